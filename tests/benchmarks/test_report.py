"""`coreml-sd report` over several records: one measured here, the rest hand-made for Mac chips.

The hand-made records below are TEST DATA: invented numbers shaped like records from Macs, used
only to check grouping, ordering and marking; they are not measurements and never go to
benchmarks/results/.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from coreml_sd.benchmarks.report import build_report, load_records, plot_figure
from coreml_sd.cli import main

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def ok(units, e2e, its, unet_ms, energy=None, pressure=None, size=(512, 512)):
    return {"compute_units": units, "backend": "coreml", "width": size[0], "height": size[1], "status": "ok", "error": None,
            "import_s": 1.5,
            "load_cold_s": 20.0, "load_warm_s": 2.0, "text_encoder_s": 0.01,
            "unet_ms_per_step": {"median": unet_ms, "iqr": 2.0, "count": 100},
            "host_ms_per_step": {"median": 0.3, "iqr": 0.05, "count": 100}, "vae_decoder_s": 0.5, "denoise_s": e2e - 0.6,
            "end_to_end_s": e2e,
            "runs": [{"end_to_end_s": e2e, "text_encoder_s": 0.01, "denoise_s": e2e - 0.6, "vae_decoder_s": 0.5}],
            "iterations_per_second": its, "peak_rss_bytes": 3 * 2**30, "energy": energy, "thermal_pressure": pressure}


def mac_record(base, chip, results, attention="split-einsum", memory_gb=32, os_version="14.5", unet_compression=None):
    """TEST DATA: a record as a Mac with ``chip`` would write it (numbers invented)."""
    rec = copy.deepcopy(base)
    rec["machine"] = {"os": "macOS", "os_version": os_version, "os_build": "23F79", "arch": "arm64", "chip": chip,
                      "performance_cores": 8, "efficiency_cores": 4, "cpu_cores": 12, "gpu_cores": 19,
                      "memory_bytes": memory_gb * 2**30}
    rec["conditions"] = {"before": {"power_source": "AC", "thermal_warning": "none recorded"},
                         "after": {"power_source": "AC", "thermal_warning": "none recorded"}}
    components = {name: {"precision": "float16", "compression": None} for name in ("TextEncoder", "Unet", "VAEDecoder")}
    components["Unet"]["compression"] = unet_compression
    rec["bundle"] = {**rec["bundle"], "model": "stable-diffusion-v1-5", "image_size": [512, 512], "attention": attention,
                     "components": components}
    rec["settings"] = {**rec["settings"], "backend": "coreml"}
    rec["results"] = results
    return rec


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def linux(bench_record):
    """A record measured here (the session's bench record, conftest.py)."""
    return bench_record


def rows_of(section):
    return [line for line in section.splitlines() if line.startswith("| ") and "| coreml |" in line]


def test_report_groups_sorts_and_marks_the_fastest(linux, tmp_path):
    base = json.loads(linux.read_text())
    energy = {"cpu_j_per_step": 0.5, "gpu_j_per_step": 0.1, "ane_j_per_step": 1.2, "coverage": 0.98, "interval_ms": 100,
              "sampler": "powermetrics"}
    m2 = mac_record(base, "Apple M2 Pro", [ok("CPU_ONLY", 40.0, 0.5, 1900), ok("CPU_AND_GPU", 9.0, 2.4, 410),
                                           ok("CPU_AND_NE", 6.5, 3.3, 290, energy, ["Nominal", "Moderate"]),
                                           ok("ALL", 7.0, 3.1, 300),
                                           {"compute_units": "CPU_AND_GPU", "backend": "coreml", "width": 512,
                                            "height": 512, "status": "failed",
                                            "error": "out of memory"}])
    # The same chip name with more memory, a newer macOS and a palettized UNet: same section, own rows.
    m2_big = mac_record(base, "Apple M2 Pro", [ok("CPU_AND_NE", 5.5, 3.9, 250)], memory_gb=64, os_version="15.1",
                        unet_compression="palettize-6")
    m1 = mac_record(base, "Apple M1", [ok("CPU_AND_GPU", 14.0, 1.5, 650), ok("CPU_AND_NE", 16.0, 1.3, 700)], attention="original")
    files = [write(tmp_path, "m2.json", m2), write(tmp_path, "m2-64.json", m2_big), write(tmp_path, "m1.json", m1), linux,
             write(tmp_path, "garbage.json", "{nope"), write(tmp_path, "old.json", {**base, "schema_version": 0})]
    out = tmp_path / "new" / "report.md"  # folders the report creates
    result = CliRunner().invoke(main, ["report", *map(str, files), "-o", str(out), "--plot", str(tmp_path / "img" / "plot.png")])
    assert result.exit_code == 0, result.output
    assert "skipped: " in result.stderr and "garbage.json" in result.stderr and "old.json" in result.stderr
    text = out.read_text()
    sections = text.split("\n## ")
    # One section per chip name, whatever the memory and OS of the machines behind it.
    headings = [s.splitlines()[0] for s in sections[1:]]
    assert headings == sorted({"Apple M1", "Apple M2 Pro", base["machine"]["chip"]}) + ["Files left out"]
    m2_section = next(s for s in sections if s.startswith("Apple M2 Pro\n"))
    rows = rows_of(m2_section)
    order = [(r.split("|")[2].strip(), r.split("|")[5].strip(), r.split("|")[6].strip()) for r in rows]
    assert order == [("CPU_AND_NE", "float16", "Unet palettize-6; others none"), ("CPU_AND_NE", "float16", "none"),
                     ("ALL", "float16", "none"), ("CPU_AND_GPU", "float16", "none"),
                     ("CPU_ONLY", "float16", "none")]  # fastest first
    assert sum(r.startswith("| ★") for r in rows) == 1
    assert rows[0].startswith("| ★ ") and "**5.50**" in rows[0] and "64 GB, macOS 15.1, AC" in rows[0]
    assert "0.50 / 0.10 / 1.20" in rows[1] and "Nominal → Moderate" in rows[1]
    assert "8P+4E CPU, 19-core GPU, 32 GB, macOS 14.5, AC" in rows[1]
    assert (
        "- failed: CPU_AND_GPU (coreml, stable-diffusion-v1-5 512x512, float16, none, 8P+4E CPU, 19-core GPU, 32 GB,"
        " macOS 14.5, AC): out of memory" in m2_section
    )
    m1_section = next(s for s in sections if s.startswith("Apple M1\n"))
    m1_rows = rows_of(m1_section)
    assert m1_rows[0].startswith("| ★ ") and "CPU_AND_GPU" in m1_rows[0] and "original" in m1_rows[0]
    assert any(s.startswith("Files left out") and "garbage.json" in s for s in sections)
    assert f"## {base['machine']['chip']}\n" in text  # the measured record is there too
    assert (tmp_path / "img" / "plot.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(("name", "content", "says"), [
    ("results-number.json", lambda r: {**r, "results": 5}, "results: expected a list, got a number"),
    ("results-true.json", lambda r: {**r, "results": True}, "results: expected a list, got a boolean"),
    ("size-one.json", lambda r: {**r, "bundle": {**r["bundle"], "image_size": [512]}}, "bundle.image_size: expected 2 items"),
    ("deep.json", lambda r: "[" * 100_000 + "]" * 100_000, "unreadable (RecursionError"),
    ("directory.json", None, "cannot read"),
    ("latin1.json", lambda r: b"\xff\xfe{", "not JSON"),
])
def test_malformed_files_are_named_and_the_rest_reported(linux, tmp_path, name, content, says):
    """Whatever is wrong with a file, the report names it (no traceback) and still covers the others."""
    bad = tmp_path / name
    if content is None:
        bad.mkdir()
    else:
        data = content(json.loads(linux.read_text()))
        if isinstance(data, bytes):
            bad.write_bytes(data)
        else:
            bad.write_text(data if isinstance(data, str) else json.dumps(data))
    result = CliRunner().invoke(main, ["report", str(bad), str(linux), "-o", str(tmp_path / "r.md")])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    [skipped] = [line for line in result.stderr.splitlines() if line.startswith("skipped: ")]
    assert name in skipped and says in skipped
    assert linux.name in (tmp_path / "r.md").read_text()


def test_report_with_no_valid_file_fails(tmp_path):
    bad = write(tmp_path, "bad.json", "[]")
    result = CliRunner().invoke(main, ["report", str(bad), "-o", str(tmp_path / "r.md")])
    assert result.exit_code == 1 and "no valid benchmark record" in result.output
    assert not (tmp_path / "r.md").exists()


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in: permission bits for a user, /proc for root (who
    ignores permission bits; on Linux)."""
    if os.geteuid() == 0:
        if not Path("/proc/self").is_dir():
            pytest.skip("running as root without /proc: no folder here refuses a new file")
        return Path("/proc")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _tree(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


# (arguments after the record r.json, with {t} for the test's folder; the one error line)
_REFUSED = {
    "-o is the input": (["-o", "{t}/r.json"], "Error: -o {t}/r.json is one of the input files; write to another path "
                        "(inputs are never overwritten)"),
    "--plot is the input, spelled otherwise": (
        ["-o", "{t}/r.md", "--plot", "{t}/sub/../r.json"],
        "Error: --plot {t}/sub/../r.json is one of the input files; write to another path (inputs are never overwritten)"),
    "-o is a link to the input": (["-o", "{t}/link.md"], "Error: -o {t}/link.md is one of the input files; write to "
                                  "another path (inputs are never overwritten)"),
    "-o is a folder": (["-o", "{t}/sub"], "Error: -o {t}/sub is a folder; give a file path, e.g. {t}/sub/report.md"),
    "--plot is a folder": (["-o", "{t}/r.md", "--plot", "{t}/sub"],
                           "Error: --plot {t}/sub is a folder; give a file path, e.g. {t}/sub/plot.png"),
    "-o under a file": (["-o", "{t}/file/new/r.md"],
                        "Error: -o {t}/file/new/r.md cannot be written: {t}/file is not a folder; choose another path"),
    "--plot under a file": (["-o", "{t}/r.md", "--plot", "{t}/file/p.png"],
                            "Error: --plot {t}/file/p.png cannot be written: {t}/file is not a folder; choose another path"),
    "-o and --plot the same": (["-o", "{t}/r.md", "--plot", "{t}/./r.md"],
                               "Error: -o and --plot are the same file {t}/r.md; give them different paths"),
}


@pytest.mark.parametrize("case", _REFUSED)
def test_report_refuses_outputs_before_writing_anything(linux, tmp_path, case):
    """An output that would replace an input or another output, or that cannot be written (a
    folder, a path under a file), is refused in one line naming the option, before anything is
    written: every file stays as it was."""
    (tmp_path / "r.json").write_bytes(linux.read_bytes())
    (tmp_path / "link.md").symlink_to(tmp_path / "r.json")
    (tmp_path / "sub").mkdir()
    (tmp_path / "file").write_text("not a folder")
    before = _tree(tmp_path)
    args, line = _REFUSED[case]
    result = CliRunner().invoke(main, ["report", str(tmp_path / "r.json"), *(a.format(t=tmp_path) for a in args)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines() == [line.format(t=tmp_path)]
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("option", ["-o", "--plot"])
def test_report_refuses_an_unwritable_folder_before_writing_anything(linux, tmp_path, option):
    locked = _unwritable_folder(tmp_path)
    (tmp_path / "r.json").write_bytes(linux.read_bytes())
    target = locked / "out.file"
    args = ["-o", str(target)] if option == "-o" else ["-o", str(tmp_path / "r.md"), "--plot", str(target)]
    before = _tree(tmp_path)
    result = CliRunner().invoke(main, ["report", str(tmp_path / "r.json"), *args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = result.output.splitlines()
    assert line.startswith(f"Error: {option} {target} cannot be written: {locked} is not writable")
    assert line.endswith("; choose another path")
    assert _tree(tmp_path) == before and not target.exists()


def test_plot_of_records_where_every_configuration_failed(linux, tmp_path):
    """Nothing measured, nothing to plot: one line saying so (the report itself is written)."""
    base = json.loads(linux.read_text())
    failed = {**base, "results": [{"compute_units": "CPU_ONLY", "backend": "mil", "width": 64, "height": 64,
                                   "status": "failed", "error": "x"}]}
    plot_path = tmp_path / "p.png"
    result = CliRunner().invoke(main, ["report", str(write(tmp_path, "failed.json", failed)), "-o", str(tmp_path / "r.md"),
                                       "--plot", str(plot_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: nothing to plot: every configuration in these records failed (the report says why)")
    assert "- failed: CPU_ONLY" in (tmp_path / "r.md").read_text()
    assert not plot_path.exists()


def test_missing_file_is_named():
    records, invalid = load_records([Path("/nonexistent/missing.json")])
    assert records == [] and "missing.json: cannot read" in invalid[0]


def test_plot_one_panel_per_model_each_readable_legend_clear(linux, tmp_path):
    """A tiny model at ~7 it/s and SD 1.5 at ~0.04 it/s: each gets its own panel and scale (its
    tallest bar fills most of it), and the legend overlaps no panel."""
    base = json.loads(linux.read_text())
    sd15 = mac_record(base, "Apple M2 Pro", [ok("CPU_AND_NE", 6.5, 0.04, 290), ok("ALL", 7.0, 0.035, 300),
                                             ok("CPU_AND_GPU", 9.0, 0.03, 410), ok("CPU_ONLY", 40.0, 0.01, 1900)])
    records, _ = load_records([linux, write(tmp_path, "sd15.json", sd15)])
    _, rows = build_report(records, [])
    fig = plot_figure(rows)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = fig.get_axes()
        assert sorted(ax.get_title() for ax in axes) == sorted({f"{r['model']} {r['size']}" for r in rows})
        for ax in axes:
            tallest = max(bar.get_height() for bar in ax.patches)
            assert tallest >= 0.6 * ax.get_ylim()[1]
        [legend] = fig.legends
        box = legend.get_window_extent(renderer)
        assert len(legend.get_texts()) == len({(r["units"], r["backend"], r["attention"], r["weights"]) for r in rows})
        for ax in axes:
            assert not box.overlaps(ax.get_tightbbox(renderer))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_every_committed_record_is_valid_and_reported():
    """benchmarks/results/*.json are records made by `coreml-sd bench` (the project's and
    contributed ones): each must read against the schema and make it into the report."""
    paths = sorted(RESULTS.glob("*.json"))
    assert paths, f"no record in {RESULTS}"
    records, invalid = load_records(paths)
    assert invalid == []
    text, rows = build_report(records, invalid)
    assert {row["file"].split(" ")[0] for row in rows} == {p.name for p in paths}
    for _, record in records:
        assert any(r["status"] == "ok" for r in record["results"])
