"""Host overhead of the runtime: time per denoising step spent outside model calls (scheduler,
guidance, array conversions, bookkeeping), for 64x64 latents (512x512 images), every scheduler.

    python benchmarks/host_overhead.py [--steps 20]

The pipeline runs for real (a tiny model converted for 64x64 latents, through the mil backend);
its own timings separate model-call time from the rest. Goal: under 2 ms per step. Reported as
milliseconds and as a share of the step as measured here (the mil backend on this machine; on a
Mac the UNet call is faster, so the share there is larger, the milliseconds the same). euler-a
and lcm draw noise every step: shown with the torch-compatible generator and with numpy's.
Writes benchmarks/results/project/host_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from coreml_sd.convert.converter import ConvertOptions, Progress, convert
from coreml_sd.convert.source import open_source
from coreml_sd.runtime.pipeline import Pipeline
from coreml_sd.runtime.random import detect_variant
from coreml_sd.runtime.schedulers import SCHEDULER_NAMES
from coreml_sd.system import tool_versions
from coreml_sd.testing.tiny_pipelines import build_tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "project" / "host_overhead.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_pipeline(Path(tmp) / "tiny", "sd1", sample_size=64)
        bundle = convert(open_source(str(model)), Path(tmp) / "bundle",
                         ConvertOptions(components=("text-encoder", "unet", "vae-decoder")), Progress(lambda s: None))
        pipe = Pipeline.from_bundle(bundle, backend="mil")
        cases = [(name, "torch") for name in SCHEDULER_NAMES] + [("euler-a", "numpy"), ("lcm", "numpy")]
        print(f"latents 64x64, batch 1, guidance 7.5, {args.steps} steps; torch rng variant: {detect_variant()}")
        print(f"{'scheduler':18s} {'rng':6s} {'host ms/step':>12s} {'unet ms/step':>12s} {'host share':>10s}")
        for name, rng in cases:
            steps = min(args.steps, 8) if name == "lcm" else args.steps
            run = pipe.start("a photo of a cat", steps=steps, seed=0, scheduler=name, rng=rng)
            for _ in run:
                pass
            host = statistics.median(run.timings.host) * 1000
            unet = statistics.median(run.timings.unet) * 1000
            share = host / (host + unet)
            rows.append({"scheduler": name, "rng": rng, "host_ms_per_step": round(host, 3),
                         "unet_ms_per_step": round(unet, 1), "host_share": round(share, 5)})
            print(f"{name:18s} {rng:6s} {host:12.3f} {unet:12.1f} {share:10.2%}")
    # What the removed noise-prefetch thread used to hide: one torch-compatible draw of the
    # latents' shape, timed alone in this same run (the euler-a / lcm rows include it).
    from coreml_sd.runtime.random import TorchRandom

    draws = []
    rng = TorchRandom(0)
    for _ in range(200):
        t = time.perf_counter()
        rng.randn((1, 4, 64, 64))
        draws.append(time.perf_counter() - t)
    draw_ms = statistics.median(draws) * 1000
    print(f"one torch-compatible (1, 4, 64, 64) noise draw: {draw_ms:.3f} ms")
    record = {"benchmark": "host_overhead", "noise_draw_ms": round(draw_ms, 3), "latents": [64, 64],
              "steps": args.steps, "backend": "mil",
              "torch_rng_variant": detect_variant(), "machine": platform.platform(), "rows": rows, "tools": tool_versions()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
