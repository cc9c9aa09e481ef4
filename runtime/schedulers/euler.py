"""Euler and Euler-ancestral samplers in sigma space (Karras et al. 2022, Algorithm 1 with no churn;
the ancestral variant is k-diffusion's `sample_euler_ancestral`).

The latent is x = x0 + sigma * eps (so it starts at `init_noise_sigma`), the UNet sees
x / sqrt(sigma^2 + 1), and one step follows the ODE derivative d = (x - x0) / sigma from sigma_i to
sigma_{i+1}. The ancestral variant steps down to sigma_down and adds fresh noise of size sigma_up.
`set_timesteps` tabulates the per-step float32 scalars; a step is a handful of array operations.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import F32, RandomSource, Scheduler, as_f32
from .config import Field, choice, flag, off, optional_positive, schedule_fields
from .schedule import exponential_sigmas, karras_sigmas, linspace_f32, sigma_to_t, spaced_timesteps


class _SigmaScheduler(Scheduler):
    """Shared by Euler and Euler-ancestral: sigma table, input scaling, step counter, add_noise."""

    ZERO_SNR_FLOOR = True
    TIMESTEP_DTYPE = np.float32

    def _finish(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        """Store the schedule (`sigmas` has one more entry than `timesteps`: the final sigma)."""
        self.timesteps = timesteps.astype(np.float32)
        s = self.sigmas = sigmas.astype(np.float32)
        # Per-step float32 scalars, rounded as the reference rounds them.
        self.sigmas_list = s.tolist()
        self.var_list = (s * s + F32(1)).tolist()  # sigma^2 + 1
        scale = np.sqrt(s * s + F32(1))
        self.input_scale = scale.tolist()  # sqrt(sigma^2 + 1)
        self.v_out = (-s / scale).tolist()  # x0 weight on a v-prediction

    def _derivative_step(self, i: int, model_output: np.ndarray, sample: np.ndarray, dt: float) -> np.ndarray:
        """sample + dt * (sample - x0) / sigma_i, with x0 predicted from the model output.

        For epsilon, (sample - x0) / sigma is the output itself and the step is one fused
        multiply-add. For v / sample the float32 operations run in the reference's order: with a
        large step the result is much smaller than the sample (the sample's share cancels), so
        only the same sequence of roundings reproduces the reference's result."""
        pred = self.config["prediction_type"]
        if pred == "epsilon":
            out = model_output * dt
            out += sample
            return out
        # 1. x0 from the output: v -> x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1); sample -> itself.
        if pred == "v_prediction":
            x0 = model_output * self.v_out[i]
            x0 += sample / self.var_list[i]
        else:
            x0 = model_output.copy()
        # 2. ODE derivative (x - x0) / sigma, 3. Euler step of dt.
        np.subtract(sample, x0, out=x0)
        x0 /= self.sigmas_list[i]
        x0 *= dt
        x0 += sample
        return x0

    @property
    def init_noise_sigma(self) -> float:
        top = self.sigmas.max() if self.num_inference_steps else self.schedule.sigmas.max()
        if self.config["timestep_spacing"] == "leading":
            return float(np.sqrt(top * top + F32(1)))
        return float(top)

    def scale_model_input(self, sample: np.ndarray, t: Any = None) -> np.ndarray:
        return as_f32(sample) / self.input_scale[self._index(t)]

    def add_noise(self, original: np.ndarray, noise: np.ndarray, t: Any) -> np.ndarray:
        """x0 + sigma * noise at the run's first step (img2img) or current step (inpainting);
        found from `t` when no begin index was set."""
        sigma = self.sigmas[self._noise_indices(t)]
        return self._mix(original, noise, np.ones_like(sigma), sigma)


class Euler(_SigmaScheduler):
    FIELDS = {
        **schedule_fields(
            timestep_spacing="linspace", predictions=("epsilon", "v_prediction", "sample", "original_sample")
        ),
        "interpolation_type": Field("linear", choice("linear", "log_linear")),
        "use_karras_sigmas": Field(False, flag),
        "use_exponential_sigmas": Field(False, flag),
        "use_beta_sigmas": Field(False, off("beta sigmas are not implemented")),
        "sigma_min": Field(None, optional_positive),
        "sigma_max": Field(None, optional_positive),
        "timestep_type": Field("discrete", choice("discrete", "continuous")),
        "final_sigmas_type": Field("zero", choice("zero", "sigma_min")),
    }

    def __init__(self, params: dict[str, Any], name: str) -> None:
        if params["use_karras_sigmas"] and params["use_exponential_sigmas"]:
            raise ValueError("scheduler config: use_karras_sigmas and use_exponential_sigmas are exclusive")
        super().__init__(params, name)

    def _set_timesteps(self, n: int) -> None:
        cfg = self.config
        big = cfg["num_train_timesteps"]
        timesteps = spaced_timesteps(cfg["timestep_spacing"], n, big, cfg["steps_offset"]).astype(np.float32)
        train_sigmas = self.schedule.sigmas
        log_sigmas = np.log(train_sigmas)
        # 1. Sigma at each timestep, or a log-linear ramp (of n+1 sigmas: the reference's layout).
        if cfg["interpolation_type"] == "linear":
            sigmas = np.interp(timesteps, np.arange(big), train_sigmas)
        else:
            sigmas = np.exp(linspace_f32(log_sigmas[-1], log_sigmas[0], n + 1))
        # 2. Optionally respace between the ends of that range; timesteps follow the sigmas.
        if cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]:
            lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(sigmas[-1])
            hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(sigmas[0])
            respace = karras_sigmas if cfg["use_karras_sigmas"] else exponential_sigmas
            sigmas = respace(lo, hi, n)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        # 3. The final sigma: zero (fully denoised) or the smallest training sigma.
        last = train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
            timesteps = np.log(sigmas[:-1]) * F32(0.25)  # EDM-style c_noise input
        self._finish(timesteps, sigmas)
        self.dt = (self.sigmas[1:] - self.sigmas[:-1]).tolist()

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray, rng: RandomSource | None = None) -> np.ndarray:
        self._check_ready()
        # 1. Position in the schedule: sigma_i -> sigma_{i+1}.
        i = self._index(t)
        # 2. x0 from the output, derivative (x - x0) / sigma_i, Euler step to sigma_{i+1}.
        out = self._derivative_step(i, as_f32(model_output), as_f32(sample), self.dt[i])
        # 3. Advance the counter.
        self._step_index = i + 1
        return out


class EulerAncestral(_SigmaScheduler):
    FIELDS = schedule_fields(timestep_spacing="linspace", predictions=("epsilon", "v_prediction"))

    @property
    def needs_rng(self) -> bool:
        return True

    def _set_timesteps(self, n: int) -> None:
        cfg = self.config
        big = cfg["num_train_timesteps"]
        timesteps = spaced_timesteps(cfg["timestep_spacing"], n, big, cfg["steps_offset"]).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(big), self.schedule.sigmas)
        self._finish(timesteps, np.concatenate([sigmas, [0.0]]))
        # Split each move s_from -> s_to into a deterministic step down to s_down and fresh noise
        # of size s_up, with s_down^2 + s_up^2 = s_to^2 (float32, as the reference; s_down is
        # clamped at 0 where rounding makes s_to^2 - s_up^2 negative: the reference gives NaN).
        s_from, s_to = self.sigmas[:-1], self.sigmas[1:]
        s_up = np.sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from))
        s_down = np.sqrt(np.maximum(s_to * s_to - s_up * s_up, F32(0)))
        self.sigma_up = s_up.tolist()
        self.dt = (s_down - s_from).tolist()

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray, rng: RandomSource | None = None) -> np.ndarray:
        self._check_ready()
        # 1. Position in the schedule: sigma_i -> sigma_{i+1}.
        i = self._index(t)
        model_output = as_f32(model_output)
        # 2. Fresh noise, drawn at every step (the last one too, where s_up = 0), so the random
        #    stream advances exactly as the reference's.
        noise = self._noise(rng, model_output.shape)
        # 3. Euler step down to sigma_down, then add noise of size sigma_up.
        out = self._derivative_step(i, model_output, as_f32(sample), self.dt[i])
        out += noise * self.sigma_up[i]
        # 4. Advance the counter.
        self._step_index = i + 1
        return out
