"""The ``mil`` backend: executes the ML program inside a ``.mlpackage`` on any OS.

Core ML itself runs only on Apple platforms; this backend reads the package's program back into
coremltools' MIL representation and executes its operations in order with torch kernels
(``mil_ops.py``), so the artifact ``convert`` wrote can be checked anywhere (CI included).

Precision is kept as on device: a tensor the program declares float16 is stored as float16
between operations; each op computes in float32 and its result is rounded back to the declared
type, so a float16 overflow becomes inf (and then NaN) here as it would on a Mac.
``precision="float32"`` keeps those tensors in float32 instead (debugging only): float16-declared
inputs are taken unrounded, no op result (casts to float16 included) is rounded to float16; only
the weights keep the float16 values the package stores.

Everything that can fail does so at load time: the program is planned once (constants turned
into tensors, compressed weights decompressed, every op matched to a kernel, each variable's
last use recorded so activations are freed as soon as possible), and an op without a kernel
raises ``BackendError`` naming the op and the package, as does a damaged package.

A multifunction package (one function per image size) runs one function: ``function``, or its
default. Only that function is read: coremltools' loader builds every function of the program,
each with its own copy of the weights they share, so the others are dropped from the spec first.

Attention is executed fused (``mil_fuse``) by ``predict``; ``find_nonfinite`` runs the same
program op by op so that it can name the op where a float16 overflow starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...system import import_coremltools
from . import BackendError, check_inputs, describe, function_name, load_spec, mil_fuse, output_array
from .mil_ops import KERNELS

# uint16 (iOS 17 argmax/argmin indices) is held as int32: torch's uint16 lacks most kernels, and
# every uint16 value is an exact int32.
_STORAGE = {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float32, "int32": torch.int32,
            "int64": torch.int64, "bool": torch.bool, "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
            "uint16": torch.int32}


@dataclass
class _Var:
    """An op input that is a runtime variable, resolved from the environment."""

    name: str


@dataclass
class _Step:
    op_type: str
    name: str
    kernel: Any
    args: dict[str, Any]  # input name -> constant value, _Var, or tuple of those
    outputs: list[tuple[str, torch.dtype]]
    output_shapes: list[tuple] | None = None


def _constant(value: Any) -> Any:
    """A MIL constant as kernels take it: float arrays as float32 tensors, the rest as numpy/python."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and value.ndim > 0:
            return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


class MILModel:
    def __init__(self, path: Path, precision: str | None = None, fuse_attention: bool = True,
                 function: str | None = None):
        if precision not in (None, "float16", "float32"):
            raise BackendError(f"precision {precision!r}: use float16 (as declared) or float32")
        self.path = Path(path)
        if self.path.suffix != ".mlpackage":
            raise BackendError(
                f"{self.path.name}: the mil backend runs .mlpackage files (a compiled .mlmodelc holds no readable program)"
            )
        spec = load_spec(self.path)
        if spec.WhichOneof("Type") != "mlProgram":
            raise BackendError(f"{self.path.name}: not an ML program (the mil backend runs ML programs only)")
        try:
            self.function = function_name(spec, function)  # None: a single-function package's main
            self.inputs, self.outputs = describe(spec, self.function)
        except BackendError as exc:
            raise BackendError(f"{self.path.name}: {exc}") from None
        self.precision = precision or "float16"
        self.fuse_attention = fuse_attention
        program_function = self._read(spec, self.function or "main")
        self._ops = self._plan(program_function)  # op by op, as the program lists them
        outputs = {v.name for v in program_function.outputs}
        self._steps = self._fused(self._ops, outputs) if fuse_attention else self._ops
        self._free = _last_uses(self._steps, outputs)

    def _read(self, spec, name: str):
        """The program's function ``name``, read with its weights, and nothing else: the other
        functions are removed from ``spec`` (this model's own copy) before the loader sees them."""
        import_coremltools()
        from coremltools.converters.mil.frontend.milproto import load as mil_load

        held = sorted(spec.mlProgram.functions)
        if name not in held:
            what = "'main' function" if name == "main" else f"function {name!r}, which its description names"
            raise BackendError(
                f"{self.path}: its program has no {what} (it has: {', '.join(held) or 'none'}); re-convert it"
            )
        for other in held:
            if other != name:
                del spec.mlProgram.functions[other]
        weights = self.path / "Data" / "com.apple.CoreML" / "weights"
        try:  # a truncated weight.bin fails here (numpy "index out of bounds", storage reader errors)
            program = mil_load.load(spec, specification_version=spec.specificationVersion, file_weights_dir=str(weights))
        except Exception as exc:
            raise BackendError(
                f"{self.path}: its program or weights cannot be read ({exc}); "
                "the package is damaged, re-convert it (or download it again)"
            ) from None
        function = program.functions[name]
        if any(op.op_type.startswith("constexpr_") for op in function.operations):
            self._decompress(program)
        return function

    def _decompress(self, program) -> None:
        """Compressed weights (``constexpr_*`` ops: lookup tables, affine or blockwise quantization,
        sparsity, and chains of them such as a palette with per-channel scales) become constants,
        decompressed once, here, by the pass ``coremltools.optimize.coreml.decompress_weights``
        applies: exactly the values Core ML reconstructs."""
        from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

        try:
            WeightDecompressor(op_selector=lambda op: True).apply(program)
        except Exception as exc:
            raise BackendError(f"{self.path}: its compressed weights cannot be decompressed ({exc}); re-convert it") from None

    # ------------------------------------------------------------------ planning

    def _storage(self, var) -> torch.dtype:
        from coremltools.converters.mil.mil import types

        name = types.builtin_to_string(var.dtype)
        if name == "fp16" and self.precision == "float32":
            return torch.float32
        if name not in _STORAGE:
            raise BackendError(f"{self.path.name}: variable {var.name} has unsupported type {name}")
        return _STORAGE[name]

    def _plan(self, function) -> list[_Step]:
        """One step per executed op, in program order; constants go to ``self._consts``; ops
        without a kernel are refused here, all named at once."""
        self._consts: dict[str, Any] = {}
        steps: list[_Step] = []
        missing: dict[str, str] = {}
        for op in function.operations:
            if op.op_type == "const":
                self._consts[op.outputs[0].name] = _constant(op.outputs[0].val)
                continue
            kernel = KERNELS.get(op.op_type)
            if kernel is None:
                missing.setdefault(op.op_type, op.name)
                continue
            args = {k: self._arg(v) for k, v in op.inputs.items()}
            outputs = [(out.name, self._storage(out)) for out in op.outputs]
            shapes = [tuple(out.shape) if out.shape is not None else () for out in op.outputs]
            steps.append(_Step(op.op_type, op.name, kernel, args, outputs, shapes))
        if missing:
            ops = ", ".join(f"{t} (e.g. {n})" for t, n in missing.items())
            raise BackendError(f"{self.path.name}: the mil backend does not implement op {ops}")
        names = [v.name for v in function.outputs]
        if sorted(names) != sorted(self.outputs):
            raise BackendError(f"{self.path.name}: program outputs {names} differ from the described {sorted(self.outputs)}")
        return steps

    @staticmethod
    def _fused(steps: list[_Step], outputs: set[str]) -> list[_Step]:
        """Replace each recognised attention (logits, mask, softmax, values) by one chunked step
        with identical rounding (see mil_fuse)."""
        consumers: dict[str, int] = {name: 1 for name in outputs}
        for step in steps:
            for value in step.args.values():
                for v in value if isinstance(value, tuple) else (value,):
                    if isinstance(v, _Var):
                        consumers[v.name] = consumers.get(v.name, 0) + 1
        out, i = [], 0
        while i < len(steps):
            found = mil_fuse.match(steps, consumers, i)
            if found is None:
                out.append(steps[i])
                i += 1
                continue
            form, n, args = found
            group = steps[i : i + n]
            masked = "mask" in args
            dtypes = {
                "logits": group[0].outputs[0][1],
                "masked": group[1].outputs[0][1] if masked else group[0].outputs[0][1],
                "probs": group[-2].outputs[0][1],
                "out": group[-1].outputs[0][1],
            }
            out.append(_Step("attention", group[-1].name, mil_fuse.make_kernel(form, dtypes), args, group[-1].outputs))
            i += n
        return out

    def _arg(self, value):
        if isinstance(value, (tuple, list)):
            return tuple(self._arg(v) for v in value)
        if value.name in self._consts:
            return self._consts[value.name]
        if value.op is not None and value.op.op_type == "const":  # a const the loader inlined
            return _constant(value.val)
        return _Var(value.name)

    # ------------------------------------------------------------------ execution

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(self._steps, self._free, inputs)

    def find_nonfinite(self, inputs: dict[str, np.ndarray]) -> tuple[str, str] | None:
        """(op type, op name) of the first op whose output holds inf/NaN although its inputs were
        finite: where a float16 overflow starts. None when every value stays finite.

        Runs op by op, never fused, so the op named is one of the program's own (inside an
        attention: the logits, the mask, the softmax or the values product)."""
        found: list[tuple[str, str]] = []

        def watch(step: _Step, args: dict, results) -> bool:
            def finite(v) -> bool:
                return not (isinstance(v, torch.Tensor) and v.is_floating_point()) or bool(torch.isfinite(v).all())

            flat = [v for a in args.values() for v in (a if isinstance(a, tuple) else (a,))]
            if all(finite(v) for v in flat) and not all(finite(r) for r in results):
                found.append((step.op_type, step.name))
                return True
            return False

        outputs = set(self.outputs)
        self._run(self._ops, _last_uses(self._ops, outputs), inputs, watch)
        return found[0] if found else None

    def _run(self, steps: list[_Step], free: list[list[str]], inputs: dict[str, np.ndarray], watch=None) -> dict[str, np.ndarray]:
        """Execute ``steps``, dropping the variables ``free[i]`` names after step i."""
        float16_as = np.float32 if self.precision == "float32" else np.float16
        arrays = check_inputs(self.path, self.inputs, inputs, float16_as=float16_as)
        env: dict[str, Any] = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in arrays.items()}
        with torch.inference_mode():
            for step, done in zip(steps, free):
                args = {k: self._resolve(v, env) for k, v in step.args.items()}
                try:
                    result = step.kernel(**args)
                except Exception as exc:
                    raise BackendError(f"{self.path.name}: op {step.op_type} {step.name} failed: {exc}") from exc
                results = result if isinstance(result, (tuple, list)) else (result,)
                stored = []
                for (name, dtype), value in zip(step.outputs, results):
                    env[name] = value.to(dtype) if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=dtype)
                    stored.append(env[name])
                if watch is not None and watch(step, args, stored):
                    return {}
                for name in done:
                    env.pop(name, None)
        out = {}
        for name, desc in self.outputs.items():
            if name in env:
                value = env[name]
            else:  # an output that is a constant: a copy, so a caller's edit cannot change the model
                value = self._consts[name]
                value = value.clone() if isinstance(value, torch.Tensor) else np.array(value)
            out[name] = output_array(desc, value.numpy() if isinstance(value, torch.Tensor) else value)
        return out

    @staticmethod
    def _resolve(value, env):
        if isinstance(value, _Var):
            return env[value.name]
        if isinstance(value, tuple):
            return tuple(env[v.name] if isinstance(v, _Var) else v for v in value)
        return value


def _last_uses(steps: list[_Step], keep: set[str]) -> list[list[str]]:
    """Per step, the variables it reads for the last time (to free after it); ``keep`` (the
    program's outputs) are never freed."""
    last: dict[str, int] = {}
    for i, step in enumerate(steps):
        for value in step.args.values():
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, _Var):
                    last[v.name] = i
    free: list[list[str]] = [[] for _ in steps]
    for name, i in last.items():
        if name not in keep:
            free[i].append(name)
    return free
