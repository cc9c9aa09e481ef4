"""Conversion cost of a full-size UNet: SD 1.5's architecture (random weights, no download),
wrapped for the Neural Engine and converted to a float16 ML program.

    python benchmarks/convert_unet.py [--attention split-einsum] [--keep PATH.mlpackage]

Prints wall time per stage (build, wrap, trace, convert, save) and the process's peak resident
memory, and writes them as JSON to benchmarks/results/project/convert_unet_sd15.json. Goal: fits a
16 GB Mac, i.e. peak RSS well below 16 GiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
from pathlib import Path

from coreml_sd.benchmarks.configs import sd15_unet
from coreml_sd.convert.export import to_coreml, trace
from coreml_sd.families import SD1, Geometry
from coreml_sd.models import load_unet
from coreml_sd.system import peak_rss_bytes, tool_versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attention", default="split-einsum")
    parser.add_argument("--keep", type=Path, help="save the package as PATH.mlpackage instead of in a temporary folder")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "project" / "convert_unet_sd15.json")
    args = parser.parse_args()

    stages: dict[str, float] = {}
    rss: dict[str, float] = {}

    def mark(name: str, t0: float) -> None:
        stages[name] = round(time.perf_counter() - t0, 1)
        rss[name] = round(peak_rss_bytes() / 2**30, 2)
        print(f"{name:8s} {stages[name]:8.1f} s   peak RSS so far {rss[name]:.2f} GiB", flush=True)

    t = time.perf_counter()
    ref = sd15_unet()
    mark("build", t)
    t = time.perf_counter()
    unet = load_unet(ref, args.attention)
    del ref
    gc.collect()
    mark("wrap", t)
    spec = SD1.component("unet")
    inputs, outputs = spec.io(Geometry(512, 512, 2, 768))  # as `coreml-sd convert` declares them
    t = time.perf_counter()
    traced = trace(unet, inputs)
    mark("trace", t)
    t = time.perf_counter()
    mlmodel = to_coreml(traced, inputs, outputs, {}, "SD 1.5 UNet (random weights)", spec.float32_features)
    del unet, traced
    gc.collect()
    mark("convert", t)
    with tempfile.TemporaryDirectory() as tmp:
        target = args.keep.with_suffix(".mlpackage") if args.keep else Path(tmp) / "Unet.mlpackage"  # coremltools adds the suffix
        t = time.perf_counter()
        mlmodel.save(str(target))
        mark("save", t)
        size = sum(p.stat().st_size for p in Path(target).rglob("*") if p.is_file())
    total = round(sum(stages.values()), 1)
    print(f"{'total':8s} {total:8.1f} s   peak RSS {peak_rss_bytes() / 2**30:.2f} GiB, package {size / 2**30:.2f} GiB")
    record = {
        "benchmark": "convert_unet",
        "model": "SD 1.5 UNet architecture, random weights",
        "attention": args.attention,
        "seconds": stages,
        "seconds_total": total,
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2),
        "peak_rss_gib_after": rss,
        "package_gib": round(size / 2**30, 2),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "tools": tool_versions(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
