"""Energy per denoising step on macOS, from ``powermetrics`` (which needs root: run bench with sudo).

``powermetrics --samplers cpu_power,gpu_power,ane_power -i MS`` prints, per sample, a header with
the sample's length ("*** Sampled system activity (...) (100.27ms elapsed) ***") and lines such as
"CPU Power: 1234 mW", "GPU Power: 56 mW", "ANE Power: 789 mW". The sampler keeps the process
running in the background, stamps each sample with the monotonic time it arrived, and integrates
power over the time windows the benchmark marks (the denoising loops). Where it cannot run, the
result is None: energy is absent, never estimated.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

_HEADER = re.compile(r"\*\*\* Sampled system activity .*\((\d+(?:\.\d+)?)ms elapsed\)")
_POWER = re.compile(r"^(CPU|GPU|ANE) Power:\s*(\d+(?:\.\d+)?)\s*(mW|W)\b", re.M)


@dataclass(frozen=True)
class Sample:
    end: float  # monotonic seconds when the sample was read
    seconds: float  # its length
    watts: dict[str, float]  # "cpu", "gpu", "ane"


def parse_samples(text: str) -> list[tuple[float, dict[str, float]]]:
    """(length in seconds, watts per unit) for each complete sample in powermetrics' text."""
    out = []
    blocks = _HEADER.split(text)
    # split gives [before, elapsed1, body1, elapsed2, body2, ...]
    for elapsed, body in zip(blocks[1::2], blocks[2::2]):
        watts = {unit.lower(): float(value) / (1000 if scale == "mW" else 1) for unit, value, scale in _POWER.findall(body)}
        if watts:
            out.append((float(elapsed) / 1000, watts))
    return out


def joules(samples: list[Sample], windows: list[tuple[float, float]]) -> dict[str, float]:
    """Energy per unit inside ``windows`` (monotonic start, end): each sample's power times the part
    of its interval [end - seconds, end] that overlaps a window."""
    total = {"cpu": 0.0, "gpu": 0.0, "ane": 0.0}
    for s in samples:
        start = s.end - s.seconds
        overlap = sum(max(0.0, min(s.end, b) - max(start, a)) for a, b in windows)
        for unit, w in s.watts.items():
            total[unit] = total.get(unit, 0.0) + w * overlap
    return total


def available() -> str | None:
    """None if powermetrics can run here, else why not."""
    if sys.platform != "darwin":
        return "powermetrics exists on macOS only"
    if shutil.which("powermetrics") is None:
        return "powermetrics not found"
    if os.geteuid() != 0:
        return "powermetrics needs root: run the benchmark with sudo"
    return None


class PowerSampler:
    """Runs powermetrics in the background; ``stop()`` returns the samples read."""

    def __init__(self, interval_ms: int = 100):
        self.samples: list[Sample] = []
        self._buffer = ""
        self._proc = subprocess.Popen(
            ["powermetrics", "--samplers", "cpu_power,gpu_power,ane_power", "-i", str(interval_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if _HEADER.search(line) and self._buffer:
                self._flush()
            self._buffer += line
        self._flush()

    def _flush(self) -> None:
        for seconds, watts in parse_samples(self._buffer):
            self.samples.append(Sample(time.monotonic(), seconds, watts))
        self._buffer = ""

    def stop(self) -> list[Sample]:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._thread.join(timeout=5)
        return self.samples
