"""Backends that execute a bundle's Core ML models, behind one interface.

    model = load_model("bundle/Unet.mlpackage", backend="mil")
    model.inputs["sample"]            # TensorDescription(name, shape, dtype), read from the package
    outputs = model.predict({"sample": x, "timestep": t, "encoder_hidden_states": c})

``coreml`` (macOS only) runs the model with Core ML on the chosen compute units; ``mil`` (any OS)
executes the package's ML program op by op (see ``mil.py``). ``predict`` takes and returns numpy
arrays; inputs are checked against the descriptions (names, shapes) and cast to the declared
dtype, as Core ML does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

BACKENDS = ("auto", "coreml", "mil")
COMPUTE_UNITS = ("CPU_AND_NE", "CPU_AND_GPU", "ALL", "CPU_ONLY")
_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "int32": np.int32}


class BackendError(Exception):
    """A model that cannot be loaded or called as asked (one-line message)."""


@dataclass(frozen=True)
class TensorDescription:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float16" | "float32" | "int32"


class Model(Protocol):
    path: Path
    inputs: dict[str, TensorDescription]
    outputs: dict[str, TensorDescription]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def describe(spec) -> tuple[dict[str, TensorDescription], dict[str, TensorDescription]]:
    """Input and output descriptions from a Core ML model spec (protobuf)."""
    from coremltools.proto import FeatureTypes_pb2 as ft

    names = {
        ft.ArrayFeatureType.FLOAT16: "float16",
        ft.ArrayFeatureType.FLOAT32: "float32",
        ft.ArrayFeatureType.DOUBLE: "float64",
        ft.ArrayFeatureType.INT32: "int32",
    }

    def table(features) -> dict[str, TensorDescription]:
        out = {}
        for f in features:
            if f.type.WhichOneof("Type") != "multiArrayType":
                raise BackendError(f"feature {f.name!r} is not a tensor; coreml-sd runs tensor models only")
            arr = f.type.multiArrayType
            out[f.name] = TensorDescription(f.name, tuple(int(d) for d in arr.shape), names[arr.dataType])
        return out

    return table(spec.description.input), table(spec.description.output)


def compiled_schema(path: Path) -> tuple[dict[str, TensorDescription], dict[str, TensorDescription]]:
    """Descriptions of a compiled ``.mlmodelc`` from its ``metadata.json`` (written by the Core ML
    compiler: ``inputSchema``/``outputSchema`` entries with name, dataType and a shape string
    such as "[2, 4, 64, 64]")."""
    import json

    try:
        meta = json.loads((path / "metadata.json").read_text())
        meta = meta[0] if isinstance(meta, list) else meta
        types = {"Float16": "float16", "Float32": "float32", "Double": "float64", "Int32": "int32"}

        def table(schema) -> dict[str, TensorDescription]:
            out = {}
            for entry in schema:
                shape = entry.get("shape", [])
                shape = json.loads(shape) if isinstance(shape, str) else shape
                dtype = types.get(entry.get("dataType", "Float32"), "float32")
                out[entry["name"]] = TensorDescription(entry["name"], tuple(int(d) for d in shape), dtype)
            return out

        return table(meta.get("inputSchema", [])), table(meta.get("outputSchema", []))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"{path}: unreadable metadata.json ({exc}); recompile the model") from None


def describe_model(path: Path) -> tuple[dict[str, TensorDescription], dict[str, TensorDescription]]:
    """Input/output descriptions of a ``.mlpackage`` or ``.mlmodelc`` without loading it."""
    path = Path(path)
    if path.suffix == ".mlmodelc":
        return compiled_schema(path)
    import coremltools as ct

    try:
        return describe(ct.utils.load_spec(str(path)))
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"{path}: not a readable Core ML package ({exc})") from None


def check_inputs(path: Path, wanted: dict[str, TensorDescription], given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs validated against the model's descriptions and cast to their declared dtypes."""
    missing, extra = sorted(wanted.keys() - given.keys()), sorted(given.keys() - wanted.keys())
    if missing or extra:
        raise BackendError(f"{path.name}: inputs {sorted(given)} do not match the model's {sorted(wanted)}")
    out = {}
    for name, desc in wanted.items():
        value = np.asarray(given[name])
        if value.shape != desc.shape:
            raise BackendError(f"{path.name}: input {name!r} has shape {value.shape}, the model takes {desc.shape}")
        out[name] = value.astype(_DTYPES[desc.dtype], copy=False)
    return out


def default_backend() -> str:
    return "coreml" if sys.platform == "darwin" else "mil"


def require(backend: str) -> None:
    """Raise ``BackendError`` (what to do instead) when ``backend`` cannot run on this system."""
    if backend == "coreml" and sys.platform != "darwin":
        raise BackendError("the coreml backend needs macOS (Core ML); use --backend mil on this system")
    if backend == "mil":
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise BackendError("the mil backend needs torch: pip install 'coreml-sd[convert]'")


class ChainedModel:
    """A model split in chunks (Apple's ``UnetChunk1``/``UnetChunk2``): each chunk reads the
    original inputs and the previous chunks' outputs by name, as the Swift package chains them."""

    def __init__(self, chunks: list[Model]):
        self.chunks = chunks
        self.path = chunks[0].path
        produced: set[str] = set()
        self.inputs = {}
        for chunk in chunks:
            self.inputs.update({n: d for n, d in chunk.inputs.items() if n not in produced and n not in self.inputs})
            produced |= set(chunk.outputs)
        self.outputs = chunks[-1].outputs

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(inputs)
        for chunk in self.chunks:
            values.update(chunk.predict({n: values[n] for n in chunk.inputs}))
        return {n: values[n] for n in self.outputs}


def load_model(
    path: str | Path,
    backend: str = "auto",
    compute_units: str = "CPU_AND_NE",
    precision: str | None = None,
) -> Model:
    """Load a ``.mlpackage`` (either backend) or a compiled ``.mlmodelc`` (``coreml`` only).

    ``precision="float32"`` (mil only) keeps activations in float32 where the program declares
    float16: for debugging a float16 overflow, never what a device does.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = default_backend()
    if not path.exists():
        raise BackendError(f"{path}: no such model")
    if backend == "mil":
        require("mil")
        from .mil import MILModel

        return MILModel(path, precision=precision)
    if precision is not None:
        raise BackendError("a precision override exists for the mil backend only")
    from .coreml import CoreMLModel

    return CoreMLModel(path, compute_units=compute_units)
