"""`coreml-sd generate`: a prompt and a bundle in, PNG files out.

Imports stay light at module level (the runtime path never needs torch); the pipeline is
imported inside the command.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import click
from click.core import ParameterSource

from .backends import BACKENDS, COMPUTE_UNITS
from .schedulers import SCHEDULER_NAMES


def denoise_with_progress(run, label: str):
    """Iterate a ``Generation`` under a progress bar on stderr (one tick per step), then decode."""
    with click.progressbar(length=run.remaining, label=label, file=sys.stderr) as bar:
        for _ in run:
            bar.update(1)
    return run.finish()


def truncation(what: str, cut: str, shown: int = 5) -> str:
    """The warning for a prompt cut at the token limit: how much was cut and how it starts (the
    whole cut text of a long prompt would flood the terminal)."""
    words = cut.split()
    start = " ".join(words[:shown]) + (" ..." if len(words) > shown else "")
    return f'the {what} is longer than 77 tokens; {len(words)} word{"s" if len(words) != 1 else ""} ignored, starting "{start}"'


def missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first: what ``mkdir -p`` creates."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): keep it and its parents
            return


@click.command()
@click.argument("prompt")
@click.option("--bundle", "bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory (ours or Apple's).")
@click.option("-n", "--num-images", default=1, show_default=True, type=int, help="Images to generate.")
@click.option("--steps", default=20, show_default=True, type=int, help="Denoising steps.")
@click.option("--guidance", default=7.5, show_default=True, type=float, help="Classifier-free guidance scale (<= 1: off).")
@click.option("--scheduler", type=click.Choice(SCHEDULER_NAMES), help="Sampler (default: the model's own).")
@click.option("--seed", type=int, help="Seed (default: random); the same seed gives the same image as diffusers on CPU.")
@click.option("--negative-prompt", default="", help="What the image should not show.")
@click.option("--init-image", type=click.Path(path_type=Path),
              help="Start from this image (image-to-image). Scaled to the bundle's size keeping its aspect ratio; "
              "a different aspect ratio is center-cropped, never stretched.")
@click.option("--strength", default=0.75, show_default=True, type=float, help="How much of the init image to repaint.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: coreml on macOS, mil elsewhere.")
@click.option("--compute-units", type=click.Choice(COMPUTE_UNITS), default="CPU_AND_NE", show_default=True)
@click.option("--reduce-memory", is_flag=True, help="Load each model just before use and release it after.")
@click.option("--precision", type=click.Choice(["float16", "float32"]),
              help="mil backend only: float32 keeps float16 activations in float32 "
              "(to debug an overflow; not what a Mac computes).")
@click.option("--rng", type=click.Choice(["torch", "numpy"]), default="torch", show_default=True, help="Noise source.")
@click.option("--height", type=int, help="Must match the bundle (default: its size).")
@click.option("--width", type=int, help="Must match the bundle (default: its size).")
@click.option("-o", "--output", "out", default=Path("."), show_default=True, type=click.Path(path_type=Path),
              help="Folder for the PNG files (created if needed).")
def generate(prompt, bundle, num_images, steps, guidance, scheduler, seed, negative_prompt, init_image, strength,
             backend, compute_units, reduce_memory, precision, rng, height, width, out):
    """Generate images for PROMPT with a converted bundle.

    Everything that can be checked without the models (bundle, options, init image, output
    folder) is checked before they load, so a mistake costs no loading time.
    """
    from .backends import BackendError
    from .bundle import BundleError, open_bundle
    from .image import crop_box, prepare_output, save_png
    from .pipeline import Pipeline
    from .request import GenerationError, check_request, check_setup, read_image

    def warn(line: str) -> None:
        click.echo(f"warning: {line}", err=True)

    try:
        opened = open_bundle(bundle)
        resolved = check_setup(opened, backend, precision)  # what Pipeline(...) would refuse, before the output folder exists
        image = read_image(init_image) if init_image is not None else None
        request = check_request(
            opened, prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance, scheduler=scheduler,
            seed=seed, num_images=num_images, init_image=image, strength=strength, rng=rng, height=height, width=width,
        )
    except (BundleError, GenerationError) as exc:
        raise click.ClickException(str(exc)) from None
    if out.exists() and not out.is_dir():
        raise click.ClickException(f"output {out} is a file; pass a folder with -o")
    # However the command ends (an error, Ctrl-C), it leaves no empty folder of its own making behind.
    click.get_current_context().call_on_close(partial(remove_if_empty, missing_folders(out)))
    try:
        prepare_output(out)
    except OSError as exc:
        raise click.ClickException(
            f"cannot write to output folder {out}: {exc.strerror or exc}; pass a writable folder with -o"
        ) from None
    given = click.get_current_context().get_parameter_source
    if given("strength") != ParameterSource.DEFAULT and image is None:
        warn("--strength is ignored: it applies to image-to-image only; add --init-image to use it")
    if given("compute_units") != ParameterSource.DEFAULT and resolved != "coreml":
        warn(f"--compute-units is ignored: the {resolved} backend runs on the CPU; it applies to --backend coreml (macOS)")
    if negative_prompt and not request.guided:
        warn(f"--negative-prompt is ignored: guidance is off at --guidance {guidance:g} (<= 1); "
             "raise it to use a negative prompt")
    if image is not None:
        h, w = opened.image_size
        left, upper, right, lower = crop_box(image.size, (w, h))
        if (right - left, lower - upper) != image.size:
            warn(f"the init image is {image.size[0]}x{image.size[1]}, not the bundle's aspect ratio ({w}x{h}): "
                 f"its center {right - left:.0f}x{lower - upper:.0f} is used")

    try:
        pipe = Pipeline(opened, backend=backend, compute_units=compute_units, reduce_memory=reduce_memory, precision=precision)
        run = pipe.generate(request)
        if run.truncated:
            warn(truncation("prompt", run.truncated))
        if run.negative_truncated:
            warn(truncation("negative prompt", run.negative_truncated))
        label = f"{pipe.backend} {compute_units if pipe.backend == 'coreml' else ''}".strip()
        result = denoise_with_progress(run, f"denoising ({label})")
    except (BundleError, BackendError, GenerationError) as exc:
        raise click.ClickException(str(exc)) from None
    for i, (picture, params) in enumerate(zip(result.images, result.parameters)):
        try:
            path = save_png(picture, params, out)
        except OSError as exc:
            kept = f" ({i} of {len(result.images)} written above)" if i else ""
            raise click.ClickException(
                f"cannot write the image to {out}: {exc.strerror or exc}{kept}; free space or pass another -o"
            ) from None
        click.echo(str(path))
    t = result.timings.as_dict()
    click.echo(
        f"load {pipe.load_time + t['load_s']:.2f}s, text encoder {t['text_encoder_s']:.2f}s"
        + (f", vae encoder {t['vae_encoder_s']:.2f}s" if init_image else "")
        + f", unet {t['unet_s_per_step'] * 1000:.0f} ms/step, other {t['host_s_per_step'] * 1000:.1f} ms/step"
        + f", vae decoder {t['vae_decoder_s']:.2f}s",
        err=True,
    )
