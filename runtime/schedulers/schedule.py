"""The noise schedule every scheduler shares: betas -> alphas_cumprod -> sigmas, timestep spacing,
and the sigma-space helpers (Karras / exponential / log-lambda spacings, sigma -> timestep).

Everything here runs once per `from_config` or `set_timesteps`, never per step. The training
schedule is built in float32 the way the torch reference builds it (same linspace arithmetic,
cumulative product accumulated in float64 and rounded once), so our `alphas_cumprod` is
bit-identical to the reference's.

Square roots (sigmas, sqrt(alpha-bar), ...) are numpy's, IEEE correctly rounded. torch's Linux
x86-64 wheels take float sqrt and `x ** 0.5` from MKL's vector math, which is not: about one value
in five is an ulp away (190 of SD's 1000 training sigmas). Runs that cancel magnify that ulp (a
zero-SNR first step from sigma 4096, Euler-ancestral's sigma_down at 2 steps, a one-step PNDM
transfer from alpha-bar 4e-5) up to 2e-4 relative there; with a correctly rounded sqrt on the
torch side every case of the parity sweep agrees within 6e-6 (tests/runtime/test_schedulers.py).
Mirroring MKL is not an option: its rounding is undocumented and varies with the CPU, and torch
does not use it on Apple silicon.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace with the reference's rounding: float32 step, start + i*step (one rounding,
    as a fused multiply-add) for the first half and end - (steps-1-i)*step for the second."""
    a, b = F32(start), F32(end)
    if steps == 1:
        return np.array([a], dtype=F32)
    step = np.float64((b - a) / F32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    out = np.where(i < steps // 2, np.float64(a) + step * i, np.float64(b) - step * (steps - 1 - i))
    return out.astype(F32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """Cumulative product accumulated in float64, rounded to float32 once per element."""
    return np.cumprod(x.astype(np.float64)).astype(F32)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """`squaredcos_cap_v2`: betas from the squared-cosine alpha-bar curve (Nichol & Dhariwal)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=F32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has zero signal (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1), in float32."""
    root = np.sqrt(cumprod_f32(F32(1) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root * root
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return (F32(1) - alphas).astype(F32)


class NoiseSchedule:
    """The training noise schedule of a checkpoint, from the config's beta fields.

    `alphas_cumprod[t]` is the signal fraction at discrete training timestep t (ascending t means
    more noise); `sigmas[t] = sqrt((1 - a) / a)` is the same noise level in k-diffusion units.
    """

    def __init__(self, cfg: dict, *, zero_snr_floor: bool = False) -> None:
        n = cfg["num_train_timesteps"]
        if cfg["trained_betas"] is not None:
            betas = cfg["trained_betas"]
        elif cfg["beta_schedule"] == "linear":
            betas = linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
        elif cfg["beta_schedule"] == "scaled_linear":
            betas = linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
        else:  # squaredcos_cap_v2 (config.py admits nothing else)
            betas = cosine_betas(n)
        if cfg.get("rescale_betas_zero_snr", False):
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = cumprod_f32(F32(1) - betas)
        if cfg.get("rescale_betas_zero_snr", False) and zero_snr_floor:
            # Sigma-based schedulers keep the terminal sigma finite: alpha-bar = fp16's smallest
            # subnormal instead of exactly zero.
            alphas_cumprod[-1] = 2.0**-24
        self.num_train_timesteps = n
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        # Python floats for the per-step scalar lookups (indexing a list is cheaper than numpy).
        self.alphas_cumprod_list = alphas_cumprod.tolist()

    @property
    def sigmas(self) -> np.ndarray:
        """float32 sigma per training timestep, ascending with t."""
        a = self.alphas_cumprod
        return np.sqrt((F32(1) - a) / a)


def spaced_timesteps(
    spacing: str,
    num_inference_steps: int,
    num_train_timesteps: int,
    steps_offset: int = 0,
    *,
    last: int | None = None,
    drop_final: bool = False,
) -> np.ndarray:
    """Descending float64 inference timesteps for a `timestep_spacing` (Lin et al. 2023, Table 2).

    `linspace` values are left unrounded (discrete schedulers round them, Euler keeps fractions);
    `steps_offset` applies to `leading` only. DPM-Solver lays out one extra point and drops the
    lowest one (`drop_final`) and may clip the top of the range (`last`).
    """
    n, big = num_inference_steps, num_train_timesteps
    top = big if last is None else last
    points = n + 1 if drop_final else n
    if spacing == "linspace":
        ts = np.linspace(0, top - 1, points)[::-1]
    elif spacing == "leading":
        ts = (np.arange(points) * (top // points)).astype(np.float64)[::-1]
    elif spacing == "trailing":
        # np.arange with a float step sometimes yields one extra point (e.g. n=61: ..., -1):
        # the reference has the same quirk and we keep it for parity.
        return np.round(np.arange(top, 0, -big / n)) - 1
    else:  # config.py admits nothing else
        raise ValueError(f"timestep_spacing: unsupported value {spacing!r}")
    if drop_final:
        ts = ts[:-1]
    if spacing == "leading":
        ts = ts + steps_offset
    return ts.copy()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: n sigmas spaced evenly in sigma^(1/rho), high to low."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas spaced evenly in log sigma, high to low."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma between the
    two neighbouring training sigmas (`log_sigmas` ascending with t), clamped to the table."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]  # the table's dtype: lo - hi rounds like it
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)
