"""The benchmark harness behind ``coreml-sd bench``.

Each compute unit (at each image size asked for, where a bundle has several) is measured in a
child process of its own: its first model load is truly cold, its peak memory is its own, and a
configuration that crashes or runs out of memory is recorded as failed (with the reason) while
the others still run. The child imports the backend
first (timed apart as ``import_s``), then times every stage through the pipeline's own timings;
the parent checks the bundle before measuring, reads the machine and its conditions (before and
after), adds software and bundle descriptions and returns one record (see schema.py and
benchmarks/README.md). Ctrl-C keeps the configurations that finished, marked ``interrupted``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..runtime.backends import COMPUTE_UNITS, default_backend, require
from ..runtime.bundle import Bundle, open_bundle
from ..system import import_coremltools, peak_rss_bytes
from . import energy, machine
from .schema import SCHEMA_VERSION

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
SEED = 0
GUIDANCE = 7.5
SCHEDULER = "dpmpp-2m-karras"
# Modules a backend imports on first use, besides coremltools itself. The child imports them
# before the cold-load timer starts: importing coremltools (and torch, for mil) takes seconds and
# is not model loading.
BACKEND_MODULES = {
    "coreml": ("coreml_sd.runtime.pipeline", "coreml_sd.runtime.backends.coreml"),
    "mil": ("coreml_sd.runtime.pipeline", "coremltools.converters.mil.frontend.milproto.load",
            "coremltools.converters.mil.mil.types", "coreml_sd.runtime.backends.mil"),
}


def _stats(values_s: list[float]) -> dict[str, float | int]:
    ms = np.asarray(values_s, dtype=np.float64) * 1000
    q1, q3 = np.percentile(ms, [25, 75])
    return {"median": round(float(np.median(ms)), 3), "iqr": round(float(q3 - q1), 3), "count": len(ms)}


def import_backend(backend: str) -> float:
    """Import everything ``backend`` needs to load a model; the seconds it took."""
    t = time.perf_counter()
    import_coremltools()  # the runtime's way: without the lines it logs on import off macOS
    for module in BACKEND_MODULES[backend]:
        importlib.import_module(module)
    return time.perf_counter() - t


def measure(bundle_path: str, backend: str, compute_units: str, steps: int, runs: int, warmup: int,
            scheduler: str, measure_energy: bool, log: Callable[[str], None], size: tuple[int, int] | None = None,
            tag: str | None = None) -> dict[str, Any]:
    """One configuration, in this process (the child): at ``size`` (height, width; None: the
    bundle's first), whose UNet and VAE functions are the ones loaded, cold and warm."""
    tag = tag or f"[{backend} {compute_units}]"
    import_s = import_backend(backend)
    from ..runtime.pipeline import Pipeline
    from ..runtime.request import check_setup

    bundle = open_bundle(bundle_path)  # hash verification happens here, outside the load timings
    bundle = bundle.at(*size) if size is not None else bundle
    check_setup(bundle, backend, purpose="bench")
    t = time.perf_counter()
    Pipeline(bundle, backend, compute_units, reduce_memory=False)
    load_cold = time.perf_counter() - t
    t = time.perf_counter()
    pipe = Pipeline(bundle, backend, compute_units, reduce_memory=False)
    load_warm = time.perf_counter() - t
    log(f"{tag} imported the backend in {import_s:.2f}s; loaded: cold {load_cold:.2f}s, warm {load_warm:.2f}s")

    sampler = None
    if measure_energy:
        try:
            sampler = energy.PowerSampler()
        except OSError as exc:
            log(f"{tag} energy: powermetrics did not start ({exc})")
        else:  # the measured loops must fall inside sampled time, even without a warm-up run
            if not sampler.wait_started(timeout=3 * sampler.interval_ms / 1000 + 5):
                log(f"{tag} energy: powermetrics printed no sample yet; measuring anyway")
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
    except BaseException:  # interrupted or failed: stop powermetrics without waiting for samples
        if sampler is not None:
            sampler.stop()
        raise
    # Wait for the sample that covers the end of the last measured loop before stopping.
    samples = sampler.stop(until=windows[-1][1]) if sampler is not None else None
    denoise = statistics.median(m["denoise_s"] for m in measured)
    height, width = bundle.image_size
    record: dict[str, Any] = {
        "compute_units": compute_units,
        "backend": backend,
        "width": width,
        "height": height,
        "status": "ok",
        "error": None,
        "import_s": round(import_s, 3),
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
        "peak_rss_bytes": peak_rss_bytes(),
        "energy": None,
        "thermal_pressure": None,
    }
    if sampler is not None:
        record["energy"], why_not = energy.energy_per_step(samples or [], windows, steps * runs, sampler.interval_ms)
        record["thermal_pressure"] = energy.pressure_levels(samples or [], windows)
        if why_not:
            log(f"{tag} energy: not recorded ({why_not})")
    return record


def _stop_child(proc: subprocess.Popen) -> None:
    """End a child that is still running (it stops its powermetrics on SIGTERM)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _child(args: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Run one configuration in a child process; a failure becomes a 'failed' result.
    KeyboardInterrupt passes through, with the child ended first."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "coreml_sd.benchmarks.bench", json.dumps({**args, "out": str(out)})],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        tail: list[str] = []
        try:
            assert proc.stderr is not None
            for line in proc.stderr:  # progress lines pass through live; the rest is kept for errors
                line = line.rstrip("\n")
                if line.startswith("["):
                    log(line)
                elif line.strip():
                    tail = (tail + [line])[-20:]
            code = proc.wait()
        finally:
            _stop_child(proc)
        if code == 0 and out.exists():
            return json.loads(out.read_text())
        if code < 0:
            reason = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
        else:
            # The child's last line is the exception ("pkg.module.SomeError: message"): keep the message.
            reason = re.sub(r"^[\w.]*(Error|Exception): ", "", tail[-1]) if tail else f"exit status {code}"
        log(f"{args['tag']} failed: {reason}")
        return {"compute_units": args["compute_units"], "backend": args["backend"], "width": args["size"][1],
                "height": args["size"][0], "status": "failed", "error": reason}


def _compression(entry: Any) -> str | None:
    """A component's compression as a record holds it: the manifest's preset name (``convert
    --compress``), or None for float16 weights."""
    return entry.get("preset") if isinstance(entry, dict) else entry


def bundle_info(bundle: Bundle) -> dict[str, Any]:
    manifest = bundle.manifest or {}
    components = {
        name: {"precision": entry.get("precision"), "compression": _compression(entry.get("compression"))}
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


def run_bench(bundle: str, compute_units: list[str] | None, backend: str, steps: int, runs: int, warmup: int,
              scheduler: str = SCHEDULER, measure_energy: bool | None = None,
              log: Callable[[str], None] = print, sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Measure every configuration asked for (compute units, None: all this backend has; times
    ``sizes``, (height, width) each, None: the bundle's first) and return the record.

    Raises ``BackendError``/``BundleError``/``GenerationError`` before measuring anything when
    the backend or the bundle cannot serve. Ctrl-C stops the measurement: the record then holds
    the configurations that finished and ``interrupted`` is true (``results`` may be empty)."""
    backend = default_backend() if backend == "auto" else backend
    require(backend)  # a backend this system lacks is the user's error, not a failed measurement
    opened = open_bundle(bundle)
    # So is a bundle without a model the generation needs (the pipeline's own check; imported
    # here so that in a child the pipeline's import stays inside the timed backend import).
    from ..runtime.request import check_setup

    check_setup(opened, backend, purpose="bench")
    sizes = list(dict.fromkeys(sizes or [opened.image_size]))
    for size in sizes:
        opened.at(*size)  # BundleError listing the bundle's sizes
    if backend == "mil":
        asked = [u for u in compute_units or [] if u != "CPU_ONLY"]
        if asked:
            log(f"note: the mil backend computes on the CPU; measuring CPU_ONLY, not {', '.join(asked)}")
        compute_units = ["CPU_ONLY"]
    compute_units = list(compute_units or COMPUTE_UNITS)
    why_not = energy.available()
    if measure_energy is None:
        measure_energy = why_not is None
    if why_not and measure_energy:
        log(f"energy: not measured ({why_not})")
        measure_energy = False
    info = bundle_info(opened)
    machine_info = machine.probe()
    before = machine.conditions()
    results: list[dict[str, Any]] = []
    interrupted = False
    try:
        for units in compute_units:
            for h, w in sizes:
                # The size shows in the progress lines when several are measured.
                tag = f"[{backend} {units}" + (f" {w}x{h}]" if len(sizes) > 1 else "]")
                log(f"{tag} starting: {warmup} warm-up + {runs} runs of {steps} steps")
                results.append(_child({"bundle": str(opened.path.resolve()), "backend": backend, "compute_units": units,
                                       "size": [h, w], "tag": tag, "steps": steps, "runs": runs, "warmup": warmup,
                                       "scheduler": scheduler, "energy": measure_energy}, log))
    except KeyboardInterrupt:
        interrupted = True
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "coreml-sd", "version": __version__},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info,
        "conditions": {"before": before, "after": machine.conditions()},
        "software": software(),
        "bundle": info,
        "settings": {"prompt": PROMPT, "negative_prompt": "", "seed": SEED, "steps": steps, "guidance_scale": GUIDANCE,
                     "scheduler": scheduler, "runs": runs, "warmup": warmup, "backend": backend, "rng": "torch"},
        "interrupted": interrupted,
        "results": results,
    }


def _sudo_owner() -> tuple[int, int] | None:
    """(uid, gid) of the user who ran ``sudo``, when this process is root under sudo."""
    if os.geteuid() != 0:
        return None
    try:
        return int(os.environ["SUDO_UID"]), int(os.environ["SUDO_GID"])
    except (KeyError, ValueError):
        return None


def write_record(record: dict[str, Any], out: Path) -> None:
    """Write ``record`` to ``out`` whole or not at all, never over an existing file (creating the
    missing folders). Under sudo, the file and the folders it created belong to the sudo user."""
    out = Path(out)
    missing = []
    parent = out.parent.absolute()
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        owner = _sudo_owner()
        if owner is not None:
            for path in [*reversed(missing), tmp]:
                os.chown(path, *owner)
        try:
            os.link(tmp, out)  # raises FileExistsError if out appeared meanwhile: never overwrite a record
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            if out.exists():
                raise FileExistsError(out) from None
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _main() -> None:
    """Child entry point: one configuration, result written as JSON to args['out']."""
    # SIGTERM from the parent (Ctrl-C there) unwinds like an exception, so powermetrics is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = json.loads(sys.argv[1])
    if args["compute_units"] not in COMPUTE_UNITS:
        raise SystemExit(f"unknown compute units {args['compute_units']}")
    result = measure(args["bundle"], args["backend"], args["compute_units"], args["steps"], args["runs"],
                     args["warmup"], args["scheduler"], args["energy"], lambda line: print(line, file=sys.stderr, flush=True),
                     size=tuple(args["size"]), tag=args["tag"])
    Path(args["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    _main()
