"""One scheduler `step` on (2, 4, 64, 64) float32 latents: ours (numpy) vs diffusers (torch).

    python benchmarks/scheduler_step.py [--repeats N] [--config sd15|sdxl]

Both sides get the same inputs at the same point: the middle (step 10) of a 20-step schedule,
reached by running the first 10 steps. Each timed call starts from a snapshot of that state, so
every repeat times the same step. Noise-injecting schedulers (euler-a, lcm) draw noise inside
`step`; the main columns time the step with that noise pre-drawn (the scheduler's own cost), and
a second table times the random draws themselves (`TorchRandom` vs `torch.randn`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import numpy as np

SHAPE = (2, 4, 64, 64)
STEPS, AT = 20, 10
CONFIGS = {
    "sd15": {
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
    },
    "sdxl": {
        "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
    },
}
REFERENCE = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lcm": ("LCMScheduler", {}),
}


class FixedNoise:
    """An rng whose draws are precomputed: times the scheduler, not the random generator."""

    def __init__(self, noise: np.ndarray) -> None:
        self.noise = noise

    def randn(self, shape):
        return self.noise


def snapshot(obj) -> dict:
    """The scheduler's state, with lists copied (steps append to / assign into them)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(obj).items()}


def restore(obj, state: dict) -> None:
    vars(obj).clear()
    vars(obj).update({k: (list(v) if isinstance(v, list) else v) for k, v in state.items()})


def median_us(call, reset, repeats: int, warmup: int = 20) -> float:
    times = []
    for i in range(warmup + repeats):
        reset()
        t0 = time.perf_counter_ns()
        call()
        t1 = time.perf_counter_ns()
        if i >= warmup:
            times.append(t1 - t0)
    return statistics.median(times) / 1e3


def bench(name: str, config: dict, repeats: int) -> tuple[float, float]:
    import diffusers
    import torch

    from coreml_sd.runtime.schedulers import from_config

    rng = np.random.default_rng(0)
    latents = rng.standard_normal(SHAPE).astype(np.float32)
    outputs = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(STEPS + 1)]
    noise = rng.standard_normal(SHAPE).astype(np.float32)

    ours = from_config(config, name)
    cls, extra = REFERENCE[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(diffusers, cls).from_config(config, **extra)
    ours.set_timesteps(STEPS)
    theirs.set_timesteps(STEPS)
    # The reference draws its noise through `randn_tensor`; hand it the same pre-drawn tensor.
    module = __import__(type(theirs).__module__, fromlist=["randn_tensor"])
    if hasattr(module, "randn_tensor"):
        module.randn_tensor = lambda *a, **k: torch.from_numpy(noise)

    x_ours, x_theirs = latents.copy(), torch.from_numpy(latents.copy())
    fixed = FixedNoise(noise)
    for i in range(AT):  # advance both to the middle of the schedule
        t_o, t_t = ours.timesteps[i], theirs.timesteps[i]
        x_ours = ours.step(outputs[i], t_o, ours.scale_model_input(x_ours, t_o), rng=fixed)
        x_theirs = theirs.step(torch.from_numpy(outputs[i]), t_t, theirs.scale_model_input(x_theirs, t_t)).prev_sample
    t_o, t_t = ours.timesteps[AT], theirs.timesteps[AT]
    eps_o, eps_t = outputs[AT], torch.from_numpy(outputs[AT])
    x_ours, x_theirs = np.ascontiguousarray(x_ours), x_theirs.contiguous()
    state_o, state_t = snapshot(ours), snapshot(theirs)

    us_ours = median_us(lambda: ours.step(eps_o, t_o, x_ours, rng=fixed), lambda: restore(ours, state_o), repeats)
    us_theirs = median_us(lambda: theirs.step(eps_t, t_t, x_theirs), lambda: restore(theirs, state_t), repeats)
    # Same inputs, same answer (up to float32 rounding).
    restore(ours, state_o)
    restore(theirs, state_t)
    a, b = ours.step(eps_o, t_o, x_ours, rng=fixed), theirs.step(eps_t, t_t, x_theirs).prev_sample.numpy()
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), name
    return us_ours, us_theirs


def bench_rng(repeats: int) -> list[tuple[str, float]]:
    import torch

    rows = []
    try:
        from coreml_sd.runtime.random import TorchRandom

        r = TorchRandom(0)
        rows.append(("TorchRandom.randn (ours)", median_us(lambda: r.randn(SHAPE), lambda: None, max(repeats // 10, 10), 3)))
    except ImportError:
        rows.append(("TorchRandom.randn (ours)", float("nan")))
    g = torch.Generator().manual_seed(0)
    rows.append(("torch.randn (diffusers)", median_us(lambda: torch.randn(SHAPE, generator=g), lambda: None, repeats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sdxl")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()

    import torch

    from coreml_sd.runtime.schedulers import SCHEDULER_NAMES

    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # it logs every config field a class ignores
    if args.threads:
        torch.set_num_threads(args.threads)
    config = CONFIGS[args.config]
    print(f"step {AT} of {STEPS}, latents {SHAPE} float32, {args.config} config, median of {args.repeats}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'scheduler':<17}{'ours µs':>10}{'diffusers µs':>14}{'ratio':>8}")
    for name in SCHEDULER_NAMES:
        ours, theirs = bench(name, copy.deepcopy(config), args.repeats)
        print(f"{name:<17}{ours:>10.1f}{theirs:>14.1f}{ours / theirs:>8.2f}")
    print("\nnoise draw for euler-a / lcm (not in the table above):")
    for label, us in bench_rng(args.repeats):
        print(f"  {label:<28}{us:>10.1f} µs")


if __name__ == "__main__":
    main()
