"""Seeded Gaussian noise in numpy: torch's CPU ``randn`` reproduced bit for bit, or plain numpy.

``TorchRandom(seed).randn(shape)`` equals ``torch.randn(shape, generator=torch.Generator()
.manual_seed(seed))`` (float32), and successive calls continue one generator's stream, so a seed
gives the same starting latents here as in a torch pipeline. Facts below are from torch 2.13's
ATen headers and its Linux x86-64 wheel (disassembled), and are checked against torch in the tests.

Generator: mt19937, seeded like ``std::mt19937`` from the seed's low 32 bits (torch takes seeds in
[-2**63, 2**64) and wraps negatives mod 2**64; 2**32 + 5 draws like 5). A float uniform is
``(w & 0xFFFFFF) * 2**-24`` from one 32-bit word w; a double one is the low 53 bits of
``(w1 << 32) | w2`` times 2**-53.

* numel >= 16: fill n float uniforms, then Box-Muller on each block of 16, in float32: with
  u1 = 1 - u[0:8], u2 = u[8:16], out[0:8] = r cos(t), out[8:16] = r sin(t), r = sqrt(-2 log u1)
  (log, not log1p), t = 2 pi u2; each output goes through fma(n, std=1, mean=0).
  When n % 16 != 0, 16 fresh uniforms replace the last 16 outputs (words used: n, or n + 16).
* numel < 16: per element, in double: u1, u2; r = sqrt(-2 log1p(-u2)), t = 2 pi u1; return
  r cos(t) and cache r sin(t) in the generator for the next small-path element (the large path
  neither reads nor clears it). Rounded to float32 only at the end.

The block transform has two builds, hence ``variant``:

* ``"avx2"``: x86-64 with AVX2 + FMA, also on AVX-512 CPUs (torch registers no AVX-512 normal
  kernel and falls back to AVX2). Float32 Cephes-style ``log256_ps``/``sincos256_ps`` polynomials
  (avx_mathfun.h), compiled by GCC with 20 mul+add pairs contracted to FMA; emulated exactly.
* ``"scalar"``: every other build (Apple Silicon, ``ATEN_CPU_CAPABILITY=default``): float32
  ``logf`` and ``sincosf`` (the compiler merges sin and cos) from the platform libm, with
  t = float(double(2 pi) * u2), no FMA contraction. By default we call the very same functions
  (``PlatformLibm``: the C library's logf/sincosf through ctypes), exact wherever torch links the
  platform libm: checked here against glibc; on macOS it is Apple's libm, which torch calls there
  too, checked by the same test run on a Mac. ``CorrectlyRoundedLibm`` (numpy, float64 rounded
  once) is the fallback when the C library cannot be loaded; glibc's logf/sincosf are not
  correctly rounded, so against glibc it differs in about 1.5% of elements by 1-3 ulps. The
  small path calls Python's ``math``, i.e. the platform libm torch uses.

``NumpyRandom`` is numpy's own PCG64 normal stream; ``make_rng`` picks one by name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import operator
import os
import platform
from typing import Protocol

import numpy as np

F32, F64 = np.float32, np.float64
VARIANTS = ("auto", "avx2", "scalar")


def _c(bits: int) -> np.float32:
    """A float32 constant from its bit pattern (read from torch's compiled AVX2 kernel)."""
    return np.array(bits, dtype=np.uint32).view(F32)[()]


_ONE, _HALF, _MINUS_TWO, _SQRTHF = F32(1), F32(0.5), F32(-2), _c(0x3F3504F3)
_LOG_P = [_c(b) for b in (0x3D9021BB, 0xBDEBD1B8, 0x3DEF251A, 0xBDFE5D4F, 0x3E11E9BF,
                          0xBE2AAE50, 0x3E4CCEAC, 0xBE7FFFFC, 0x3EAAAAAA)]
_LOG_Q1, _LOG_Q2 = _c(0xB95E8083), _c(0x3F318000)
_FOPI, _TWO_PI_F = _c(0x3FA2F983), _c(0x40C90FDB)  # 4/pi; float(2 pi) used by the AVX2 kernel
_MINUS_DP = [_c(b) for b in (0xBF490000, 0xB97DA000, 0xB3222169)]  # -pi/4 in three pieces
_COS_P = [_c(b) for b in (0x37CCF5CE, 0xBAB6061A, 0x3D2AAAA5)]
_SIN_P = [_c(b) for b in (0xB94CA1F9, 0x3C08839E, 0xBE2AAAA3)]
_TWO_PI = 2.0 * math.pi  # the scalar kernel's 2.0f * pi<double>, a double


class Libm(Protocol):
    """Float32 elementary functions for the scalar kernel (element-wise on float32 arrays)."""

    def log(self, x: np.ndarray) -> np.ndarray: ...
    def sincos(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class CorrectlyRoundedLibm:
    """logf/sinf/cosf as float64 numpy results rounded once to float32: the correctly rounded
    value except in the ~2**-29 of cases where the double lands within an ulp of a midpoint."""

    def log(self, x: np.ndarray) -> np.ndarray:
        return np.log(x.astype(F64)).astype(F32)

    def sincos(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x64 = x.astype(F64)
        return np.sin(x64).astype(F32), np.cos(x64).astype(F32)


class _SinCos(ctypes.Structure):
    _fields_ = [("sin", ctypes.c_float), ("cos", ctypes.c_float)]


class PlatformLibm:
    """The C library's own ``logf`` and ``sincosf``, called through ctypes one element at a time
    (a few ms for a 64x64 latent): the functions torch's scalar kernel calls. glibc exports
    ``sincosf``; Apple's libm, where clang merges sin and cos, ``__sincosf_stret``."""

    def __init__(self, path: str | None = None):
        lib = ctypes.CDLL(path or ctypes.util.find_library("m") or ctypes.util.find_library("c"))
        self._logf = lib.logf
        self._logf.restype, self._logf.argtypes = ctypes.c_float, [ctypes.c_float]
        fp = ctypes.POINTER(ctypes.c_float)
        if hasattr(lib, "sincosf"):
            self._sincosf = lib.sincosf
            self._sincosf.restype, self._sincosf.argtypes = None, [ctypes.c_float, fp, fp]
            self._stret = None
        else:  # Apple: struct {float sin, cos} returned by value
            self._stret = lib.__sincosf_stret
            self._stret.restype, self._stret.argtypes = _SinCos, [ctypes.c_float]

    @classmethod
    def load(cls) -> PlatformLibm | None:
        """The platform libm, or None when it cannot be loaded (then use CorrectlyRoundedLibm)."""
        try:
            return cls()
        except (OSError, AttributeError, TypeError):
            return None

    def log(self, x: np.ndarray) -> np.ndarray:
        f = self._logf
        return np.array([f(v) for v in x.ravel().tolist()], F32).reshape(x.shape)

    def sincos(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = x.ravel().tolist()
        if self._stret is not None:
            pairs = [(r.sin, r.cos) for r in map(self._stret, values)]
        else:
            s, c, f, pairs = ctypes.c_float(), ctypes.c_float(), self._sincosf, []
            ps, pc = ctypes.byref(s), ctypes.byref(c)
            for v in values:
                f(v, ps, pc)
                pairs.append((s.value, c.value))
        out = np.array(pairs, F32).reshape(*x.shape, 2)
        return out[..., 0], out[..., 1]


def _fma32(a, b, c) -> np.ndarray:
    """Fused float32 a*b + c, rounded once. a*b is exact in float64 (48 bits); the float64 sum
    rounds once more, and rounding that to float32 gives the fused result except where the sum
    landed exactly on a float32 rounding midpoint (low 29 bits 1000...0) while inexact: only there
    is the sum rounded to odd instead (error-free TwoSum gives the side of the true value)."""
    shape = np.broadcast_shapes(np.shape(a), np.shape(b), np.shape(c))
    p = np.atleast_1d(np.multiply(a, b, dtype=F64))
    s = np.atleast_1d(np.add(p, c, dtype=F64))  # one float64 rounding
    bits = s.view(np.int64)
    tie = (bits & 0x1FFFFFFF) == 0x10000000
    if tie.any():  # rare: fix just these elements
        c64 = np.broadcast_to(np.asarray(c, dtype=F64), s.shape)
        p = np.broadcast_to(p, s.shape)
        idx = np.nonzero(tie)
        ps, cs, ss = p[idx], c64[idx], s[idx]
        bv = ss - ps
        err = (ps - (ss - bv)) + (cs - bv)
        nudge = np.where(err == 0, 0, np.where((err > 0) == (ss > 0), 1, -1))
        bits = bits.copy()
        bits[idx] += nudge
    return bits.view(F64).astype(F32).reshape(shape)


def _log_avx2(x: np.ndarray) -> np.ndarray:
    """log256_ps for normal x > 0: x = m 2**e, m in [sqrt(1/2), sqrt 2), polynomial in m - 1."""
    bits = x.view(np.uint32)
    e = ((bits >> 23).astype(np.int32) - 127).astype(F32) + _ONE
    m = ((bits & 0x807FFFFF) | 0x3F000000).view(F32)  # mantissa with exponent of 0.5: [0.5, 1)
    small = m < _SQRTHF
    e = e - np.where(small, _ONE, F32(0))
    x = (m - _ONE) + np.where(small, m, F32(0))  # m < sqrt(1/2): use 2m - 1, one rounding
    z = x * x
    y = _LOG_P[0]
    for p in _LOG_P[1:]:  # Horner: every step fused
        y = _fma32(y, x, p)
    y = _fma32(y * x, z, e * _LOG_Q1)  # y*x rounded; y*z fused with the rounded e*q1
    y = y - z * _HALF  # fused in the binary too, but z*0.5 is exact so one rounding either way
    return _fma32(e, _LOG_Q2, x + y)  # e*q2 fused (exact anyway) onto the rounded x + y


def _sincos_avx2(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sincos256_ps: octant j from |t| * 4/pi, Cody-Waite reduction, two polynomials, signs."""
    tb = t.view(np.uint32)
    ax = (tb & 0x7FFFFFFF).view(F32)
    j = (((ax * _FOPI).astype(np.int32) + 1) & ~1).astype(np.uint32)  # truncate, round up to even
    y = j.astype(F32)
    sin_sign = (tb & 0x80000000) ^ ((j & 4) << 29)
    cos_sign = (~(j - np.uint32(2)) & 4) << 29
    use_sin_poly = (j & 2) == 0
    x = ax
    for dp in _MINUS_DP:  # x - y*pi/4, each product fused into its add
        x = _fma32(y, dp, x)
    z = x * x
    yc = _fma32(_fma32(_COS_P[0], z, _COS_P[1]), z, _COS_P[2])
    yc = _fma32(z, z * yc, -(z * _HALF)) + _ONE  # z*yc rounded, then z*(.) - z/2 fused
    ys = _fma32(_fma32(_SIN_P[0], z, _SIN_P[1]), z, _SIN_P[2])
    ys = _fma32(x, z * ys, x)  # z*ys rounded, then x*(.) + x fused
    ys_sin = np.where(use_sin_poly, ys, F32(0))  # the kernel selects with masks, subtractions
    yc_sin = np.where(use_sin_poly, F32(0), yc)  # and adds; mirrored for identical signed zeros
    sin = (yc_sin + ys_sin).view(np.uint32) ^ sin_sign
    cos = ((ys - ys_sin) + (yc - yc_sin)).view(np.uint32) ^ cos_sign
    return sin.view(F32), cos.view(F32)


def _box_muller16(u: np.ndarray, variant: str, libm: Libm) -> np.ndarray:
    """Torch's 16-element Box-Muller on rows of a (k, 16) float32 uniform array."""
    u1 = _ONE - u[:, :8]  # [0, 1) -> (0, 1], exact
    u2 = u[:, 8:]
    if variant == "avx2":
        log = _log_avx2(u1)
        sin, cos = _sincos_avx2(_TWO_PI_F * u2)  # float32 product with float(2 pi)
    else:
        log = libm.log(u1)
        sin, cos = libm.sincos((u2.astype(F64) * _TWO_PI).astype(F32))  # double product, rounded
    radius = np.sqrt(_MINUS_TWO * log)
    # fma(n, std=1, mean=0) is exact: n + 0, which also turns -0 into +0.
    return np.concatenate([radius * cos, radius * sin], axis=1) + F32(0)


def _x86_has_avx2_fma() -> bool:
    """What torch's cpuinfo check asks (AVX2 and FMA3). Read from /proc/cpuinfo on Linux;
    elsewhere assumed true (every x86 Mac that runs a current macOS has both)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), None)
    except OSError:
        flags = None
    return flags is None or {"avx2", "fma"} <= set(flags)


def detect_variant() -> str:
    """The kernel torch would run here: honours ATEN_CPU_CAPABILITY as torch does."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "scalar"
    forced = os.environ.get("ATEN_CPU_CAPABILITY")  # torch compares case-sensitively
    if forced in ("avx2", "avx512", "default"):
        return "scalar" if forced == "default" else "avx2"
    return "avx2" if _x86_has_avx2_fma() else "scalar"


def _seed64(seed: int) -> int:
    """Torch's accepted seed range, negatives wrapped mod 2**64 as torch does."""
    seed = operator.index(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed {seed} is outside torch's range [-2**63, 2**64)")
    return seed % 2**64


class TorchRandom:
    """``torch.randn`` (float32, CPU generator) in numpy; see the module docstring.

    ``variant``: "auto" (what torch runs here, see ``detect_variant``), "avx2" or "scalar".
    ``libm``: logf/sincosf for the scalar variant (default ``PlatformLibm``, else
    ``CorrectlyRoundedLibm``).
    """

    def __init__(self, seed: int, variant: str = "auto", libm: Libm | None = None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        self.seed = _seed64(seed)
        self.variant = detect_variant() if variant == "auto" else variant
        if libm is None and self.variant == "scalar":
            libm = PlatformLibm.load()
        self.libm = libm or CorrectlyRoundedLibm()
        # mt19937 seeded like std::mt19937(seed & 0xFFFFFFFF); numpy's legacy seeding is the same.
        key = np.random.RandomState(self.seed & 0xFFFFFFFF).get_state()[1]
        self._mt = np.random.MT19937()
        self._mt.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
        self._cached_normal: float | None = None  # torch's next_double_normal_sample

    def _words(self, n: int) -> np.ndarray:
        return self._mt.random_raw(n).astype(np.uint32)

    def _uniform_f32(self, n: int) -> np.ndarray:
        return (self._words(n) & 0xFFFFFF).astype(F32) * F32(2.0**-24)  # exact

    def randn(self, shape: tuple[int, ...] | int) -> np.ndarray:
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        n = math.prod(shape)
        if n >= 16:
            out = self._uniform_f32(n)
            full = n - n % 16
            out[:full] = _box_muller16(out[:full].reshape(-1, 16), self.variant, self.libm).ravel()
            if n % 16:  # torch recomputes the last 16 outputs from 16 fresh uniforms
                tail = self._uniform_f32(16).reshape(1, 16)
                out[n - 16:] = _box_muller16(tail, self.variant, self.libm).ravel()
        else:
            out = np.array([self._normal_double() for _ in range(n)], dtype=F64).astype(F32)
        return out.reshape(shape)

    def _normal_double(self) -> float:
        """One serial double Box-Muller sample, with torch's one-sample cache."""
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value * 1.0 + 0.0  # transformation::normal(x, mean=0, std=1)
        w = self._words(4).astype(np.uint64)
        u1, u2 = (float(((hi & 0x1FFFFF) << 32) | lo) * 2.0**-53 for hi, lo in (w[:2], w[2:]))
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = r * math.sin(theta)
        return r * math.cos(theta) * 1.0 + 0.0


class NumpyRandom:
    """Standard normals from numpy's ``Generator(PCG64(seed))``, as float32. Not torch's stream;
    seeds take the same range as ``TorchRandom`` (negatives wrapped mod 2**64)."""

    def __init__(self, seed: int):
        self.seed = _seed64(seed)
        self._gen = np.random.Generator(np.random.PCG64(self.seed))

    def randn(self, shape: tuple[int, ...] | int) -> np.ndarray:
        return self._gen.standard_normal(shape, dtype=F32)


def make_rng(seed: int, kind: str = "torch") -> TorchRandom | NumpyRandom:
    """A random source by name: "torch" (matches torch.randn for the seed) or "numpy"."""
    if kind == "torch":
        return TorchRandom(seed)
    if kind == "numpy":
        return NumpyRandom(seed)
    raise ValueError(f"unknown rng kind {kind!r}; expected 'torch' or 'numpy'")
