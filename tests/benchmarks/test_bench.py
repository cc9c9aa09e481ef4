"""`coreml-sd bench` on a tiny bundle through the mil backend: a valid, self-consistent record."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from coreml_sd.benchmarks import bench as bench_mod
from coreml_sd.benchmarks.schema import SCHEMA_VERSION, RecordError, load_record, validate
from coreml_sd.cli import main

STEPS, RUNS, WARMUP = 3, 2, 1


@pytest.fixture(scope="module")
def record(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results" / "tiny.json"  # a folder bench creates
    result = CliRunner().invoke(main, ["bench", "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--steps", str(STEPS),
                                       "--runs", str(RUNS), "--warmup", str(WARMUP), "--backend", "mil", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "[mil CPU_ONLY] run 3/3" in result.stderr  # progress while it runs
    return out


def test_record_is_valid_and_complete(record, tiny_bundle):
    data = load_record(record)
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["settings"] == {**data["settings"], "steps": STEPS, "runs": RUNS, "warmup": WARMUP, "backend": "mil", "seed": 0}
    assert data["machine"]["os"] in ("Linux", "macOS") and data["machine"]["memory_bytes"] > 0
    manifest = json.loads((tiny_bundle("sd1", "split-einsum") / "manifest.json").read_text())
    assert data["bundle"]["attention"] == "split-einsum" and data["bundle"]["family"] == "sd1"
    assert data["bundle"]["components"]["Unet"] == {"precision": "float16", "compression": None}
    assert data["bundle"]["image_size"] == manifest["image_size"]
    [result] = data["results"]
    assert result["status"] == "ok" and result["backend"] == "mil"
    assert result["energy"] is None  # never invented where powermetrics did not run


def test_record_is_internally_consistent(record):
    result = load_record(record)["results"][0]
    assert result["unet_ms_per_step"]["count"] == STEPS * RUNS
    assert result["host_ms_per_step"]["count"] == STEPS * RUNS
    assert len(result["runs"]) == RUNS
    for run in result["runs"]:
        stages = run["text_encoder_s"] + run["denoise_s"] + run["vae_decoder_s"]
        assert run["end_to_end_s"] >= stages > 0
    assert result["iterations_per_second"] == pytest.approx(STEPS / result["denoise_s"], rel=1e-3)
    assert result["unet_ms_per_step"]["median"] > result["host_ms_per_step"]["median"] > 0
    assert result["load_cold_s"] > 0 and result["load_warm_s"] > 0
    assert result["peak_rss_bytes"] > 100 * 2**20


def test_never_overwrites_a_record(record, tiny_bundle):
    before = record.read_bytes()
    result = CliRunner().invoke(main, ["bench", "--bundle", str(tiny_bundle("sd1", "split-einsum")), "-o", str(record)])
    assert result.exit_code != 0 and "exists" in result.output
    assert record.read_bytes() == before


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


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML is there on macOS")
def test_a_backend_this_system_lacks_is_refused_before_measuring(tiny_bundle, tmp_path):
    out = tmp_path / "x.json"
    result = CliRunner().invoke(main, ["bench", "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--backend", "coreml",
                                       "-o", str(out)])
    assert result.exit_code == 1 and "needs macOS" in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(("change", "problem"), [
    (lambda r: r.pop("machine"), "machine: missing"),
    (lambda r: r.update(schema_version=0), "schema_version: 0"),
    (lambda r: r["results"][0].update(iterations_per_second="fast"), "results[0].iterations_per_second: expected"),
    (lambda r: r["results"][0].update(status="maybe"), "results[0].status"),
    (lambda r: r["settings"].update(steps=True), "settings.steps: expected integer"),
])
def test_invalid_records_are_named(record, tmp_path, change, problem):
    data = json.loads(record.read_text())
    change(data)
    assert any(problem in p for p in validate(data)), validate(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(RecordError, match=r"bad\.json: not a coreml-sd benchmark record"):
        load_record(bad)


def test_unreadable_record(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(RecordError, match="x.json: not JSON"):
        load_record(tmp_path / "x.json")
