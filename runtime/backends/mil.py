"""The ``mil`` backend: executes the ML program inside a ``.mlpackage`` on any OS.

Core ML itself runs only on Apple platforms; this backend reads the package's program back into
coremltools' MIL representation and executes its operations in order with torch kernels
(``mil_ops.py``), so the artifact ``convert`` wrote can be checked anywhere (CI included).

Precision is kept as on device: a tensor the program declares float16 is stored as float16
between operations; each op computes in float32 and its result is rounded back to the declared
type, so a float16 overflow becomes inf (and then NaN) here as it would on a Mac.
``precision="float32"`` keeps those tensors in float32 instead (debugging only).

Everything that can fail does so at load time: the program is planned once (constants turned
into tensors, compressed weights decompressed, every op matched to a kernel, each variable's
last use recorded so activations are freed as soon as possible), and an op without a kernel
raises ``BackendError`` naming the op and the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import BackendError, check_inputs, describe
from . import mil_fuse
from .mil_ops import KERNELS

_STORAGE = {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float32, "int32": torch.int32,
            "int64": torch.int64, "bool": torch.bool, "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16}


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
    free: list[str]  # variables whose last use is this step
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
    def __init__(self, path: Path, precision: str | None = None, fuse_attention: bool = True):
        if precision not in (None, "float16", "float32"):
            raise BackendError(f"precision {precision!r}: use float16 (as declared) or float32")
        self.path = Path(path)
        if self.path.suffix != ".mlpackage":
            raise BackendError(f"{self.path.name}: the mil backend runs .mlpackage files (a compiled .mlmodelc holds no readable program)")
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto import load as mil_load

        try:
            spec = ct.utils.load_spec(str(self.path))
        except Exception as exc:
            raise BackendError(f"{self.path}: not a readable Core ML package ({exc})") from None
        if spec.WhichOneof("Type") != "mlProgram":
            raise BackendError(f"{self.path.name}: not an ML program (the mil backend runs ML programs only)")
        self.inputs, self.outputs = describe(spec)
        weights = self.path / "Data" / "com.apple.CoreML" / "weights"
        program = mil_load.load(spec, specification_version=spec.specificationVersion, file_weights_dir=str(weights))
        self.precision = precision or "float16"
        self.fuse_attention = fuse_attention
        self._plan(program.functions["main"])

    # ------------------------------------------------------------------ planning

    def _storage(self, var) -> torch.dtype:
        from coremltools.converters.mil.mil import types

        name = types.builtin_to_string(var.dtype)
        if name == "fp16" and self.precision == "float32":
            return torch.float32
        if name not in _STORAGE:
            raise BackendError(f"{self.path.name}: variable {var.name} has unsupported type {name}")
        return _STORAGE[name]

    def _plan(self, function) -> None:
        self._consts: dict[str, Any] = {}
        self._steps: list[_Step] = []
        missing: dict[str, str] = {}
        for op in function.operations:
            if op.op_type == "const":
                self._consts[op.outputs[0].name] = _constant(op.outputs[0].val)
                continue
            if op.op_type.startswith("constexpr_"):  # compressed weights: decompress once, here
                try:
                    values = op.materialized_val_inference()
                except Exception as exc:
                    raise BackendError(f"{self.path.name}: cannot decompress {op.op_type} {op.name} ({exc})") from None
                values = values if isinstance(values, tuple) else (values,)
                for out, value in zip(op.outputs, values):
                    self._consts[out.name] = _constant(np.asarray(value))
                continue
            kernel = KERNELS.get(op.op_type)
            if kernel is None:
                missing.setdefault(op.op_type, op.name)
                continue
            args = {k: self._arg(v) for k, v in op.inputs.items()}
            outputs = [(out.name, self._storage(out)) for out in op.outputs]
            shapes = [tuple(out.shape) if out.shape is not None else () for out in op.outputs]
            self._steps.append(_Step(op.op_type, op.name, kernel, args, outputs, [], shapes))
        if missing:
            ops = ", ".join(f"{t} (e.g. {n})" for t, n in missing.items())
            raise BackendError(f"{self.path.name}: the mil backend does not implement op {ops}")
        if self.fuse_attention:
            self._steps = self._fused(self._steps, {v.name for v in function.outputs})
        names = [v.name for v in function.outputs]
        if sorted(names) != sorted(self.outputs):
            raise BackendError(f"{self.path.name}: program outputs {names} differ from the described {sorted(self.outputs)}")
        self._outputs = [(name, self.outputs[name].dtype) for name in names]
        # Free each variable after its last reader (outputs are kept).
        last: dict[str, int] = {}
        for i, step in enumerate(self._steps):
            for value in step.args.values():
                for v in value if isinstance(value, tuple) else (value,):
                    if isinstance(v, _Var):
                        last[v.name] = i
        keep = {name for name, _ in self._outputs}
        for name, i in last.items():
            if name not in keep:
                self._steps[i].free.append(name)

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
            out.append(_Step("attention", group[-1].name, mil_fuse.make_kernel(form, dtypes), args, group[-1].outputs, []))
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
        return self._run(inputs)

    def find_nonfinite(self, inputs: dict[str, np.ndarray]) -> tuple[str, str] | None:
        """(op type, op name) of the first op whose output holds inf/NaN although its inputs were
        finite: where a float16 overflow starts. None when every value stays finite."""
        found: list[tuple[str, str]] = []

        def watch(step: _Step, args: dict, results) -> bool:
            def finite(v) -> bool:
                return not (isinstance(v, torch.Tensor) and v.is_floating_point()) or bool(torch.isfinite(v).all())

            flat = [v for a in args.values() for v in (a if isinstance(a, tuple) else (a,))]
            if all(finite(v) for v in flat) and not all(finite(r) for r in results):
                found.append((step.op_type, step.name))
                return True
            return False

        self._run(inputs, watch)
        return found[0] if found else None

    def _run(self, inputs: dict[str, np.ndarray], watch=None) -> dict[str, np.ndarray]:
        arrays = check_inputs(self.path, self.inputs, inputs)
        env: dict[str, Any] = {}
        for name, array in arrays.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array))
            if tensor.dtype == torch.float16 and self.precision == "float32":
                tensor = tensor.float()
            env[name] = tensor
        with torch.inference_mode():
            for step in self._steps:
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
                for name in step.free:
                    env.pop(name, None)
        out = {}
        for name, dtype in self._outputs:
            value = env[name] if name in env else self._consts[name]
            value = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            out[name] = value.astype(np.float16 if dtype == "float16" else np.float32 if dtype.startswith("float") else value.dtype)
        return out

    @staticmethod
    def _resolve(value, env):
        if isinstance(value, _Var):
            return env[value.name]
        if isinstance(value, tuple):
            return tuple(env[v.name] if isinstance(v, _Var) else v for v in value)
        return value
