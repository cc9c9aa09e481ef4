"""``coreml-sd report``: many benchmark records side by side.

One markdown table per chip name (rows: compute unit x backend x attention x weights x bundle,
with the OS, memory and power source of the machine that measured each row), sorted by
end-to-end time, the fastest configuration for each model and image size on that chip marked;
failed configurations listed under their chip; files that are not valid records reported by
name and left out. Optionally a plot of iterations per second: one panel per model and image
size (their speeds differ by orders of magnitude), a bar per chip and configuration.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from .schema import RecordError, load_record


class PlotError(Exception):
    """The plot cannot be drawn here (one-line message naming the fix)."""


def load_records(paths: list[str | Path]) -> tuple[list[tuple[Path, dict]], list[str]]:
    """(path, record) for every valid file, and one message per file left out, naming it."""
    good, bad = [], []
    for path in paths:
        try:
            good.append((Path(path), load_record(path)))
        except RecordError as exc:
            bad.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - one odd file must not lose the others
            bad.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
    return good, bad


def system_label(machine: dict[str, Any], power: str | None) -> str:
    """Cores, GPU cores, memory, OS and power source: what tells apart machines with one chip name."""
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
    if power:
        parts.append(power)
    return ", ".join(parts)


def _agreeing(labels: dict[str, str]) -> str:
    """One label when every component agrees, else the UNet's (it dominates the time) and the others'."""
    if len(set(labels.values())) <= 1:
        return next(iter(labels.values()), "?")
    others = sorted({v for k, v in labels.items() if k != "Unet"})
    return f"Unet {labels.get('Unet', '?')}; others {', '.join(others)}"


def weights_label(components: dict[str, dict]) -> str:
    """Precision of the weights (float16, float32)."""
    return _agreeing({name: c.get("precision") or "?" for name, c in components.items()})


def compression_label(components: dict[str, dict]) -> str:
    """Compression of the weights: a ``convert --compress`` preset, or none."""
    return _agreeing({name: c.get("compression") or "none" for name, c in components.items()})


def _power(record: dict) -> str | None:
    if record["schema_version"] == 1:
        return record["machine"].get("power_source")
    return record["conditions"]["before"]["power_source"]


def _row(path: Path, record: dict, result: dict) -> dict[str, Any]:
    bundle = record["bundle"]
    # Since schema 3 each result carries the size it generated; before, the bundle had one.
    h, w = (result["height"], result["width"]) if "width" in result else bundle["image_size"]
    return {
        "chip": record["machine"]["chip"] or "unknown chip",
        "system": system_label(record["machine"], _power(record)),
        "file": path.name + (" (interrupted)" if record.get("interrupted") else ""),
        "units": result["compute_units"],
        "backend": result["backend"],
        "attention": bundle["attention"] or "?",
        "weights": weights_label(bundle["components"]),
        "compression": compression_label(bundle["components"]),
        "model": bundle["model"],
        "size": f"{w}x{h}",
        "result": result,
        "steps": record["settings"]["steps"],
        "version": record["schema_version"],
    }


def _energy(e: dict | None) -> str:
    if not e:
        return "–"
    return " / ".join("–" if e[k] is None else f"{e[k]:.2f}" for k in ("cpu_j_per_step", "gpu_j_per_step", "ane_j_per_step"))


def _thermal(result: dict) -> str:
    levels = result.get("thermal_pressure")
    return " → ".join(levels) if levels else "–"


def _config(r: dict) -> str:
    return f"{r['units']} · {r['backend']} · {r['attention']} · {r['weights']} · {r['compression']}"


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
        "image size on a chip. Weights: precision of the bundle's models; compression: their --compress "
        "preset. Energy is joules per step "
        "(CPU / GPU / Neural Engine) and thermal the pressure levels powermetrics reported during the runs, where it "
        "could run (sudo on macOS).",
        "",
    ]
    old_cold = False
    for chip in sorted(by_chip):
        ok = sorted((r for r in by_chip[chip] if r["result"]["status"] == "ok"),
                    key=lambda r: (r["model"], r["size"], r["result"]["end_to_end_s"]))
        failed = [r for r in by_chip[chip] if r["result"]["status"] != "ok"]
        fastest = {}
        for r in ok:
            fastest.setdefault((r["model"], r["size"]), id(r))
        lines += [f"## {chip}", ""]
        if ok:
            lines += [
                "| | compute units | backend | attention | weights | compression | model | size | end-to-end s | "
                "it/s | "
                "UNet ms/step (IQR) | load cold / warm s | peak memory GB | energy J/step | thermal | system | record |",
                "|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
            ]
            for r in ok:
                res = r["result"]
                star = "★" if fastest[(r["model"], r["size"])] == id(r) else ""
                e2e = f"**{res['end_to_end_s']:.2f}**" if star else f"{res['end_to_end_s']:.2f}"
                unet = res["unet_ms_per_step"]
                dagger = "†" if r["version"] == 1 else ""
                old_cold = old_cold or bool(dagger)
                lines.append(
                    f"| {star} | {r['units']} | {r['backend']} | {r['attention']} | {r['weights']} | {r['compression']} | "
                    f"{r['model']} | "
                    f"{r['size']} | {e2e} | {res['iterations_per_second']:.3g} | {unet['median']:.1f} ({unet['iqr']:.1f}) | "
                    f"{res['load_cold_s']:.1f}{dagger} / {res['load_warm_s']:.1f} | {res['peak_rss_bytes'] / 2**30:.1f} | "
                    f"{_energy(res.get('energy'))} | {_thermal(res)} | {r['system']} | {r['file']} |"
                )
            lines.append("")
        for r in failed:
            lines.append(f"- failed: {r['units']} ({r['backend']}, {r['model']} {r['size']}, {r['weights']}, {r['compression']}, "
                         f"{r['system']}): {r['result']['error']}")
        if failed:
            lines.append("")
    if old_cold:
        lines += ["† schema 1 record: its cold load includes importing the backend's Python modules.", ""]
    if invalid:
        lines += ["## Files left out", ""] + [f"- {msg}" for msg in invalid] + [""]
    return "\n".join(lines), rows


def plot_figure(rows: list[dict]):
    """A matplotlib figure: one panel per model and image size (each with its own scale), chips
    along x, one bar per configuration; the legend sits below the panels."""
    ok = [r for r in rows if r["result"]["status"] == "ok"]
    if not ok:  # no panel to draw (matplotlib refuses a figure of zero rows)
        raise PlotError("nothing to plot: every configuration in these records failed (the report says why)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("the plot needs matplotlib: pip install 'coreml-sd[plot]'") from None
    panels = sorted({(r["model"], r["size"]) for r in ok})
    configs = sorted({_config(r) for r in ok})
    colors = {c: plt.get_cmap("tab10" if len(configs) <= 10 else "tab20")(i % 20) for i, c in enumerate(configs)}
    columns = 1 if len(configs) < 4 else 2
    legend_in = 0.25 * -(-len(configs) // columns) + 0.3  # inches below the panels for the legend
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels) + legend_in + 0.4), squeeze=False)
    for ax, (model, size) in zip(axes[:, 0], panels):
        mine = [r for r in ok if (r["model"], r["size"]) == (model, size)]
        chips = sorted({r["chip"] for r in mine})
        here = [c for c in configs if any(_config(r) == c for r in mine)]
        width = 0.8 / max(len(here), 3)  # a lone bar stays a bar, not the whole panel
        for j, config in enumerate(here):
            xs, values = [], []
            for i, chip in enumerate(chips):
                match = [r["result"]["iterations_per_second"] for r in mine if r["chip"] == chip and _config(r) == config]
                if match:
                    xs.append(i + (j - (len(here) - 1) / 2) * width)
                    values.append(max(match))
            bars = ax.bar(xs, values, width, color=colors[config], label=config)
            ax.bar_label(bars, fmt="%.3g", fontsize="x-small")
        ax.set_xticks(range(len(chips)), chips)
        ax.set_xlim(-0.5, len(chips) - 0.5)
        ax.margins(y=0.12)
        ax.set_ylabel("iterations / s")
        ax.set_title(f"{model} {size}")
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[c]) for c in configs]
    fig.suptitle("coreml-sd: UNet iterations per second (compute units · backend · attention · weights)")
    fig.legend(handles, configs, loc="lower center", ncol=columns, fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 0.97))
    return fig


def plot(rows: list[dict]) -> bytes:
    """The plot as PNG bytes."""
    fig = plot_figure(rows)  # first: it says when matplotlib is missing
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
