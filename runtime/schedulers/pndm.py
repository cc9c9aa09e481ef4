"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds").

Each model output is turned into a transfer x_t -> x_{t-d} along the DDIM manifold (paper eq. 9).
The outputs fed to it are combined either by a Runge-Kutta scheme (PRK: four evaluations per
step, used for the first three steps to warm up) or by a 4th-order linear multistep rule (PLMS).
With `skip_prk_steps` the warm-up is a Heun-like second evaluation at the first step instead.

This is a state machine driven by a call counter, not by `t`: it replays the reference's exact
sequence of `(timestep, prev_timestep, combined output)`, including at an img2img start.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import F32, RandomSource, Scheduler, as_f32
from .config import Field, flag, schedule_fields
from .schedule import spaced_timesteps

PRK_STEPS = 4  # the warm-up runs over the last PRK_STEPS spaced timesteps


class PNDM(Scheduler):
    FIELDS = {
        **schedule_fields(timestep_spacing="leading", predictions=("epsilon", "v_prediction"), zero_snr=False),
        "skip_prk_steps": Field(False, flag),
        "set_alpha_to_one": Field(False, flag),
    }

    def __init__(self, params: dict[str, Any], name: str) -> None:
        super().__init__(params, name)
        self.final_alpha_cumprod = 1.0 if params["set_alpha_to_one"] else self.schedule.alphas_cumprod_list[0]
        self.v_prediction = params["prediction_type"] == "v_prediction"

    def _set_timesteps(self, n: int) -> None:
        cfg = self.config
        big = cfg["num_train_timesteps"]
        spaced = self._spaced(n)  # ascending int64
        self.stride = big // n  # timestep distance of one step
        if cfg["skip_prk_steps"]:
            # The first timestep twice (second evaluation of the warm-up step), then the rest.
            plms = np.concatenate([spaced[:-1], spaced[-2:-1], spaced[-1:]])[::-1]
            self.prk_timesteps = np.zeros(0, dtype=np.int64)
        else:
            if n < PRK_STEPS:
                raise ValueError(f"PNDM with skip_prk_steps=false needs at least {PRK_STEPS} steps, got {n}")
            # Runge-Kutta over the top PRK_STEPS timesteps, each visited at t, t-d/2, t-d/2, t-d.
            half = np.tile([0, self.stride // 2], PRK_STEPS)
            nodes = spaced[-PRK_STEPS:].repeat(2) + half
            self.prk_timesteps = nodes[:-1].repeat(2)[1:-1][::-1].copy()
            plms = spaced[:-3][::-1]
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self.counter = 0
        self.ets: list[np.ndarray] = []  # past model outputs, oldest first
        self.cur_sample: np.ndarray | None = None
        self.rk_sum: np.ndarray | None = None  # running Runge-Kutta combination
        self._scalar_cache: dict[tuple[int, int], tuple[float, ...]] = {}

    def _spaced(self, n: int) -> np.ndarray:
        cfg = self.config
        ts = spaced_timesteps(cfg["timestep_spacing"], n, cfg["num_train_timesteps"], cfg["steps_offset"])
        return np.round(ts[::-1]).astype(np.int64)

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray, rng: RandomSource | None = None) -> np.ndarray:
        self._check_ready()
        model_output, sample = as_f32(model_output), as_f32(sample)
        if self.counter < len(self.prk_timesteps):
            out = self._step_prk(model_output, int(t), sample)
        else:
            out = self._step_plms(model_output, int(t), sample)
        self.counter += 1
        return out

    def _step_prk(self, eps: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        # 1. Within each group of four calls, odd calls land on t itself, even ones half a stride
        #    below it; all four transfer from the group's first node and its sample.
        phase = self.counter % 4
        prev_t = t - (0 if self.counter % 2 else self.stride // 2)
        t_from = int(self.prk_timesteps[self.counter // 4 * 4])
        # 2. Accumulate the RK4 combination (1/6, 1/3, 1/3, 1/6); the last call transfers with it.
        if phase == 0:
            self.rk_sum = eps * (1 / 6)
            self.ets.append(eps)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.rk_sum = self.rk_sum + eps * (1 / 3)
        else:
            eps = self.rk_sum + eps * (1 / 6)
            self.rk_sum = None
        start = self.cur_sample if self.cur_sample is not None else sample
        # 3. Transfer from the group's first node to prev_t.
        return self._transfer(start, t_from, prev_t, eps)

    def _step_plms(self, eps: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        if not self.config["skip_prk_steps"] and len(self.ets) < 3:
            raise RuntimeError("PNDM: the PLMS phase needs the 12 Runge-Kutta calls to run first")
        # 1. Target one stride below t; the second warm-up call (counter 1) instead redoes the
        #    first step: from t + stride down to t.
        prev_t = t - self.stride
        if self.counter != 1:
            self.ets = self.ets[-3:] + [eps]
        else:
            prev_t, t = t, t + self.stride
        # 2. Combine past outputs: Euler, then Heun (average with the first output, restarting
        #    from the saved sample), then Adams-Bashforth of order 2, 3 and 4.
        e = self.ets
        if len(e) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(e) == 1 and self.counter == 1:
            eps = (eps + e[-1]) * 0.5
            sample, self.cur_sample = self.cur_sample, None
        elif len(e) == 2:
            eps = e[-1] * 1.5 - e[-2] * 0.5
        elif len(e) == 3:
            eps = e[-1] * (23 / 12) - e[-2] * (16 / 12) + e[-3] * (5 / 12)
        else:
            eps = e[-1] * (55 / 24) - e[-2] * (59 / 24) + e[-3] * (37 / 24) - e[-4] * (9 / 24)
        # 3. Transfer along the DDIM manifold with the combined output.
        return self._transfer(sample, t, prev_t, eps)

    def _transfer(self, sample: np.ndarray, t: int, prev_t: int, out: np.ndarray) -> np.ndarray:
        """PNDM eq. 9: x' = sqrt(a'/a) x - (a' - a) eps / (a sqrt(1-a') + sqrt(a (1-a) a'))."""
        ks, kv_out, kv_sample, num, den = self._transfer_scalars(t, prev_t)
        if self.v_prediction:
            out = out * kv_out + sample * kv_sample  # eps = sqrt(a) v + sqrt(1-a) x
        # Same float32 operations in the same order as the reference: at large steps the two
        # terms nearly cancel, and only identical roundings then give identical results.
        eps = out * num
        eps /= den
        return np.subtract(sample * ks, eps, out=eps)

    def _transfer_scalars(self, t: int, prev_t: int) -> tuple[float, ...]:
        """The float32 scalars of a (t, prev_t) transfer, computed once per pair per run."""
        key = (t, prev_t)
        if key not in self._scalar_cache:
            ac = self.schedule.alphas_cumprod
            a = ac[t]
            a_prev = ac[prev_t] if prev_t >= 0 else F32(self.final_alpha_cumprod)
            b, b_prev = F32(1) - a, F32(1) - a_prev
            ks = np.sqrt(a_prev / a)
            den = a * np.sqrt(b_prev) + np.sqrt(a * b * a_prev)
            self._scalar_cache[key] = (float(ks), float(np.sqrt(a)), float(np.sqrt(b)), float(a_prev - a), float(den))
        return self._scalar_cache[key]
