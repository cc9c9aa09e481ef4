"""One scheduler `step` on (2, 4, 64, 64) float32 latents: ours (numpy) vs diffusers (torch).

    python benchmarks/scheduler_step.py [--repeats N] [--runs 2] [--config sdxl|sd15] [--threads N]

Goal (issue 2): the numpy step costs no more than diffusers' torch step, and under 1 ms.

Both sides get the same inputs at the same point: the middle (step 10) of a 20-step schedule,
reached by running the first 10 steps. Every timed call starts from a snapshot of that state, so
each repeat times the same step; ours and diffusers' calls alternate, so a busy machine slows
both alike. The main table times the step as a pipeline runs it: euler-a and lcm draw fresh
noise inside `step`, ours from `TorchRandom` (torch's stream, bit for bit) or `NumpyRandom`
(numpy's own), diffusers' from a `torch.Generator`. A second table times the step with the noise
drawn in advance (the scheduler arithmetic alone), a third the draws by themselves.

Prints the tables and writes benchmarks/results/project/scheduler_step.json, one list entry per
run for every figure (median microseconds), with the tool versions and the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

from coreml_sd.contract import SD15_SCHEDULER_CONFIG
from coreml_sd.system import tool_versions

SHAPE = (2, 4, 64, 64)
STEPS, AT = 20, 10
GOAL_US = 1000.0
CONFIGS = {  # as the checkpoints' scheduler_config.json hold them (less their _diffusers_version)
    "sd15": dict(SD15_SCHEDULER_CONFIG),
    "sdxl": {
        **SD15_SCHEDULER_CONFIG, "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
        "prediction_type": "epsilon", "sample_max_value": 1.0, "timestep_spacing": "leading", "use_karras_sigmas": False,
    },
}
SEED = 0


class FixedNoise:
    """An rng whose draws are precomputed: times the scheduler, not the random generator."""

    def __init__(self, noise: np.ndarray) -> None:
        self.noise = noise

    def randn(self, shape):
        return self.noise


@contextlib.contextmanager
def reference_noise(module, noise):
    """Within the block, the reference scheduler's module draws `noise` instead of random numbers
    (its `randn_tensor`), so its step can be timed without the draw; restored on exit."""
    import torch

    if not hasattr(module, "randn_tensor"):
        yield
        return
    original = module.randn_tensor
    module.randn_tensor = lambda *args, **kwargs: torch.from_numpy(noise)
    try:
        yield
    finally:
        module.randn_tensor = original


def snapshot(obj) -> dict:
    """The scheduler's state, with lists copied (steps append to / assign into them)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(obj).items()}


def restore(obj, state: dict) -> None:
    vars(obj).clear()
    vars(obj).update({k: (list(v) if isinstance(v, list) else v) for k, v in state.items()})


def interleaved_median_us(calls: dict[str, tuple], repeats: int, warmup: int = 20) -> dict[str, float]:
    """Median microseconds of each `call()`, each preceded by its untimed `reset()`; the calls
    take turns, so load on a shared machine falls on all of them alike."""
    times: dict[str, list[int]] = {label: [] for label in calls}
    for i in range(warmup + repeats):
        for label, (call, reset) in calls.items():
            reset()
            t0 = time.perf_counter_ns()
            call()
            t1 = time.perf_counter_ns()
            if i >= warmup:
                times[label].append(t1 - t0)
    return {label: statistics.median(t) / 1e3 for label, t in times.items()}


class Case:
    """One scheduler on both sides, advanced to step AT of STEPS with identical inputs."""

    def __init__(self, name: str, config: dict) -> None:
        import diffusers
        import torch

        from coreml_sd.runtime.schedulers import SCHEDULERS, from_config

        rng = np.random.default_rng(0)
        latents = rng.standard_normal(SHAPE).astype(np.float32)
        outputs = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(STEPS + 1)]
        self.noise = rng.standard_normal(SHAPE).astype(np.float32)
        self.ours = from_config(config, name)
        spec = SCHEDULERS[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.theirs = getattr(diffusers, spec.diffusers_class).from_config(config, **spec.overrides)
        self.module = __import__(type(self.theirs).__module__, fromlist=["randn_tensor"])
        self.ours.set_timesteps(STEPS)
        self.theirs.set_timesteps(STEPS)
        self.draws_noise = self.ours.needs_rng  # (lcm's depends on the step count)
        x_ours, x_theirs = latents.copy(), torch.from_numpy(latents.copy())
        fixed = FixedNoise(self.noise)
        with reference_noise(self.module, self.noise):  # advance both with the same noise
            for i in range(AT):
                t_o, t_t = self.ours.timesteps[i], self.theirs.timesteps[i]
                x_ours = self.ours.step(outputs[i], t_o, self.ours.scale_model_input(x_ours, t_o), rng=fixed)
                x_theirs = self.theirs.step(
                    torch.from_numpy(outputs[i]), t_t, self.theirs.scale_model_input(x_theirs, t_t)
                ).prev_sample
        self.t_ours, self.t_theirs = self.ours.timesteps[AT], self.theirs.timesteps[AT]
        self.eps_ours, self.eps_theirs = outputs[AT], torch.from_numpy(outputs[AT])
        self.x_ours, self.x_theirs = np.ascontiguousarray(x_ours), x_theirs.contiguous()
        self.state_ours, self.state_theirs = snapshot(self.ours), snapshot(self.theirs)

    def reset_ours(self) -> None:
        restore(self.ours, self.state_ours)

    def reset_theirs(self) -> None:
        restore(self.theirs, self.state_theirs)

    def step_ours(self, rng):
        return self.ours.step(self.eps_ours, self.t_ours, self.x_ours, rng=rng)

    def step_theirs(self, generator=None):
        extra = {"generator": generator} if self.draws_noise else {}
        return self.theirs.step(self.eps_theirs, self.t_theirs, self.x_theirs, **extra).prev_sample

    def check(self) -> float:
        """Relative difference of one step, both sides drawing from seed SEED (same noise)."""
        import torch

        from coreml_sd.runtime.random import TorchRandom

        self.reset_ours()
        self.reset_theirs()
        ours = self.step_ours(TorchRandom(SEED))
        theirs = self.step_theirs(torch.Generator().manual_seed(SEED)).numpy()
        return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def measure(name: str, config: dict, repeats: int) -> dict:
    """One row: the step with its noise draw (both rngs), and without (noise drawn in advance)."""
    import torch

    from coreml_sd.runtime.random import NumpyRandom, TorchRandom

    case = Case(name, copy.deepcopy(config))
    error = case.check()
    assert error < 1e-5, f"{name}: ours and diffusers differ by {error:.3g} on the timed step"
    ours_torch_rng, ours_numpy_rng = TorchRandom(SEED), NumpyRandom(SEED)
    generator = torch.Generator().manual_seed(SEED)
    calls = {
        "diffusers": (lambda: case.step_theirs(generator), case.reset_theirs),
        "ours_torch_rng": (lambda: case.step_ours(ours_torch_rng), case.reset_ours),
    }
    if case.draws_noise:
        calls["ours_numpy_rng"] = (lambda: case.step_ours(ours_numpy_rng), case.reset_ours)
    with_draw = interleaved_median_us(calls, repeats)
    fixed = FixedNoise(case.noise)
    if case.draws_noise:
        with reference_noise(case.module, case.noise):
            alone = interleaved_median_us({
                "diffusers": (lambda: case.step_theirs(generator), case.reset_theirs),
                "ours": (lambda: case.step_ours(fixed), case.reset_ours),
            }, repeats)
    else:  # nothing is drawn: the step alone is the step
        alone = {"diffusers": with_draw["diffusers"], "ours": with_draw["ours_torch_rng"]}
    return {"scheduler": name, "draws_noise": case.draws_noise, "relative_error": error,
            "with_draw_us": with_draw, "step_alone_us": alone}


def measure_draws(repeats: int) -> dict[str, float]:
    """One (2, 4, 64, 64) draw by itself, each generator continuing its stream."""
    import torch

    from coreml_sd.runtime.random import NumpyRandom, TorchRandom

    torch_rng, numpy_rng, generator = TorchRandom(SEED), NumpyRandom(SEED), torch.Generator().manual_seed(SEED)
    nothing = lambda: None  # noqa: E731
    return interleaved_median_us({
        "torch.randn": (lambda: torch.randn(SHAPE, generator=generator), nothing),
        "TorchRandom.randn": (lambda: torch_rng.randn(SHAPE), nothing),
        "NumpyRandom.randn": (lambda: numpy_rng.randn(SHAPE), nothing),
    }, repeats)


def print_run(run: int, rows: list[dict], draws: dict[str, float]) -> None:
    print(f"\nrun {run}: the step as a pipeline runs it (euler-a, lcm: including the noise draw)")
    print(f"{'scheduler':<17}{'diffusers µs':>13}{'ours µs':>10}{'ratio':>7}{'  numpy rng µs':>15}{'ratio':>7}  goal")
    for r in rows:
        d, ot = r["with_draw_us"]["diffusers"], r["with_draw_us"]["ours_torch_rng"]
        met = "met" if ot <= d and ot < GOAL_US else "missed"
        if r["draws_noise"]:
            on = r["with_draw_us"]["ours_numpy_rng"]
            numpy_cols = f"{on:>15.1f}{on / d:>7.2f}"
            if met == "missed" and on <= d and on < GOAL_US:
                met = "met with numpy rng only"
        else:
            numpy_cols = f"{'(no draw)':>15}{'':>7}"
        print(f"{r['scheduler']:<17}{d:>13.1f}{ot:>10.1f}{ot / d:>7.2f}{numpy_cols}  {met}")
    print("the step alone (noise drawn in advance on both sides)")
    for r in rows:
        if r["draws_noise"]:
            d, o = r["step_alone_us"]["diffusers"], r["step_alone_us"]["ours"]
            print(f"{r['scheduler']:<17}{d:>13.1f}{o:>10.1f}{o / d:>7.2f}")
    print(f"one {SHAPE} draw: " + ", ".join(f"{k} {v:.1f} µs" for k, v in draws.items()))


def record(args, runs: list[tuple[list[dict], dict[str, float]]]) -> dict:
    """The JSON record: per scheduler, each figure as a list with one entry per run."""
    import torch

    from coreml_sd.runtime.random import detect_variant

    def per_run(figures: list[dict[str, float]], key: str) -> list[float]:
        return [round(f[key], 1) for f in figures]

    rows = []
    for i, r in enumerate(runs[0][0]):
        with_draw = [rows_[i]["with_draw_us"] for rows_, _ in runs]  # this scheduler's, one per run
        row = {"scheduler": r["scheduler"], "draws_noise": r["draws_noise"],
               "relative_error_vs_diffusers": float(f"{r['relative_error']:.3g}"),
               "diffusers_us": per_run(with_draw, "diffusers")}
        # Without a draw the rng plays no part: one "ours" figure.
        for key in ("ours_torch_rng", "ours_numpy_rng") if r["draws_noise"] else ("ours_torch_rng",):
            label = key if r["draws_noise"] else "ours"
            row[f"{label}_us"] = per_run(with_draw, key)
            row[f"ratio_{label}"] = [round(o / d, 2) for o, d in zip(row[f"{label}_us"], row["diffusers_us"])]
        if r["draws_noise"]:
            alone = [rows_[i]["step_alone_us"] for rows_, _ in runs]
            row["step_alone_us"] = {k: per_run(alone, k) for k in ("diffusers", "ours")}
        rows.append(row)
    return {
        "benchmark": "scheduler_step",
        "latents": list(SHAPE),
        "config": args.config,
        "timed_step": f"{AT} of {STEPS}",
        "statistic": f"median of {args.repeats} interleaved calls, microseconds; one list entry per run",
        "goal": "ours <= diffusers and ours < 1000 us, noise draw included",
        "torch_threads": torch.get_num_threads(),
        "torch_rng_variant": detect_variant(),
        "machine": platform.platform(),
        "rows": rows,
        "draw_us": {k: per_run([draws_ for _, draws_ in runs], k) for k in runs[0][1]},
        "tools": tool_versions(("coreml-sd", "torch", "diffusers", "numpy")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--runs", type=int, default=2, help="measure everything this many times")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sdxl")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "project" / "scheduler_step.json")
    args = parser.parse_args()

    import diffusers
    import torch

    from coreml_sd.runtime.schedulers import SCHEDULER_NAMES

    diffusers.utils.logging.set_verbosity_error()  # it logs every config field a class ignores
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"step {AT} of {STEPS}, latents {SHAPE} float32, {args.config} config, median of {args.repeats}; "
          f"torch threads {torch.get_num_threads()}")
    runs = []
    for run in range(1, args.runs + 1):
        rows = [measure(name, CONFIGS[args.config], args.repeats) for name in SCHEDULER_NAMES]
        draws = measure_draws(args.repeats)
        print_run(run, rows, draws)
        runs.append((rows, draws))
    data = record(args, runs)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(args.json)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
