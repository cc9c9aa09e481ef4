"""The mil backend on a full-size UNet: SD 1.5's architecture (random weights, no download),
converted with split-einsum, run at batch 2 on 64x64 latents, against diffusers' UNet in torch
eager on the same inputs, in one process.

    python benchmarks/mil_unet.py [--package Unet.mlpackage] [--runs 2]

Without --package the UNet is converted first, in a child process (benchmarks/convert_unet.py),
so the peak memory reported here is that of running, not converting. Prints seconds per call
for both, their ratio (goal: <= 1.5), agreement (PSNR) and peak resident memory (goal: < 25 GiB);
writes benchmarks/results/project/mil_unet_sd15.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from coreml_sd.benchmarks.configs import sd15_unet
from coreml_sd.benchmarks.metrics import psnr
from coreml_sd.runtime.backends import load_model
from coreml_sd.system import peak_rss_bytes, tool_versions

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, help="an already converted SD 1.5 UNet (seed 0)")
    parser.add_argument("--runs", type=int, default=2, help="timed calls of each (after one warm-up of each)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "project" / "mil_unet_sd15.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        package = args.package
        if package is None:
            package = Path(tmp) / "Unet.mlpackage"
            print("converting the UNet in a child process ...", flush=True)
            subprocess.run(
                [sys.executable, str(HERE / "convert_unet.py"), "--keep", str(package), "--json", str(Path(tmp) / "c.json")],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        reference = sd15_unet(seed=0)  # the same weights convert_unet.py converted
        t = time.perf_counter()
        model = load_model(package, backend="mil")
        load_s = time.perf_counter() - t

        rng = np.random.default_rng(0)
        sample = rng.standard_normal((2, 4, 64, 64)).astype(np.float32)
        timestep = np.array([981.0, 981.0], np.float32)
        text = rng.standard_normal((2, 77, 768)).astype(np.float32)
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text.transpose(0, 2, 1)[:, :, None, :]}

        def run_torch():
            with torch.inference_mode():
                return reference(torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(text)).sample.numpy()

        def run_mil():
            return model.predict(feeds)["noise_pred"]

        timings: dict[str, list[float]] = {"torch_eager": [], "mil": []}
        outputs = {}
        for name, fn in (("torch_eager", run_torch), ("mil", run_mil)):
            outputs[name] = fn()  # warm-up
            for _ in range(args.runs):
                t = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - t)
            print(f"{name:12s} {statistics.median(timings[name]):7.2f} s per call", flush=True)

    ratio = statistics.median(timings["mil"]) / statistics.median(timings["torch_eager"])
    agreement = psnr(outputs["mil"], outputs["torch_eager"])
    peak = peak_rss_bytes() / 2**30
    print(f"ratio mil / torch eager: {ratio:.2f}   PSNR {agreement:.1f} dB   load {load_s:.1f} s   peak RSS {peak:.2f} GiB")
    record = {
        "benchmark": "mil_unet",
        "model": "SD 1.5 UNet architecture, random weights, split-einsum, float16 program",
        "inputs": "batch 2, latents 64x64, timestep 981",
        "torch_threads": torch.get_num_threads(),
        "seconds_per_call": {k: [round(v, 2) for v in vs] for k, vs in timings.items()},
        "ratio_mil_over_torch_eager": round(ratio, 2),
        "psnr_db": round(agreement, 1),
        "load_seconds": round(load_s, 1),
        "peak_rss_gib": round(peak, 2),
        "tools": tool_versions(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
