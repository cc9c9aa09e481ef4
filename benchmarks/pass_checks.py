"""What coremltools' program check after every pass costs a conversion: SD 1.5's full-size UNet
(the converter's stand-in weights, so no weights are needed), traced once and converted to an ML
program twice in one process, first with coremltools' own pipelines (the program checked before
and after each of its passes), then as ``coreml-sd convert`` does (checked once per pipeline,
``convert.export._validated_once_per_pipeline``).

    python benchmarks/pass_checks.py [--json PATH]

Writes the two convert times, their ratio and the programs' op counts (equal: the same program)
to benchmarks/results/project/pass_checks_sd15.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
from collections import Counter
from pathlib import Path

from coreml_sd.benchmarks.compress_unet import machine_and_tools
from coreml_sd.benchmarks.configs import SD15_UNET
from coreml_sd.convert import export
from coreml_sd.convert.export import stand_in_weights, to_program, trace
from coreml_sd.families import SD1, Geometry
from coreml_sd.models import AttentionImpl
from coreml_sd.system import peak_rss_bytes


def _ops(program) -> Counter:
    return Counter(op.op_type for op in program.functions["main"].operations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "project" / "pass_checks_sd15.json")
    args = parser.parse_args()

    from coreml_sd.convert.components import empty_module
    from coreml_sd.convert.quiet import library_output

    spec = SD1.component("unet")
    inputs, outputs = spec.io(Geometry(512, 512, 2, 768))
    with library_output(False, print):
        module = empty_module(spec, SD15_UNET, AttentionImpl("split-einsum"), 512)
        stand_in_weights(module)
        t = time.perf_counter()
        traced = trace(module, inputs)
        trace_s = time.perf_counter() - t
        print(f"traced in {trace_s:.1f}s", flush=True)
        seconds, ops = {}, {}
        for case, checks in (("every pass", lambda: contextlib.nullcontext()),
                             ("once per pipeline", export._validated_once_per_pipeline)):
            real = export._validated_once_per_pipeline
            export._validated_once_per_pipeline = checks  # the reference: coremltools' pipelines as they are
            try:
                gc.collect()
                t = time.perf_counter()
                program = to_program(traced, inputs, outputs, spec.float32_features)
                seconds[case] = round(time.perf_counter() - t, 1)
            finally:
                export._validated_once_per_pipeline = real
            ops[case] = _ops(program)
            del program
            print(f"checked {case}: converted in {seconds[case]}s", flush=True)
    result = {
        "benchmark": "pass_checks",
        "command": "python benchmarks/pass_checks.py",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": "SD 1.5 UNet, split-einsum, 64x64 latents, batch 2, stand-in weights",
        "trace_seconds": round(trace_s, 1),
        "convert_seconds": seconds,
        "once_vs_every_pass": round(seconds["once per pipeline"] / seconds["every pass"], 3),
        "same_program": ops["every pass"] == ops["once per pipeline"],
        "operations": sum(ops["every pass"].values()),
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2),
        **machine_and_tools(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
