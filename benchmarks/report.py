"""``coreml-sd report``: many benchmark records side by side.

One markdown table per chip (rows: compute unit x backend x attention x bundle), sorted by
end-to-end time, the fastest configuration for each model and image size on that chip marked;
failed configurations listed under their chip; files that are not valid records reported by
name and left out. Optionally a plot of iterations per second per chip and compute unit.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from .schema import RecordError, load_record


def load_records(paths: list[str | Path]) -> tuple[list[tuple[Path, dict]], list[str]]:
    """(path, record) for every valid file, and one message per invalid one."""
    good, bad = [], []
    for path in paths:
        try:
            good.append((Path(path), load_record(path)))
        except RecordError as exc:
            bad.append(str(exc))
    return good, bad


def chip_label(machine: dict[str, Any]) -> str:
    parts = []
    if machine.get("performance_cores") is not None and machine.get("efficiency_cores") is not None:
        parts.append(f"{machine['performance_cores']}P+{machine['efficiency_cores']}E CPU")
    elif machine.get("cpu_cores"):
        parts.append(f"{machine['cpu_cores']} CPU cores")
    if machine.get("gpu_cores"):
        parts.append(f"{machine['gpu_cores']}-core GPU")
    if machine.get("memory_bytes"):
        parts.append(f"{machine['memory_bytes'] / 2**30:.0f} GB")
    version = " ".join(v for v in (machine.get("os"), machine.get("os_version")) if v)
    if version:
        parts.append(version)
    return f"{machine.get('chip') or 'unknown chip'} ({', '.join(parts)})"


def _row(path: Path, record: dict, result: dict) -> dict[str, Any]:
    bundle = record["bundle"]
    h, w = bundle["image_size"]
    return {
        "chip": chip_label(record["machine"]),
        "file": path.name,
        "units": result["compute_units"],
        "backend": result["backend"],
        "attention": bundle.get("attention") or "?",
        "model": bundle["model"],
        "size": f"{w}x{h}",
        "result": result,
        "steps": record["settings"]["steps"],
    }


def _energy(e: dict | None) -> str:
    if not e:
        return "–"
    return f"{e['cpu_j_per_step']:.2f} / {e['gpu_j_per_step']:.2f} / {e['ane_j_per_step']:.2f}"


def build_report(records: list[tuple[Path, dict]], invalid: list[str]) -> tuple[str, list[dict]]:
    """The markdown text, and the rows (for the plot)."""
    rows = [_row(p, rec, res) for p, rec in records for res in rec["results"]]
    by_chip: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_chip[row["chip"]].append(row)
    lines = [
        "# coreml-sd benchmark report",
        "",
        f"{len(records)} record(s); {sum(r['result']['status'] == 'ok' for r in rows)} configuration(s) measured. "
        "Times are medians over the measured runs; ★ marks the fastest configuration (end to end) for each model and "
        "image size on a chip. Energy is joules per step (CPU / GPU / Neural Engine), where powermetrics could run.",
        "",
    ]
    for chip in sorted(by_chip):
        ok = sorted((r for r in by_chip[chip] if r["result"]["status"] == "ok"), key=lambda r: (r["model"], r["size"], r["result"]["end_to_end_s"]))
        failed = [r for r in by_chip[chip] if r["result"]["status"] != "ok"]
        fastest = {}
        for r in ok:
            fastest.setdefault((r["model"], r["size"]), id(r))
        lines += [f"## {chip}", ""]
        if ok:
            lines += [
                "| | compute units | backend | attention | model | size | end-to-end s | it/s | UNet ms/step (IQR) | load cold / warm s | peak memory GB | energy J/step | record |",
                "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
            ]
            for r in ok:
                res = r["result"]
                star = "★" if fastest[(r["model"], r["size"])] == id(r) else ""
                e2e = f"**{res['end_to_end_s']:.2f}**" if star else f"{res['end_to_end_s']:.2f}"
                unet = res["unet_ms_per_step"]
                lines.append(
                    f"| {star} | {r['units']} | {r['backend']} | {r['attention']} | {r['model']} | {r['size']} | {e2e} | "
                    f"{res['iterations_per_second']:.3g} | {unet['median']:.1f} ({unet['iqr']:.1f}) | "
                    f"{res['load_cold_s']:.1f} / {res['load_warm_s']:.1f} | {res['peak_rss_bytes'] / 2**30:.1f} | "
                    f"{_energy(res.get('energy'))} | {r['file']} |"
                )
            lines.append("")
        for r in failed:
            lines.append(f"- failed: {r['units']} ({r['backend']}, {r['model']} {r['size']}): {r['result']['error']}")
        if failed:
            lines.append("")
    if invalid:
        lines += ["## Files left out", ""] + [f"- {msg}" for msg in invalid] + [""]
    return "\n".join(lines), rows


def plot(rows: list[dict], path: Path) -> None:
    """Iterations per second per chip (groups) and configuration (bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RecordError("the plot needs matplotlib: pip install 'coreml-sd[plot]'") from None
    ok = [r for r in rows if r["result"]["status"] == "ok"]
    chips = sorted({r["chip"].split(" (")[0] for r in ok})
    configs = sorted({f"{r['units']} · {r['backend']} · {r['attention']} · {r['model']} {r['size']}" for r in ok})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(chips) * max(1, len(configs)) / 2), 4.5))
    width = 0.8 / max(1, len(configs))
    for j, config in enumerate(configs):
        values = []
        for chip in chips:
            match = [r["result"]["iterations_per_second"] for r in ok if r["chip"].split(" (")[0] == chip
                     and f"{r['units']} · {r['backend']} · {r['attention']} · {r['model']} {r['size']}" == config]
            values.append(max(match) if match else 0.0)
        ax.bar([i + j * width for i in range(len(chips))], values, width, label=config)
    ax.set_xticks([i + width * (len(configs) - 1) / 2 for i in range(len(chips))], chips)
    ax.set_ylabel("iterations per second")
    ax.set_title("coreml-sd: UNet iterations per second")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
