"""The benchmark harness behind ``coreml-sd bench``.

Each compute unit is measured in a child process of its own: its first model load is truly
cold, its peak memory is its own, and a configuration that crashes or runs out of memory is
recorded as failed (with the reason) while the others still run. The child times every stage
through the pipeline's own timings; the parent adds machine, software and bundle descriptions
and writes one record (see schema.py and benchmarks/README.md).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..runtime.backends import COMPUTE_UNITS, default_backend, require
from ..runtime.bundle import open_bundle
from . import energy, machine
from .schema import SCHEMA_VERSION

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
SEED = 0
GUIDANCE = 7.5
SCHEDULER = "dpmpp-2m-karras"


def _stats(values_s: list[float]) -> dict[str, float | int]:
    ms = np.asarray(values_s, dtype=np.float64) * 1000
    q1, q3 = np.percentile(ms, [25, 75])
    return {"median": round(float(np.median(ms)), 3), "iqr": round(float(q3 - q1), 3), "count": len(ms)}


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure(bundle_path: str, backend: str, compute_units: str, steps: int, runs: int, warmup: int,
            scheduler: str, measure_energy: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """One configuration, in this process (the child)."""
    from ..runtime.pipeline import Pipeline

    tag = f"[{backend} {compute_units}]"
    bundle = open_bundle(bundle_path)  # hash verification happens here, outside the load timings
    t = time.perf_counter()
    Pipeline(bundle, backend, compute_units, reduce_memory=False)
    load_cold = time.perf_counter() - t
    t = time.perf_counter()
    pipe = Pipeline(bundle, backend, compute_units, reduce_memory=False)
    load_warm = time.perf_counter() - t
    log(f"{tag} loaded: cold {load_cold:.2f}s, warm {load_warm:.2f}s")

    sampler = energy.PowerSampler() if measure_energy else None
    measured, windows, unet, host = [], [], [], []
    try:
        for r in range(warmup + runs):
            t = time.perf_counter()
            run = pipe.start(PROMPT, steps=steps, guidance_scale=GUIDANCE, scheduler=scheduler, seed=SEED)
            loop = [time.monotonic()]
            for _ in run:
                pass
            loop.append(time.monotonic())
            result = run.finish()
            end_to_end = time.perf_counter() - t
            kind = "warm-up" if r < warmup else "run"
            log(f"{tag} {kind} {r + 1}/{warmup + runs}: {end_to_end:.2f}s, {steps / (loop[1] - loop[0]):.2f} it/s")
            if r < warmup:
                continue
            timings = result.timings
            unet += timings.unet
            host += timings.host
            windows.append((loop[0], loop[1]))
            measured.append({
                "end_to_end_s": round(end_to_end, 4),
                "text_encoder_s": round(timings.text_encoder, 4),
                "denoise_s": round(sum(timings.unet) + sum(timings.host), 4),
                "vae_decoder_s": round(timings.vae_decoder, 4),
            })
    finally:
        samples = sampler.stop() if sampler else None
    denoise = statistics.median(m["denoise_s"] for m in measured)
    record: dict[str, Any] = {
        "compute_units": compute_units,
        "backend": backend,
        "status": "ok",
        "error": None,
        "load_cold_s": round(load_cold, 3),
        "load_warm_s": round(load_warm, 3),
        "text_encoder_s": round(statistics.median(m["text_encoder_s"] for m in measured), 4),
        "unet_ms_per_step": _stats(unet),
        "host_ms_per_step": _stats(host),
        "vae_decoder_s": round(statistics.median(m["vae_decoder_s"] for m in measured), 4),
        "denoise_s": round(denoise, 4),
        "end_to_end_s": round(statistics.median(m["end_to_end_s"] for m in measured), 4),
        "runs": measured,
        "iterations_per_second": round(steps / denoise, 4),
        "peak_rss_bytes": _peak_rss(),
        "energy": None,
    }
    if samples:
        joules = energy.joules(samples, windows)
        n = steps * runs
        record["energy"] = {f"{unit}_j_per_step": round(j / n, 4) for unit, j in joules.items()} | {"sampler": "powermetrics"}
    return record


def _child(args: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Run one configuration in a child process; a failure becomes a 'failed' result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "coreml_sd.benchmarks.bench", json.dumps({**args, "out": str(out)})],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        tail: list[str] = []
        assert proc.stderr is not None
        for line in proc.stderr:  # progress lines pass through live; the rest is kept for errors
            line = line.rstrip("\n")
            if line.startswith("["):
                log(line)
            elif line.strip():
                tail = (tail + [line])[-20:]
        code = proc.wait()
        if code == 0 and out.exists():
            return json.loads(out.read_text())
        if code < 0:
            reason = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
        else:
            # The child's last line is the exception ("pkg.module.SomeError: message"): keep the message.
            reason = re.sub(r"^[\w.]*(Error|Exception): ", "", tail[-1]) if tail else f"exit status {code}"
        log(f"[{args['backend']} {args['compute_units']}] failed: {reason}")
        return {"compute_units": args["compute_units"], "backend": args["backend"], "status": "failed", "error": reason}


def bundle_info(path: str) -> dict[str, Any]:
    bundle = open_bundle(path)
    manifest = bundle.manifest or {}
    components = {
        name: {"precision": entry.get("precision"), "compression": entry.get("compression")}
        for name, entry in manifest.get("components", {}).items()
    } or {name: {"precision": None, "compression": None} for name in bundle.models}
    digest = hashlib.sha256((bundle.path / "manifest.json").read_bytes()).hexdigest() if bundle.manifest else None
    return {
        "model": bundle.name,
        "layout": bundle.layout,
        "family": bundle.family,
        "image_size": list(bundle.image_size),
        "attention": manifest.get("attention"),
        "unet_batch": bundle.unet_batch,
        "components": components,
        "manifest_sha256": digest,
    }


def software() -> dict[str, str]:
    # The installed distribution's version: importing coremltools here would only print its
    # platform warnings into the user's terminal.
    from importlib.metadata import version

    return {"coreml-sd": __version__, "coremltools": version("coremltools"), "numpy": np.__version__,
            "python": platform.python_version()}


def run_bench(bundle: str, compute_units: list[str], backend: str, steps: int, runs: int, warmup: int,
              scheduler: str = SCHEDULER, measure_energy: bool | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every configuration asked for and return the record."""
    backend = default_backend() if backend == "auto" else backend
    require(backend)  # a backend this system lacks is the user's error, not a failed measurement
    if backend == "mil":
        compute_units = ["CPU_ONLY"]  # the mil backend computes on the CPU, whatever is asked
    why_not = energy.available()
    if measure_energy is None:
        measure_energy = why_not is None
    if why_not and measure_energy:
        log(f"energy: not measured ({why_not})")
        measure_energy = False
    info = bundle_info(bundle)
    results = []
    for units in compute_units:
        log(f"[{backend} {units}] starting: {warmup} warm-up + {runs} runs of {steps} steps")
        results.append(_child({"bundle": str(Path(bundle).resolve()), "backend": backend, "compute_units": units,
                               "steps": steps, "runs": runs, "warmup": warmup, "scheduler": scheduler,
                               "energy": measure_energy}, log))
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "coreml-sd", "version": __version__},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine.probe(),
        "software": software(),
        "bundle": info,
        "settings": {"prompt": PROMPT, "negative_prompt": "", "seed": SEED, "steps": steps, "guidance_scale": GUIDANCE,
                     "scheduler": scheduler, "runs": runs, "warmup": warmup, "backend": backend, "rng": "torch"},
        "results": results,
    }


def _main() -> None:
    """Child entry point: one configuration, result written as JSON to args['out']."""
    args = json.loads(sys.argv[1])
    if args["compute_units"] not in COMPUTE_UNITS:
        raise SystemExit(f"unknown compute units {args['compute_units']}")
    result = measure(args["bundle"], args["backend"], args["compute_units"], args["steps"], args["runs"],
                     args["warmup"], args["scheduler"], args["energy"], lambda line: print(line, file=sys.stderr, flush=True))
    Path(args["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    _main()
