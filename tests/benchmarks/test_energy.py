"""Energy from powermetrics: parsing a captured Apple Silicon output, integrating power over the
measured windows, and the sampler itself driving a real process.

powermetrics exists on macOS only and needs root, so the live tests put a stand-in named
``powermetrics`` first on PATH: a small Python program that prints what powermetrics prints, in
its format, when the test releases a sample, and buffers its output as a C program writing to a
pipe does unless ``-b`` says otherwise (what powermetrics' ``--buffer-size`` controls). The
sampler under test is unchanged: it spawns the process, reads its pipe and parses its text.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from coreml_sd.benchmarks import energy
from coreml_sd.benchmarks.energy import Sample

# A two-sample capture in the format `powermetrics --samplers cpu_power,gpu_power,ane_power,thermal`
# prints on an Apple M1 Pro (MacBookPro18,3), macOS 14. Per-CPU lines trimmed to two cores per
# cluster. "GPU Power" appears in both the processor section and the GPU section.
CAPTURE = """\
Machine model: MacBookPro18,3
OS version: 23F79
Boot arguments:
Boot time: Mon Nov 24 08:12:03 2026



*** Sampled system activity (Tue Nov 25 10:00:00 2026 +0100) (102.31ms elapsed) ***


**** Processor usage ****

E-Cluster HW active frequency: 1310 MHz
E-Cluster HW active residency:  62.08% (600 MHz:   0% 972 MHz:  41% 1332 MHz:  13% 1704 MHz:  12% 2064 MHz:  34%)
E-Cluster idle residency:  37.92%
CPU 0 frequency: 1402 MHz
CPU 0 active residency:  48.30% (600 MHz:   0% 972 MHz:  18% 1332 MHz: 5.9% 1704 MHz: 6.2% 2064 MHz:  18%)
CPU 0 idle residency:  51.70%
CPU 1 frequency: 1395 MHz
CPU 1 active residency:  41.12% (600 MHz:   0% 972 MHz:  16% 1332 MHz: 4.8% 1704 MHz: 5.1% 2064 MHz:  15%)
CPU 1 idle residency:  58.88%

P0-Cluster HW active frequency: 3104 MHz
P0-Cluster HW active residency:  98.60% (600 MHz:   0% 828 MHz:   0% 1296 MHz:   0% 1956 MHz: 1.1% 2580 MHz: 9.5% 3228 MHz:  88%)
P0-Cluster idle residency:   1.40%
CPU 2 frequency: 3156 MHz
CPU 2 active residency:  96.21% (600 MHz:   0% 828 MHz:   0% 1296 MHz:   0% 1956 MHz: 1.0% 2580 MHz: 8.9% 3228 MHz:  86%)
CPU 2 idle residency:   3.79%
CPU 3 frequency: 3149 MHz
CPU 3 active residency:  95.02% (600 MHz:   0% 828 MHz:   0% 1296 MHz:   0% 1956 MHz: 1.2% 2580 MHz: 9.0% 3228 MHz:  85%)
CPU 3 idle residency:   4.98%

P1-Cluster HW active frequency: 2280 MHz
P1-Cluster HW active residency:  35.44% (600 MHz:  21% 828 MHz:   0% 1296 MHz: 2.2% 1956 MHz: 3.1% 2580 MHz: 2.6% 3228 MHz: 6.5%)
P1-Cluster idle residency:  64.56%
CPU 6 frequency: 2301 MHz
CPU 6 active residency:  20.17% (600 MHz:  12% 828 MHz:   0% 1296 MHz: 1.3% 1956 MHz: 1.8% 2580 MHz: 1.5% 3228 MHz: 3.6%)
CPU 6 idle residency:  79.83%
CPU 7 frequency: 2255 MHz
CPU 7 active residency:  11.90% (600 MHz: 7.2% 828 MHz:   0% 1296 MHz: 0.7% 1956 MHz: 1.1% 2580 MHz: 0.9% 3228 MHz: 2.0%)
CPU 7 idle residency:  88.10%

CPU Power: 14217 mW
GPU Power: 312 mW
ANE Power: 4126 mW
Combined Power (CPU + GPU + ANE): 18655 mW

**** GPU usage ****

GPU HW active frequency: 388 MHz
GPU HW active residency:   6.45% (388 MHz: 6.4% 486 MHz:   0% 648 MHz:   0% 777 MHz:   0% 972 MHz:   0% 1296 MHz:   0%)
GPU SW requested state: (P1 : 100% P2 :   0% P3 :   0% P4 :   0% P5 :   0% P6 :   0%)
GPU idle residency:  93.55%
GPU Power: 312 mW

**** Thermal pressure ****

Current pressure level: Nominal

*** Sampled system activity (Tue Nov 25 10:00:00 2026 +0100) (100.87ms elapsed) ***


**** Processor usage ****

E-Cluster HW active frequency: 1122 MHz
E-Cluster HW active residency:  55.71% (600 MHz:   0% 972 MHz:  52% 1332 MHz:  11% 1704 MHz: 9.4% 2064 MHz:  27%)
E-Cluster idle residency:  44.29%

P0-Cluster HW active frequency: 3228 MHz
P0-Cluster HW active residency: 100.00% (600 MHz:   0% 828 MHz:   0% 1296 MHz:   0% 1956 MHz:   0% 2580 MHz:   0% 3228 MHz: 100%)
P0-Cluster idle residency:   0.00%

P1-Cluster HW active frequency: 3228 MHz
P1-Cluster HW active residency:  99.12% (600 MHz:   0% 828 MHz:   0% 1296 MHz:   0% 1956 MHz:   0% 2580 MHz: 1.0% 3228 MHz:  99%)
P1-Cluster idle residency:   0.88%

CPU Power: 21046 mW
GPU Power: 9 mW
ANE Power: 0 mW
Combined Power (CPU + GPU + ANE): 21055 mW

**** GPU usage ****

GPU HW active frequency: 0 MHz
GPU HW active residency:   0.00% (388 MHz:   0% 486 MHz:   0% 648 MHz:   0% 777 MHz:   0% 972 MHz:   0% 1296 MHz:   0%)
GPU SW requested state: (P1 : 100% P2 :   0% P3 :   0% P4 :   0% P5 :   0% P6 :   0%)
GPU idle residency: 100.00%
GPU Power: 9 mW

**** Thermal pressure ****

Current pressure level: Moderate

"""


def test_parse_a_captured_apple_silicon_output():
    # Values read off the capture by hand: mW -> W, GPU counted once per sample although printed twice.
    assert energy.parse_samples(CAPTURE) == [
        (0.10231, {"cpu": 14.217, "gpu": 0.312, "ane": 4.126}, "Nominal"),
        (0.10087, {"cpu": 21.046, "gpu": 0.009, "ane": 0.0}, "Moderate"),
    ]


def test_per_cluster_and_combined_lines_are_not_units():
    watts, pressure = energy.parse_body("E-Cluster Power: 396 mW\nP0-Cluster Power: 2000 mW\n"
                                        "Combined Power (CPU + GPU + ANE): 18655 mW\n")
    assert watts == {} and pressure is None


def test_integrate_over_windows():
    samples = [Sample(end=10.1, seconds=0.1, watts={"cpu": 1.0, "gpu": 0.0, "ane": 2.0}),
               Sample(end=10.3, seconds=0.2, watts={"cpu": 3.0, "gpu": 1.0, "ane": 0.0})]
    # Window [10.05, 10.2]: half of the first sample (0.05 s), half of the second (0.1 s).
    integral = energy.integrate(samples, [(10.05, 10.2)])
    assert integral.joules["cpu"] == pytest.approx(0.05 * 1.0 + 0.1 * 3.0)
    assert integral.joules["ane"] == pytest.approx(0.05 * 2.0)
    assert integral.joules["gpu"] == pytest.approx(0.1 * 1.0)
    assert integral.coverage == pytest.approx(1.0)


def test_overlapping_stamps_are_not_counted_twice():
    # The second header arrived 10 ms early relative to its elapsed: [10.09, 10.19] overlaps the
    # first sample's [10.0, 10.1] by 10 ms, which belongs to the first sample only.
    samples = [Sample(end=10.1, seconds=0.1, watts={"cpu": 1.0}), Sample(end=10.19, seconds=0.1, watts={"cpu": 1.0})]
    integral = energy.integrate(samples, [(10.0, 10.19)])
    assert integral.joules["cpu"] == pytest.approx(0.19)
    assert integral.covered_s == pytest.approx(0.19)


def test_energy_is_absent_unless_samples_cover_the_windows():
    samples = [Sample(end=10.1, seconds=0.1, watts={"cpu": 1.0, "gpu": 0.5, "ane": 2.0})]
    # No overlap at all: no energy (not 0.0 J).
    assert energy.energy_per_step(samples, [(20.0, 21.0)], steps=10)[0] is None
    # Half covered: still absent, and the reason says so.
    e, why = energy.energy_per_step(samples, [(10.0, 10.2)], steps=10)
    assert e is None and "50%" in why
    assert energy.energy_per_step([], [(10.0, 10.1)], steps=10) == (None, "powermetrics gave no sample")
    # Covered: joules per step, per unit.
    e, why = energy.energy_per_step(samples, [(10.0, 10.1)], steps=2, interval_ms=100)
    assert why is None
    assert e == {"cpu_j_per_step": 0.05, "gpu_j_per_step": 0.025, "ane_j_per_step": 0.1, "coverage": 1.0,
                 "interval_ms": 100, "sampler": "powermetrics"}


def test_a_unit_powermetrics_never_reported_is_null():
    samples = [Sample(end=1.0, seconds=1.0, watts={"cpu": 2.0, "gpu": 1.0})]  # no ANE line
    e, _ = energy.energy_per_step(samples, [(0.0, 1.0)], steps=4)
    assert e["ane_j_per_step"] is None and e["cpu_j_per_step"] == 0.5


def test_pressure_levels_in_the_windows_least_severe_first():
    samples = [Sample(1.0, 1.0, {}, "Heavy"), Sample(2.0, 1.0, {}, "Nominal"), Sample(3.0, 1.0, {}, "Moderate"),
               Sample(9.0, 1.0, {}, "Trapping")]
    assert energy.pressure_levels(samples, [(0.5, 2.9)]) == ["Nominal", "Moderate", "Heavy"]
    assert energy.pressure_levels(samples, [(20.0, 21.0)]) is None


# ------------------------------------------------------------------ the sampler, on a real process

FAKE_POWERMETRICS = '''\
#!{python}
"""Stand-in for macOS powermetrics, for tests: prints a sample each time a line is appended to
$FAKE_POWERMETRICS_CONTROL ("cpu_mW gpu_mW ane_mW pressure"), or every -i ms the line in
$FAKE_POWERMETRICS_AUTO, and appends the elapsed time it printed to $FAKE_POWERMETRICS_LOG."""
import argparse, os, sys, time

parser = argparse.ArgumentParser(prog="powermetrics")
parser.add_argument("-s", "--samplers", required=True)
parser.add_argument("-i", "--sample-rate", type=int, default=5000)
parser.add_argument("-b", "--buffer-size", type=int)
parser.add_argument("-n", "--sample-count", type=int, default=0)
args = parser.parse_args()
if os.environ.get("FAKE_POWERMETRICS_NOT_ROOT"):
    sys.exit("powermetrics must be invoked as the superuser")
samplers = args.samplers.split(",")
unknown = set(samplers) - {{"cpu_power", "gpu_power", "ane_power", "thermal"}}
if unknown:
    sys.exit("unrecognized sampler: " + ",".join(sorted(unknown)))
# Like C stdio on a pipe: block-buffered unless -b 0 (none) or -b 1 (line).
out = open(1, "w", buffering=1 if args.buffer_size in (0, 1) else 65536, closefd=False)
out.write("Machine model: MacBookPro18,3\\nOS version: 23F79\\nBoot arguments:\\nBoot time: Mon Nov 24 08:12:03 2026\\n\\n\\n\\n")
control, log = os.environ["FAKE_POWERMETRICS_CONTROL"], os.environ["FAKE_POWERMETRICS_LOG"]
last, done = time.monotonic(), 0
while not args.sample_count or done < args.sample_count:
    if os.environ.get("FAKE_POWERMETRICS_AUTO"):
        time.sleep(args.sample_rate / 1000)
        pending = [os.environ["FAKE_POWERMETRICS_AUTO"]]
    else:
        with open(control) as f:
            pending = f.read().split("\\n")[:-1][done:]  # complete lines only
    for line in pending:
        cpu, gpu, ane, pressure = line.split()
        now = time.monotonic()
        elapsed = f"{{(now - last) * 1000:.2f}}"
        last = now
        out.write(f"*** Sampled system activity (Tue Nov 25 10:00:00 2026 +0100) ({{elapsed}}ms elapsed) ***\\n\\n\\n")
        if "cpu_power" in samplers:
            out.write("**** Processor usage ****\\n\\nE-Cluster HW active frequency: 1310 MHz\\n"
                      "E-Cluster idle residency:  37.92%\\nCPU 0 frequency: 1402 MHz\\n\\n"
                      f"CPU Power: {{cpu}} mW\\nGPU Power: {{gpu}} mW\\nANE Power: {{ane}} mW\\n"
                      f"Combined Power (CPU + GPU + ANE): {{int(cpu) + int(gpu) + int(ane)}} mW\\n\\n")
        if "gpu_power" in samplers:
            out.write(f"**** GPU usage ****\\n\\nGPU HW active frequency: 388 MHz\\nGPU idle residency:  93.55%\\n"
                      f"GPU Power: {{gpu}} mW\\n\\n")
        if "thermal" in samplers:
            out.write(f"**** Thermal pressure ****\\n\\nCurrent pressure level: {{pressure}}\\n\\n")
        with open(log, "a") as f:
            f.write(elapsed + "\\n")
        done += 1
    time.sleep(0.005)
out.flush()
'''


@pytest.fixture
def fake_powermetrics(tmp_path, monkeypatch):
    """(release, log): ``release("cpu gpu ane pressure")`` makes the stand-in print one sample."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "powermetrics"
    script.write_text(FAKE_POWERMETRICS.format(python=sys.executable))
    script.chmod(0o755)
    control, log = tmp_path / "control", tmp_path / "log"
    control.write_text("")
    log.write_text("")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_POWERMETRICS_CONTROL", str(control))
    monkeypatch.setenv("FAKE_POWERMETRICS_LOG", str(log))

    def release(line: str) -> None:
        with open(control, "a") as f:
            f.write(line + "\n")

    return release, log


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.002)


def test_sampler_stamps_each_sample_by_its_own_header(fake_powermetrics):
    """A sample is stamped when its own header line arrives (the end of its interval), not when
    the next one does; this needs line-buffered output (-b 1): block-buffered, the stand-in's
    header would not arrive until it exits."""
    release, log = fake_powermetrics
    sampler = energy.PowerSampler(interval_ms=100)
    try:
        assert sampler.wait_started(timeout=0.05) is False  # nothing printed yet
        released = time.monotonic()
        release("1250 312 4126 Nominal")
        assert sampler.wait_started(timeout=20)
        seen = time.monotonic()
        first_header = sampler.last_header_at
        assert released <= first_header <= seen
        assert sampler.samples == []  # complete only when the next header arrives

        release("2000 0 0 Moderate")
        wait_for(lambda: len(sampler.samples) == 1, "the first sample")
        second_header = sampler.last_header_at
        release("900 10 0 Nominal")  # completes the second sample
        samples = sampler.stop(until=second_header)
    finally:
        sampler.stop()
    elapsed = [float(ms) / 1000 for ms in log.read_text().split()]
    assert samples == [
        Sample(end=first_header, seconds=elapsed[0], watts={"cpu": 1.25, "gpu": 0.312, "ane": 4.126}, pressure="Nominal"),
        Sample(end=second_header, seconds=elapsed[1], watts={"cpu": 2.0, "gpu": 0.0, "ane": 0.0}, pressure="Moderate"),
    ]
    # Energy over the second sample's interval (less any start it shares with the first sample,
    # whose header may have arrived a little late): its power times its length.
    a, b = samples
    window = [(max(b.end - b.seconds, a.end), b.end)]
    integral = energy.integrate(samples, window)
    assert integral.coverage == pytest.approx(1.0)
    assert integral.joules == pytest.approx({"cpu": 2.0 * (window[0][1] - window[0][0]), "gpu": 0.0, "ane": 0.0})
    assert energy.pressure_levels(samples, [(b.end - b.seconds / 2, b.end)]) == ["Moderate"]


def test_sampler_when_powermetrics_refuses(fake_powermetrics, monkeypatch):
    """powermetrics exits at once without root: no sample, no energy, and stop() does not wait
    for a sample that cannot come."""
    monkeypatch.setenv("FAKE_POWERMETRICS_NOT_ROOT", "1")
    sampler = energy.PowerSampler(interval_ms=100)
    assert sampler.wait_started(timeout=60) is False  # returns when powermetrics exits, not after a minute
    samples = sampler.stop(until=time.monotonic() + 3600, timeout=60)
    assert samples == []
    assert energy.energy_per_step(samples, [(0.0, 1.0)], steps=1) == (None, "powermetrics gave no sample")


def test_energy_unavailable_says_why():
    reason = energy.available()
    if sys.platform != "darwin":
        assert reason == "powermetrics exists on macOS only"
    elif os.geteuid() != 0:
        assert "sudo" in reason


def test_stand_in_holds_output_back_without_b(fake_powermetrics, tmp_path):
    """The stand-in's premise, as powermetrics behaves on a pipe: without -b, a printed sample
    stays in the process's buffer (nothing readable), and all of it arrives at exit."""
    import select
    import subprocess

    release, log = fake_powermetrics
    proc = subprocess.Popen(["powermetrics", "--samplers", energy.SAMPLERS, "-i", "100", "-n", "1"],
                            stdout=subprocess.PIPE, text=True)
    try:
        release("1 2 3 Nominal")
        wait_for(lambda: log.read_text().count("\n") == 1, "the stand-in to print its sample")
        assert select.select([proc.stdout], [], [], 0)[0] == []  # printed, but not on the pipe
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert "CPU Power: 1 mW" in out and out.count("*** Sampled system activity") == 1


def test_bench_measures_energy_with_powermetrics(fake_powermetrics, tiny_bundle, monkeypatch):
    """bench's child path with energy on (powermetrics sampling every 100 ms at constant power):
    the result carries energy per step for each unit and the thermal pressure, and is valid."""
    from coreml_sd.benchmarks import bench
    from coreml_sd.benchmarks.schema import validate_result

    monkeypatch.setenv("FAKE_POWERMETRICS_AUTO", "1250 312 4126 Nominal")
    logged = []
    result = bench.measure(str(tiny_bundle("sd1", "split-einsum")), "mil", "CPU_ONLY", 4, 1, 0, bench.SCHEDULER,
                           True, logged.append)
    problems = validate_result(result)
    assert problems == [] and not any("energy:" in line for line in logged), (problems, logged)
    e = result["energy"]
    assert e["sampler"] == "powermetrics" and e["coverage"] >= energy.MIN_COVERAGE
    # Constant power: the units' energies stand as their powers (rounding to 1e-4 J aside).
    assert e["ane_j_per_step"] / e["cpu_j_per_step"] == pytest.approx(4126 / 1250, rel=1e-2)
    assert e["gpu_j_per_step"] / e["cpu_j_per_step"] == pytest.approx(312 / 1250, rel=2e-2)
    assert result["thermal_pressure"] == ["Nominal"]
