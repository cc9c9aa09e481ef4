"""`coreml-sd bench` and `coreml-sd report`."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import click

from ..runtime.backends import BACKENDS, COMPUTE_UNITS
from ..runtime.cli import size_list

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def _units(ctx, param, value: str | None) -> list[str] | None:
    if value is None or value.lower() == "all":
        return None  # every unit the backend has
    units = [u.strip() for u in value.split(",") if u.strip()]
    bad = [u for u in units if u not in COMPUTE_UNITS]
    if bad or not units:
        raise click.BadParameter(
            f"unknown compute units {', '.join(bad) or '(none)'}; use all or some of {', '.join(COMPUTE_UNITS)}"
        )
    return units


def _cannot_write(path: Path) -> str | None:
    """Why a file cannot be created at ``path`` (its folder may not exist yet), or None."""
    ancestor = path.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    try:  # os.access trusts permission bits; root, read-only mounts and /proc-like folders differ
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as exc:
        return f"{ancestor} is not writable ({exc.strerror or exc})"
    return None


def _same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` name one file: the same resolved path (links followed), or hard links."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist
        return False


def _check_outputs(outputs: dict[str, tuple[Path | None, str]], inputs: list[Path]) -> None:
    """Refuse, before anything is written, an output that cannot be written whole or that would
    replace an input or another output; the one-line error names the option. ``outputs``: option
    -> (path or None, an example file name)."""
    given = [(option, path, example) for option, (path, example) in outputs.items() if path is not None]
    for option, path, example in given:
        if path.is_dir():
            raise click.ClickException(f"{option} {path} is a folder; give a file path, e.g. {path / example}")
        if any(_same_file(path, f) for f in inputs):
            raise click.ClickException(f"{option} {path} is one of the input files; write to another path "
                                       "(inputs are never overwritten)")
        if why := _cannot_write(path):
            raise click.ClickException(f"{option} {path} cannot be written: {why}; choose another path")
    for i, (option, path, _) in enumerate(given):
        for other, other_path, _ in given[i + 1:]:
            if _same_file(path, other_path):
                raise click.ClickException(f"{option} and {other} are the same file {path}; give them different paths")


def _write(path: Path, data: bytes, option: str) -> None:
    """Write a derived file (report, plot) whole, creating its folder; one-line error otherwise."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise click.ClickException(f"{option} {path} cannot be written: {exc.strerror or exc}; choose another path") from None


@click.command()
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle to measure.")
@click.option("--compute-units", "units", default=None, callback=_units,
              help="all (default), or a comma-separated list of " + ", ".join(COMPUTE_UNITS) +
                   " (coreml backend; mil measures CPU_ONLY).")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1))
@click.option("--runs", default=5, show_default=True, type=click.IntRange(1), help="Measured runs per configuration.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="Unmeasured runs first.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--sizes", callback=size_list, metavar="WxH[,WxH...]",
              help="Image sizes to time, each one of the bundle's (default: its first).")
@click.option("--energy/--no-energy", default=None,
              help="Measure energy with powermetrics (default: when run with sudo on macOS).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Record to write (JSON).")
def bench(bundle, units, steps, runs, warmup, backend, sizes, energy, out):
    """Time every stage of generation with a bundle, per compute unit and size, into one JSON record."""
    from ..runtime.backends import BackendError
    from ..runtime.bundle import BundleError
    from ..runtime.request import GenerationError
    from .bench import run_bench, write_record

    if out.exists():
        raise click.ClickException(f"{out} exists; choose another -o (records are never overwritten)")
    if why := _cannot_write(out):
        raise click.ClickException(f"cannot write {out}: {why}; choose another -o")
    try:
        record = run_bench(str(bundle), units, backend, steps, runs, warmup, measure_energy=energy,
                           log=lambda line: click.echo(line, err=True), sizes=sizes)
    except (BundleError, BackendError, GenerationError) as exc:
        raise click.ClickException(str(exc)) from None
    if record["interrupted"] and not record["results"]:
        click.echo("interrupted before any configuration finished; nothing written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    try:
        write_record(record, out)
    except FileExistsError:
        raise click.ClickException(f"{out} appeared while measuring; not overwritten, the measurement is lost") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from None
    ok = [r for r in record["results"] if r["status"] == "ok"]
    several = len(set(sizes or [])) > 1  # then each line names its size
    for r in ok:
        size = f" {r['width']}x{r['height']}" if several else ""
        click.echo(f"{r['backend']} {r['compute_units']}{size}: {r['end_to_end_s']:.2f}s end to end, "
                   f"{r['iterations_per_second']:.2f} it/s", err=True)
    if record["interrupted"]:
        done = ", ".join(r["compute_units"] + (f" {r['width']}x{r['height']}" if several else "") for r in record["results"])
        click.echo(f"interrupted: wrote the finished configuration(s) ({done}) to {out}, marked interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo(str(out))
    if not ok:
        sys.exit(1)


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Markdown report to write.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Also write a PNG plot of iterations per second.")
def report(files, out, plot_path):
    """Put many benchmark records side by side in a markdown report."""
    from .report import PlotError, build_report, load_records, plot

    _check_outputs({"-o": (out, "report.md"), "--plot": (plot_path, "plot.png")}, list(files))
    records, invalid = load_records(list(files))
    for message in invalid:
        click.echo(f"skipped: {message}", err=True)
    if not records:
        raise click.ClickException("no valid benchmark record among the files given")
    text, rows = build_report(records, invalid)
    _write(out, (text + "\n").encode(), "-o")  # UTF-8 whatever the locale: the report has ★, – and →
    click.echo(str(out))
    if plot_path:
        try:
            png = plot(rows)
        except PlotError as exc:
            raise click.ClickException(str(exc)) from None
        _write(plot_path, png, "--plot")  # whole or not at all, like the report
        click.echo(str(plot_path))
