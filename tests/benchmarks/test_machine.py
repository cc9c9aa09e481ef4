"""The machine probe and the conditions, on recorded outputs of the system commands (formats as
macOS prints them: sw_vers, sysctl, system_profiler -json, ioreg, pmset). powermetrics: test_energy.py."""

from __future__ import annotations

import json

import pytest

from coreml_sd.benchmarks import machine

SW_VERS = "ProductName:\t\tmacOS\nProductVersion:\t\t14.5\nBuildVersion:\t\t23F79\n"
SYSTEM_PROFILER = json.dumps(
    {"SPDisplaysDataType": [{"_name": "Apple M2 Pro", "sppci_cores": "19", "sppci_model": "Apple M2 Pro"}]}
)
IOREG = (
    '+-o AGXAcceleratorG14X  <class AGXAcceleratorG14X, id 0x1000003a4>\n'
    '    {\n      "gpu-core-count" = 19\n      "model" = "Apple M2 Pro"\n    }\n'
)
PMSET_BATT_AC = "Now drawing from 'AC Power'\n -InternalBattery-0 (id=12345)\t100%; charged; 0:00 remaining present: true\n"
PMSET_BATT_BATTERY = (
    "Now drawing from 'Battery Power'\n"
    " -InternalBattery-0 (id=12345)\t72%; discharging; 3:15 remaining present: true\n"
)
THERM_NOMINAL = (
    "Note: No thermal warning level has been recorded\nNote: No performance warning level has been recorded\n"
    "2026-08-20 05:08:37 -0700 CPU Power notify\n\tCPU_Scheduler_Limit \t= 100\n"
    "\tCPU_Available_CPUs \t= 12\n\tCPU_Speed_Limit \t= 100\n"
)
THERM_NOTES_ONLY = "Note: No thermal warning level has been recorded\nNote: No performance warning level has been recorded\n"
# Not seen on a Mac by us (machines rarely record a warning): the parser accepts "level set to N",
# "level: N" and "level = N".
THERM_WARNING = "Thermal warning level set to 2.\nNote: No performance warning level has been recorded\n"
THERM_THROTTLED = (
    "2026-08-20 05:08:37 -0700 CPU Power notify\n\tCPU_Scheduler_Limit \t= 100\n"
    "\tCPU_Available_CPUs \t= 12\n\tCPU_Speed_Limit \t= 65\n"
)
def fake_run(outputs):
    def run(*cmd, timeout=10.0):
        return outputs.get(cmd)

    return run


def test_probe_macos_on_recorded_outputs():
    info = machine.probe_macos(fake_run({
        ("sw_vers",): SW_VERS,
        ("sysctl", "-n", "machdep.cpu.brand_string"): "Apple M2 Pro\n",
        ("sysctl", "-n", "hw.perflevel0.physicalcpu"): "8\n",
        ("sysctl", "-n", "hw.perflevel1.physicalcpu"): "4\n",
        ("sysctl", "-n", "hw.physicalcpu"): "12\n",
        ("sysctl", "-n", "hw.memsize"): "34359738368\n",
        ("system_profiler", "-json", "SPDisplaysDataType"): SYSTEM_PROFILER,
        ("ioreg", "-rc", "AGXAccelerator"): IOREG,
    }))
    assert info == {
        "os": "macOS", "os_version": "14.5", "os_build": "23F79", "chip": "Apple M2 Pro",
        "performance_cores": 8, "efficiency_cores": 4, "cpu_cores": 12, "gpu_cores": 19,
        "memory_bytes": 34359738368,
    }


def test_conditions_macos_on_recorded_outputs():
    assert machine.conditions_macos(fake_run({("pmset", "-g", "batt"): PMSET_BATT_BATTERY,
                                              ("pmset", "-g", "therm"): THERM_NOTES_ONLY})) == {
        "power_source": "Battery", "thermal_warning": "none recorded"}
    assert machine.conditions_macos(fake_run({})) == {"power_source": None, "thermal_warning": None}


def test_probe_macos_leaves_unknowns_empty():
    info = machine.probe_macos(fake_run({("sw_vers",): SW_VERS}))
    assert info["os_version"] == "14.5"
    assert all(info[k] is None for k in ("chip", "performance_cores", "gpu_cores", "memory_bytes"))


def test_gpu_cores_from_ioreg_when_system_profiler_has_none():
    assert machine.parse_gpu_cores('{"SPDisplaysDataType": [{"_name": "x"}]}', IOREG) == 19
    assert machine.parse_gpu_cores(None, None) is None


@pytest.mark.parametrize(("text", "warning"), [
    (THERM_NOMINAL, "none recorded"), (THERM_NOTES_ONLY, "none recorded"), (THERM_WARNING, "thermal warning level 2"),
    (THERM_THROTTLED, "CPU speed limit 65%"), ("", None), (None, None),
])
def test_thermal_warning_says_what_pmset_says(text, warning):
    assert machine.parse_thermal_warning(text) == warning


def test_power_source():
    assert machine.parse_power_source(PMSET_BATT_AC) == "AC"
    assert machine.parse_power_source(PMSET_BATT_BATTERY) == "Battery"
    assert machine.parse_power_source("No batteries\n") is None


def test_linux_parsers():
    cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n"
    assert machine.parse_cpuinfo(cpuinfo) == "Intel(R) Xeon(R) CPU @ 2.20GHz"
    assert machine.parse_meminfo("MemTotal:       24683656 kB\nMemFree: 1 kB\n") == 24683656 * 1024
    info = machine.probe()
    assert info["os"] in ("Linux", "macOS") and info["arch"]
    assert set(machine.conditions()) == {"power_source", "thermal_warning"}
