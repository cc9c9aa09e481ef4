"""`coreml-sd bench` and `coreml-sd report`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..runtime.backends import BACKENDS, COMPUTE_UNITS


def _units(ctx, param, value: str) -> list[str]:
    if value.lower() == "all":
        return list(COMPUTE_UNITS)
    units = [u.strip() for u in value.split(",") if u.strip()]
    bad = [u for u in units if u not in COMPUTE_UNITS]
    if bad or not units:
        raise click.BadParameter(f"unknown compute units {', '.join(bad) or '(none)'}; use all or some of {', '.join(COMPUTE_UNITS)}")
    return units


@click.command()
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle to measure.")
@click.option("--compute-units", "units", default="all", show_default=True, callback=_units,
              help="all, or a comma-separated list of " + ", ".join(COMPUTE_UNITS) + " (coreml backend).")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1))
@click.option("--runs", default=5, show_default=True, type=click.IntRange(1), help="Measured runs per configuration.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="Unmeasured runs first.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--energy/--no-energy", default=None, help="Measure energy with powermetrics (default: when run with sudo on macOS).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Record to write (JSON).")
def bench(bundle, units, steps, runs, warmup, backend, energy, out):
    """Time every stage of generation with a bundle, per compute unit, into one JSON record."""
    from ..runtime.backends import BackendError
    from ..runtime.bundle import BundleError
    from .bench import run_bench

    if out.exists():
        raise click.ClickException(f"{out} exists; choose another -o (records are never overwritten)")
    if out.parent.exists() and not out.parent.is_dir():
        raise click.ClickException(f"{out.parent} is not a folder; choose another -o")
    try:
        record = run_bench(str(bundle), units, backend, steps, runs, warmup, measure_energy=energy,
                           log=lambda line: click.echo(line, err=True))
    except (BundleError, BackendError) as exc:
        raise click.ClickException(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    ok = [r for r in record["results"] if r["status"] == "ok"]
    for r in ok:
        click.echo(f"{r['backend']} {r['compute_units']}: {r['end_to_end_s']:.2f}s end to end, "
                   f"{r['iterations_per_second']:.2f} it/s", err=True)
    click.echo(str(out))
    if not ok:
        sys.exit(1)


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Markdown report to write.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Also write a PNG plot of iterations per second.")
def report(files, out, plot_path):
    """Put many benchmark records side by side in a markdown report."""
    from .report import build_report, load_records, plot
    from .schema import RecordError

    records, invalid = load_records(list(files))
    for message in invalid:
        click.echo(f"skipped: {message}", err=True)
    if not records:
        raise click.ClickException("no valid benchmark record among the files given")
    text, rows = build_report(records, invalid)
    out.write_text(text + "\n")
    click.echo(str(out))
    if plot_path:
        try:
            plot(rows, plot_path)
        except RecordError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(str(plot_path))
