"""`coreml-sd bench` on a tiny bundle through the mil backend: a valid, self-consistent record;
and what bench does with bad bundles, bad output paths, Ctrl-C and sudo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from coreml_sd.benchmarks import bench as bench_mod
from coreml_sd.benchmarks.schema import SCHEMA_VERSION, RecordError, load_record, validate
from coreml_sd.cli import main
from helpers import coreml_sd_command

STEPS, RUNS, WARMUP = 3, 2, 1  # conftest.py's bench_record
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.fixture
def record(bench_record):
    """The session's bench record (conftest.py): 3 steps, 2 runs, 1 warm-up, mil."""
    return bench_record


def test_record_is_valid_and_complete(record, tiny_bundle):
    data = load_record(record)
    assert data["schema_version"] == SCHEMA_VERSION == 3
    assert data["settings"] == {**data["settings"], "steps": STEPS, "runs": RUNS, "warmup": WARMUP, "backend": "mil", "seed": 0}
    assert data["machine"]["os"] in ("Linux", "macOS") and data["machine"]["memory_bytes"] > 0
    assert set(data["conditions"]["before"]) == set(data["conditions"]["after"]) == {"power_source", "thermal_warning"}
    assert data["interrupted"] is False
    manifest = json.loads((tiny_bundle("sd1", "split-einsum") / "manifest.json").read_text())
    assert data["bundle"]["attention"] == "split-einsum" and data["bundle"]["family"] == "sd1"
    assert data["bundle"]["components"]["Unet"] == {"precision": "float16", "compression": None}
    assert data["bundle"]["image_size"] == manifest["image_size"]
    [result] = data["results"]
    assert result["status"] == "ok" and result["backend"] == "mil" and result["compute_units"] == "CPU_ONLY"
    assert [result["height"], result["width"]] == manifest["image_size"]  # the bundle's one size
    assert result["energy"] is None and result["thermal_pressure"] is None  # never invented without powermetrics


def test_record_is_internally_consistent(record):
    result = load_record(record)["results"][0]
    assert result["unet_ms_per_step"]["count"] == STEPS * RUNS
    assert result["host_ms_per_step"]["count"] == STEPS * RUNS
    assert len(result["runs"]) == RUNS
    for run in result["runs"]:
        stages = run["text_encoder_s"] + run["denoise_s"] + run["vae_decoder_s"]
        assert run["end_to_end_s"] >= stages > 0
    # denoise_s is recorded to 0.1 ms and iterations_per_second to 1e-4, both from the unrounded
    # median: for the tiny model's ~50 ms loops the rounding alone moves STEPS / denoise_s by 0.1%.
    denoise, ips = result["denoise_s"], result["iterations_per_second"]
    assert STEPS / (denoise + 5e-5) - 5e-5 <= ips <= STEPS / (denoise - 5e-5) + 5e-5
    assert result["unet_ms_per_step"]["median"] > result["host_ms_per_step"]["median"] > 0
    assert result["import_s"] > 0 and result["load_cold_s"] > 0 and result["load_warm_s"] > 0
    assert result["peak_rss_bytes"] > 100 * 2**20


# In a fresh interpreter (nothing imported yet), record which backend modules get imported while
# each pipeline is built; measure() builds two (cold, then warm).
COLD_LOAD_PROBE = r"""
import json, sys
from coreml_sd.benchmarks import bench
from coreml_sd.runtime import pipeline

built = []
build = pipeline.Pipeline.__init__
def watched(self, *args, **kwargs):
    before = set(sys.modules)
    build(self, *args, **kwargs)
    built.append(sorted(m for m in set(sys.modules) - before
                        if m.split(".")[0] in ("torch", "coremltools") or m.startswith("coreml_sd.runtime.backends.")))
pipeline.Pipeline.__init__ = watched
fresh = [m for m in ("torch", "coremltools", "coreml_sd.runtime.backends.mil") if m in sys.modules]
result = bench.measure(sys.argv[1], "mil", "CPU_ONLY", 1, 1, 0, bench.SCHEDULER, False, lambda line: None)
print(json.dumps({"fresh": fresh, "built": built, "import_s": result["import_s"]}))
"""


def test_cold_load_does_not_include_importing_the_backend(tiny_bundle):
    """The cold-load timer covers building the pipeline; importing coremltools and torch (seconds)
    happens before it, timed on its own as import_s."""
    proc = subprocess.run([sys.executable, "-c", COLD_LOAD_PROBE, str(tiny_bundle("sd1", "split-einsum"))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["fresh"] == []  # the backend really was imported inside measure()
    assert probe["built"] == [[], []]  # ...and not while a pipeline was being built
    assert probe["import_s"] > 0


def test_never_overwrites_a_record(record, tiny_bundle):
    before = record.read_bytes()
    result = CliRunner().invoke(main, ["bench", "--bundle", str(tiny_bundle("sd1", "split-einsum")), "-o", str(record)])
    assert result.exit_code != 0 and "exists" in result.output
    assert record.read_bytes() == before


def test_an_output_path_that_cannot_be_written_is_refused_before_measuring(tiny_bundle, tmp_path):
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(main, ["bench", "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--backend", "mil",
                                       "-o", str(tmp_path / "file" / "r.json")])
    assert result.exit_code == 1 and "is not a folder" in result.output and "Traceback" not in result.output
    assert "[mil" not in result.output  # nothing was measured


def test_a_failing_configuration_is_recorded_and_the_others_run(tiny_bundle, monkeypatch):
    """One configuration fails (a real child process, given a bundle that has gone missing);
    the others are still measured and the failure is recorded with its reason."""
    calls = []
    real = bench_mod._child

    def child(args, log):
        calls.append(args["compute_units"])
        if args["compute_units"] == "CPU_AND_NE":
            return real({**args, "bundle": "/nonexistent/bundle"}, log)
        return {"compute_units": args["compute_units"], "backend": args["backend"], "status": "ok", "stub": True}

    monkeypatch.setattr(bench_mod, "_child", child)
    monkeypatch.setattr(bench_mod, "require", lambda backend: None)  # three units even off macOS
    logged = []
    data = bench_mod.run_bench(str(tiny_bundle("sd1", "split-einsum")), ["CPU_ONLY", "CPU_AND_NE", "ALL"], "coreml",
                               1, 1, 0, log=logged.append)
    assert calls == ["CPU_ONLY", "CPU_AND_NE", "ALL"]
    assert [r["status"] for r in data["results"]] == ["ok", "failed", "ok"]
    failed = data["results"][1]
    assert failed["error"] == "/nonexistent/bundle: no such bundle directory; convert one with 'coreml-sd convert'"
    assert any(line.startswith("[coreml CPU_AND_NE] failed: /nonexistent") for line in logged)


def test_conditions_are_read_before_and_after_measuring(tiny_bundle, monkeypatch):
    events = []

    def conditions():
        events.append("conditions")
        return {"power_source": f"reading {events.count('conditions')}", "thermal_warning": None}

    def child(args, log):
        events.append(args["compute_units"])
        return {"compute_units": args["compute_units"], "backend": args["backend"], "status": "failed", "error": "x"}

    monkeypatch.setattr(bench_mod.machine, "conditions", conditions)
    monkeypatch.setattr(bench_mod, "_child", child)
    monkeypatch.setattr(bench_mod, "require", lambda backend: None)
    data = bench_mod.run_bench(str(tiny_bundle("sd1", "split-einsum")), ["CPU_AND_NE", "ALL"], "coreml", 1, 1, 0,
                               log=lambda line: None)
    assert events == ["conditions", "CPU_AND_NE", "ALL", "conditions"]
    assert data["conditions"]["before"]["power_source"] == "reading 1"
    assert data["conditions"]["after"]["power_source"] == "reading 2"


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML is there on macOS")
def test_a_backend_this_system_lacks_is_refused_before_measuring(tiny_bundle, tmp_path):
    out = tmp_path / "x.json"
    result = CliRunner().invoke(main, ["bench", "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--backend", "coreml",
                                       "-o", str(out)])
    assert result.exit_code == 1 and "needs macOS" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_bundle_without_a_model_the_generation_needs_is_refused_before_measuring(tiny_bundle, tmp_path):
    """A bundle converted without the VAE decoder (as `convert --components text-encoder,unet`
    writes it): one line naming what is missing, nothing measured, nothing written."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("sd1", "split-einsum"), bundle, ignore=shutil.ignore_patterns("VAEDecoder*"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["components"]["VAEDecoder"]
    manifest["files"] = {rel: sha for rel, sha in manifest["files"].items() if not rel.startswith("VAEDecoder")}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "x.json"
    result = CliRunner().invoke(main, ["bench", "--bundle", str(bundle), "--backend", "mil", "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        f"Error: {bundle}: the bundle has no VAEDecoder; bench needs TextEncoder, Unet, VAEDecoder "
        "(convert with --components text-encoder,unet,vae-decoder)"]
    assert not out.exists()


def test_ctrl_c_keeps_the_finished_configurations(record, tiny_bundle, tmp_path, monkeypatch):
    """Ctrl-C during the second configuration: the first one's result is written, marked
    interrupted, and bench exits 130."""
    measured = load_record(record)["results"][0]

    def child(args, log):
        if args["compute_units"] == "CPU_AND_GPU":
            raise KeyboardInterrupt
        return {**measured, "compute_units": args["compute_units"], "backend": args["backend"]}

    monkeypatch.setattr(bench_mod, "_child", child)
    monkeypatch.setattr(bench_mod, "require", lambda backend: None)
    out = tmp_path / "partial.json"
    result = CliRunner().invoke(main, ["bench", "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--backend", "coreml",
                                       "--compute-units", "CPU_AND_NE,CPU_AND_GPU,ALL", "-o", str(out)])
    assert result.exit_code == 130, result.output
    assert f"interrupted: wrote the finished configuration(s) (CPU_AND_NE) to {out}, marked interrupted" in result.stderr
    data = load_record(out)
    assert data["interrupted"] is True
    assert [r["compute_units"] for r in data["results"]] == ["CPU_AND_NE"]


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT")
@pytest.mark.parametrize("started_with", ["sigint-default", "sigint-ignored"])
def test_ctrl_c_before_anything_finished_writes_nothing(tiny_bundle, tmp_path, started_with):
    """A real Ctrl-C (SIGINT to the process group, as a terminal sends it) while the only
    configuration runs: bench and its child end, one line says nothing was written, exit 130.
    Also when started as a shell without job control starts `cmd &` (CI, scripts): with SIGINT
    ignored, which Python and bench's child would otherwise inherit and keep."""
    out = tmp_path / "x.json"
    bundle = tiny_bundle("sd1", "split-einsum")
    proc = subprocess.Popen([*coreml_sd_command(), "bench", "--bundle", str(bundle), "--backend", "mil",
                             "--steps", "50", "--runs", "50", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_ignore_sigint if started_with == "sigint-ignored" else None)
    try:
        for line in proc.stderr:
            if line.startswith("[mil CPU_ONLY] imported"):  # the child is measuring
                break
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted before any configuration finished; nothing written"
    assert "Traceback" not in err
    assert not out.exists()
    with pytest.raises(ProcessLookupError):  # no child left behind in the group
        os.killpg(proc.pid, 0)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
def test_a_record_written_under_sudo_belongs_to_the_user(record, tmp_path, monkeypatch):
    monkeypatch.setenv("SUDO_UID", "12345")
    monkeypatch.setenv("SUDO_GID", "23456")
    out = tmp_path / "new" / "folder" / "r.json"
    bench_mod.write_record(load_record(record), out)
    for path in (out, out.parent, out.parent.parent):
        assert (path.stat().st_uid, path.stat().st_gid) == (12345, 23456)
    assert tmp_path.stat().st_uid == 0  # only what it created
    with pytest.raises(FileExistsError):
        bench_mod.write_record(load_record(record), out)


def test_version_1_records_are_still_read():
    # A schema 1 record exactly as coreml-sd bench wrote it (committed to benchmarks/results/ in
    # 6d19037, since re-measured as version 2), kept here as test data.
    v1 = json.loads((Path(__file__).parent / "data" / "schema-v1-tiny-demo.json").read_text())
    assert v1["schema_version"] == 1 and validate(v1) == []
    assert any("conditions: missing" in p for p in validate({**v1, "schema_version": 2}))


@pytest.mark.parametrize(("change", "problem"), [
    (lambda r: r.pop("machine"), "machine: missing"),
    (lambda r: r.update(schema_version=0), "schema_version: 0"),
    (lambda r: r.update(schema_version=True), "schema_version: True"),
    (lambda r: r.update(results=5), "results: expected a list, got a number"),
    (lambda r: r.update(results=True), "results: expected a list, got a boolean"),
    (lambda r: r.update(results=[]), "results: expected at least 1 item(s), got 0"),
    (lambda r: r.update(interrupted="no"), "interrupted: expected boolean"),
    (lambda r: r["bundle"].update(image_size=[512]), "bundle.image_size: expected 2 items, got 1"),
    (lambda r: r["bundle"].update(image_size="512x512"), "bundle.image_size: expected a list"),
    (lambda r: r["results"].append(7), "results[1].status: expected 'ok' or 'failed', got None"),
    (lambda r: r["results"][0].update(iterations_per_second="fast"), "results[0].iterations_per_second: expected"),
    (lambda r: r["results"][0].update(status="maybe"), "results[0].status"),
    (lambda r: r["results"][0].update(runs=[]), "results[0].runs: expected at least 1"),
    (lambda r: r["results"][0].update(energy={"cpu_j_per_step": 1.0}), "results[0].energy.coverage: missing"),
    (lambda r: r["settings"].update(steps=True), "settings.steps: expected integer"),
    # Deep inside, the path names the field exactly.
    (lambda r: r["results"][0]["unet_ms_per_step"].update(count="6"),
     "results[0].unet_ms_per_step.count: expected integer, got a string"),
    (lambda r: r["results"][0]["runs"][1].pop("denoise_s"), "results[0].runs[1].denoise_s: missing"),
    (lambda r: r["bundle"]["components"]["Unet"].update(precision=16),
     "bundle.components.Unet.precision: expected string or null, got a number"),
    (lambda r: r["conditions"].update(after=[]), "conditions.after: expected an object or null, got a list"),
    # A result's status says which fields it must have.
    (lambda r: r["results"][0].update(status="maybe"), "results[0].status: expected 'ok' or 'failed', got 'maybe'"),
    (lambda r: r["results"][0].update(status=["ok"]), "results[0].status: expected 'ok' or 'failed', got ['ok']"),
    (lambda r: r["results"][0].update(status="failed"), "results[0].error: expected string, got null"),
    (lambda r: r["results"][0].update(error="boom"), "results[0].error: expected null, got a string"),
])
def test_invalid_records_are_named(record, tmp_path, change, problem):
    data = json.loads(record.read_text())
    change(data)
    assert any(problem in p for p in validate(data)), validate(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(RecordError, match=r"bad\.json: not a coreml-sd benchmark record"):
        load_record(bad)


def test_a_rejected_file_names_the_field(record, tmp_path):
    data = json.loads(record.read_text())
    del data["results"][0]["runs"][1]["denoise_s"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(RecordError,
                       match=r"bad\.json: not a coreml-sd benchmark record: results\[0\]\.runs\[1\]\.denoise_s: missing$"):
        load_record(bad)


def test_unknown_fields_and_nulls_where_allowed_are_accepted(record):
    """Fields may be added within a schema version; readers ignore them."""
    data = json.loads(record.read_text())
    data["new_field"] = {"anything": [1, None]}
    data["conditions"]["after"] = None
    data["results"][0].update(energy=None, thermal_pressure=None, new_figure=1.5)
    data["results"].append({"compute_units": "ALL", "backend": "coreml", "width": 64, "height": 64, "status": "failed",
                            "error": "killed by signal 9"})
    assert validate(data) == []


def test_unreadable_record(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(RecordError, match="x.json: not JSON"):
        load_record(tmp_path / "x.json")
