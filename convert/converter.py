"""The conversion driver: a checkpoint in, a bundle out.

Order of work: open and validate everything that can be checked cheaply (source, family, the
requested components' architectures, sizes, output path, the presence and headers of their
weight files) before any expensive step; then per component: reuse it if already converted, else
load -> trace -> convert -> save -> compile, freeing the torch modules before the next component
so peak memory stays near the largest single one.
"""

from __future__ import annotations

import gc
import json
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..models import AttentionImpl
from ..runtime.bundle import MERGES, SCHEDULER_CONFIG, VOCAB
from .bundle import BundleWriter, recipe_hash
from .components import COMPONENT_SPECS, VAE_SCALE, Component, Geometry, source_config
from .export import can_compile, compile_package, to_coreml, trace
from .source import SUPPORTED, Source

DEFAULT_COMPONENTS = ("text-encoder", "unet", "vae-decoder", "vae-encoder")


class ConvertError(Exception):
    """A conversion request that cannot be carried out (one-line message naming the fix)."""


@dataclass(frozen=True)
class ConvertOptions:
    attention: str = AttentionImpl.SPLIT_EINSUM.value
    components: tuple[str, ...] = DEFAULT_COMPONENTS
    height: int | None = None  # image pixels; default: the model's native size
    width: int | None = None
    unet_batch: int = 2
    compile: bool | None = None  # None: compile where Core ML exists (macOS)
    overwrite: bool = False
    query_chunk: int = 512


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Progress:
    """Stage-by-stage progress lines with elapsed times."""

    log: Callable[[str], None] = print
    start: float = field(default_factory=time.perf_counter)

    @contextmanager
    def stage(self, component: str, what: str) -> Iterator[None]:
        t = time.perf_counter()
        self.log(f"[{component}] {what} ...")
        yield
        self.log(f"[{component}] {what} done in {time.perf_counter() - t:.1f}s")


def tool_versions() -> dict[str, str]:
    import diffusers
    import numpy
    import torch
    import transformers

    from ..runtime.backends import import_coremltools

    coremltools = import_coremltools()
    return {
        "coreml-sd": __version__,
        "coremltools": coremltools.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def _configs(source: Source, components: list[Component]) -> dict[str, dict[str, Any]]:
    """Every config the conversion reads, each read once, as diffusers / transformers read it
    (``source_config``): the UNet's (sizes come from it), that of each part a requested component
    is built from (a part the pipeline lacks is a ``SourceError``), and the VAE's in any case: the
    manifest records its scaling factor (diffusers' default for a pipeline without VAE)."""
    parts = dict.fromkeys(["unet", *(comp.source_part for comp in components)])
    configs = {part: source_config(source, part) for part in parts}
    if "vae" not in configs:
        configs["vae"] = source_config(source, "vae", missing_ok=True)
    return configs


def _architectures(source_id: str, components: list[Component], configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each requested part's module config (``text_encoder``, ``unet``, ``vae``), from ``configs``.

    Cheap, and the place where a variant our modules do not implement (an LCM UNet's
    ``time_cond_proj_dim``, a VAE with a ``shift_factor``, ...) is refused, before any work."""
    architectures = {}
    for comp in components:
        if comp.source_part in architectures:  # the VAE's decoder and encoder: one config
            continue
        try:
            architectures[comp.source_part] = comp.architecture(configs[comp.source_part])
        except KeyError as exc:
            raise ConvertError(f"{source_id}: its {comp.source_part} config has no field {exc}; {SUPPORTED}") from None
        except (ValueError, TypeError) as exc:
            raise ConvertError(f"{source_id}: {exc}; {SUPPORTED}") from None
    return architectures


def _image_side(name: str, requested: int | None, native: int | None, unet_factor: int) -> int:
    """One side of the image in pixels: as requested, else the model's native size."""
    if requested is None and native is None:
        raise ConvertError(f"the UNet config gives no sample_size: pass --{name}")
    side = native if requested is None else requested
    if side <= 0 or side % VAE_SCALE:
        raise ConvertError(f"--{name} {side}: the image side must be a positive multiple of {VAE_SCALE} (the VAE's scale)")
    if (side // VAE_SCALE) % unet_factor:
        raise ConvertError(
            f"--{name} {side}: latent side {side // VAE_SCALE} is not a multiple of {unet_factor} as this UNet needs; "
            f"use a multiple of {VAE_SCALE * unet_factor} pixels"
        )
    return side


def _native_size(source_id: str, sample_size: Any) -> tuple[int, int] | None:
    """(height, width) in pixels from a UNet's ``sample_size``: one latent side, or (height,
    width) as diffusers also allows; None when absent."""
    if not sample_size:
        return None
    sides = list(sample_size) if isinstance(sample_size, (list, tuple)) else [sample_size, sample_size]
    if len(sides) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides):
        raise ConvertError(f"{source_id}: its UNet's sample_size {sample_size!r} is neither a latent side nor (height, width)")
    return sides[0] * VAE_SCALE, sides[1] * VAE_SCALE


def _geometry(source_id: str, opts: ConvertOptions, unet: dict[str, Any], architectures: dict[str, Any]) -> Geometry:
    """Sizes for every component, from the UNet's config ``unet`` (every pipeline has one) and the
    flags; checked against the requested parts' ``architectures``."""
    unet_factor = 2 ** (len(unet["block_out_channels"]) - 1)
    native = _native_size(source_id, unet.get("sample_size"))
    height = _image_side("height", opts.height, native and native[0], unet_factor)
    width = _image_side("width", opts.width, native and native[1], unet_factor)
    if opts.unet_batch not in (1, 2):
        raise ConvertError(f"UNet batch {opts.unet_batch}: use 2 (default) or 1 (--unet-batch-one)")
    geometry = Geometry(height, width, opts.unet_batch, unet["cross_attention_dim"])
    text = architectures.get("text_encoder")
    if text is not None and (text.hidden_size, text.max_length) != (geometry.text_dim, geometry.max_length):
        raise ConvertError(
            f"{source_id}: its text encoder gives {text.max_length} x {text.hidden_size} embeddings, its UNet reads"
            f" {geometry.max_length} x {geometry.text_dim}: the parts are not of one Stable Diffusion pipeline"
        )
    vae = architectures.get("vae")
    if vae is not None and (scale := 2 ** (len(vae.block_out_channels) - 1)) != VAE_SCALE:
        raise ConvertError(f"{source_id}: its VAE scales images by {scale}, not {VAE_SCALE} as SD's does; {SUPPORTED}")
    return geometry


def convert(source: Source, out: Path, opts: ConvertOptions = ConvertOptions(), progress: Progress | None = None) -> Path:
    """Convert ``source`` into the bundle directory ``out``; returns its path."""
    progress = progress or Progress()
    attention = AttentionImpl.parse(opts.attention)
    unknown = [c for c in opts.components if c not in COMPONENT_SPECS]
    if unknown or not opts.components:
        raise ConvertError(f"unknown component {', '.join(unknown) or '(none)'}: choose from {', '.join(COMPONENT_SPECS)}")
    components = [COMPONENT_SPECS[c] for c in DEFAULT_COMPONENTS if c in opts.components]
    configs = _configs(source, components)  # a component the checkpoint lacks fails here
    architectures = _architectures(source.id, components, configs)
    geometry = _geometry(source.id, opts, configs["unet"], architectures)
    do_compile = can_compile() if opts.compile is None else opts.compile
    if do_compile and not can_compile():
        raise ConvertError("compiling to .mlmodelc needs macOS (Core ML); drop --compile on this system")
    vocab, merges, pad_token = source.tokenizer_files()
    writer = BundleWriter(out, opts.overwrite)
    for part in dict.fromkeys(comp.source_part for comp in components):
        source.check_weights(part)  # last: for a hub repo this downloads them

    tools = tool_versions()
    writer.open({c.name for c in components})
    for comp in components:
        inputs, outputs = comp.interface(geometry)
        recipe = recipe_hash(
            {
                "component": comp.cli_name,
                "source": source.fingerprint(comp.source_part),
                "attention": attention.value,
                "query_chunk": opts.query_chunk,
                "float32_features": list(comp.float32_features),
                "inputs": [s.as_dict() | {"name": s.name} for s in inputs],
                "compiled": do_compile,
                "tools": tools,
            }
        )
        reused = writer.reuse(comp.name, recipe)
        if reused:
            progress.log(f"[{comp.cli_name}] unchanged: reused from the {reused}")
            continue
        t0 = time.perf_counter()
        with progress.stage(comp.cli_name, "load"):
            try:
                module = comp.build(source, attention, opts.query_chunk)
            except ValueError as exc:  # the weights do not fit our module (models.model_io)
                raise ConvertError(f"{source.id}: its {comp.source_part} does not map onto coreml-sd's {comp.name}: {exc}") from None
        with progress.stage(comp.cli_name, "trace"):
            traced = trace(module, inputs)
        with progress.stage(comp.cli_name, "convert"):
            metadata = {
                "coreml-sd.version": __version__,
                "coreml-sd.component": comp.name,
                "coreml-sd.source": source.id,
                "coreml-sd.attention": attention.value,
            }
            mlmodel = to_coreml(
                traced, inputs, outputs, metadata, f"{comp.description} ({source.id})", comp.float32_features
            )
        del module, traced
        gc.collect()
        package = f"{comp.name}.mlpackage"
        with progress.stage(comp.cli_name, "save"):
            # Straight into place: until record() lists it, the next run's writer.open() deletes
            # it, so an interrupted save leaves nothing behind.
            mlmodel.save(str(writer.staging / package))
        del mlmodel
        gc.collect()
        paths = [package]
        if do_compile:
            with progress.stage(comp.cli_name, "compile"):
                compile_package(writer.staging / package, writer.staging / f"{comp.name}.mlmodelc")
            paths.append(f"{comp.name}.mlmodelc")
        entry = {
            "package": package,
            "compiled": f"{comp.name}.mlmodelc" if do_compile else None,
            "precision": "float16",
            "compression": None,
            "inputs": {s.name: s.as_dict() for s in inputs},
            "outputs": {s.name: s.as_dict() for s in outputs},
        }
        writer.record(comp.name, entry, recipe, paths)
        progress.log(
            f"[{comp.cli_name}] converted in {time.perf_counter() - t0:.1f}s (peak memory so far {peak_rss_bytes() / 2**30:.1f} GiB)"
        )

    shutil.copyfile(vocab, writer.staging / VOCAB)
    shutil.copyfile(merges, writer.staging / MERGES)
    writer.write_text(SCHEDULER_CONFIG, json.dumps(source.scheduler_config(), indent=2) + "\n")
    h, w = geometry.latent
    manifest: dict[str, Any] = {
        "created_by": f"coreml-sd {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"kind": source.kind, "id": source.id, "revision": source.revision},
        "family": source.family,
        "prediction_type": source.prediction_type,
        "image_size": [geometry.height, geometry.width],
        "latent_size": [h, w],
        "attention": attention.value,
        "query_chunk": opts.query_chunk,
        "unet_batch": geometry.unet_batch,
        "text_embedding_dim": geometry.text_dim,
        "tokenizer": {"pad_token": pad_token, "max_length": geometry.max_length},
        "vae": {"scaling_factor": configs["vae"]["scaling_factor"]},
        "tools": tools,
    }
    path = writer.finish(manifest, [VOCAB, MERGES, SCHEDULER_CONFIG])
    progress.log(f"bundle written to {path} in {time.perf_counter() - progress.start:.1f}s")
    return path
