"""`coreml-sd demo`: the whole job on a built-in default, no download needed.

Builds a tiny SD 1.x-style model (random weights), converts it to a Core ML bundle and generates
an image from it: with Core ML on a Mac, through the mil backend elsewhere. A second run reuses
the model and the converted components. It uses both stages, so it lives beside them, not in
either.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from .runtime.backends import BACKENDS
from .runtime.schedulers import SCHEDULER_NAMES

DEMO_PROMPT = "a lighthouse on a cliff at sunset, oil painting"


@click.command()
@click.argument("prompt", required=False)
@click.option("-o", "--output", "root", type=click.Path(path_type=Path), metavar="DIR",
              help="Working folder: the tiny model, its bundle and the images.  [default: demo]")
# The names of earlier releases, kept working but out of --help: generate's -o and PROMPT are the names.
@click.option("--dir", "old_root", type=click.Path(path_type=Path), hidden=True)
@click.option("--prompt", "old_prompt", hidden=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--scheduler", default="dpmpp-2m-karras", show_default=True, type=click.Choice(SCHEDULER_NAMES))
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Also show the libraries' own progress bars and messages.")
def demo(prompt: str | None, root: Path | None, old_root: Path | None, old_prompt: str | None, seed: int, steps: int,
         scheduler: str, backend: str, verbose: bool) -> None:
    """Build a tiny model, convert it to Core ML, and generate an image of PROMPT with it.

    PROMPT defaults to "a lighthouse on a cliff at sunset, oil painting".
    """
    root = _renamed(root, old_root, "-o/--output", "--dir") or Path("demo")
    prompt = _renamed(prompt, old_prompt, "PROMPT", "--prompt") or DEMO_PROMPT
    if root.exists() and not root.is_dir():
        raise click.ClickException(f"output {root} is a file; pass a folder for the demo's files with -o")
    from .convert.cli import require_convert_extra

    require_convert_extra("demo")
    from .convert.bundle import OutputError
    from .convert.converter import ConvertError, ConvertOptions, Progress, convert
    from .convert.export import CompileError
    from .convert.quiet import library_output
    from .convert.source import SourceError, open_source
    from .runtime.backends import BackendError
    from .runtime.bundle import BundleError
    from .runtime.cli import denoise_with_progress
    from .runtime.image import save_png
    from .runtime.pipeline import Pipeline
    from .runtime.request import GenerationError
    from .testing.tiny_pipelines import build_tiny_pipeline

    def say(line: str) -> None:
        click.echo(line, err=True)

    start = time.perf_counter()
    model = root / "tiny-sd"
    if not (model / "model_index.json").exists():
        say(f"building a tiny SD 1.x-style model (random weights) in {model}")
        try:
            build_tiny_pipeline(model, "sd1", seed=0, sample_size=32)
        except FileNotFoundError as exc:  # the CLIP vocabulary comes from the open_clip_torch wheel
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a parent that is a file, no permission
            raise click.ClickException(
                f"cannot write the tiny model to {model}: {exc.strerror or exc}; pass another folder with -o"
            ) from None
    bundle = root / "bundle"
    say(f"converting it to a Core ML bundle in {bundle}")
    try:
        with library_output(verbose, say):
            convert(open_source(str(model)), bundle, ConvertOptions(overwrite=True), Progress(say))
    except (SourceError, ConvertError, OutputError, CompileError) as exc:  # as 'coreml-sd convert' reports them
        raise click.ClickException(str(exc)) from None

    try:
        pipe = Pipeline.from_bundle(bundle, backend=backend)
        run = pipe.start(prompt, steps=steps, seed=seed, scheduler=scheduler)
        result = denoise_with_progress(run, f"generating ({pipe.backend})")
    except (BackendError, BundleError, GenerationError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        path = save_png(result.images[0], result.parameters[0], root / "images")
    except OSError as exc:
        raise click.ClickException(
            f"cannot write the image to {root / 'images'}: {exc.strerror or exc}; pass another folder with -o"
        ) from None
    t = result.timings.as_dict()
    say(f"unet {t['unet_s_per_step'] * 1000:.0f} ms/step, other {t['host_s_per_step'] * 1000:.1f} ms/step; "
        f"done in {time.perf_counter() - start:.0f}s")
    say("the demo model has random weights, so expect an abstract pattern; convert a real checkpoint with 'coreml-sd convert'")
    click.echo(f"image written to {path}")


def _renamed(value, old_value, name: str, old_name: str):
    """The value of an option that an earlier release spelt ``old_name``, given either way."""
    if old_value is None:
        return value
    if value is not None:
        raise click.UsageError(f"{old_name} is the old name of {name}: give only {name}")
    click.echo(f"note: {old_name} is deprecated; use {name}", err=True)
    return old_value
