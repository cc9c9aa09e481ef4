"""`coreml-sd generate`: a prompt and a bundle in, PNG files out.

Imports stay light at module level (the runtime path never needs torch); the pipeline is
imported inside the command.
"""

from __future__ import annotations

from pathlib import Path

import click

from .backends import BACKENDS, COMPUTE_UNITS
from .schedulers import SCHEDULER_NAMES


@click.command()
@click.argument("prompt")
@click.option("--bundle", "bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory (ours or Apple's).")
@click.option("-n", "--num-images", default=1, show_default=True, type=int, help="Images to generate.")
@click.option("--steps", default=20, show_default=True, type=int, help="Denoising steps.")
@click.option("--guidance", default=7.5, show_default=True, type=float, help="Classifier-free guidance scale (<= 1: off).")
@click.option("--scheduler", type=click.Choice(SCHEDULER_NAMES), help="Sampler (default: the model's own).")
@click.option("--seed", type=int, help="Seed (default: random); the same seed gives the same image as diffusers on CPU.")
@click.option("--negative-prompt", default="", help="What the image should not show.")
@click.option("--init-image", type=click.Path(path_type=Path), help="Start from this image (image-to-image).")
@click.option("--strength", default=0.75, show_default=True, type=float, help="How much of the init image to repaint.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help="auto: coreml on macOS, mil elsewhere.")
@click.option("--compute-units", type=click.Choice(COMPUTE_UNITS), default="CPU_AND_NE", show_default=True)
@click.option("--reduce-memory", is_flag=True, help="Load each model just before use and release it after.")
@click.option("--rng", type=click.Choice(["torch", "numpy"]), default="torch", show_default=True, help="Noise source.")
@click.option("--height", type=int, help="Must match the bundle (default: its size).")
@click.option("--width", type=int, help="Must match the bundle (default: its size).")
@click.option("-o", "--output", "out", default=Path("."), show_default=True, type=click.Path(path_type=Path), help="Folder for the PNG files.")
def generate(prompt, bundle, num_images, steps, guidance, scheduler, seed, negative_prompt, init_image, strength,
             backend, compute_units, reduce_memory, rng, height, width, out):
    """Generate images for PROMPT with a converted bundle."""
    from .backends import BackendError
    from .bundle import BundleError
    from .image import save_png
    from .pipeline import GenerationError, Pipeline

    def err(line: str) -> None:
        click.echo(line, err=True)

    if out.exists() and not out.is_dir():
        raise click.ClickException(f"output {out} is a file; pass a folder with -o")
    try:
        pipe = Pipeline.from_bundle(bundle, backend=backend, compute_units=compute_units, reduce_memory=reduce_memory)
        run = pipe.start(
            prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance, scheduler=scheduler,
            seed=seed, num_images=num_images, init_image=init_image, strength=strength, rng=rng, height=height, width=width,
        )
        if run.truncated:
            err(f"warning: the prompt is longer than 77 tokens; ignored: {run.truncated!r}")
        label = f"{pipe.backend} {compute_units if pipe.backend == 'coreml' else ''}".strip()
        with click.progressbar(length=len(run.timesteps), label=f"denoising ({label})", file=click.get_text_stream("stderr")) as bar:
            for _ in run:
                bar.update(1)
        result = run.finish()
        paths = [save_png(image, params, out) for image, params in zip(result.images, result.parameters)]
    except (BundleError, BackendError, GenerationError) as exc:
        raise click.ClickException(str(exc)) from None
    t = result.timings.as_dict()
    err(
        f"load {t['load_s']:.2f}s, text encoder {t['text_encoder_s']:.2f}s"
        + (f", vae encoder {t['vae_encoder_s']:.2f}s" if init_image else "")
        + f", unet {t['unet_s_per_step'] * 1000:.0f} ms/step, other {t['host_s_per_step'] * 1000:.1f} ms/step"
        + f", vae decoder {t['vae_decoder_s']:.2f}s"
    )
    for path in paths:
        click.echo(str(path))
