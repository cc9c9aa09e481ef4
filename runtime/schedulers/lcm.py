"""Latent Consistency Model multistep sampling (Luo et al. 2023, "Latent Consistency Models",
Algorithm 3).

Each step maps the sample straight to a clean estimate through the consistency function
f(x, t) = c_skip(t) x + c_out(t) x0(x, t), then (except at the last step) re-noises that estimate
to the next timestep with fresh Gaussian noise. Timesteps are a subset of the distillation
schedule: `original_inference_steps` evenly spaced training timesteps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import RandomSource, Scheduler, as_f32
from .config import THRESHOLDING_FIELDS, Field, count, flag, positive, schedule_fields
from .ddim import combine, x0_eps_coefficients

SIGMA_DATA = 0.5  # the consistency-model boundary-condition constant


class LCM(Scheduler):
    FIELDS = {
        **schedule_fields(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",  # read and checked, but the LCM schedule ignores it
            predictions=("epsilon", "sample", "v_prediction"),
        ),
        "original_inference_steps": Field(50, count),
        "clip_sample": Field(False, flag),
        "clip_sample_range": Field(1.0, positive),
        "set_alpha_to_one": Field(True, flag),
        "timestep_scaling": Field(10.0, positive),
        **THRESHOLDING_FIELDS,
    }

    def __init__(self, params: dict[str, Any], name: str) -> None:
        super().__init__(params, name)
        self.final_alpha_cumprod = 1.0 if params["set_alpha_to_one"] else self.schedule.alphas_cumprod_list[0]

    @property
    def needs_rng(self) -> bool:
        return (self.num_inference_steps or 0) > 1

    def _set_timesteps(self, n: int) -> None:
        big, original = self.config["num_train_timesteps"], self.config["original_inference_steps"]
        if original > big:
            raise ValueError(f"LCM: original_inference_steps={original} exceeds num_train_timesteps={big}")
        if n > original:
            raise ValueError(f"LCM: {n} steps exceed original_inference_steps={original}")
        # The distillation schedule: every k-th training timestep, ending at k - 1; then n of them
        # picked at evenly spaced (floored) positions from the top.
        k = big // original
        distill = (np.arange(1, original + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, len(distill), num=n, endpoint=False)).astype(np.int64)
        self.timesteps = distill[picks].astype(np.int64)

    def boundary_scalings(self, t: float) -> tuple[float, float]:
        """(c_skip, c_out) of the consistency parameterisation at timestep t."""
        scaled = t * self.config["timestep_scaling"]
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        return c_skip, c_out

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray, rng: RandomSource | None = None) -> np.ndarray:
        self._check_ready()
        model_output, sample = as_f32(model_output), as_f32(sample)
        # 1. Position in the schedule and the next timestep (the same one at the end).
        i = self._index(t)
        t = int(t)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        last = i == self.num_inference_steps - 1
        # 2. Signal levels at t and at the next timestep.
        ac = self.schedule.alphas_cumprod_list
        a = ac[t]
        a_prev = ac[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        # 3. Boundary-condition scalings.
        c_skip, c_out = self.boundary_scalings(t)
        # 4. Predicted x0 = xs*sample + xm*output (xs, xm from the parameterisation).
        xs, xm, _, _ = x0_eps_coefficients(self.config["prediction_type"], a)
        # 5. + 6. Clamp x0 if asked, then the consistency estimate c_out x0 + c_skip x; scaled
        #    by sqrt(a_prev) here unless this is the last step.
        k = 1.0 if last else a_prev**0.5
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x = combine(sample, xs, model_output, xm)
            np.clip(x, -r, r, out=x)
            x *= c_out * k
            x += sample * (c_skip * k)
        else:
            x = combine(sample, (c_out * xs + c_skip) * k, model_output, c_out * xm * k)
        # 7. Re-noise to the next timestep with fresh noise (not at the last step).
        if not last:
            x += self._noise(rng, model_output.shape) * (1 - a_prev) ** 0.5
        self._step_index = i + 1
        return x
