"""torch module -> Core ML ML program -> (on macOS) compiled ``.mlmodelc``.

The one place that calls ``torch.jit.trace`` and ``coremltools.convert``. Programs are float16
compute, macOS 13 / iOS 16 minimum (what Apple's Swift package and its apps target), with float32
inputs and outputs by choice (see ``coreml_sd.families``): the Swift package feeds and reads
Float32 (float16 outputs crash its ``MLShapedArray<Float32>`` conversion on macOS 13), and a
float32 timestep keeps the UNet's accuracy at high timesteps, where Apple's converter declares
the UNet's and VAE's inputs float16. With float32 inputs, coremltools' float16 pass puts a cast
to float16 right after each input, so the program's compute and weights are float16 all the same.

Weights come last (``coreml-sd convert``). Converted as a whole (``to_coreml``), a model is in
memory as its float32 weights plus their float16 copies (SDXL's UNet: 10 + 5 GB), after a trace
that touched every page of them. The converter instead traces and converts the module with
stand-in weights that cost no memory (``stand_in_weights``: a value of each parameter's own,
broadcast to its shape), finds each stand-in among the program's constants by its value and
empties them (``take_slots``), and only then loads the real weights, in the program's precision,
and puts them in their place (``place_weights``). coremltools' passes that compute a new weight
from one (a convolution absorbing the scale after it: q and k's dh**-0.25) would turn stand-ins
into values no longer found: they are left out of the first conversion and run on the real
weights (``finish``), in the program's precision. In float16 that rounds the scale first (2**-12
relative) and the product once more than the float32 product rounded once: within float16's own
error of the weights (``tests/convert/test_memory_path.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import platform
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..families import TensorSpec
from ..system import import_coremltools

_DTYPES = {"float16": np.float16, "float32": np.float32}
_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def return_freed_memory() -> None:
    """Have this process give freed blocks of 128 KiB and more back to the system at once (glibc;
    a process-wide setting).

    glibc maps such blocks itself at first, but raises that threshold to the size of each one
    freed (up to 32 MiB): tensors then come from its heap, where the small allocations between
    them keep freed pages from being returned. Tracing SDXL's UNet at 1024x1024 grew the process
    by 9.5 GiB of freed activations that way; with the threshold fixed, by 1 GiB. macOS's
    allocator returns large blocks by itself.
    """
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        M_MMAP_THRESHOLD = -3  # glibc's malloc.h
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024)


class CompileError(Exception):
    pass


def trace(module: torch.nn.Module, inputs: list[TensorSpec]) -> torch.jit.ScriptModule:
    """Trace with zero example inputs of the declared shapes (values do not change the graph:
    the modules have no data-dependent control flow)."""
    examples = tuple(torch.zeros(spec.shape) for spec in inputs)
    with torch.no_grad(), warnings.catch_warnings():
        # Python branches on tensor shapes (attention chunking) are meant to be frozen: every
        # conversion is for fixed shapes.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # Deprecated in torch 2.13 in favour of torch.export; coremltools 9 converts both, and
        # the TorchScript path is the one Apple's and our tooling have exercised at scale.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=DeprecationWarning)
        return torch.jit.trace(module.eval(), examples, check_trace=False)


_WEIGHTED = ("conv", "conv_transpose", "linear", "matmul", "einsum")


def float32_features_of(input_names: tuple[str, ...]):
    """An fp16 op selector keeping in float32 the ops computed from ``input_names`` alone (and
    constants), up to the first weighted op.

    For the UNet's ``timestep``: the sinusoidal features sin(t * f_i) are phases of up to ~1000
    radians. In float16, t * f_i (and f_i itself) carry a relative error of 2**-11, i.e. up to
    half a radian at t = 999: the high-frequency features become noise and the UNet's output
    loses some 20 dB of PSNR at large timesteps. These few element-wise ops stay float32; their
    results (in [-1, 1]) are rounded to float16 only where the time embedding's first 1x1
    convolution reads them.
    """
    memo: dict[int, bool] = {}

    def derived(var) -> bool:
        if var.op is None:
            return var.name in input_names
        return var.op.op_type == "const" or in_cone(var.op)

    def in_cone(op) -> bool:
        if id(op) not in memo:
            memo[id(op)] = False  # provisional, guards recursion
            variables = [v for value in op.inputs.values() for v in (value if isinstance(value, (tuple, list)) else (value,))]
            fed = [v for v in variables if not (v.op is not None and v.op.op_type == "const")]
            memo[id(op)] = op.op_type not in _WEIGHTED and bool(fed) and all(derived(v) for v in fed)
        return memo[id(op)]

    return lambda op: not in_cone(op)  # True: compute in float16


@contextlib.contextmanager
def _validated_once_per_pipeline() -> Iterator[None]:
    """While it lasts, coremltools' pass pipelines check the program once, after their last pass,
    instead of before the first and after each of their hundred or so passes.

    Those checks walk every operation of the program (each var's consumers against each op's
    inputs): a third of a tiny test model's conversion, a sixth of SD 1.5's UNet's graph conversion
    (``benchmarks/pass_checks.py``), while what they guard against is a pass of coremltools' own leaving a broken graph, which
    tells where a bug is but changes no result. The program is still checked: after each pipeline
    here, by the torch frontend when it finishes, and (scope information included) when the ML
    program is serialized. Departs from coremltools' ``PassPipelineManager.apply_pipeline`` by
    wrapping it, not replacing it: the passes, their options and their order are its own."""
    import_coremltools()
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipelineManager
    from coremltools.converters.mil.mil.program import Program

    apply, validate = PassPipelineManager.__dict__["apply_pipeline"], Program.validate

    def apply_once(prog, pass_pipeline):
        Program.validate = lambda self, check_essential_scope=False: None
        try:
            apply.__func__(prog, pass_pipeline)
        finally:
            Program.validate = validate
        prog.validate()

    PassPipelineManager.apply_pipeline = staticmethod(apply_once)
    try:
        yield
    finally:
        PassPipelineManager.apply_pipeline = apply


def _convert(traced, inputs, outputs, float32_features, precision, target="macOS13", **options):
    ct = import_coremltools()  # without its Linux import noise

    if precision not in ("float16", "float32"):
        raise ValueError(f"precision {precision!r}: use float16 or float32")
    compute = ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32
    if float32_features and precision == "float16":
        compute = ct.transform.FP16ComputePrecision(op_selector=float32_features_of(float32_features))
    with _validated_once_per_pipeline():
        return ct.convert(
            traced,
            inputs=[ct.TensorType(name=s.name, shape=s.shape, dtype=_DTYPES[s.dtype]) for s in inputs],
            outputs=[ct.TensorType(name=s.name, dtype=_DTYPES[s.dtype]) for s in outputs],
            compute_precision=compute,
            minimum_deployment_target=getattr(ct.target, target),
            **options,
        )


def to_coreml(
    traced: torch.jit.ScriptModule,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    metadata: dict[str, str],
    description: str,
    float32_features: tuple[str, ...] = (),
    precision: str = "float16",
):
    """Convert a traced module, weights and all, to an ML program; returns a
    ``coremltools.models.MLModel``.

    ``precision``: "float16" (what the Neural Engine runs) or "float32" (CPU/GPU only).
    ``float32_features``: inputs whose element-wise features stay float32 in a float16 program
    (see ``float32_features_of``)."""
    # skip_model_load: loading needs macOS; compilation (below) checks the model there.
    model = _convert(traced, inputs, outputs, float32_features, precision, convert_to="mlprogram", skip_model_load=True)
    return _describe(model, inputs, outputs, metadata, description)


# -- weights last ------------------------------------------------------------------------------

# The passes of coremltools' default pipeline that compute a weight from one (a convolution or
# linear layer absorbing the scale, bias or batch norm after it).
WEIGHT_PASSES = (
    "common::fuse_matmul_weight_bias",
    "common::fuse_linear_bias",
    "common::fuse_conv_scale",
    "common::fuse_conv_bias",
    "common::fuse_conv_batchnorm",
)

# Stand-in values: float16 numbers from 2**-12 up to just below 1, one per parameter. Exact in
# float16 and float32, so the program's float16 cast keeps them; distinct, so coremltools merges
# none as duplicates; never 0 or 1, which it would remove as identities (x + 0, x * 1).
_STAND_INS = np.arange(0x0C00, 0x3C00, dtype=np.uint16).view(np.float16)


@dataclass(frozen=True)
class StandIns:
    """The stand-in value and the shape of each parameter of a module, by name."""

    values: dict[str, float]
    shapes: dict[str, torch.Size]


def stand_in_weights(module: torch.nn.Module) -> StandIns:
    """Give every parameter of ``module`` (built on the meta device) a stand-in that costs no
    memory: a value of its own, broadcast to the parameter's shape."""
    shapes = {name: p.shape for name, p in module.named_parameters()}
    if len(shapes) > len(_STAND_INS):
        raise ValueError(f"{len(shapes)} parameters: stand-in values exist for {len(_STAND_INS)}")
    values = dict(zip(shapes, _STAND_INS.astype(float).tolist()))
    module.load_state_dict({n: torch.tensor(v).expand(shapes[n]) for n, v in values.items()}, strict=True, assign=True)
    return StandIns(values, shapes)


def to_program(
    traced: torch.jit.ScriptModule,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    float32_features: tuple[str, ...] = (),
    precision: str = "float16",
    target: str = "macOS13",
):
    """Convert a module traced with stand-in weights to an ML program (coremltools' ``Program``),
    as ``to_coreml`` would but for ``WEIGHT_PASSES``, which ``finish`` applies. ``target``: the
    minimum deployment target, as a ``coremltools.target`` name (a macOS 15 compression preset
    needs the iOS 18 opset from the start)."""
    ct = import_coremltools()
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(WEIGHT_PASSES)
    return _convert(traced, inputs, outputs, float32_features, precision, target, convert_to="milinternal",
                    pass_pipeline=pipeline)


def _constants(program) -> Iterator:
    def walk(block):
        for op in list(block.operations):
            if op.op_type == "const":
                yield op
            for inner in op.blocks:
                yield from walk(inner)

    for function in program.functions.values():
        yield from walk(function)


def _replace_constants(replacements: list[tuple]) -> list:
    """Constants holding the given values in place of the constants given, which are removed;
    ``replacements``: (constant op, value) pairs. Returns the new constant ops, in order."""
    import_coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

    by_block: dict[int, tuple] = {}
    for i, (op, value) in enumerate(replacements):
        by_block.setdefault(id(op.enclosing_block), (op.enclosing_block, []))[1].append((i, op, value))
    new = [None] * len(replacements)
    # In a pass's scope, coremltools gives each new constant the old one's scopes (its origin in
    # the torch module), as a program must carry.
    with mb.scope(ScopeInfo(source=ScopeSource.COREMLTOOLS_GRAPH_PASS, data=["place_weights"])):
        for block, items in by_block.values():
            with block:  # once per block: entering and leaving one walks all of its ops
                for i, op, value in items:
                    var = mb.const(val=value, name=op.name, before_op=op)
                    block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=var)
                    new[i] = var.op
            block.remove_ops([op for _, op, _ in items])  # at once: each call validates the block
    return new


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


Slots = dict[str, list]  # the constants of a program to hold each parameter's weight, by name


def take_slots(program, stand_ins: StandIns) -> Slots:
    """The constants of ``program`` that hold a parameter's stand-in whole (in any shape with the
    same non-1 dimensions), by parameter name; their values become placeholders that cost no
    memory (the program's stand-ins take as much as the real weights will; coremltools' ops hold
    one another in cycles: ``gc.collect()`` frees them). Raises ``ValueError`` for a parameter
    found nowhere: a pass changed its stand-in."""
    names = {value: name for name, value in stand_ins.values.items()}
    found = []  # (parameter, constant, placeholder)
    for op in _constants(program):
        value = op.outputs[0].val
        if not (isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size):
            continue
        name = names.get(float(value.flat[0]))
        if name is None or value.size != stand_ins.shapes[name].numel() or not (value == value.flat[0]).all():
            continue
        if _squeezed(value.shape) != _squeezed(stand_ins.shapes[name]):
            raise ValueError(f"{name} {tuple(stand_ins.shapes[name])} became a {value.shape} constant: a pass reordered it")
        found.append((name, op, np.broadcast_to(np.zeros((), value.dtype), value.shape)))
    placed = {name for name, _, _ in found}
    if missing := [name for name in stand_ins.values if name not in placed]:
        raise ValueError(f"no constant of the program holds {missing[0]} ({len(missing)} weights) as it was: a pass changed it")
    slots: Slots = {}
    for (name, _, _), placeholder in zip(found, _replace_constants([(op, value) for _, op, value in found])):
        slots.setdefault(name, []).append(placeholder)
    return slots


def place_weights(slots: Slots, weights: Mapping[str, torch.Tensor]) -> Slots:
    """Put each parameter's weight (``weights``: a state dict of the module traced) into its slots,
    sharing the tensor's memory where its dtype is the program's; returns the constants now holding
    each parameter."""
    replacements, names = [], []
    for name, ops in slots.items():
        tensor = weights[name].detach()
        for op in ops:
            slot = op.outputs[0].val
            if tensor.numel() != slot.size:
                raise ValueError(f"{name}: {tuple(tensor.shape)} for a constant of {slot.shape}")
            replacements.append((op, tensor.to(_TORCH_DTYPES[slot.dtype]).contiguous().numpy().reshape(slot.shape)))
            names.append(name)
    placed: Slots = {}
    for name, op in zip(names, _replace_constants(replacements)):
        placed.setdefault(name, []).append(op)
    return placed


# Ops a weight pass folds into the weighted op before them, making a new constant.
_FOLDED = ("mul", "real_div", "add", "sub", "batch_norm")


def _role(op, var) -> str | None:
    """The name of the input of ``op`` that ``var`` is (``weight``, ``bias``, ...)."""
    return next((key for key, value in op.inputs.items() if value is var), None)


class WeightNames:
    """Which parameter each weight constant of a program holds, through the weight passes.

    Taken before ``finish`` from the constants ``place_weights`` returned. A constant the passes
    leave alone keeps its op; one they fold a scale or bias into is a new constant, feeding the
    same input (weight, bias) of a new weighted op, named after the last op folded (coremltools
    names a pass's result after the output it replaces): the names of the ops that may be folded
    are remembered here, with the input each parameter feeds."""

    def __init__(self, placed: Slots):
        self._ops = {id(op): name for name, ops in placed.items() for op in ops}
        self._outputs: dict[tuple[str, str | None], str] = {}
        for name, ops in placed.items():
            for op in ops:
                for child in op.outputs[0].child_ops:
                    role, var = _role(child, op.outputs[0]), child.outputs[0]
                    self._outputs[var.name, role] = name
                    while len(var.child_ops) == 1 and var.child_ops[0].op_type in _FOLDED:
                        var = var.child_ops[0].outputs[0]
                        self._outputs[var.name, role] = name

    def of(self, op) -> str | None:
        """The parameter the constant ``op`` holds, or None (a constant of the graph itself)."""
        if id(op) in self._ops:
            return self._ops[id(op)]
        var = op.outputs[0]
        owners = {self._outputs.get((child.outputs[0].name, _role(child, var))) for child in var.child_ops}
        return owners.pop() if len(owners) == 1 else None


def run_weight_passes(program) -> None:
    """``WEIGHT_PASSES`` on the placed weights, then the clean-up they need, in place."""
    import_coremltools()
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    for name in (*WEIGHT_PASSES, "common::const_elimination", "common::dead_code_elimination"):
        PASS_REGISTRY[name](program)


def finish(program, inputs: list[TensorSpec], outputs: list[TensorSpec], metadata: dict[str, str], description: str,
           compress: Callable[[Any], None] | None = None, target: str = "macOS13"):
    """The program of ``to_program``, its weights placed, as an ML program package
    (``coremltools.models.MLModel``, as ``to_coreml`` returns): ``WEIGHT_PASSES`` first, then
    ``compress`` (a function compressing the program's weights in place), for ``target``."""
    ct = import_coremltools()
    run_weight_passes(program)
    if compress is not None:
        compress(program)
    model = ct.convert(
        program,
        convert_to="mlprogram",
        pass_pipeline=ct.PassPipeline.EMPTY,
        compute_precision=ct.precision.FLOAT32,  # no casts to add: the program is in its precision
        minimum_deployment_target=getattr(ct.target, target),
        skip_model_load=True,
    )
    return _describe(model, inputs, outputs, metadata, description)


# -- several sizes in one package ------------------------------------------------------------
#
# One function per image size, sharing the weights (a multifunction ML program, macOS 15 / iOS 18).
# coremltools' ``save_multifunction`` merges packages already written: every size converted and
# saved whole, then all of them read back at once (SDXL's UNet at three sizes: 15 GB in memory,
# as much on disk). The converter instead holds each size's program with the same weight arrays
# placed in it (``place_weights`` shares them), compresses the first function's weights only and
# gives the others the same compressed constants (``share_compressed``), and writes one package
# whose constants of equal value are stored once (coremltools' own cross-function deduplication,
# as ``save_multifunction`` uses it).


def _key(value: np.ndarray) -> tuple:
    return value.dtype.str, value.shape, hashlib.blake2b(np.ascontiguousarray(value).data, digest_size=16).digest()


def _uses(var) -> list[tuple[Any, str]]:
    return [(child, _role(child, var)) for child in var.child_ops]


def share_compressed(first, others: list, compress: Callable[[Any], None]) -> None:
    """Compress ``first`` (a program) with ``compress`` and give each program of ``others`` (the
    same model at other sizes, holding the same weights) the same compressed constants in place of
    its own: compressing them again would cost as much each time, and k-means that is not
    deterministic (scikit-learn's, for grouped palettes) could store different palettes per size."""
    before: dict[tuple, list] = {}
    for op in _constants(first):
        value = op.outputs[0].val
        if isinstance(value, np.ndarray) and value.size > 1:
            before.setdefault(_key(value), []).extend(_uses(op.outputs[0]))
    compress(first)
    compressed = {}
    for key, uses in before.items():
        for child, role in uses:
            var = child.inputs.get(role) if role else None
            if var is not None and var.op is not None and var.op.op_type != "const":
                compressed[key] = var
                break
    if not compressed:
        return
    for program in others:
        for op in list(_constants(program)):
            value = op.outputs[0].val
            if isinstance(value, np.ndarray) and value.size > 1 and (source := compressed.get(_key(value))) is not None:
                _replace_with_copy(op, source)


def _replace_with_copy(const_op, source) -> None:
    """Replace ``const_op`` by a copy of the ops computing ``source`` (a decompressing ``constexpr_*``
    op of another program, and the constants it reads: the same arrays, not copies of them)."""
    import_coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

    def copy(var):
        op = var.op
        if op.op_type == "const":
            return mb.const(val=var.val, name=op.name, before_op=const_op)
        inputs = {k: (tuple(copy(v) for v in value) if isinstance(value, (tuple, list)) else copy(value))
                  for k, value in op.inputs.items()}
        outputs = getattr(mb, op.op_type)(**inputs, name=op.name, before_op=const_op)
        return outputs[op.outputs.index(var)] if isinstance(outputs, (tuple, list)) else outputs

    block = const_op.enclosing_block
    with mb.scope(ScopeInfo(source=ScopeSource.COREMLTOOLS_GRAPH_PASS, data=["share_compressed"])), block:
        new = copy(source)
        block.replace_uses_of_var_after_op(anchor_op=const_op, old_var=const_op.outputs[0], new_var=new)
        block.remove_ops([const_op])


def finish_functions(functions: list[tuple[str, Any, list[TensorSpec], list[TensorSpec]]], metadata: dict[str, str],
                     description: str, compress: Callable[[Any], None] | None = None, target: str = "macOS15"):
    """Programs of ``to_program`` for one model at several sizes, their weights placed, as one
    multifunction ML program package (``coremltools.models.MLModel``): ``functions`` lists (name,
    program, inputs, outputs), the first being the package's default function. ``WEIGHT_PASSES``
    run on each program, ``compress`` on the first one only (``share_compressed``)."""
    ct = import_coremltools()
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil import Program
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    programs = [program for _, program, _, _ in functions]
    for program in programs:
        run_weight_passes(program)
    if compress is not None:
        share_compressed(programs[0], programs[1:], compress)
    merged = Program()
    for name, program, _, _ in functions:
        merged.add_function(name, program.functions["main"])
    merged.default_function_name = functions[0][0]
    # Equal constants of different functions get one weight id: stored once in weight.bin.
    PASS_REGISTRY["common::const_deduplication"]._deduplicate_const_across_functions(merged)
    merged.skip_all_passes = True
    merged.export_as_multifunction = True
    version = max(_SPEC_VERSIONS[target], _SPEC_VERSIONS["macOS15"])
    model = mil_convert(merged, convert_to="mlprogram", convert_from="milinternal", specification_version=version,
                        compute_units=ct.ComputeUnit.CPU_ONLY, skip_model_load=True, pass_pipeline=ct.PassPipeline.EMPTY)
    spec = model.get_spec()
    for function, (_, _, inputs, outputs) in zip(spec.description.functions, functions):
        _describe_features(function.input, inputs)
        _describe_features(function.output, outputs)
    described = ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True)
    # What ct.convert records of every model it writes (coremltools' version, the source, the date),
    # as the one-size packages carry it.
    from coremltools.converters._converters_entry import _record_build_metadata

    return _describe(_record_build_metadata(described, "milinternal"), [], [], metadata, description)


# The Core ML specification version of each deployment target's opset.
_SPEC_VERSIONS = {"macOS13": 7, "macOS14": 8, "macOS15": 9}


def _describe_features(features, specs: list[TensorSpec]) -> None:
    by_name = {s.name: s for s in specs}
    for feature in features:
        if feature.name in by_name and by_name[feature.name].description:
            feature.shortDescription = by_name[feature.name].description


def _describe(model, inputs: list[TensorSpec], outputs: list[TensorSpec], metadata: dict[str, str], description: str):
    model.short_description = description
    model.author = "coreml-sd"
    for spec in inputs:
        if spec.description:
            model.input_description[spec.name] = spec.description
    for spec in outputs:
        if spec.description:
            model.output_description[spec.name] = spec.description
    model.user_defined_metadata.update(metadata)
    return model


def can_compile() -> bool:
    """Compiling to .mlmodelc needs the Core ML framework: macOS only."""
    return sys.platform == "darwin"


def compile_package(package: Path, destination: Path) -> Path:
    """Compile ``X.mlpackage`` to ``destination`` (``X.mlmodelc``) with coremltools' binding of
    the Core ML compiler (no Xcode needed). Any failure is a ``CompileError``."""
    ct = import_coremltools()  # without its Linux import noise

    if destination.exists():
        shutil.rmtree(destination)
    try:
        compiled = Path(ct.utils.compile_model(str(package), str(destination)))
    except Exception as exc:  # coremltools raises bare Exceptions here
        raise CompileError(f"compiling {package.name} failed: {exc}") from exc
    if not (compiled / "coremldata.bin").exists():
        raise CompileError(f"compiling {package.name} produced no coremldata.bin in {compiled}")
    return compiled
