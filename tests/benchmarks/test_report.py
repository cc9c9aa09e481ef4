"""`coreml-sd report` over several records: one measured here, the rest hand-made for Mac chips.

The hand-made records below are TEST DATA: invented numbers shaped like records from Macs, used
only to check grouping, ordering and marking; they are not measurements and never go to
benchmarks/results/.
"""

from __future__ import annotations

import copy
import json

from click.testing import CliRunner

from coreml_sd.benchmarks.report import build_report, load_records
from coreml_sd.cli import main


def ok(units, e2e, its, unet_ms, energy=None):
    return {"compute_units": units, "backend": "coreml", "status": "ok", "error": None, "load_cold_s": 20.0, "load_warm_s": 2.0,
            "text_encoder_s": 0.01, "unet_ms_per_step": {"median": unet_ms, "iqr": 2.0, "count": 100},
            "host_ms_per_step": {"median": 0.3, "iqr": 0.05, "count": 100}, "vae_decoder_s": 0.5, "denoise_s": e2e - 0.6,
            "end_to_end_s": e2e, "runs": [{"end_to_end_s": e2e, "text_encoder_s": 0.01, "denoise_s": e2e - 0.6, "vae_decoder_s": 0.5}],
            "iterations_per_second": its, "peak_rss_bytes": 3 * 2**30, "energy": energy}


def mac_record(base, chip, results, attention="split-einsum"):
    """TEST DATA: a record as a Mac with ``chip`` would write it (numbers invented)."""
    rec = copy.deepcopy(base)
    rec["machine"] = {"os": "macOS", "os_version": "14.5", "os_build": "23F79", "arch": "arm64", "chip": chip,
                      "performance_cores": 8, "efficiency_cores": 4, "cpu_cores": 12, "gpu_cores": 19,
                      "memory_bytes": 32 * 2**30, "power_source": "AC", "thermal_state": "nominal"}
    rec["bundle"] = {**rec["bundle"], "model": "stable-diffusion-v1-5", "image_size": [512, 512], "attention": attention}
    rec["settings"] = {**rec["settings"], "backend": "coreml"}
    rec["results"] = results
    return rec


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_report_groups_sorts_and_marks_the_fastest(tiny_bundle, tmp_path):
    result = CliRunner().invoke(main, ["bench", "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--steps", "1",
                                       "--runs", "1", "--warmup", "0", "--backend", "mil", "-o", str(tmp_path / "linux.json")])
    assert result.exit_code == 0, result.output
    linux = json.loads((tmp_path / "linux.json").read_text())
    energy = {"cpu_j_per_step": 0.5, "gpu_j_per_step": 0.1, "ane_j_per_step": 1.2, "sampler": "powermetrics"}
    m2 = mac_record(linux, "Apple M2 Pro", [ok("CPU_ONLY", 40.0, 0.5, 1900), ok("CPU_AND_GPU", 9.0, 2.4, 410),
                                            ok("CPU_AND_NE", 6.5, 3.3, 290, energy), ok("ALL", 7.0, 3.1, 300),
                                            {"compute_units": "CPU_AND_GPU", "backend": "coreml", "status": "failed", "error": "out of memory"}])
    m1 = mac_record(linux, "Apple M1", [ok("CPU_AND_GPU", 14.0, 1.5, 650), ok("CPU_AND_NE", 16.0, 1.3, 700)], attention="original")
    files = [write(tmp_path, "m2.json", m2), write(tmp_path, "m1.json", m1), tmp_path / "linux.json",
             write(tmp_path, "garbage.json", "{nope"), write(tmp_path, "old.json", {**linux, "schema_version": 0})]
    out = tmp_path / "report.md"
    result = CliRunner().invoke(main, ["report", *map(str, files), "-o", str(out), "--plot", str(tmp_path / "plot.png")])
    assert result.exit_code == 0, result.output
    assert "skipped: " in result.stderr and "garbage.json" in result.stderr and "old.json" in result.stderr
    text = out.read_text()
    sections = text.split("\n## ")
    m2_section = next(s for s in sections if s.startswith("Apple M2 Pro"))
    m1_section = next(s for s in sections if s.startswith("Apple M1 "))
    rows = [line for line in m2_section.splitlines() if line.startswith("| ") and "| coreml |" in line]
    order = [r.split("|")[2].strip() for r in rows]
    assert order == ["CPU_AND_NE", "ALL", "CPU_AND_GPU", "CPU_ONLY"]  # fastest first
    assert rows[0].startswith("| ★ ") and "**6.50**" in rows[0] and "0.50 / 0.10 / 1.20" in rows[0]
    assert sum(r.startswith("| ★") for r in rows) == 1
    assert "8P+4E CPU, 19-core GPU, 32 GB, macOS 14.5" in m2_section
    assert "- failed: CPU_AND_GPU (coreml, stable-diffusion-v1-5 512x512): out of memory" in m2_section
    m1_rows = [line for line in m1_section.splitlines() if line.startswith("| ") and "coreml" in line]
    assert m1_rows[0].startswith("| ★ ") and "CPU_AND_GPU" in m1_rows[0] and "original" in m1_rows[0]
    assert any(s.startswith("Files left out") and "garbage.json" in s for s in sections)
    assert linux["machine"]["chip"] in text  # the measured record is there too
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_report_with_no_valid_file_fails(tmp_path):
    bad = write(tmp_path, "bad.json", "[]")
    result = CliRunner().invoke(main, ["report", str(bad), "-o", str(tmp_path / "r.md")])
    assert result.exit_code == 1 and "no valid benchmark record" in result.output
    assert not (tmp_path / "r.md").exists()


def test_build_report_directly(tmp_path):
    records, invalid = load_records([tmp_path / "missing.json"])
    assert records == [] and "missing.json: cannot read" in invalid[0]


def test_every_committed_record_is_valid_and_reported():
    """benchmarks/results/*.json are records made by `coreml-sd bench` (the project's and
    contributed ones): each must read against the schema and make it into the report."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    paths = sorted(results.glob("*.json"))
    assert paths, f"no record in {results}"
    records, invalid = load_records(paths)
    assert invalid == []
    text, rows = build_report(records, invalid)
    assert {row["file"] for row in rows} == {p.name for p in paths}
    for _, record in records:
        assert any(r["status"] == "ok" for r in record["results"])
