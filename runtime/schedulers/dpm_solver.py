"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models"), orders 1-3, ODE (`dpmsolver++`) and SDE (`sde-dpmsolver++`).

Works in log-SNR time lambda = log(alpha_t / sigma_t): each model output is converted to a data
prediction x0, and the step integrates exactly in lambda with the x0 history (the last 1-3
predictions) extrapolated by finite differences. Every update is linear in (sample, the stored
x0 predictions, noise), so `set_timesteps` tabulates the scalar coefficients per step and order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import F32, RandomSource, Scheduler, as_f32
from .config import (
    THRESHOLDING_FIELDS,
    Field,
    choice,
    flag,
    mapped,
    number,
    off,
    only,
    schedule_fields,
)
from .schedule import exponential_sigmas, karras_sigmas, sigma_to_t, spaced_timesteps


def _tables(sigmas: np.ndarray, sde: bool, heun: bool) -> tuple[np.ndarray, ...]:
    """Per step i (sigma_i -> sigma_{i+1}): alpha_i, sigma_i, and the coefficients
    (on sample, on x0 of step i, i-1, i-2, on noise) of the order-1, -2 and -3 updates.
    Scalars are formed in float32 in the reference's order of operations, so they round alike."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        alpha = F32(1) / np.sqrt(sigmas * sigmas + F32(1))  # VP: alpha_t^2 + sigma_t^2 = 1
        sig = sigmas * alpha
        lam = np.log(alpha) - np.log(sig)  # +inf at a final sigma of 0
        a_t, s_t, s_s = alpha[1:], sig[1:], sig[:-1]
        h = lam[1:] - lam[:-1]
        nan = np.full(1, np.nan, dtype=F32)
        h0 = np.concatenate([nan, lam[1:-1] - lam[:-2]])  # previous step's h
        h1 = np.concatenate([nan, h0[:-1]])
        r0, r1 = h0 / h, h1 / h
        if sde:
            e2 = np.exp(F32(-2.0) * h)
            ks = s_t / s_s * np.exp(-h)
            k0 = a_t * (F32(1) - e2)
            kn = s_t * np.sqrt(F32(1) - e2)
            half = a_t * ((F32(1) - e2) / (F32(-2.0) * h) + F32(1))  # weight of D1 (heun / order 3)
            d2 = -(a_t * ((F32(1) - e2 - F32(2) * h) / (F32(2) * h) ** 2 - F32(0.5)))
            mid = F32(0.5) * k0
        else:
            em = np.exp(-h) - F32(1)
            ks = s_t / s_s
            k0 = -(a_t * em)
            kn = np.zeros_like(ks)
            half = a_t * (em / h + F32(1))
            d2 = a_t * ((em + h) / (h * h) - F32(0.5))
            mid = F32(0.5) * k0
    e = half if heun else mid  # order 2: D1 = (x0_i - x0_{i-1}) / r0 with this weight
    # Expand the finite differences into weights on x0_i, x0_{i-1}, x0_{i-2} (float64 from here).
    ks, k0, kn, r0, r1 = (v.astype(np.float64) for v in (ks, k0, kn, r0, r1))
    e, half, d2 = e.astype(np.float64), half.astype(np.float64), d2.astype(np.float64)
    zero = np.zeros_like(ks)
    first = np.stack([ks, k0, zero, zero, kn], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        second = np.stack([ks, k0 + e / r0, -e / r0, zero, kn], 1)
        # Order 3: D1 = u + q (u - w), D2 = p (u - w), u = (x0_i - x0_{i-1}) / r0,
        # w = (x0_{i-1} - x0_{i-2}) / r1, q = r0 / (r0 + r1), p = 1 / (r0 + r1).
        q, p = r0 / (r0 + r1), 1 / (r0 + r1)
        b = half * q - d2 * p
        a = half + b
        third = np.stack([ks, k0 + a / r0, -a / r0 - b / r1, b / r1, kn], 1)
    return alpha, sig, first, second, third


class DPMSolverMultistep(Scheduler):
    ZERO_SNR_FLOOR = True
    FIELDS = {
        **schedule_fields(timestep_spacing="linspace", predictions=("epsilon", "sample", "v_prediction")),
        "solver_order": Field(2, choice(1, 2, 3)),
        # A DEIS config's `deis` algorithm and its solver types run as DPM-Solver++ midpoint,
        # as in the reference. (`dpmsolver` / `sde-dpmsolver`, deprecated there, are refused.)
        "algorithm_type": Field("dpmsolver++", choice("dpmsolver++", "sde-dpmsolver++", "deis")),
        "solver_type": Field(
            "midpoint",
            mapped({"midpoint": "midpoint", "heun": "heun", "logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}),
        ),
        "lower_order_final": Field(True, flag),
        "euler_at_final": Field(False, flag),
        "use_karras_sigmas": Field(False, flag),
        "use_exponential_sigmas": Field(False, flag),
        "use_lu_lambdas": Field(False, flag),
        "use_beta_sigmas": Field(False, off("beta sigmas are not implemented")),
        "use_flow_sigmas": Field(False, off("flow-matching sigmas are not implemented")),
        "use_dynamic_shifting": Field(False, off("flow-matching shifting is not implemented")),
        "flow_shift": Field(1.0, number),
        "time_shift_type": Field("exponential", choice("exponential")),
        "final_sigmas_type": Field("zero", choice("zero", "sigma_min")),
        "lambda_min_clipped": Field(-float("inf"), number),
        "variance_type": Field(None, only(None, "learned-variance outputs are not implemented")),
        **THRESHOLDING_FIELDS,
    }

    def __init__(self, params: dict[str, Any], name: str) -> None:
        if sum([params["use_karras_sigmas"], params["use_exponential_sigmas"]]) > 1:
            raise ValueError("scheduler config: use_karras_sigmas and use_exponential_sigmas are exclusive")
        if params["algorithm_type"] == "deis" and params["final_sigmas_type"] == "zero":
            # The reference checks the final sigma against the algorithm type before rewriting
            # `deis`, so DEIS configs only load with final_sigmas_type="sigma_min".
            raise ValueError(
                "scheduler config field 'final_sigmas_type': unsupported value 'zero' with algorithm_type 'deis' "
                "(expected 'sigma_min')"
            )
        super().__init__(params, name)
        self.sde = params["algorithm_type"] == "sde-dpmsolver++"

    @property
    def needs_rng(self) -> bool:
        return self.sde

    def _set_timesteps(self, n: int) -> None:
        cfg = self.config
        big = cfg["num_train_timesteps"]
        ac = self.schedule.alphas_cumprod
        train_sigmas = self.schedule.sigmas
        log_sigmas = np.log(train_sigmas)
        # 1. Timesteps: spacing over [0, last), last clipped where lambda drops below the floor.
        lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(F32(1) - ac))
        last = big - int(np.searchsorted(lam[::-1], cfg["lambda_min_clipped"]))
        ts = spaced_timesteps(cfg["timestep_spacing"], n, big, cfg["steps_offset"], last=last, drop_final=True)
        # 2. Sigmas: at those timesteps, or respaced between the training extremes (then the
        #    timesteps follow the sigmas: rounded for Karras/lambda spacing, truncated for
        #    exponential, as the reference does).
        lo, hi = float(train_sigmas[0]), float(train_sigmas[-1])
        cosine = cfg["beta_schedule"] == "squaredcos_cap_v2"
        if cfg["use_karras_sigmas"] or cfg["use_lu_lambdas"]:
            if cfg["use_karras_sigmas"]:
                sigmas = karras_sigmas(lo, hi, n)
            else:
                ramp = np.linspace(0, 1, n)
                sigmas = np.exp(float(log_sigmas[-1]) + ramp * (float(log_sigmas[0]) - float(log_sigmas[-1])))
            ts = sigma_to_t(sigmas, log_sigmas)
            ts = ts if cosine else np.round(ts)
        elif cfg["use_exponential_sigmas"]:
            sigmas = exponential_sigmas(lo, hi, n)
            ts = np.trunc(sigma_to_t(sigmas, log_sigmas))
        else:
            ts = np.round(ts)
            sigmas = np.interp(ts, np.arange(big), train_sigmas)
        # 3. Final sigma: zero, or the smallest training sigma.
        final = train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
        self.timesteps = ts.astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        alpha, sig, *orders = _tables(self.sigmas, self.sde, cfg["solver_type"] == "heun")
        self.alpha, self.sigma = alpha.tolist(), sig.tolist()
        self.coefficients = [o.tolist() for o in orders]  # [order-1][step] -> (ks, k0, k1, k2, kn)
        self.x0_history: list[np.ndarray] = []  # newest last, at most solver_order
        self.lower_order_nums = 0

    def _missing_timestep(self, t: Any) -> int:
        return len(self.timesteps) - 1  # the reference's fallback for an unknown timestep

    def _order(self, i: int) -> int:
        """Solver order for step i: limited by the history so far, and lowered at the end of short
        runs (and always for the last step to a zero sigma) for stability."""
        cfg = self.config
        total = len(self.timesteps)
        short = cfg["lower_order_final"] and total < 15
        if i == total - 1 and (cfg["euler_at_final"] or short or cfg["final_sigmas_type"] == "zero"):
            return 1
        if cfg["solver_order"] == 1 or self.lower_order_nums < 1:
            return 1
        if cfg["solver_order"] == 2 or self.lower_order_nums < 2 or (i == total - 2 and short):
            return 2
        return 3

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray, rng: RandomSource | None = None) -> np.ndarray:
        self._check_ready()
        model_output, sample = as_f32(model_output), as_f32(sample)
        # 1. Position in the schedule and the order this step runs at.
        i = self._index(t)
        order = self._order(i)
        # 2. Convert the output to a data prediction x0 at sigma_i.
        pred = self.config["prediction_type"]
        if pred == "epsilon":
            x0 = model_output * self.sigma[i]
            np.subtract(sample, x0, out=x0)
            x0 /= self.alpha[i]
        elif pred == "v_prediction":
            x0 = sample * self.alpha[i]
            x0 -= model_output * self.sigma[i]
        else:
            x0 = model_output.copy()  # kept across steps: never alias the caller's buffer
        history = self.x0_history
        history.append(x0)
        if len(history) > self.config["solver_order"]:
            del history[0]
        # 3. Noise for the SDE variant, drawn at every step like the reference.
        noise = self._noise(rng, model_output.shape) if self.sde else None
        # 4. x_{i+1} = ks x_i + k0 x0_i + k1 x0_{i-1} + k2 x0_{i-2} (+ kn noise).
        ks, *k, kn = self.coefficients[order - 1][i]
        out = sample * ks
        for j in range(order):
            out += history[-1 - j] * k[j]
        if noise is not None:
            out += noise * kn
        # 5. Advance the counters.
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config["solver_order"])
        self._step_index = i + 1
        return out

    def add_noise(self, original: np.ndarray, noise: np.ndarray, t: Any) -> np.ndarray:
        """alpha x0 + sigma noise at the run's first step (img2img), the current step, or at `t`."""
        s = self.sigmas[self._noise_indices(t)]
        alpha = F32(1) / np.sqrt(s * s + F32(1))
        return self._mix(original, noise, alpha, s * alpha)
