"""Backends that execute a bundle's Core ML models, behind one interface.

    model = load_model("bundle/Unet.mlpackage", backend="mil")
    model.inputs["sample"]            # TensorDescription(name, shape, dtype), read from the package
    outputs = model.predict({"sample": x, "timestep": t, "encoder_hidden_states": c})
    load_model("bundle/Unet.mlpackage", function="size_512x768")   # one function of a multifunction package

``coreml`` (macOS only) runs the model with Core ML on the chosen compute units; ``mil`` (any OS)
executes the package's ML program op by op (see ``mil.py``). ``predict`` takes a mapping of input
name to numpy array and returns one of output name to array:

- inputs are checked against the descriptions (names, shapes, real numeric data: integer data only
  for integer inputs) and cast to the declared dtype, as Core ML does; anything else is a
  one-line ``BackendError`` naming the input and what the model takes;
- float outputs come back as float32 from both backends, whatever the program declares (a
  float16 output keeps its float16-rounded values); integer outputs as int32.

A multifunction package (one function per image size, sharing weights; spec version 9) is one
model per function: ``function`` names it, None takes the package's default function (the
bundle's first size), so a caller unaware of functions gets what Apple's Swift package gets. A
single-function package has only its ``main``.

coremltools is imported through ``coreml_sd.system.import_coremltools()``, never directly: off
macOS its import logs lines about the missing Core ML binding, which are noise there.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ...system import INSTALL_CONVERT_EXTRA, import_coremltools

BACKENDS = ("auto", "coreml", "mil")
COMPUTE_UNITS = ("CPU_AND_NE", "CPU_AND_GPU", "ALL", "CPU_ONLY")
_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "int32": np.int32}
# numpy kinds an input may hold per declared dtype: floats take real numbers (token ids come as
# ints), integers take integers only (a float would be truncated silently). Never bool, complex,
# strings or objects.
_KINDS = {"float16": "fiu", "float32": "fiu", "float64": "fiu", "int32": "iu"}

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

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; float outputs as float32 arrays (see the module docstring)."""
        ...


def functions(spec) -> tuple[str, ...]:
    """The functions a multifunction model spec describes, default first; () for a
    single-function one (whose I/O is ``spec.description.input``/``output``)."""
    names = [f.name for f in spec.description.functions]
    default = spec.description.defaultFunctionName
    return tuple(sorted(names, key=lambda n: n != default))


def function_name(spec, function: str | None = None) -> str | None:
    """The function ``function`` selects in ``spec``: itself, or (None) the default function of a
    multifunction spec; None for a single-function spec. An unknown name is a one-line
    ``BackendError`` listing what the model has."""
    names = functions(spec)
    if not names:
        if function not in (None, "main"):
            raise BackendError(f"no function {function!r}: it is a single-function model (one image size), "
                               "load it without one")
        return None
    chosen = function or spec.description.defaultFunctionName or names[0]
    if chosen not in names:
        raise BackendError(f"no function {chosen!r}; it has {', '.join(names)}")
    return chosen


def describe(spec, function: str | None = None) -> tuple[dict[str, TensorDescription], dict[str, TensorDescription]]:
    """Input and output descriptions from a Core ML model spec (protobuf): of ``function`` in a
    multifunction spec (None: its default function), whose top-level description is empty."""
    import_coremltools()
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
            if arr.dataType not in names:
                raise BackendError(f"feature {f.name!r} has an array type coreml-sd does not run ({arr.dataType})")
            out[f.name] = TensorDescription(f.name, tuple(int(d) for d in arr.shape), names[arr.dataType])
        return out

    chosen = function_name(spec, function)
    where = spec.description if chosen is None else next(f for f in spec.description.functions if f.name == chosen)
    return table(where.input), table(where.output)


def compiled_metadata(path: Path) -> dict[str, Any]:
    """The object in a compiled ``.mlmodelc``'s ``metadata.json`` (the Core ML compiler writes a
    one-element list of it). Raises ``OSError``/``ValueError``/``IndexError`` when unreadable."""
    import json

    meta = json.loads((Path(path) / "metadata.json").read_text())
    meta = meta[0] if isinstance(meta, list) else meta
    if not isinstance(meta, dict):
        raise ValueError(f"expected an object, got {type(meta).__name__}")
    return meta


def compiled_schema(
    path: Path, function: str | None = None
) -> tuple[dict[str, TensorDescription], dict[str, TensorDescription]]:
    """Descriptions of a compiled ``.mlmodelc`` from its ``metadata.json`` (written by the Core ML
    compiler: ``inputSchema``/``outputSchema`` entries with name, dataType and a shape string
    such as "[2, 4, 64, 64]").

    ``function`` (a multifunction model's): how its ``metadata.json`` lays out each function's
    schema is not known here (no Core ML compiler off macOS to write one), so they come from the
    ``.mlpackage`` it was compiled from, beside it under the same name, when present; else a
    one-line ``BackendError``. Callers holding a bundle manifest pass its per-function entry
    instead (``load_model(schema=...)``)."""
    import json

    path = Path(path)
    if function is not None:
        package = path.with_suffix(".mlpackage")
        if package.is_dir():
            return describe_model(package, function)
        raise BackendError(f"{path.name}: the inputs of its function {function!r} are unknown without "
                           f"{package.name} beside it; keep the bundle's .mlpackage files with the compiled models")
    try:
        meta = compiled_metadata(path)
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
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise BackendError(f"{path}: unreadable metadata.json ({exc}); recompile the model") from None


def describe_model(
    path: Path, function: str | None = None
) -> tuple[dict[str, TensorDescription], dict[str, TensorDescription]]:
    """Input/output descriptions of a ``.mlpackage`` or ``.mlmodelc`` without loading it: of
    ``function`` in a multifunction model (None: its default function)."""
    path = Path(path)
    if path.suffix == ".mlmodelc":
        return compiled_schema(path, function)
    spec = load_spec(path)
    try:
        return describe(spec, function)
    except BackendError as exc:
        raise BackendError(f"{path.name}: {exc}") from None


def schema_from_manifest(
    entry: Mapping[str, Any],
) -> tuple[dict[str, TensorDescription], dict[str, TensorDescription]]:
    """Descriptions as a bundle manifest records a model's (or one function's) I/O:
    ``{"inputs": {name: {"shape": [...], "dtype": "float32"}}, "outputs": {...}}``. Raises
    ``KeyError``/``TypeError``/``ValueError`` when malformed."""

    def table(features: Mapping[str, Any]) -> dict[str, TensorDescription]:
        out = {}
        for name, feature in features.items():
            if feature["dtype"] not in _DTYPES:
                raise ValueError(f"dtype {feature['dtype']!r}")
            out[name] = TensorDescription(name, tuple(int(d) for d in feature["shape"]), feature["dtype"])
        return out

    return table(entry["inputs"]), table(entry["outputs"])


def load_spec(path: Path):
    """The model spec (protobuf) of a ``.mlpackage``; ``BackendError`` when it cannot be read."""
    ct = import_coremltools()
    try:
        return ct.utils.load_spec(str(path))
    except Exception as exc:  # protobuf and coremltools raise assorted exception types here
        raise BackendError(f"{path}: not a readable Core ML package ({exc}); re-convert it (or download it again)") from None


def check_inputs(
    path: Path,
    wanted: dict[str, TensorDescription],
    given: Mapping[str, np.ndarray],
    float16_as: type = np.float16,
) -> dict[str, np.ndarray]:
    """Inputs validated against the model's descriptions and cast to their declared dtypes.

    ``float16_as``: what float16-declared inputs become; the mil backend's float32 override takes
    them unrounded (``np.float32``). Values beyond float16 range become inf, as on device."""
    if not isinstance(given, Mapping):
        raise BackendError(f"{path.name}: inputs must be a mapping of input name to array, not {type(given).__name__}")
    if wanted.keys() != given.keys():  # names shown as text: a caller's keys need not be strings
        raise BackendError(f"{path.name}: inputs {sorted(map(str, given))} do not match the model's {sorted(wanted)}")
    out = {}
    for name, desc in wanted.items():
        value = _numeric(path, desc, given[name])
        target = float16_as if desc.dtype == "float16" else _DTYPES[desc.dtype]
        with np.errstate(over="ignore"):  # float16 overflow to inf is the device's behaviour
            out[name] = value.astype(target, copy=False)
    return out


def _numeric(path: Path, desc: TensorDescription, value) -> np.ndarray:
    """``value`` as an array of the kind and shape ``desc`` takes, or a one-line ``BackendError``."""
    takes = f"the model takes {desc.dtype} of shape {desc.shape}"
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged nested sequences, unconvertible objects
        raise BackendError(f"{path.name}: input {desc.name!r} is not an array ({exc}); {takes}") from None
    if array.dtype.kind not in _KINDS[desc.dtype]:
        raise BackendError(f"{path.name}: input {desc.name!r} holds {array.dtype} data; {takes}")
    if array.shape != desc.shape:
        raise BackendError(f"{path.name}: input {desc.name!r} has shape {array.shape}, {takes}")
    if desc.dtype == "int32" and array.size and not np.can_cast(array.dtype, np.int32):
        info = np.iinfo(np.int32)  # int64 / uint32 data: each value must fit
        if array.min() < info.min or array.max() > info.max:
            raise BackendError(f"{path.name}: input {desc.name!r} holds values beyond int32; {takes}")
    return array


def output_array(desc: TensorDescription, value) -> np.ndarray:
    """An output as ``predict`` returns it: float32 for a float output (float16 values convert
    exactly, so a float16 output keeps its rounding), int32 for an integer one."""
    return np.asarray(value, dtype=np.float32 if desc.dtype.startswith("float") else np.int32)


def default_backend() -> str:
    return "coreml" if sys.platform == "darwin" else "mil"


def require(backend: str) -> None:
    """Raise ``BackendError`` (what to do instead) when ``backend`` cannot run on this system."""
    if backend == "coreml" and sys.platform != "darwin":
        raise BackendError("the coreml backend needs macOS (Core ML); use --backend mil on this system")
    if backend == "mil":
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise BackendError(f"the mil backend needs torch: {INSTALL_CONVERT_EXTRA}")


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

    def find_nonfinite(self, inputs: dict[str, np.ndarray]) -> tuple[str, str] | None:
        """The first op, chunk by chunk, whose output holds inf/NaN although its inputs were
        finite (see ``MILModel.find_nonfinite``); None when no chunk names one or a chunk's
        backend cannot tell."""
        values = dict(inputs)
        for chunk in self.chunks:
            feed = {n: values[n] for n in chunk.inputs}
            find = getattr(chunk, "find_nonfinite", None)
            if find is None:
                return None
            found = find(feed)
            if found is not None:
                return found
            values.update(chunk.predict(feed))
        return None


def load_model(
    path: str | Path,
    backend: str = "auto",
    compute_units: str = "CPU_AND_NE",
    precision: str | None = None,
    function: str | None = None,
    schema: tuple[dict[str, TensorDescription], dict[str, TensorDescription]] | None = None,
) -> Model:
    """Load a ``.mlpackage`` (either backend) or a compiled ``.mlmodelc`` (``coreml`` only).

    ``function``: which function of a multifunction package to run (None: its default); only
    that one is loaded. ``schema`` (coreml only): the model's (inputs, outputs) as the bundle's
    manifest records them, for a compiled multifunction model (see ``compiled_schema``).
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

        return MILModel(path, precision=precision, function=function)
    if precision is not None:
        raise BackendError("a precision override exists for the mil backend only")
    from .coreml import CoreMLModel

    return CoreMLModel(path, compute_units=compute_units, function=function, schema=schema)
