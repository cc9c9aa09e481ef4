"""The conversion driver: a checkpoint in, a bundle out.

Order of work: open and validate everything that can be checked cheaply (source, family, the
requested components' architectures, sizes, output path, the presence and headers of their
weight files) before any expensive step; then per component: reuse it if already converted, else
trace -> convert (with stand-in weights) -> load -> place the weights -> save -> compile, freeing
each stage's copy before the next, so that peak memory stays near one float16 copy of the
largest component's weights.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..contract import MERGES, SCHEDULER_CONFIG, VOCAB
from ..families import COMPONENT_NAMES, ComponentSpec, EncoderWidths, Family, Geometry, family
from ..models import AttentionImpl
from ..system import peak_rss_bytes, tool_versions
from .bundle import BundleWriter, check_output, recipe_hash
from .components import BUILDERS, build_module, empty_module, source_config
from .compress import (
    WEIGHT_THRESHOLD,
    CompressError,
    Preset,
    compress_program,
    deployment_target,
    describe_target,
    preset,
    program_weight_bytes,
    weight_bytes,
)
from .export import (
    WeightNames,
    can_compile,
    compile_package,
    finish,
    finish_functions,
    place_weights,
    return_freed_memory,
    stand_in_weights,
    take_slots,
    to_program,
    trace,
)
from .probe import FLOAT16_PROBES, float16_failure
from .sensitivity import SUFFIX, Sensitivity, analyse
from .source import Source
from .support import SUPPORTED


class ConvertError(Exception):
    """A conversion request that cannot be carried out (one-line message naming the fix)."""


@dataclass(frozen=True)
class ConvertOptions:
    attention: str = AttentionImpl.SPLIT_EINSUM.value
    components: tuple[str, ...] | None = None  # --components names; None: every one the family has
    height: int | None = None  # image pixels; default: the model's native size
    width: int | None = None
    unet_batch: int = 2
    compile: bool | None = None  # None: compile where Core ML exists (macOS)
    overwrite: bool = False
    query_chunk: int = 512
    compress: str | None = None  # a preset of convert.compress; None: float16 weights
    compress_vae: bool = False  # the VAE too (it is small and the most sensitive)
    deployment_target: str | None = None  # None: the lowest the preset needs
    # --sizes: (height, width) pixels of each size, the first the default; more than one makes the
    # UNet's and VAE's packages multifunction (one function a size, the weights shared).
    sizes: tuple[tuple[int, int], ...] | None = None


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


# ------------------------------------------------------------------ 1. plan: every cheap check


@dataclass(frozen=True)
class Plan:
    """A conversion checked as far as it can be without converting: what to build, for which
    sizes, from which configs, into which folder."""

    source: Source
    out: Path
    family: Family
    components: tuple[ComponentSpec, ...]  # requested, in the family's order
    configs: dict[str, dict[str, Any]]  # per source part, as diffusers / transformers read it
    geometry: Geometry  # the first (default) size's
    attention: AttentionImpl
    query_chunk: int
    compile: bool
    overwrite: bool
    tokenizer: tuple[Path, Path, str]  # vocab.json, merges.txt, pad token
    tools: dict[str, str | None]
    compression: Preset | None = None
    compress_vae: bool = False
    target: str = "macOS13"  # minimum deployment target of the bundle
    geometries: tuple[Geometry, ...] = ()  # every size, ``geometry`` first
    single_target: str = "macOS13"  # that of a one-function package: only multifunction ones need macOS 15

    def target_of(self, functions: list) -> str:
        """The deployment target of a package of ``functions`` (``functions``): a text encoder in a
        bundle of several sizes stays as old as the compression allows, and is reused from a
        one-size bundle of the same model."""
        return self.target if len(functions) > 1 else self.single_target

    def functions(self, spec: ComponentSpec) -> list[tuple[str | None, list, list]]:
        """``spec``'s (function name, inputs, outputs) per size: one, named None, for a single size
        or a model whose inputs do not depend on it (the text encoders); else one per size."""
        ios = [spec.io(g) for g in self.geometries or (self.geometry,)]
        if len(ios) == 1 or all(io == ios[0] for io in ios):
            return [(None, *ios[0])]
        return [(function_name(g.height, g.width), *io) for g, io in zip(self.geometries, ios)]

    def compression_of(self, spec: ComponentSpec) -> Preset | None:
        """The preset ``spec``'s weights get: the text encoders and UNets take ``compression``,
        the VAE only with ``compress_vae``."""
        return self.compression if spec.source_part != "vae" or self.compress_vae else None


def plan(source: Source, out: Path, opts: ConvertOptions = ConvertOptions()) -> Plan:
    """Check everything that can be checked cheaply, in the order a user would fix it (options,
    configs, architectures, sizes, tokenizer, output path), and the weight files last (for a hub
    source that downloads them). Raises ``ConvertError``, ``SourceError`` or ``OutputError``."""
    attention = AttentionImpl.parse(opts.attention)
    compression, single_target = _compression(opts)
    target = _sizes_target(opts, compression, single_target)
    fam = family(source.family)
    names = [c.cli_name for c in fam.components]
    requested = names if opts.components is None else opts.components
    unknown = [c for c in requested if c not in COMPONENT_NAMES]
    if unknown or not requested:
        raise ConvertError(f"unknown component {', '.join(unknown) or '(none)'}: choose from {', '.join(names)}")
    if absent := [c for c in requested if c not in names]:
        raise ConvertError(f"{source.id} is {fam.label}, which has no {', '.join(absent)}: choose from {', '.join(names)}")
    components = tuple(c for c in fam.components if c.cli_name in requested)
    configs = _configs(source, fam, components)  # a component the checkpoint lacks fails here
    architectures = _architectures(source.id, components, configs)
    geometries = tuple(_geometry(source.id, fam, opts, configs, architectures, size) for size in opts.sizes or [None])
    geometry = geometries[0]
    do_compile = can_compile() if opts.compile is None else opts.compile
    if do_compile and not can_compile():
        raise ConvertError("compiling to .mlmodelc needs macOS (Core ML); drop --compile on this system")
    tokenizer = source.tokenizer_files()
    check_output(out, opts.overwrite)
    for part in dict.fromkeys(c.source_part for c in components):
        source.check_weights(part)
    return Plan(source, Path(out), fam, components, configs, geometry, attention, opts.query_chunk, do_compile,
                opts.overwrite, tokenizer, tool_versions(), compression, opts.compress_vae, target, geometries, single_target)


def function_name(height: int, width: int) -> str:
    """The name of a multifunction package's function for one image size, as --sizes spells it."""
    return f"size_{width}x{height}"


def _sizes_target(opts: ConvertOptions, compression: Preset | None, target: str) -> str:
    """The deployment target once --sizes is taken into account: several sizes make multifunction
    packages, which need macOS 15 / iOS 18; an explicit older target is refused."""
    sizes = opts.sizes or ()
    if opts.sizes is not None and (opts.height is not None or opts.width is not None):
        raise ConvertError("--sizes lists every size: drop --width/--height, or give the one size with them instead")
    if len(set(sizes)) != len(sizes):
        twice = next(s for s in sizes if sizes.count(s) > 1)
        raise ConvertError(f"--sizes lists {twice[1]}x{twice[0]} twice: give each size once")
    if len(sizes) < 2 or target == "macOS15":
        return target
    if opts.deployment_target is not None:
        raise ConvertError(f"--sizes with {len(sizes)} sizes makes multifunction packages, which need macOS15 / iOS18:"
                           f" raise or drop --deployment-target {opts.deployment_target}, or convert one size per bundle")
    return "macOS15"


def _compression(opts: ConvertOptions) -> tuple[Preset | None, str]:
    """The compression preset and the deployment target, checked together."""
    try:
        chosen = None if opts.compress is None else preset(opts.compress)
        if opts.compress_vae and chosen is None:
            raise CompressError("--compress-vae compresses the VAE with the --compress preset: add --compress PRESET")
        return chosen, deployment_target(chosen, opts.deployment_target)
    except CompressError as exc:
        raise ConvertError(str(exc)) from None


def _configs(source: Source, fam: Family, components: tuple[ComponentSpec, ...]) -> dict[str, dict[str, Any]]:
    """Every config the conversion reads, each read once (``source_config``): the UNet's (sizes
    come from it), that of each part a requested component is built from (a part the pipeline
    lacks is a ``SourceError``), those of the family's text encoders the pipeline has (their
    widths must add up to the UNet's), and the VAE's in any case: the manifest records its
    scaling factor (diffusers' default for a pipeline without VAE)."""
    parts = dict.fromkeys(["unet", *(c.source_part for c in components)])
    configs = {part: source_config(source, part) for part in parts}
    for spec in fam.components:
        if spec.name in fam.conditioning.models and spec.source_part not in configs and source.has_config(spec.source_part):
            configs[spec.source_part] = source_config(source, spec.source_part)
    if "vae" not in configs:
        configs["vae"] = source_config(source, "vae", missing_ok=True)
    return configs


def _architectures(source_id: str, components: tuple[ComponentSpec, ...], configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each requested part's module config (``text_encoder``, ``unet``, ``vae``), from ``configs``.

    Cheap, and the place where a variant our modules do not implement (an LCM UNet's
    ``time_cond_proj_dim``, a VAE with a ``shift_factor``, ...) is refused, before any work."""
    architectures = {}
    for spec in components:
        if spec.source_part in architectures:  # the VAE's decoder and encoder: one config
            continue
        try:
            architectures[spec.source_part] = BUILDERS[spec.module].architecture(configs[spec.source_part])
        except KeyError as exc:
            raise ConvertError(f"{source_id}: its {spec.source_part} config has no field {exc}; {SUPPORTED}") from None
        except (ValueError, TypeError) as exc:
            raise ConvertError(f"{source_id}: {exc}; {SUPPORTED}") from None
    return architectures


def _image_side(name: str, requested: int | None, native: int | None, fam: Family, unet_factor: int,
                flag: str | None = None) -> int:
    """One side of the image in pixels: as requested, else the model's native size. ``flag``: how
    the user asked for it, for messages (default --height / --width)."""
    vae_scale = fam.vae_scale
    if requested is None and native is None:
        usual = fam.default_size[0 if name == "height" else 1]
        raise ConvertError(f"the UNet config gives no sample_size: pass --{name} ({fam.label} models are usually {usual})")
    side = native if requested is None else requested
    asked = f"{flag}: {name}" if flag else f"--{name}"
    if side <= 0 or side % vae_scale:
        raise ConvertError(f"{asked} {side}: the image side must be a positive multiple of {vae_scale} (the VAE's scale)")
    if (side // vae_scale) % unet_factor:
        raise ConvertError(
            f"{asked} {side}: latent side {side // vae_scale} is not a multiple of {unet_factor} as this UNet needs; "
            f"use a multiple of {vae_scale * unet_factor} pixels"
        )
    return side


def _native_size(source_id: str, sample_size: Any, vae_scale: int) -> tuple[int, int] | None:
    """(height, width) in pixels from a UNet's ``sample_size``: one latent side, or (height,
    width) as diffusers also allows; None when absent."""
    if not sample_size:
        return None
    sides = list(sample_size) if isinstance(sample_size, (list, tuple)) else [sample_size, sample_size]
    if len(sides) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides):
        raise ConvertError(f"{source_id}: its UNet's sample_size {sample_size!r} is neither a latent side nor (height, width)")
    return sides[0] * vae_scale, sides[1] * vae_scale


def _geometry(source_id: str, fam: Family, opts: ConvertOptions, configs: dict[str, dict[str, Any]],
              architectures: dict[str, Any], size: tuple[int, int] | None = None) -> Geometry:
    """Sizes for every component, from the UNet's config (every pipeline has one), the text
    encoders' and the flags (``size``: one of --sizes, as (height, width)); checked against the
    requested parts' ``architectures``."""
    unet = configs["unet"]
    scale = fam.vae_scale
    unet_factor = 2 ** (len(unet["block_out_channels"]) - 1)
    native = _native_size(source_id, unet.get("sample_size"), scale)
    if size is not None:
        height = _image_side("height", size[0], None, fam, unet_factor, flag=f"--sizes {size[1]}x{size[0]}")
        width = _image_side("width", size[1], None, fam, unet_factor, flag=f"--sizes {size[1]}x{size[0]}")
    else:
        height = _image_side("height", opts.height, native and native[0], fam, unet_factor)
        width = _image_side("width", opts.width, native and native[1], fam, unet_factor)
    if opts.unet_batch not in (1, 2):
        raise ConvertError(f"UNet batch {opts.unet_batch}: use 2 (default) or 1 (--unet-batch-one)")
    geometry = Geometry(height, width, opts.unet_batch, unet["cross_attention_dim"], vae_scale=scale,
                        latent_channels=fam.latent_channels, encoders=_encoder_widths(source_id, fam, configs),
                        pooled_dim=_pooled_dim(fam, unet), time_ids=fam.time_ids)
    _check_text_widths(source_id, fam, geometry)
    vae = architectures.get("vae")
    if vae is not None and (vae_factor := 2 ** (len(vae.block_out_channels) - 1)) != scale:
        raise ConvertError(f"{source_id}: its VAE scales images by {vae_factor}, not {scale} as {fam.label}'s does; {SUPPORTED}")
    return geometry


def _encoder_widths(source_id: str, fam: Family, configs: dict[str, dict[str, Any]]) -> tuple[tuple[str, EncoderWidths], ...]:
    """The output widths of each of the family's text encoders whose config was read; their
    prompts must be 77 tokens, as every model of the bundle is converted for."""
    widths = []
    for spec in fam.components:
        config = configs.get(spec.source_part)
        if spec.name not in fam.conditioning.models or config is None:
            continue
        if config["max_position_embeddings"] != Geometry.max_length:
            raise ConvertError(f"{source_id}: its {spec.source_part} reads {config['max_position_embeddings']} tokens,"
                               f" not {Geometry.max_length} as {fam.label}'s do; {SUPPORTED}")
        pooled = config["projection_dim"] if "projection" in spec.module else config["hidden_size"]
        widths.append((spec.name, EncoderWidths(config["hidden_size"], pooled)))
    return tuple(widths)


def _pooled_dim(fam: Family, unet: dict[str, Any]) -> int:
    """The width of an SDXL UNet's ``text_embeds``: its added embedding's input less the time ids'."""
    if fam.conditioning.pooled is None:
        return 0
    return unet["projection_class_embeddings_input_dim"] - fam.time_ids * unet["addition_time_embed_dim"]


def _check_text_widths(source_id: str, fam: Family, g: Geometry) -> None:
    """The text encoders' hidden widths add up to the UNet's cross-attention width, and the pooled
    encoder's pooled width is the UNet's ``text_embeds`` width, when their configs are known."""
    known = dict(g.encoders)
    if len(known) == len(fam.conditioning.models) and (total := sum(w.hidden for w in known.values())) != g.text_dim:
        widths = " + ".join(str(w.hidden) for w in known.values())
        raise ConvertError(
            f"{source_id}: its text encoders give {widths} = {total}-wide embeddings, its UNet reads {g.text_dim}-wide"
            f" ones: the parts are not of one {fam.label} pipeline"
        )
    pooled = known.get(fam.conditioning.pooled or "")
    if pooled is not None and pooled.pooled != g.pooled_dim:
        raise ConvertError(
            f"{source_id}: its {fam.conditioning.pooled} pools {pooled.pooled}-wide embeddings, its UNet reads"
            f" {g.pooled_dim}-wide ones: the parts are not of one {fam.label} pipeline"
        )


# ------------------------------------------------------------------ 2. one component


def _recipe(p: Plan, spec: ComponentSpec, functions) -> str:
    """What a component's package depends on: a bundle's component with the same recipe is reused."""
    inputs = [[s.as_dict() | {"name": s.name} for s in inputs] for _, inputs, _ in functions]
    return recipe_hash(
        {
            "component": spec.cli_name,
            "source": p.source.fingerprint(spec.source_part),
            "attention": p.attention.value,
            "query_chunk": p.query_chunk,
            "float32_features": list(spec.float32_features),
            "inputs": inputs[0] if len(functions) == 1 else inputs,
            **({"functions": [name for name, _, _ in functions]} if len(functions) > 1 else {}),
            "compiled": p.compile,
            "tools": p.tools,
            "compression": (c := p.compression_of(spec)) and c.name,
            "target": p.target_of(functions),
        }
    )


def _build(p: Plan, spec: ComponentSpec, functions, destination: Path, precision: str, writer: BundleWriter,
           progress: Progress, bits: dict[str, int] | None = None) -> dict[str, Any]:
    """Trace -> convert (with stand-in weights) -> load -> place -> compress -> save ``spec``'s
    package to ``destination`` in ``precision``, freeing each stage's copy before the next; returns
    the compression's manifest entry (None when uncompressed). ``functions``: (name, inputs,
    outputs) per size (``Plan.functions``); several make one multifunction package, each size
    traced and converted on its own and the weights loaded, placed, compressed and stored once.
    ``bits``: a mixed preset's palette bits per parameter.

    Weights last (see export): the module is traced and converted with stand-in weights that cost no
    memory, which are loaded in the program's precision only then, so that the model is in memory once
    (SDXL's UNet: 5 GB rather than 10 GB of float32 weights plus their copies). Compression runs on
    that program before it is written: no float16 package is written and read back."""
    return_freed_memory()
    compression = p.compression_of(spec)
    target = p.target_of(functions)
    with writer.temporaries():  # coremltools' temporary package: inside staging, removed after
        programs = []  # (function, program, its weights' slots)
        for function, inputs, outputs in functions:
            size = f" ({function.removeprefix('size_')})" if function else ""
            with progress.stage(spec.cli_name, f"trace{size}"):
                module = empty_module(spec, p.configs[spec.source_part], p.attention, p.query_chunk)
                stand_ins = stand_in_weights(module)
                traced = trace(module, inputs)
            with progress.stage(spec.cli_name, f"convert{size}" if precision == "float16" else f"convert ({precision}){size}"):
                program = to_program(traced, inputs, outputs, spec.float32_features, precision, target)
                del module, traced
                programs.append((function, program, take_slots(program, stand_ins)))
                gc.collect()
        with progress.stage(spec.cli_name, "load"):
            try:
                module = build_module(p.source, spec, p.attention, p.query_chunk, getattr(torch, precision))
            except ValueError as exc:  # the weights do not fit our module (models.model_io)
                raise ConvertError(
                    f"{p.source.id}: its {spec.source_part} does not map onto coreml-sd's {spec.name}: {exc}"
                ) from None
        entry: dict[str, Any] = {}
        with progress.stage(spec.cli_name, "place"):
            weights = module.state_dict()
            # Every size's program shares the same arrays (place_weights takes the tensors' memory).
            placed = [place_weights(slots, weights) for _, _, slots in programs]
            names = WeightNames(placed[0])  # the first program's: compression runs on it (export.share_compressed)
            del module, weights, placed  # the programs share the tensors they hold
            program = programs[0][1]

            def compress(program) -> None:  # on the placed weights, their scales folded in (export.finish)
                if compression is None:
                    return
                consts = _weight_consts(p, spec, program, names, bits)
                entry.update(preset=compression.name, bytes_before=program_weight_bytes(program), deployment_target=target,
                             bits=compression.bits if bits is None else _average(program, consts))
                with progress.stage(spec.cli_name, f"compress ({compression.name})"):
                    compress_program(program, compression, consts)

            metadata = {
                "coreml-sd.version": __version__,
                "coreml-sd.component": spec.name,
                "coreml-sd.source": p.source.id,
                "coreml-sd.attention": p.attention.value,
                "coreml-sd.precision": precision,
                **({"coreml-sd.compression": compression.name} if compression else {}),
            }
            description = f"{spec.description} ({p.source.id})"
            if len(functions) == 1:
                mlmodel = finish(program, *functions[0][1:], metadata, description, compress, target)
            else:
                mlmodel = finish_functions([(f, prog, *io) for (f, prog, _), (_, *io) in zip(programs, functions)],
                                           metadata, description, compress, target)
        del program, programs
        gc.collect()
        with progress.stage(spec.cli_name, "save"):
            # Straight into place: until record() lists it, the next run's writer deletes it, so an
            # interrupted save leaves nothing behind.
            mlmodel.save(str(destination))
        del mlmodel
        gc.collect()
    if not entry:
        return None
    entry["bytes_after"] = weight_bytes(destination)
    return entry


def _weight_consts(p: Plan, spec: ComponentSpec, program, names: WeightNames, bits: dict[str, int] | None) -> dict:
    """The constants of ``program`` holding the model's weight tensors, by name, with a mixed preset's
    palette bits for each (from ``bits``, per parameter; every analysed parameter must be found);
    None for a fixed preset."""
    consts, found = {}, set()
    for function in program.functions.values():
        for op in function.operations:
            owner = names.of(op) if op.op_type == "const" else None
            value = op.outputs[0].val
            # Weights only (biases and norms stay float16), of more than WEIGHT_THRESHOLD elements.
            if owner is None or getattr(value, "size", 0) <= WEIGHT_THRESHOLD or value.ndim < 2:
                continue
            if bits is None:
                consts[op.name] = None
            elif owner in bits:
                consts[op.name] = bits[owner]
                found.add(owner)
    if bits is not None and (missing := [name for name in bits if name not in found]):
        raise ConvertError(f"{spec.name}: {len(missing)} analysed weights (first {missing[0]}) are in no constant of its"
                           f" program, so {p.compression.name} cannot set their bits; use a palettize-N preset")
    return consts


def _average(program, by_const: dict[str, int | None]) -> float:
    """The average palette bits of a mixed preset over the weights it compresses."""
    sizes = {op.name: op.outputs[0].val.size for f in program.functions.values() for op in f.operations if op.name in by_const}
    return round(sum(by_const[n] * sizes[n] for n in sizes) / max(1, sum(sizes.values())), 3)


def convert_component(p: Plan, spec: ComponentSpec, writer: BundleWriter, progress: Progress) -> None:
    """Reuse ``spec``'s component when its recipe is unchanged, else build it into ``writer``'s
    staging folder (``_build``), check a VAE model's float16 output (``probe``; converted again in
    float32 when it overflows), then compile it."""
    functions = p.functions(spec)
    recipe = _recipe(p, spec, functions)
    reused = writer.reuse(spec.name, recipe)
    if reused:
        progress.log(f"[{spec.cli_name}] unchanged: reused from the {reused}")
        return
    t0 = time.perf_counter()
    package = f"{spec.name}.mlpackage"
    precision = "float16"
    compression = p.compression_of(spec)
    extra: list[str] = []
    bits = None
    if compression is not None and compression.mixed:
        sensitivity, extra = _sensitivity(p, spec, writer, progress)
        bits = sensitivity.allocate(compression.bits)
    elif spec.source_part != "vae" and _cached_sensitivity(p, spec, writer)[0] is not None:
        extra = [f"{spec.name}{SUFFIX}"]  # an earlier mixed preset's analysis, kept for the next one
    stats = _build(p, spec, functions, writer.staging / package, precision, writer, progress, bits)
    if spec.name in FLOAT16_PROBES:
        with progress.stage(spec.cli_name, "float16 probe"):
            failure = float16_failure(writer.staging / package, spec.name, p.configs["vae"]["scaling_factor"])
        if failure:
            progress.log(f"[{spec.cli_name}] {failure} in float16, as SDXL's stock VAE does: converting it in float32"
                         " (runs on the CPU and GPU, not the Neural Engine; --vae with a float16-safe VAE avoids it)")
            precision = "float32"
            shutil.rmtree(writer.staging / package)
            stats = _build(p, spec, functions, writer.staging / package, precision, writer, progress, bits)
    if stats is not None:
        if bits is not None:
            stats.update(predicted_psnr_db=round(sensitivity.psnr(bits), 2), analysis=extra[0], layer_bits=bits)
        ratio = stats["bytes_after"] / stats["bytes_before"]
        progress.log(f"[{spec.cli_name}] {compression.name}: weights {stats['bytes_before'] / 2**20:.1f} MiB ->"
                     f" {stats['bytes_after'] / 2**20:.1f} MiB ({ratio:.2f}x)")
    compiled = f"{spec.name}.mlmodelc" if p.compile else None
    if compiled:
        with progress.stage(spec.cli_name, "compile"):
            compile_package(writer.staging / package, writer.staging / compiled)
    entry = {
        "package": package,
        "compiled": compiled,
        "precision": precision,
        "compression": stats,
        "deployment_target": p.target_of(functions),
        "inputs": {s.name: s.as_dict() for s in functions[0][1]},
        "outputs": {s.name: s.as_dict() for s in functions[0][2]},
    }
    if len(functions) > 1:  # a multifunction package: each size's I/O, by function name
        entry["functions"] = {name: {"inputs": {s.name: s.as_dict() for s in inputs},
                                     "outputs": {s.name: s.as_dict() for s in outputs}}
                              for name, inputs, outputs in functions}
    writer.record(spec.name, entry, recipe, [package, *([compiled] if compiled else []), *extra])
    progress.log(
        f"[{spec.cli_name}] converted in {time.perf_counter() - t0:.1f}s (peak memory so far {peak_rss_bytes() / 2**30:.1f} GiB)"
    )


def _cached_sensitivity(p: Plan, spec: ComponentSpec, writer: BundleWriter) -> tuple[Sensitivity | None, str, str]:
    """``spec``'s per-layer sensitivity if the staging folder or the bundle being replaced holds it
    for these weights (copied into the staging folder), with where it was found; and its key."""
    key = recipe_hash({"source": p.source.fingerprint(spec.source_part), "component": spec.name,
                       "coremltools": p.tools.get("coremltools"), "torch": p.tools.get("torch")})
    name = f"{spec.name}{SUFFIX}"
    for folder, where in ((writer.staging, "interrupted run"), (writer.out, "existing bundle")):
        found = Sensitivity.read(folder / name, key)
        if found is not None:
            if folder != writer.staging:
                shutil.copyfile(folder / name, writer.staging / name)
            return found, where, key
    return None, "", key


def _sensitivity(p: Plan, spec: ComponentSpec, writer: BundleWriter, progress: Progress) -> tuple[Sensitivity, list[str]]:
    """``spec``'s per-layer sensitivity (``convert.sensitivity``): the cached one, else measured and
    written to the staging folder. Returns it with the file's name, which the component then owns
    (and keeps under other presets, for the next mixed one: ``convert_component``)."""
    found, where, key = _cached_sensitivity(p, spec, writer)
    if found is not None:
        progress.log(f"[{spec.cli_name}] layer sensitivity: reused from the {where} ({found.probes} probes)")
    else:
        with progress.stage(spec.cli_name, "layer sensitivity (for mixed-bit palettes)"):
            # The plain attention: the same parameters, faster in torch than the Neural Engine's layout.
            module = build_module(p.source, spec, AttentionImpl.ORIGINAL, p.query_chunk, torch.float32)
            found = analyse(module, spec, p.geometry, p.configs["vae"]["scaling_factor"], key,
                            log=lambda line: progress.log(f"[{spec.cli_name}]   {line}"))
            del module
            gc.collect()
        writer.write_text(f"{spec.name}{SUFFIX}", found.to_json())
    return found, [f"{spec.name}{SUFFIX}"]


# ------------------------------------------------------------------ 3. the manifest


def write_manifest(p: Plan, writer: BundleWriter) -> Path:
    """Add the tokenizer and scheduler files and the manifest, and move the bundle into place."""
    vocab, merges, pad_token = p.tokenizer
    shutil.copyfile(vocab, writer.staging / VOCAB)
    shutil.copyfile(merges, writer.staging / MERGES)
    writer.write_text(SCHEDULER_CONFIG, json.dumps(p.source.scheduler_config(), indent=2) + "\n")
    g = p.geometry
    manifest: dict[str, Any] = {
        "created_by": f"coreml-sd {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"kind": p.source.kind, "id": p.source.id, "revision": p.source.revision},
        "family": p.family.name,
        "prediction_type": p.source.prediction_type,
        "image_size": [g.height, g.width],
        "latent_size": list(g.latent),
        # Every size the bundle runs at, the first the default; "function" names the UNet's and
        # VAE's function for it (null: a single-size bundle, whose packages have one function).
        "sizes": [{"height": s.height, "width": s.width,
                   "function": function_name(s.height, s.width) if len(p.geometries) > 1 else None}
                  for s in p.geometries or (g,)],
        "attention": p.attention.value,
        "query_chunk": p.query_chunk,
        "unet_batch": g.unet_batch,
        "deployment_target": p.target,
        "text_embedding_dim": g.text_dim,
        "tokenizer": {"pad_token": pad_token, "max_length": g.max_length},
        "vae": {"scaling_factor": p.configs["vae"]["scaling_factor"],
                **({"source": p.source.vae.where} if p.source.vae is not None else {})},
        "tools": p.tools,
    }
    if p.family.conditioning.pooled:  # SDXL: the UNet's extra inputs, and the pipeline's options
        manifest["conditioning"] = {"pooled_dim": g.pooled_dim, "time_ids": g.time_ids, **p.source.pipeline_options()}
    return writer.finish(manifest, [VOCAB, MERGES, SCHEDULER_CONFIG])


def convert(source: Source, out: Path, opts: ConvertOptions = ConvertOptions(), progress: Progress | None = None) -> Path:
    """Convert ``source`` into the bundle directory ``out``; returns its path."""
    progress = progress or Progress()
    p = plan(source, out, opts)
    if p.compression is not None:
        chosen = [spec.cli_name for spec in p.components if p.compression_of(spec)]
        kept = "" if p.compress_vae else "; the VAE stays float16 (--compress-vae compresses it)"
        progress.log(f"compressing {', '.join(chosen) or 'nothing requested'} as {p.compression.name}{kept};"
                     f" minimum deployment target {describe_target(p.target)}")
    if len(p.geometries) > 1:
        sizes = ", ".join(f"{g.width}x{g.height}" for g in p.geometries)
        progress.log(f"sizes {sizes}: one function per size in the UNet's and VAE's packages (weights stored once,"
                     f" {p.geometries[0].width}x{p.geometries[0].height} the default); minimum deployment target"
                     f" {describe_target(p.target)}")
    if p.family.time_ids and p.geometry.unet_batch == 1 and any(c.name == p.family.unet for c in p.components):
        # StableDiffusionXLPipeline.swift feeds a timestep of batch 2 (Unet.swift line 165).
        progress.log("note: Apple's Swift SDXL pipeline calls the UNet with batch 2 only; this batch-1 UNet runs in coreml-sd")
    with BundleWriter(p.out, p.overwrite, {spec.name for spec in p.components}) as writer:
        for spec in p.components:
            convert_component(p, spec, writer, progress)
        path = write_manifest(p, writer)
    progress.log(f"bundle written to {path} in {time.perf_counter() - progress.start:.1f}s")
    return path
