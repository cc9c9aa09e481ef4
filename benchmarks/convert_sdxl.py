"""Conversion cost of SDXL's full-size UNet and second text encoder (random weights, no
download), with SD 1.5's UNet measured in the same run for scale.

    python benchmarks/convert_sdxl.py [--workdir DIR] [--cases a,b] [--limit-gib 18]

Each case converts one component of a random-weight diffusers folder (float32 files, as the
published repositories' default ones; ``configs.build_sd15_pipeline`` / ``build_sdxl_pipeline``,
written once into the work folder) in a process of its own, so that its peak memory is its own:

* ``weights last``: what ``coreml-sd convert FOLDER --components ...`` does (``convert.converter``:
  trace and convert with stand-in weights, load the weights in float16, place them, save);
* ``whole``: the conversion as it was made before, the module holding its float32 weights from
  the load to the end of ``coremltools.convert`` (``export.to_coreml``); ``+ heap`` with glibc's
  heap made to return freed memory (``export.return_freed_memory``), the one part of the new path
  that applies to it.

Per stage: wall time, the process's peak resident memory at its end (``ru_maxrss``: the peak so
far) and the largest resident size sampled during it (every 0.2 s); then the package's size. A
case whose resident memory passes ``--limit-gib``, or that would leave the machine less than 1
GiB available, is stopped and recorded as ``exceeded`` with the stage it was in, rather than
left to swap or to the out-of-memory killer. Results: benchmarks/results/project/convert_sdxl.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import queue
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coreml_sd.system import peak_rss_bytes, tool_versions


@dataclass(frozen=True)
class Case:
    folder: str  # "sd15" or "sdxl": which random-weight folder
    component: str  # as --components spells it
    path: str  # "weights last", "whole", "whole + heap"
    model: str


CASES = {
    "sd15-unet-whole": Case("sd15", "unet", "whole", "SD 1.5 UNet (860 M parameters), 64x64 latents, batch 2"),
    "sd15-unet": Case("sd15", "unet", "weights last", "SD 1.5 UNet (860 M parameters), 64x64 latents, batch 2"),
    "sdxl-unet-whole": Case("sdxl", "unet", "whole", "SDXL base UNet (2.6 B parameters), 128x128 latents, batch 2"),
    "sdxl-unet-whole-heap": Case("sdxl", "unet", "whole + heap", "SDXL base UNet (2.6 B parameters), 128x128 latents, batch 2"),
    "sdxl-unet": Case("sdxl", "unet", "weights last", "SDXL base UNet (2.6 B parameters), 128x128 latents, batch 2"),
    "sdxl-text-encoder-2-whole": Case("sdxl", "text-encoder-2", "whole", "SDXL TextEncoder2, OpenCLIP bigG (695 M parameters)"),
    "sdxl-text-encoder-2": Case("sdxl", "text-encoder-2", "weights last", "SDXL TextEncoder2, OpenCLIP bigG (695 M parameters)"),
}
GIB = 2**30
SAMPLE_SECONDS = 0.2
MIN_AVAILABLE_GIB = 1.0  # what a case must leave the machine (Linux's MemAvailable)


# ------------------------------------------------------------------ the child: one case


def _emit(event: str, stage: str) -> None:
    print(json.dumps({"event": event, "stage": stage, "t": time.perf_counter(), "peak_rss": peak_rss_bytes()}), flush=True)


def run_case(name: str, folder: Path, out: Path) -> None:
    """Convert as ``CASES[name]`` says, printing one JSON line at the start and end of each stage."""
    from coreml_sd.convert.converter import ConvertOptions, Progress, convert, plan
    from coreml_sd.convert.source import open_source

    case = CASES[name]

    class Stages(Progress):
        @contextmanager
        def stage(self, component: str, what: str):
            _emit("start", what)
            with super().stage(component, what):
                yield
            _emit("end", what)

    progress = Stages(log=lambda line: print(line, file=sys.stderr, flush=True))
    source = open_source(str(folder))
    options = ConvertOptions(components=(case.component,))
    if case.path == "weights last":
        convert(source, out, options, progress)
        return
    # The whole conversion, as convert_component made it before weights came last.
    from coreml_sd.convert.components import build_module
    from coreml_sd.convert.export import return_freed_memory, to_coreml, trace

    if case.path == "whole + heap":
        return_freed_memory()
    p = plan(source, out, options)
    spec = p.components[0]
    inputs, outputs = spec.io(p.geometry)
    with progress.stage(spec.cli_name, "load"):
        module = build_module(source, spec, p.attention, p.query_chunk)  # float32
    with progress.stage(spec.cli_name, "trace"):
        traced = trace(module, inputs)
    with progress.stage(spec.cli_name, "convert"):
        mlmodel = to_coreml(traced, inputs, outputs, {}, spec.description, spec.float32_features)
        del module, traced
        gc.collect()
    with progress.stage(spec.cli_name, "save"):
        out.mkdir(parents=True)
        mlmodel.save(str(out / f"{spec.name}.mlpackage"))


# ------------------------------------------------------------------ the parent: measure each case


def _rss_bytes(pid: int) -> int:
    """Resident size of a running process: Linux's /proc, else ``ps`` (macOS); 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        pass
    result = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(result.stdout) * 1024 if result.stdout.strip() else 0


def _available_bytes() -> int | None:
    """The machine's available memory (Linux's MemAvailable); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(name: str, folder: Path, work: Path, limit_gib: float) -> dict:
    """Run one case in a child process under a memory guard; return its record."""
    case = CASES[name]
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    log = work / f"{name}.log"
    command = [sys.executable, __file__, "--child", name, "--folder", str(folder), "--out", str(out)]
    events: queue.Queue = queue.Queue()
    with open(log, "w") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        threading.Thread(target=lambda: [events.put(json.loads(line)) for line in child.stdout], daemon=True).start()
        stages: list[dict] = []
        current = None
        exceeded = None
        while True:
            while not events.empty():
                event = events.get()
                if event["event"] == "start":
                    current = {"stage": event["stage"], "t0": event["t"], "max_rss_sampled": 0}
                    stages.append(current)
                else:
                    current["seconds"] = round(event["t"] - current.pop("t0"), 1)
                    current["peak_rss_gib"] = round(event["peak_rss"] / GIB, 2)
                    current = None
            if child.poll() is not None:
                break
            rss = _rss_bytes(child.pid)
            if current is not None:
                current["max_rss_sampled"] = max(current["max_rss_sampled"], rss)
            available = _available_bytes()
            if rss > limit_gib * GIB or (available is not None and available < MIN_AVAILABLE_GIB * GIB):
                stage = current["stage"] if current else "between stages"
                why = f"{rss / GIB:.1f} GiB resident" if rss > limit_gib * GIB else f"{available / GIB:.1f} GiB left available"
                exceeded = f"stopped in {stage}: {why} (limit {limit_gib} GiB)"
                child.kill()
                child.wait()
                break
            time.sleep(SAMPLE_SECONDS)
    for stage in stages:
        stage["max_rss_sampled_gib"] = round(stage.pop("max_rss_sampled") / GIB, 2)
        stage.pop("t0", None)
    if exceeded:
        status, error = "exceeded", exceeded
    elif child.returncode == 0:
        status, error = "ok", None
    else:
        lines = log.read_text().strip().splitlines()
        status, error = "failed", lines[-1] if lines else f"exit status {child.returncode}"
    packages = list(out.rglob("*.mlpackage")) if out.exists() else []
    size = sum(f.stat().st_size for p in packages for f in p.rglob("*") if f.is_file())
    shutil.rmtree(out, ignore_errors=True)
    finished = [s for s in stages if "seconds" in s]
    peaks = [s.get("peak_rss_gib", 0) for s in stages] + [s["max_rss_sampled_gib"] for s in stages]
    record = {
        "case": name,
        "model": case.model,
        "component": case.component,
        "path": case.path,
        "status": status,
        "error": error,
        "stages": stages,
        "seconds_total": round(sum(s["seconds"] for s in finished), 1) if status == "ok" else None,
        "peak_rss_gib": max(peaks, default=None),
        "package_gib": round(size / GIB, 2) if status == "ok" else None,
    }
    return record


def _folder(work: Path, which: str) -> Path:
    """The random-weight folder ``which``, written once (in a process of its own: SDXL's takes
    one UNet's float32 weights of memory, ~10 GB)."""
    folder = work / which
    done = work / f"{which}.done"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        flag = ["--sdxl"] if which == "sdxl" else []
        print(f"writing the random-weight {which} folder in {folder} ...", flush=True)
        subprocess.run([sys.executable, "-m", "coreml_sd.benchmarks.configs", str(folder), *flag], check=True,
                       stdout=subprocess.DEVNULL)
        done.touch()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="keep the random-weight folders here (default: a temporary folder)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--limit-gib", type=float, default=18.0, help="stop a case whose resident memory passes this")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "project" / "convert_sdxl.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_case(args.child, args.folder, args.out)
        return

    names = args.cases.split(",")
    if unknown := [n for n in names if n not in CASES]:
        parser.error(f"unknown case {unknown[0]}: choose from {', '.join(CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        records = []
        for name in names:
            folder = _folder(work, CASES[name].folder)
            print(f"{name}: {CASES[name].model}, {CASES[name].path} ...", flush=True)
            record = measure(name, folder, work, args.limit_gib)
            records.append(record)
            for s in record["stages"]:
                seconds, peak = s.get("seconds", float("nan")), s.get("peak_rss_gib", float("nan"))
                sampled = s["max_rss_sampled_gib"]
                print(f"  {s['stage']:8s} {seconds:7.1f} s   peak {peak:6.2f} GiB   sampled max {sampled:6.2f} GiB", flush=True)
            print(f"  {record['status']}: {record['seconds_total']} s, peak {record['peak_rss_gib']} GiB,"
                  f" package {record['package_gib']} GiB{'  (' + record['error'] + ')' if record['error'] else ''}", flush=True)
    result = {
        "benchmark": "convert_sdxl",
        "command": shlex.join(["python", "benchmarks/convert_sdxl.py", *sys.argv[1:]]),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "limit_gib": args.limit_gib,
        "cases": records,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "memory_gib": round(_total_bytes() / GIB, 1) if _total_bytes() else None},
        "tools": tool_versions(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


def _total_bytes() -> int | None:
    try:
        return int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None


if __name__ == "__main__":
    main()
