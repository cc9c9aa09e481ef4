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
  (avx_mathfun.h), compiled by GCC with 20 mul+add pairs contracted to FMA; emulated exactly by
  ``Avx2Kernel`` in float64 work arrays (0.26 ms for (1, 4, 64, 64) here, torch 0.04 ms).
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
# Box-Muller rows per pass of the AVX2 kernel: 64 KB per float64 work array (0.8 MB in all), so
# they stay in cache; a (1, 4, 64, 64) draw is one pass.
_ROWS = 1024


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


# The AVX2 kernel emulated in float64 arrays that hold float32 values. A float32 product is exact
# in float64 (48 bits), and a float32 +, - or * done in float64 and then rounded to float32 gives
# the float32 result (double rounding is innocuous when 53 >= 2 * 24 + 2). A fused multiply-add is
# one float64 add of the exact product, then rounding to float32: right unless the float64 sum was
# inexact and landed exactly on a float32 rounding midpoint, where the second rounding can go the
# wrong way. The kernels use `fma_into`, which does not repair that case: their inputs are the
# 2**24 possible uniforms, and over all of them no fused step of either kernel meets it
# (tests/runtime/test_random.py checks every one, with the hazard test and repair it would need).


def round32(x: np.ndarray, f32: np.ndarray) -> np.ndarray:
    """Round float64 `x` to float32 precision in place, through the float32 scratch `f32`."""
    np.copyto(f32, x, casting="same_kind")
    np.copyto(x, f32)
    return x


def fma_into(a, b, c, out: np.ndarray, f32: np.ndarray) -> np.ndarray:
    """out = fused float32 a*b + c, for float32 values held in float64; `out` may be `a` or `b`,
    not `c`. Exact except at the double-rounding hazard described above."""
    np.multiply(a, b, out=out)
    out += c
    return round32(out, f32)


class Avx2Kernel:
    """torch's AVX2 Box-Muller (avx_mathfun.h's log256_ps and sincos256_ps, GCC's FMA contractions)
    on up to `rows` rows of 16 uniforms at a time.

    Every intermediate lives in arrays allocated once here and reused by every call: fresh
    temporaries on each draw made glibc map and return memory over and over (in a process that
    has not yet freed a large block, its mmap/trim thresholds stay at 128 KB), and the page
    faults tripled the cost of a (2, 4, 64, 64) draw. `fma` is the fused multiply-add to use.
    """

    def __init__(self, rows: int, fma=fma_into) -> None:
        n = 8 * rows  # elements per half-row array
        self.rows = rows
        self.fma = fma
        self._f64 = [np.empty(n, F64) for _ in range(8)]
        self._u64 = [np.empty(n, np.uint64) for _ in range(3)]
        self._f32 = [np.empty(n, F32) for _ in range(4)]

    def _buffers(self, n: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        return [b[:n] for b in self._f64], [b[:n] for b in self._u64], [b[:n] for b in self._f32]

    def log(self, u: np.ndarray) -> np.ndarray:
        """log256_ps of float32 `u` (1-D, normal, > 0), as float32 values in a float64 work array
        (valid until the next call): u = m 2**e, m in [sqrt(1/2), sqrt 2), polynomial in m - 1."""
        (e, m, x, z, y, t, *_), (mask, *_), (f32, *_) = self._buffers(len(u))
        fma = self.fma
        bits = u.view(np.uint32)
        e[:] = bits >> 23
        e -= 126.0  # exponent + 1, exact
        m[:] = ((bits & 0x807FFFFF) | 0x3F000000).view(F32)  # mantissa with exponent of 0.5: [0.5, 1)
        small = m < float(_SQRTHF)
        e -= small
        np.subtract(m, 1.0, out=x)  # exact
        np.negative(small, dtype=np.int64, out=mask.view(np.int64))
        x += np.bitwise_and(m.view(np.uint64), mask, out=t.view(np.uint64)).view(F64)  # m < sqrt(1/2): 2m - 1
        round32(x, f32)  # ... with one float32 rounding
        round32(np.multiply(x, x, out=z), f32)
        fma(x, float(_LOG_P[0]), float(_LOG_P[1]), y, f32)
        for p in _LOG_P[2:]:  # Horner: every step fused
            fma(y, x, float(p), y, f32)
        round32(np.multiply(e, float(_LOG_Q1), out=t), f32)
        round32(np.multiply(y, x, out=y), f32)
        fma(y, z, t, y, f32)  # y*x rounded; y*z fused with the rounded e*q1
        y -= np.multiply(z, 0.5, out=t)  # fused in the binary too, but z*0.5 is exact: one rounding
        round32(y, f32)
        round32(np.add(x, y, out=t), f32)
        return fma(e, float(_LOG_Q2), t, y, f32)  # e*q2 fused (exact anyway) onto the rounded x + y

    def sincos(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """sincos256_ps of float32 `t` (1-D), as float32 values in float64 work arrays (valid until
        the next call): octant j from |t| * 4/pi, Cody-Waite reduction, two polynomials, signs."""
        (y, x, tmp, z, yc, ys, ys_sin, yc_sin), (sin_sign, cos_sign, sin_poly), (f32, *_) = self._buffers(len(t))
        fma = self.fma
        tb = t.view(np.uint32)
        ax = (tb & 0x7FFFFFFF).view(F32)
        j = (((ax * _FOPI).astype(np.int32) + 1) & ~1).astype(np.uint32)  # truncate, round up to even
        y[:] = j
        sin_sign[:] = (tb & 0x80000000) ^ ((j & 4) << 29)
        sin_sign <<= np.uint64(32)  # float32 sign bit -> float64 sign bit
        cos_sign[:] = (~(j - np.uint32(2)) & 4) << 29
        cos_sign <<= np.uint64(32)
        np.negative((j & 2) == 0, dtype=np.int64, out=sin_poly.view(np.int64))  # all ones: sine polynomial
        x[:] = ax
        for dp in _MINUS_DP:  # x - y*pi/4, each product fused into its add
            x, tmp = fma(y, float(dp), x, tmp, f32), x
        round32(np.multiply(x, x, out=z), f32)
        fma(z, float(_COS_P[0]), float(_COS_P[1]), yc, f32)
        fma(yc, z, float(_COS_P[2]), yc, f32)
        round32(np.multiply(z, yc, out=tmp), f32)
        fma(z, tmp, np.multiply(z, -0.5, out=yc), tmp, f32)  # z*yc rounded, then z*(.) - z/2 fused
        yc, tmp = round32(np.add(tmp, 1.0, out=tmp), f32), yc
        fma(z, float(_SIN_P[0]), float(_SIN_P[1]), ys, f32)
        fma(ys, z, float(_SIN_P[2]), ys, f32)
        round32(np.multiply(z, ys, out=tmp), f32)
        fma(x, tmp, x, ys, f32)  # z*ys rounded, then x*(.) + x fused
        # The kernel selects with and-masks, subtractions and adds; mirrored for identical signed zeros.
        np.bitwise_and(ys.view(np.uint64), sin_poly, out=ys_sin.view(np.uint64))
        np.bitwise_and(yc.view(np.uint64), np.invert(sin_poly, out=sin_poly), out=yc_sin.view(np.uint64))
        sin = round32(np.add(yc_sin, ys_sin, out=x), f32)
        sin.view(np.uint64)[:] ^= sin_sign
        round32(np.subtract(ys, ys_sin, out=ys), f32)
        round32(np.subtract(yc, yc_sin, out=yc), f32)
        cos = round32(np.add(ys, yc, out=ys), f32)
        cos.view(np.uint64)[:] ^= cos_sign
        return sin, cos

    def box_muller(self, u: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Torch's 16-element Box-Muller on the rows of a (k, 16) float32 uniform array, k <= rows,
        into `out` (may be `u`)."""
        n = 8 * len(u)
        _, _, (_, u1, t, radius) = self._buffers(n)  # float32; the first is round32's scratch
        np.subtract(_ONE, u[:, :8], out=u1.reshape(-1, 8))  # [0, 1) -> (0, 1], exact
        np.multiply(_TWO_PI_F, u[:, 8:], out=t.reshape(-1, 8))  # float32 product with float(2 pi)
        np.copyto(radius, self.log(u1), casting="same_kind")
        radius *= _MINUS_TWO
        np.sqrt(radius, out=radius)
        sin, cos = self.sincos(t)
        np.copyto(u1, cos, casting="same_kind")  # u1 and t are free again: float32 cos and sin
        np.copyto(t, sin, casting="same_kind")
        # fma(n, std=1, mean=0) is exact: n + 0, which also turns -0 into +0.
        np.multiply(radius.reshape(-1, 8), u1.reshape(-1, 8), out=out[:, :8])
        np.multiply(radius.reshape(-1, 8), t.reshape(-1, 8), out=out[:, 8:])
        out += F32(0)
        return out


def _box_muller16_scalar(u: np.ndarray, libm: Libm) -> np.ndarray:
    """Torch's scalar-build Box-Muller on rows of a (k, 16) float32 uniform array."""
    u1 = _ONE - u[:, :8]  # [0, 1) -> (0, 1], exact
    u2 = u[:, 8:]
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
    ``CorrectlyRoundedLibm``). One stream, one caller at a time: calls from two threads at once
    would interleave the stream (as with a torch generator) and share the kernel's work arrays.
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
        self._kernel: Avx2Kernel | None = None  # work arrays, allocated on the first large avx2 draw

    def _words(self, n: int) -> np.ndarray:
        return self._mt.random_raw(n).astype(np.uint32)

    def _uniform_f32(self, n: int) -> np.ndarray:
        return (self._words(n) & 0xFFFFFF).astype(F32) * F32(2.0**-24)  # exact

    def randn(self, shape: tuple[int, ...] | int) -> np.ndarray:
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        n = math.prod(shape)
        if n >= 16:
            out = self._uniform_f32(n)
            blocks = out[: n - n % 16].reshape(-1, 16)
            for i in range(0, len(blocks), _ROWS):
                self._box_muller16(blocks[i : i + _ROWS])  # in place
            if n % 16:  # torch recomputes the last 16 outputs from 16 fresh uniforms
                out[n - 16:] = self._box_muller16(self._uniform_f32(16).reshape(1, 16)).ravel()
        else:
            out = np.array([self._normal_double() for _ in range(n)], dtype=F64).astype(F32)
        return out.reshape(shape)

    def _box_muller16(self, u: np.ndarray) -> np.ndarray:
        """Torch's 16-element Box-Muller, in place on the rows of a (k, 16) float32 uniform array."""
        if self.variant == "scalar":
            u[:] = _box_muller16_scalar(u, self.libm)
            return u
        if self._kernel is None:
            self._kernel = Avx2Kernel(_ROWS)
        return self._kernel.box_muller(u, out=u)

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
