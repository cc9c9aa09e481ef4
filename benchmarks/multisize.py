"""What ``convert --sizes`` costs against a one-size conversion, on SD 1.5's full-size UNet and
VAE (random weights).

    python benchmarks/multisize.py [--sizes 512x512,512x768,768x512] [--workdir DIR] [--limit-gib 18]

Two conversions of the same random-weight SD 1.5 folder (``configs.build_sd15_pipeline``), each in
a process of its own under a memory guard: the UNet, VAE decoder and VAE encoder at the first size
alone, then at every size (``--sizes``: one multifunction package per model). Recorded for each:
the time (whole, and per stage summed over sizes), the peak resident memory, and the bytes on disk
of each package and of the three together; then the ratios of the several-size conversion to the
one-size one. The weights are the same whatever their values, so random weights measure what a
real model's conversion costs. Results: benchmarks/results/project/multisize_sd15.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from coreml_sd.benchmarks.compress_unet import machine_and_tools, run_guarded, timed_convert
from coreml_sd.benchmarks.convert_sdxl import _folder

COMPONENTS = ("unet", "vae-decoder", "vae-encoder")
PACKAGES = ("Unet", "VAEDecoder", "VAEEncoder")


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    """"512x768,..." (width x height) as ((height, width), ...)."""
    return tuple((int(h), int(w)) for w, h in (item.lower().split("x") for item in text.split(",")))


def run_child(sizes: str, folder: Path, out: Path) -> None:
    from coreml_sd.convert.converter import ConvertOptions

    chosen = _sizes(sizes)
    options = (ConvertOptions(components=COMPONENTS, overwrite=True, sizes=chosen) if len(chosen) > 1 else
               ConvertOptions(components=COMPONENTS, overwrite=True, height=chosen[0][0], width=chosen[0][1]))
    timed_convert(folder, out, options)


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512x512,512x768,768x512", help="WIDTHxHEIGHT,... the first the default")
    parser.add_argument("--workdir", type=Path, help="keep the random-weight folder here (default: a temporary folder)")
    parser.add_argument("--limit-gib", type=float, default=18.0, help="stop a conversion whose resident memory passes this")
    parser.add_argument("--json", type=Path, help="the results' file [default: results/project/multisize_sd15.json]")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.folder, args.out)
        return
    args.json = args.json or Path(__file__).parent / "results" / "project" / "multisize_sd15.json"
    first = args.sizes.split(",")[0]
    cases = {"one size": first, "every size": args.sizes}
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        folder = _folder(work, "sd15")
        for name, sizes in cases.items():
            out = work / f"out-{len(sizes.split(','))}"
            print(f"{name} ({sizes}) ...", flush=True)
            command = [sys.executable, __file__, "--child", sizes, "--folder", str(folder), "--out", str(out)]
            record = {"sizes": sizes, **run_guarded(command, work / f"{len(sizes.split(','))}.log", args.limit_gib)}
            if record["status"] == "ok":
                record["bytes"] = {p: _bytes(out / f"{p}.mlpackage") for p in PACKAGES}
                record["bytes"]["total"] = sum(record["bytes"].values())
            records[name] = record
            print(f"  {json.dumps(record)}", flush=True)
    one, every = records["one size"], records["every size"]
    ratios = None
    if one["status"] == every["status"] == "ok":
        n = len(args.sizes.split(","))
        ratios = {
            "bytes": round(every["bytes"]["total"] / one["bytes"]["total"], 4),
            "bytes_per_extra_size": round((every["bytes"]["total"] / one["bytes"]["total"] - 1) / max(1, n - 1), 5),
            "seconds": round(every["seconds"] / one["seconds"], 2),
            "peak_rss": round(every["peak_rss_gib"] / one["peak_rss_gib"], 2),
        }
    result = {
        "benchmark": "multisize",
        "command": shlex.join(["python", "benchmarks/multisize.py", *sys.argv[1:]]),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": "SD 1.5 UNet, VAE decoder and encoder (random weights), split-einsum, float16",
        "cases": records,
        "every_size_vs_one": ratios,
        **machine_and_tools(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
