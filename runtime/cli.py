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


def _pair(value: str | None, sep: str, what: str) -> tuple[int, int] | None:
    """"A<sep>B" as two whole numbers, for click (a bad one is click's one-line usage error)."""
    if value is None:
        return None
    parts = value.lower().replace(" ", "").split(sep)
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise click.BadParameter(f"{value!r} is not {what}")
    return int(parts[0]), int(parts[1])


def size_list(ctx, param, value: str | None) -> tuple[tuple[int, int], ...] | None:
    """"WxH[,WxH...]" (width x height, as people say sizes) as ((height, width), ...), the order
    the API and diffusers take; for click (``convert --sizes``, ``bench --sizes``)."""
    if value is None:
        return None
    sizes = tuple(_pair(item, "x", "WIDTHxHEIGHT in pixels, such as 512x768") for item in value.split(","))
    if zero := next((f"{w}x{h}" for w, h in sizes if not (w and h)), None):
        raise click.BadParameter(f"{zero!r} is not WIDTHxHEIGHT in pixels: sides are positive")
    return tuple((h, w) for w, h in sizes)


def _size(ctx, param, value):
    pair = _pair(value, "x", "WIDTHxHEIGHT in pixels, such as 1024x768")
    return None if pair is None else (pair[1], pair[0])  # (height, width), as the API and diffusers take it


def _crop(ctx, param, value):
    return _pair(value, ",", "TOP,LEFT in pixels, such as 0,0")


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
@click.option("--prompt-2", default="", help="SDXL base: the prompt of the second text encoder (default: the prompt).")
@click.option("--negative-prompt-2", default="",
              help="SDXL base: the negative prompt of the second text encoder (default: the negative prompt). "
              "Without any negative prompt, SDXL base conditions the negative branch on zeros, as diffusers does.")
@click.option("--original-size", callback=_size, metavar="WxH",
              help="SDXL: the size the model is told the image had before resizing, WIDTHxHEIGHT pixels "
              "as in the PNG's Size field (default: the image size).")
@click.option("--crop", callback=_crop, metavar="TOP,LEFT",
              help="SDXL: the top-left corner, in pixels, of the crop the model is told the image is (default: 0,0).")
@click.option("--refiner", type=click.Path(path_type=Path),
              help="SDXL: a refiner bundle that finishes the denoising (its own text encoder and VAE).")
@click.option("--refiner-start", type=float,
              help="With --refiner: the fraction of the schedule the base denoises before the refiner takes over "
              "(default: 0.8).")
@click.option("--aesthetic-score", type=float, help="SDXL refiner: the aesthetic score it is conditioned on (default: 6).")
@click.option("--negative-aesthetic-score", type=float,
              help="SDXL refiner: the aesthetic score of the negative branch (default: 2.5).")
@click.option("--init-image", type=click.Path(path_type=Path),
              help="Start from this image (image-to-image). Scaled to the image size keeping its aspect ratio; "
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
@click.option("--height", type=int, help="Image height in pixels: one of the bundle's sizes (default: its first).")
@click.option("--width", type=int, help="Image width in pixels: one of the bundle's sizes (default: its first).")
@click.option("-o", "--output", "out", default=Path("."), show_default=True, type=click.Path(path_type=Path),
              help="Folder for the PNG files (created if needed).")
def generate(prompt, bundle, num_images, steps, guidance, scheduler, seed, negative_prompt, prompt_2, negative_prompt_2,
             original_size, crop, refiner, refiner_start, aesthetic_score, negative_aesthetic_score, init_image, strength,
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
            prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, original_size=original_size, crop=crop,
            refiner=refiner, refiner_start=refiner_start, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
        )
        if request.refiner is not None:
            check_setup(request.refiner, backend, precision, purpose="the refiner")
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
    for option, value in (("--negative-prompt", negative_prompt), ("--negative-prompt-2", negative_prompt_2),
                          ("--negative-aesthetic-score", negative_aesthetic_score)):
        if value not in (None, "") and not request.guided:
            warn(f"{option} is ignored: guidance is off at --guidance {guidance:g} (<= 1); "
                 "raise it to use a negative prompt")
    if image is not None:
        h, w = request.image_size
        left, upper, right, lower = crop_box(image.size, (w, h))
        if (right - left, lower - upper) != image.size:
            warn(f"the init image is {image.size[0]}x{image.size[1]}, not the image's aspect ratio ({w}x{h}): "
                 f"its center {right - left:.0f}x{lower - upper:.0f} is used")

    try:
        pipe = Pipeline(opened, backend=backend, compute_units=compute_units, reduce_memory=reduce_memory, precision=precision)
        run = pipe.generate(request)
        if run.truncated:
            warn(truncation("prompt", run.truncated))
        if run.negative_truncated:
            warn(truncation("negative prompt", run.negative_truncated))
        if run.truncated_2:
            warn(truncation("second prompt", run.truncated_2))
        if run.negative_truncated_2:
            warn(truncation("second negative prompt", run.negative_truncated_2))
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
