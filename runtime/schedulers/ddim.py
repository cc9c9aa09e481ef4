"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), deterministic (eta = 0).

Each step predicts the clean latent x0 and the noise eps from the model output, then re-noises x0
to the previous timestep along the same eps (paper eq. 12 with sigma_t = 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import RandomSource, Scheduler, as_f32
from .config import THRESHOLDING_FIELDS, Field, flag, positive, schedule_fields
from .schedule import spaced_timesteps


def x0_eps_coefficients(prediction_type: str, alpha_prod: float) -> tuple[float, float, float, float]:
    """(xs, xm, es, em) with x0 = xs*sample + xm*output and eps = es*sample + em*output, for a
    model output of the given parameterisation at signal level alpha_prod (= alpha-bar_t)."""
    sa, sb = alpha_prod**0.5, (1 - alpha_prod) ** 0.5
    if prediction_type == "epsilon":
        return 1 / sa, -sb / sa, 0.0, 1.0
    if prediction_type == "sample":
        return 0.0, 1.0, 1 / sb, -sa / sb
    return sa, -sb, sb, sa  # v_prediction: v = sqrt(a) eps - sqrt(1-a) x0


def combine(a: np.ndarray, ka: float, b: np.ndarray, kb: float) -> np.ndarray:
    """ka*a + kb*b as a new float32 array, skipping a zero term."""
    if ka == 0.0:
        return b * kb
    out = a * ka
    if kb != 0.0:
        out += b * kb
    return out


class DDIM(Scheduler):
    FIELDS = {
        **schedule_fields(timestep_spacing="leading", predictions=("epsilon", "sample", "v_prediction")),
        "clip_sample": Field(True, flag),
        "clip_sample_range": Field(1.0, positive),
        "set_alpha_to_one": Field(True, flag),
        **THRESHOLDING_FIELDS,
    }

    def __init__(self, params: dict[str, Any], name: str) -> None:
        super().__init__(params, name)
        self.final_alpha_cumprod = 1.0 if params["set_alpha_to_one"] else self.schedule.alphas_cumprod_list[0]

    def _set_timesteps(self, n: int) -> None:
        cfg = self.config
        if n > cfg["num_train_timesteps"]:
            raise ValueError(f"DDIM: {n} steps exceed num_train_timesteps={cfg['num_train_timesteps']}")
        ts = spaced_timesteps(cfg["timestep_spacing"], n, cfg["num_train_timesteps"], cfg["steps_offset"])
        self.timesteps = np.round(ts).astype(np.int64)
        self.stride = cfg["num_train_timesteps"] // n

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray, rng: RandomSource | None = None) -> np.ndarray:
        self._check_ready()
        model_output, sample = as_f32(model_output), as_f32(sample)
        # 1. The previous timestep is one stride below t (whatever the spacing).
        t = int(t)
        prev_t = t - self.stride
        # 2. Signal levels at t and at the previous timestep (past the end: 1 or alpha-bar_0).
        ac = self.schedule.alphas_cumprod_list
        a = ac[t]
        a_prev = ac[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        # 3. Predicted x0 and eps as linear combinations of (sample, model output).
        xs, xm, es, em = x0_eps_coefficients(self.config["prediction_type"], a)
        # 4. + 5. x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps; with clipping x0 is formed
        #    and clamped first, otherwise the two combinations fold into one.
        ka, ke = a_prev**0.5, (1 - a_prev) ** 0.5
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = combine(sample, xs, model_output, xm)
            np.clip(x0, -r, r, out=x0)
            x0 *= ka
            x0 += combine(sample, es * ke, model_output, em * ke)
            return x0
        return combine(sample, ka * xs + ke * es, model_output, ka * xm + ke * em)
