"""What machine a benchmark ran on, and in what condition, read from the system.

macOS: chip name, performance/efficiency core counts, GPU core count, memory, macOS version and
build from ``sysctl``, ``sw_vers``, ``system_profiler`` and ``ioreg``; the conditions (power
source and the thermal warning ``pmset -g therm`` reports) from ``pmset``, read before and after
measuring. Linux: CPU model, core count and memory from ``/proc``. Every parser is a pure
function of a command's text output (unit-tested on recorded outputs); a value the system does
not tell is ``None``, never guessed.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from typing import Any


def _run(*cmd: str, timeout: float = 10.0) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


# ------------------------------------------------------------------ parsers (pure)


def parse_sw_vers(text: str | None) -> tuple[str | None, str | None]:
    """(product version, build) from ``sw_vers`` output."""
    fields = dict(re.findall(r"^(\w+):\s*(.+?)\s*$", text or "", re.M))
    return fields.get("ProductVersion"), fields.get("BuildVersion")


def parse_gpu_cores(system_profiler_json: str | None, ioreg_text: str | None) -> int | None:
    """GPU core count from ``system_profiler -json SPDisplaysDataType`` (``sppci_cores``), else from
    ``ioreg -rc AGXAccelerator`` (``"gpu-core-count" = N``)."""
    try:
        for gpu in json.loads(system_profiler_json or "{}").get("SPDisplaysDataType", []):
            cores = _int(str(gpu.get("sppci_cores", "")))
            if cores:
                return cores
    except ValueError:
        pass
    match = re.search(r'"gpu-core-count"\s*=\s*(\d+)', ioreg_text or "")
    return int(match.group(1)) if match else None


def parse_power_source(pmset_batt: str | None) -> str | None:
    """"AC" or "Battery" from ``pmset -g batt`` ("Now drawing from 'AC Power'")."""
    match = re.search(r"drawing from '([^']+)'", pmset_batt or "")
    if not match:
        return None
    return {"AC Power": "AC", "Battery Power": "Battery"}.get(match.group(1), match.group(1))


def parse_thermal_warning(pmset_therm: str | None) -> str | None:
    """What ``pmset -g therm`` reports, which is a warning log, not a temperature or pressure
    reading: "none recorded" when it notes that no thermal warning level has been recorded and
    shows no CPU speed limit below 100 (what Apple Silicon Macs print almost always), else the
    warning level or speed limit it shows; None if the output says neither."""
    text = pmset_therm or ""
    limit = re.search(r"CPU_Speed_Limit\s*=\s*(\d+)", text)
    warning = re.search(r"[Tt]hermal [Ww]arning [Ll]evel(?: set to| is|:|\s*=)\s*(\d+)", text)
    if warning and warning.group(1) != "0":
        return f"thermal warning level {warning.group(1)}"
    if limit and limit.group(1) != "100":
        return f"CPU speed limit {limit.group(1)}%"
    if warning or limit or "No thermal warning level has been recorded" in text:
        return "none recorded"
    return None


def parse_cpuinfo(text: str | None) -> str | None:
    """The CPU model from /proc/cpuinfo ("model name" on x86, "Model"/"CPU part" elsewhere)."""
    for key in ("model name", "Model", "Hardware"):
        match = re.search(rf"^{key}\s*:\s*(.+?)\s*$", text or "", re.M)
        if match:
            return match.group(1)
    return None


def parse_meminfo(text: str | None) -> int | None:
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", text or "", re.M)
    return int(match.group(1)) * 1024 if match else None


# ------------------------------------------------------------------ probes


def probe_macos(run=_run) -> dict[str, Any]:
    version, build = parse_sw_vers(run("sw_vers"))
    return {
        "os": "macOS",
        "os_version": version,
        "os_build": build,
        "chip": (run("sysctl", "-n", "machdep.cpu.brand_string") or "").strip() or None,
        "performance_cores": _int(run("sysctl", "-n", "hw.perflevel0.physicalcpu")),
        "efficiency_cores": _int(run("sysctl", "-n", "hw.perflevel1.physicalcpu")),
        "cpu_cores": _int(run("sysctl", "-n", "hw.physicalcpu")),
        "gpu_cores": parse_gpu_cores(run("system_profiler", "-json", "SPDisplaysDataType", timeout=30),
                                     run("ioreg", "-rc", "AGXAccelerator")),
        "memory_bytes": _int(run("sysctl", "-n", "hw.memsize")),
    }


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def probe_linux() -> dict[str, Any]:
    return {
        "os": "Linux",
        "os_version": platform.release(),
        "os_build": None,
        "chip": parse_cpuinfo(_read("/proc/cpuinfo")) or platform.processor() or platform.machine(),
        "performance_cores": None,
        "efficiency_cores": None,
        "cpu_cores": os.cpu_count(),
        "gpu_cores": None,
        "memory_bytes": parse_meminfo(_read("/proc/meminfo")),
    }


def probe() -> dict[str, Any]:
    """The machine this process runs on."""
    info = probe_macos() if sys.platform == "darwin" else probe_linux()
    info["arch"] = platform.machine()
    return info


def conditions_macos(run=_run) -> dict[str, str | None]:
    return {
        "power_source": parse_power_source(run("pmset", "-g", "batt")),
        "thermal_warning": parse_thermal_warning(run("pmset", "-g", "therm")),
    }


def conditions() -> dict[str, str | None]:
    """What may change while the benchmark runs (read before and after measuring): the power
    source and pmset's thermal warning on macOS; unknown (None) elsewhere."""
    if sys.platform == "darwin":
        return conditions_macos()
    return {"power_source": None, "thermal_warning": None}
