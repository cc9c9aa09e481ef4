"""`coreml-sd bench --sizes` on a bundle of several image sizes, and the sizes in the report.

Each configuration of the record carries the size it generated (schema 3); the report shows it
per row and marks the fastest configuration per size; records of schema 2, whose results carry
no size, are read with the bundle's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from coreml_sd.benchmarks import bench as bench_mod
from coreml_sd.benchmarks.report import build_report
from coreml_sd.benchmarks.schema import load_record
from coreml_sd.cli import main
from helpers import TINY_SIZES, one_line_error

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
WxH = [f"{w}x{h}" for h, w in TINY_SIZES]
MEASURED = TINY_SIZES[:2]  # two of the sizes, the second first: a child process each
ASKED = ",".join(f"{w}x{h}" for h, w in reversed(MEASURED))

# The module's bench record is built once per worker that runs one of its tests: all on one worker.
pytestmark = pytest.mark.xdist_group("bench-sizes")


@pytest.fixture(scope="module")
def record(tiny_sizes_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-sizes") / "sizes.json"
    result = CliRunner().invoke(main, ["bench", "--bundle", str(tiny_sizes_bundle), "--sizes", ASKED,
                                       "--steps", "1", "--runs", "1", "--warmup", "0", "--backend", "mil", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for size in (f"{w}x{h}" for h, w in MEASURED):  # each size in its progress and summary lines
        assert f"[mil CPU_ONLY {size}] run 1/1" in result.stderr and f"mil CPU_ONLY {size}: " in result.stderr
    return out


def test_each_size_is_a_configuration_of_the_record(record):
    data = load_record(record)
    assert data["schema_version"] == 3
    assert data["bundle"]["image_size"] == list(TINY_SIZES[0])  # the bundle's default size
    # in the order asked for, each measured at its own size
    assert [(r["status"], r["width"], r["height"]) for r in data["results"]] == [
        ("ok", w, h) for h, w in reversed(MEASURED)]


def test_the_report_shows_each_size(record):
    text, rows = build_report([(record, load_record(record))], [])
    assert sorted(r["size"] for r in rows) == sorted(f"{w}x{h}" for h, w in MEASURED)
    table = [line for line in text.splitlines() if line.startswith("| ★ |")]
    assert sorted(line.split("|")[8].strip() for line in table) == sorted(f"{w}x{h}" for h, w in MEASURED)  # fastest per size


def test_without_sizes_the_first_is_measured(tiny_sizes_bundle, monkeypatch):
    asked = []

    def child(args, log):
        asked.append(tuple(args["size"]))
        return {"compute_units": args["compute_units"], "backend": args["backend"], "width": args["size"][1],
                "height": args["size"][0], "status": "failed", "error": "not measured here"}

    monkeypatch.setattr(bench_mod, "_child", child)
    bench_mod.run_bench(str(tiny_sizes_bundle), None, "mil", 1, 1, 0, log=lambda line: None)
    assert asked == [TINY_SIZES[0]]


def test_a_size_the_bundle_lacks_is_refused_before_measuring(tiny_sizes_bundle, tmp_path):
    out = tmp_path / "x.json"
    result = CliRunner().invoke(main, ["bench", "--bundle", str(tiny_sizes_bundle), "--sizes", f"{WxH[0]},640x640",
                                       "--backend", "mil", "-o", str(out)])
    one_line_error(result, f"this bundle has no 640x640 size: it has {', '.join(WxH)}; re-convert with --sizes")
    assert "[mil" not in result.output and not out.exists()
    bad = CliRunner().invoke(main, ["bench", "--bundle", str(tiny_sizes_bundle), "--sizes", "64", "-o", str(out)])
    assert bad.exit_code == 2 and "'64' is not WIDTHxHEIGHT in pixels" in bad.output and "Traceback" not in bad.output


def test_a_schema_2_record_is_reported_at_its_bundle_size():
    path = RESULTS / "linux-x86_64-tiny-demo.json"
    data = load_record(path)
    assert data["schema_version"] == 2 and "width" not in data["results"][0]
    h, w = data["bundle"]["image_size"]
    _, rows = build_report([(path, data)], [])
    assert {r["size"] for r in rows} == {f"{w}x{h}"}
    assert json.loads(path.read_text()) == data  # read as is
