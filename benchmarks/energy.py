"""Energy per denoising step (and thermal pressure) on macOS, from ``powermetrics`` (root only:
run bench with sudo).

``powermetrics --samplers cpu_power,gpu_power,ane_power,thermal -i MS -b 1`` prints, per sample, a
header giving the sample's length, then one section per sampler::

    *** Sampled system activity (Tue Nov 25 10:00:00 2026 +0100) (100.27ms elapsed) ***
    **** Processor usage ****
    ...per-cluster and per-CPU frequency and residency lines...
    CPU Power: 1234 mW
    GPU Power: 56 mW
    ANE Power: 0 mW
    Combined Power (CPU + GPU + ANE): 1290 mW
    **** GPU usage ****
    ...GPU HW active frequency / residency lines...
    GPU Power: 56 mW
    **** Thermal pressure ****
    Current pressure level: Nominal

``-b 1`` makes powermetrics line-buffered: through a pipe it would otherwise hold whole blocks of
output back, and a sample would be read seconds after it was taken. A sample is printed when its
interval ends, so the sampler stamps each one with the monotonic time its own header line
arrived: it covers [stamp - elapsed, stamp]. A sample is complete when the next header arrives.

Energy is integrated over the time windows the benchmark marks (the denoising loops of the
measured runs) and reported only when samples cover at least ``MIN_COVERAGE`` of them; where
powermetrics cannot run, or its samples do not cover the windows, energy is None: absent, never
estimated.
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

SAMPLERS = "cpu_power,gpu_power,ane_power,thermal"
INTERVAL_MS = 100
MIN_COVERAGE = 0.9  # the loss is header-arrival jitter between back-to-back samples, a few %
UNITS = ("cpu", "gpu", "ane")
# powermetrics' thermal pressure levels, least to most severe (OSThermalPressureLevel).
PRESSURE_LEVELS = ("Nominal", "Moderate", "Heavy", "Trapping", "Sleeping")

_HEADER = re.compile(r"^\*\*\* Sampled system activity .*\((\d+(?:\.\d+)?)ms elapsed\) \*\*\*")
# Apple Silicon prints milliwatts; a line in any other unit is not read (energy stays absent).
_POWER = re.compile(r"^(CPU|GPU|ANE) Power:\s*(\d+(?:\.\d+)?) mW\s*$", re.M)
_PRESSURE = re.compile(r"^Current pressure level:\s*(\w+)\s*$", re.M)


@dataclass(frozen=True)
class Sample:
    end: float  # monotonic seconds when the sample's header arrived (the end of its interval)
    seconds: float  # its length, as powermetrics measured it
    watts: dict[str, float]  # "cpu", "gpu", "ane": those the sample reported
    pressure: str | None = None  # thermal pressure level, when the thermal sampler ran


@dataclass(frozen=True)
class Integral:
    joules: dict[str, float | None]  # per unit; None when no covering sample reported the unit
    covered_s: float  # window time covered by samples
    window_s: float  # total window time

    @property
    def coverage(self) -> float:
        return self.covered_s / self.window_s if self.window_s > 0 else 0.0


# ------------------------------------------------------------------ parsing (pure)


def parse_body(body: str) -> tuple[dict[str, float], str | None]:
    """Watts per unit and the thermal pressure level from one sample's text (after its header).

    "GPU Power" appears twice when both cpu_power and gpu_power run (in the processor section and
    again in the GPU section) for the same interval: the first line of each unit counts, once.
    """
    watts: dict[str, float] = {}
    for unit, milliwatts in _POWER.findall(body):
        watts.setdefault(unit.lower(), float(milliwatts) / 1000)
    pressure = _PRESSURE.search(body)
    return watts, pressure.group(1) if pressure else None


def parse_header(line: str) -> float | None:
    """The sample length in seconds from a sample header line, or None for any other line."""
    match = _HEADER.match(line)
    return float(match.group(1)) / 1000 if match else None


class SampleSplitter:
    """Cuts powermetrics' output, line by line, into samples: a sample begins at its header line
    and is complete when the next header arrives (or, for output that ended on its own, at the
    end). A sample is stamped with the time its own header arrived: the end of its interval."""

    def __init__(self) -> None:
        self._pending: tuple[float, float] | None = None  # (stamp, seconds) of the sample being read
        self._body: list[str] = []

    def feed(self, line: str, now: float) -> tuple[bool, Sample | None]:
        """Take one line (with its newline) read at ``now``: (whether it was a header, the sample
        it completed, if any)."""
        seconds = parse_header(line)
        if seconds is None:
            if self._pending is not None:
                self._body.append(line)
            return False, None
        done = self.complete()
        self._pending, self._body = (now, seconds), []
        return True, done

    def complete(self) -> Sample | None:
        """Close the sample being read (None if none, or if it held no reading)."""
        if self._pending is None:
            return None
        (stamp, seconds), self._pending = self._pending, None
        watts, pressure = parse_body("".join(self._body))
        return Sample(stamp, seconds, watts, pressure) if watts or pressure else None

    def drop(self) -> None:
        """Forget the sample being read (cut short)."""
        self._pending = None


def parse_samples(text: str) -> list[tuple[float, dict[str, float], str | None]]:
    """(length in seconds, watts per unit, pressure) of each sample in a whole powermetrics output,
    cut as ``PowerSampler`` cuts it."""
    splitter, samples = SampleSplitter(), []
    for line in text.splitlines(keepends=True):
        samples.append(splitter.feed(line, 0.0)[1])
    samples.append(splitter.complete())
    return [(s.seconds, s.watts, s.pressure) for s in samples if s is not None]


# ------------------------------------------------------------------ integration (pure)


def _intervals(samples: list[Sample]) -> list[tuple[float, float, Sample]]:
    """Each sample's [start, end], clipped so that consecutive samples never overlap (header
    arrival jitter would otherwise count a few milliseconds twice)."""
    out, previous_end = [], float("-inf")
    for s in sorted(samples, key=lambda s: s.end):
        start = max(s.end - s.seconds, previous_end)
        if s.end > start:
            out.append((start, s.end, s))
        previous_end = max(previous_end, s.end)
    return out


def _overlap(a: float, b: float, windows: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, w1) - max(a, w0)) for w0, w1 in windows)


def integrate(samples: list[Sample], windows: list[tuple[float, float]]) -> Integral:
    """Energy per unit inside ``windows`` (monotonic start, end; not overlapping each other):
    each sample's power times the part of its interval inside a window."""
    joules: dict[str, float | None] = {unit: None for unit in UNITS}
    covered = 0.0
    for start, end, s in _intervals(samples):
        inside = _overlap(start, end, windows)
        if inside <= 0:
            continue
        covered += inside
        for unit, watts in s.watts.items():
            joules[unit] = (joules.get(unit) or 0.0) + watts * inside
    return Integral(joules, covered, sum(max(0.0, b - a) for a, b in windows))


def pressure_levels(samples: list[Sample], windows: list[tuple[float, float]]) -> list[str] | None:
    """The distinct thermal pressure levels of the samples overlapping ``windows``, least severe
    first (levels this code does not know go last); None when no such sample had one."""
    seen = {s.pressure for start, end, s in _intervals(samples) if s.pressure and _overlap(start, end, windows) > 0}
    if not seen:
        return None
    rank = {level: i for i, level in enumerate(PRESSURE_LEVELS)}
    return sorted(seen, key=lambda level: (rank.get(level, len(rank)), level))


def energy_per_step(samples: list[Sample], windows: list[tuple[float, float]], steps: int,
                    interval_ms: int = INTERVAL_MS) -> tuple[dict | None, str | None]:
    """(the record's ``energy`` object, None) or (None, why not): joules per step per unit over
    ``windows``, which hold ``steps`` denoising steps in all."""
    if not samples:
        return None, "powermetrics gave no sample"
    integral = integrate(samples, windows)
    if integral.coverage < MIN_COVERAGE:
        return None, f"powermetrics samples cover {integral.coverage:.0%} of the measured time, below {MIN_COVERAGE:.0%}"
    if all(j is None for j in integral.joules.values()):
        return None, "powermetrics samples hold no power lines in mW"
    per_step = {f"{unit}_j_per_step": None if j is None else round(j / steps, 4) for unit, j in integral.joules.items()}
    return per_step | {"coverage": round(integral.coverage, 4), "interval_ms": interval_ms, "sampler": "powermetrics"}, None


# ------------------------------------------------------------------ the sampler


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
    """Runs powermetrics in the background; ``stop()`` returns the complete samples read."""

    def __init__(self, interval_ms: int = INTERVAL_MS, samplers: str = SAMPLERS):
        self.interval_ms = interval_ms
        self.samples: list[Sample] = []
        self.last_header_at: float | None = None  # monotonic time the latest header arrived
        self._splitter = SampleSplitter()
        self._stopping = False
        self._ended = False  # powermetrics' output has ended
        self._changed = threading.Condition()
        self._proc = subprocess.Popen(
            ["powermetrics", "--samplers", samplers, "-i", str(interval_ms), "-b", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            now = time.monotonic()  # first, before any parsing: the stamp of a header
            with self._changed:
                header, done = self._splitter.feed(line, now)
                if header:
                    self.last_header_at = now
                if done is not None:
                    self.samples.append(done)
                self._changed.notify_all()
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        with self._changed:
            if code == 0 and not self._stopping:  # ended on its own (-n): its last sample is whole
                done = self._splitter.complete()
                if done is not None:
                    self.samples.append(done)
            self._splitter.drop()
            self._ended = True
            self._changed.notify_all()

    def wait_started(self, timeout: float = 5.0) -> bool:
        """Wait until the first sample header arrives (so that what follows is sampled); False if
        none came within ``timeout`` seconds or powermetrics ended."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self.last_header_at is not None or self._ended, timeout=timeout
            ) and self.last_header_at is not None

    def stop(self, until: float | None = None, timeout: float | None = None) -> list[Sample]:
        """Stop powermetrics and return the complete samples, first waiting (at most ``timeout``
        seconds; default a few intervals) until a sample ending at or after ``until`` is complete."""
        if until is not None:
            wait = timeout if timeout is not None else 3 * self.interval_ms / 1000 + 2.0
            with self._changed:
                self._changed.wait_for(
                    lambda: any(s.end >= until for s in self.samples) or self._ended, timeout=wait)
        with self._changed:
            self._stopping = True  # a sample cut short by the stop is not a sample
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._thread.join(timeout=5)
        with self._changed:
            return list(self.samples)
