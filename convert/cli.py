"""`coreml-sd convert`: one command from a checkpoint to a Core ML bundle.

torch, diffusers and coremltools are imported inside the command, so `coreml-sd --help` and the
other commands stay fast and torch-free. A base install (the Mac runtime) has no torch at all:
``require_convert_extra`` turns that into a one-line error naming the extra to install.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from ..families import COMPONENT_NAMES
from ..runtime.cli import size_list
from ..system import INSTALL_CONVERT_EXTRA

_ATTENTION = ("original", "split-einsum", "split-einsum-v2")
# What the `convert` extra of pyproject.toml installs, as imported (torch first: the others need it).
CONVERT_EXTRA = ("torch", "safetensors", "transformers", "diffusers", "filelock", "sklearn")


def require_convert_extra(command: str) -> None:
    """Raise a one-line ``ClickException`` unless every package of the ``convert`` extra imports;
    commands that convert call it first, before any work."""
    for name in CONVERT_EXTRA:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            raise click.ClickException(
                f"{command} needs the convert extra ({exc}): {INSTALL_CONVERT_EXTRA}"
            ) from None


def _components(ctx, param, value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(c.strip() for c in value.split(",") if c.strip()))
    unknown = [c for c in names if c not in COMPONENT_NAMES]
    if unknown or not names:
        raise click.BadParameter(f"unknown component {', '.join(unknown) or '(none)'}; choose from {', '.join(COMPONENT_NAMES)}")
    return names


@click.command()
@click.argument("source")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option(
    "--attention",
    type=click.Choice(_ATTENTION),
    default="split-einsum",
    show_default=True,
    help="split-einsum(-v2) for the Neural Engine, original for the GPU.",
)
@click.option("--components", callback=lambda ctx, param, value: value and _components(ctx, param, value),
              help=f"Comma-separated, from {', '.join(COMPONENT_NAMES)} [default: all the model has].")
@click.option("--height", type=int, help="Image height in pixels (default: the model's native size).")
@click.option("--width", type=int, help="Image width in pixels (default: the model's native size).")
@click.option("--sizes", callback=size_list, metavar="WxH,...",
              help="Several image sizes in one bundle, e.g. 512x512,512x768,768x512: the UNet and VAE hold one function"
                   " per size, sharing their weights (the first is the default; needs macOS 15 / iOS 18).")
@click.option("--unet-batch-one", is_flag=True, help="UNet takes batch 1 (two calls per step with guidance; less memory).")
@click.option("--compress", metavar="PRESET",
              help="Compress the text encoders' and UNet's weights: palettize-8, palettize-6, palettize-4,"
                   " palettize-4-grouped, int8, int4-blocked, or mixed-B (B bits on average, e.g. mixed-4.5).")
@click.option("--compress-vae", is_flag=True, help="Compress the VAE too, with the same preset (it is the most sensitive).")
@click.option("--deployment-target", metavar="TARGET",
              help="Minimum OS: macOS13 (iOS16), macOS14 (iOS17) or macOS15 (iOS18) [default: the lowest the preset needs].")
@click.option("--revision", help="Hub revision (branch, tag or commit) of SOURCE.")
@click.option("--config", "config", help="Architecture of a single-file SOURCE: a diffusers folder, hub id, or built-in name"
              " (sd15, sd2-512, sd2-768-v, sdxl-base, sdxl-refiner); known architectures need none.")
@click.option("--vae", "vae", help="Replacement VAE: hub id, folder or .safetensors file (e.g. a float16-safe SDXL VAE).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle checkpoints (.ckpt, .bin): only for files you trust.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle (unchanged components are reused).")
@click.option("--compile/--no-compile", "compile_", default=None, help="Compile to .mlmodelc (default: on macOS).")
@click.option("-v", "--verbose", is_flag=True, help="Also show the libraries' own progress bars and messages.")
def convert(source, out, attention, components, height, width, sizes, unet_batch_one, compress, compress_vae, deployment_target,
            revision, config, vae, allow_pickle, overwrite, compile_, verbose):
    """Convert a Stable Diffusion checkpoint to a Core ML bundle.

    SOURCE is a model id on the Hugging Face hub, a local diffusers folder, or a single-file
    .safetensors checkpoint.
    """
    require_convert_extra("convert")
    from .bundle import OutputError, staging_dir
    from .converter import ConvertError, ConvertOptions, Progress
    from .converter import convert as run
    from .export import CompileError
    from .quiet import library_output
    from .source import SourceError, open_source

    def log(line: str) -> None:
        click.echo(line, err=True)

    opts = ConvertOptions(
        attention=attention,
        components=components or None,
        height=height,
        width=width,
        sizes=sizes,
        unet_batch=1 if unet_batch_one else 2,
        compile=compile_,
        overwrite=overwrite,
        compress=compress,
        compress_vae=compress_vae,
        deployment_target=deployment_target,
    )
    try:
        log(f"opening {source}")
        src = open_source(source, revision=revision, allow_pickle=allow_pickle, config=config)
        if vae is not None:
            src = src.with_vae(vae, allow_pickle)
            log(f"VAE from {src.vae.where}")
        log(f"{src.kind} {src.id}: {src.family}, {src.prediction_type} prediction")
        with library_output(verbose, log):
            run(src, out, opts, Progress(log))
    except (SourceError, ConvertError, OutputError, CompileError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        staging = staging_dir(out)
        if staging.is_dir():
            log(f"interrupted: finished components are kept in {staging} and reused by the same command")
        else:
            log("interrupted before anything was written")
        sys.exit(130)
    click.echo(str(out))
