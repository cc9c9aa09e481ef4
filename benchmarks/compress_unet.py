"""What each ``--compress`` preset costs and gives on SD 1.5's or SDXL's full-size UNet (random weights).

    python benchmarks/compress_unet.py [--model sd15|sdxl] [--workdir DIR] [--presets a,b] [--limit-gib 18]

For each preset (and float16, the reference), ``coreml-sd convert FOLDER --components unet
--compress PRESET`` runs in a process of its own (its peak resident memory is its own; a memory
guard stops it past ``--limit-gib``), on the random-weight SD 1.5 folder of
``configs.build_sd15_pipeline`` (SDXL: ``build_sdxl_pipeline``, by default only ``mixed-4.5`` and
``palettize-4``). Recorded per preset:

* time: the whole conversion, and its compression stage alone (for mixed-bit presets, also the
  layer-sensitivity analysis; the second mixed preset converts over the first one's bundle with
  ``--overwrite`` and so reuses it, as a user would);
* peak resident memory of the conversion (``ru_maxrss`` and 0.2 s samples);
* the weight file's size against float16's;
* the UNet's output against the float16 package's, through the mil backend, as PSNR (dB): batch
  2 at the model's size (SD 1.5: 64x64 latents, SDXL: 128x128), timestep 500, Gaussian latents and
  text embeddings (SDXL: time ids of a 1024x1024 image); for mixed presets, also the PSNR the
  analysis predicted.

Random weights are not trained weights: their distribution (Gaussian, no outliers) palettizes
differently from a real model's, so these PSNRs say how the presets rank and what they cost, not
what a trained model's images lose. Results: benchmarks/results/project/compress_unet_{sd15,sdxl}.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from coreml_sd.benchmarks.convert_sdxl import GIB, SAMPLE_SECONDS, _available_bytes, _folder, _rss_bytes, _total_bytes
from coreml_sd.system import peak_rss_bytes, tool_versions

# model: (what it is, its native image side, its default presets)
MODELS = {
    "sd15": ("SD 1.5 UNet (860 M parameters), random weights, split-einsum", 512, None),
    "sdxl": ("SDXL base UNet (2.6 B parameters), random weights, split-einsum", 1024, "palettize-4,mixed-4.5"),
}
PRESETS = ("float16", "palettize-8", "palettize-6", "palettize-4", "int8", "int4-blocked", "mixed-4.5", "mixed-3.5",
           "palettize-4-grouped")
TIMESTEP = 500.0


def run_child(preset: str, folder: Path, out: Path, size: int | None) -> None:
    """Convert the UNet with ``preset``, printing each stage's time and the final peak as JSON."""
    from coreml_sd.convert.converter import ConvertOptions

    compress = None if preset == "float16" else preset
    timed_convert(folder, out, ConvertOptions(components=("unet",), compress=compress, overwrite=True, height=size, width=size))


def timed_convert(folder: Path, out: Path, options) -> None:
    """Convert ``folder`` into ``out`` with ``options`` (``ConvertOptions``), printing each stage's
    time (summed over sizes and components) and the final peak as one JSON line."""
    from coreml_sd.convert.converter import Progress, convert
    from coreml_sd.convert.quiet import library_output
    from coreml_sd.convert.source import open_source

    stages: dict[str, float] = {}

    class Timed(Progress):
        @contextmanager
        def stage(self, component: str, what: str):
            t = time.perf_counter()
            with super().stage(component, what):
                yield
            key = what.split(" (")[0]
            stages[key] = round(stages.get(key, 0.0) + time.perf_counter() - t, 1)

    t0 = time.perf_counter()
    with library_output(False, lambda line: print(line, file=sys.stderr)):
        convert(open_source(str(folder)), out, options, Timed(log=lambda line: print(line, file=sys.stderr, flush=True)))
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "stages": stages, "peak_rss": peak_rss_bytes()}))


def convert_case(preset: str, folder: Path, out: Path, log: Path, limit_gib: float, size: int | None) -> dict:
    """Run ``run_child`` under the memory guard; its record."""
    command = [sys.executable, __file__, "--child", preset, "--folder", str(folder), "--out", str(out),
               *(["--size", str(size)] if size else [])]
    return run_guarded(command, log, limit_gib)


def run_guarded(command: list[str], log: Path, limit_gib: float) -> dict:
    """Run ``command`` (a child printing ``timed_convert``'s JSON line last), its stderr into
    ``log``, stopping it when its resident memory passes ``limit_gib`` or the machine's available
    memory falls under 1 GiB; its record (status, seconds, stages, peak_rss_gib)."""
    sampled = 0
    with open(log, "w") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        while child.poll() is None:
            rss = _rss_bytes(child.pid)
            sampled = max(sampled, rss)
            available = _available_bytes()
            if rss > limit_gib * GIB or (available is not None and available < GIB):
                child.kill()
                child.wait()
                return {"status": "exceeded", "error": f"{rss / GIB:.1f} GiB resident (limit {limit_gib} GiB)"}
            time.sleep(SAMPLE_SECONDS)
        output = child.stdout.read().strip().splitlines()
    if child.returncode != 0 or not output:
        lines = log.read_text().strip().splitlines()
        return {"status": "failed", "error": lines[-1] if lines else f"exit status {child.returncode}"}
    done = json.loads(output[-1])
    return {"status": "ok", "seconds": done["seconds"], "stages": done["stages"],
            "peak_rss_gib": round(max(done["peak_rss"], sampled) / GIB, 2)}


def unet_output_apart(package: Path, work: Path) -> np.ndarray:
    """``unet_output`` in a process of its own: loaded through mil, SDXL's UNet took 11 GiB that
    the allocator kept after the model was gone, beside the next preset's conversion."""
    saved = work / "output.npy"
    subprocess.run([sys.executable, __file__, "--output-of", str(package), "--out", str(saved)], check=True)
    output = np.load(saved)
    saved.unlink()
    return output


def unet_output(package: Path) -> np.ndarray:
    from coreml_sd.runtime.backends import load_model

    model = load_model(package, "mil")
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(d.shape).astype(np.float32) for name, d in model.inputs.items()}
    feeds["timestep"] = np.full(model.inputs["timestep"].shape, TIMESTEP, np.float32)
    if "time_ids" in feeds:  # SDXL: a 1024x1024 image, uncropped
        feeds["time_ids"] = np.tile(np.array([1024, 1024, 0, 0, 1024, 1024], np.float32), (feeds["time_ids"].shape[0], 1))
    return model.predict(feeds)["noise_pred"]


def machine_and_tools() -> dict:
    """What a result file says of the machine and the tools it was measured with."""
    total = _total_bytes()
    return {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "memory_gib": round(total / GIB, 1) if total else None},
            "tools": tool_versions()}


def write(args, records: list[dict], done: bool) -> None:
    """The results so far (after each preset: a stopped run keeps what it measured)."""
    side = args.size or MODELS[args.model][1]
    result = {
        "benchmark": "compress_unet",
        "command": shlex.join(["python", "benchmarks/compress_unet.py", *sys.argv[1:]]),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": done,
        "model": f"{MODELS[args.model][0]}, {side // 8}x{side // 8} latents ({side}x{side} images), batch 2",
        "psnr_input": f"batch 2, Gaussian latents and text embeddings, timestep {TIMESTEP:g}, through the mil backend",
        "note": "random weights are not trained weights: their quantization error can differ from a real model's",
        "presets": records,
        **machine_and_tools(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="keep the random-weight folder here (default: a temporary folder)")
    parser.add_argument("--model", choices=list(MODELS), default="sd15")
    parser.add_argument("--presets",
                        help=f"comma-separated, from: {', '.join(PRESETS)} [default: all; SDXL: {MODELS['sdxl'][2]}]")
    parser.add_argument("--limit-gib", type=float, default=18.0, help="stop a conversion whose resident memory passes this")
    parser.add_argument("--json", type=Path, help="the results' file [default: results/project/compress_unet_MODEL.json]")
    parser.add_argument("--size", type=int, help="image side in pixels [default: the model's]")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output-of", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.folder, args.out, args.size)
        return
    if args.output_of:
        np.save(args.out, unet_output(args.output_of))
        return
    from coreml_sd.benchmarks.metrics import psnr
    from coreml_sd.convert.compress import weight_bytes

    presets = (args.presets or MODELS[args.model][2] or ",".join(PRESETS)).split(",")
    args.json = args.json or Path(__file__).parent / "results" / "project" / f"compress_unet_{args.model}.json"
    if "float16" not in presets:
        presets.insert(0, "float16")
    if unknown := [p for p in presets if p not in PRESETS]:
        parser.error(f"unknown preset {unknown[0]}: choose from {', '.join(PRESETS)}")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        folder = _folder(work, args.model)
        reference = None
        for preset in sorted(presets, key=lambda p: p != "float16"):
            # The mixed presets share one bundle: the second reuses the first one's analysis.
            out = work / ("out-mixed" if preset.startswith("mixed-") else f"out-{preset}")
            print(f"{preset} ...", flush=True)
            record = {"preset": preset, **convert_case(preset, folder, out, work / f"{preset}.log", args.limit_gib, args.size)}
            if record["status"] == "ok":
                package = out / "Unet.mlpackage"
                record["weight_bytes"] = weight_bytes(package)
                entry = json.loads((out / "manifest.json").read_text())["components"]["Unet"]["compression"] or {}
                record["bits"] = entry.get("bits", 16)
                record["predicted_psnr_db"] = entry.get("predicted_psnr_db")
                record["deployment_target"] = json.loads((out / "manifest.json").read_text())["deployment_target"]
                t = time.perf_counter()
                output = unet_output_apart(package, work)
                record["mil_seconds"] = round(time.perf_counter() - t, 1)
                if reference is None:
                    reference, record["psnr_db"] = output, None
                    float16_bytes, float16_seconds = record["weight_bytes"], record["seconds"]
                else:
                    # Times as ratios to this run's float16 conversion: this machine is noisy.
                    record["seconds_vs_float16"] = round(record["seconds"] / float16_seconds, 2)
                    record["psnr_db"] = round(psnr(output, reference), 2)
                    record["finite"] = bool(np.isfinite(output).all())
                record["size_vs_float16"] = round(record["weight_bytes"] / float16_bytes, 4)
            if not preset.startswith("mixed-"):
                shutil.rmtree(out, ignore_errors=True)
            records.append(record)
            print(f"  {json.dumps(record)}", flush=True)
            write(args, records, done=False)
    write(args, records, done=True)


if __name__ == "__main__":
    main()
