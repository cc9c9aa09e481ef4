"""torch module -> Core ML ML program -> (on macOS) compiled ``.mlmodelc``.

The one place that calls ``torch.jit.trace`` and ``coremltools.convert``. Programs are float16
compute, macOS 13 / iOS 16 minimum (what Apple's Swift package and its apps target), with float32
inputs and outputs by choice (see ``coreml_sd.families``): the Swift package feeds and reads
Float32 (float16 outputs crash its ``MLShapedArray<Float32>`` conversion on macOS 13), and a
float32 timestep keeps the UNet's accuracy at high timesteps, where Apple's converter declares
the UNet's and VAE's inputs float16. With float32 inputs, coremltools' float16 pass puts a cast
to float16 right after each input, so the program's compute and weights are float16 all the same.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ..families import TensorSpec
from ..system import import_coremltools

_DTYPES = {"float16": np.float16, "float32": np.float32}


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


def to_coreml(
    traced: torch.jit.ScriptModule,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    metadata: dict[str, str],
    description: str,
    float32_features: tuple[str, ...] = (),
    precision: str = "float16",
):
    """Convert a traced module to an ML program; returns a ``coremltools.models.MLModel``.

    ``precision``: "float16" (what the Neural Engine runs) or "float32" (CPU/GPU only).
    ``float32_features``: inputs whose element-wise features stay float32 in a float16 program
    (see ``float32_features_of``)."""
    ct = import_coremltools()  # without its Linux import noise

    if precision not in ("float16", "float32"):
        raise ValueError(f"precision {precision!r}: use float16 or float32")
    compute = ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32
    if float32_features and precision == "float16":
        compute = ct.transform.FP16ComputePrecision(op_selector=float32_features_of(float32_features))
    model = ct.convert(
        traced,
        convert_to="mlprogram",
        inputs=[ct.TensorType(name=s.name, shape=s.shape, dtype=_DTYPES[s.dtype]) for s in inputs],
        outputs=[ct.TensorType(name=s.name, dtype=_DTYPES[s.dtype]) for s in outputs],
        compute_precision=compute,
        minimum_deployment_target=ct.target.macOS13,
        skip_model_load=True,  # loading needs macOS; compilation (below) checks the model there
    )
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
