"""The ``coreml`` backend: Core ML itself, on macOS, on the chosen compute units.

Deliberately thin: descriptions, input checks and everything around the model call are shared
with the ``mil`` backend; only loading and ``predict`` go through coremltools' Core ML binding.
A compiled ``.mlmodelc`` loads without the compile step a ``.mlpackage`` needs on first use.
A multifunction model loads one function (``function_name``), as Apple's frameworks do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...system import import_coremltools
from . import COMPUTE_UNITS, BackendError, TensorDescription, check_inputs, describe_model, output_array, require


class CoreMLModel:
    def __init__(self, path: Path, compute_units: str = "CPU_AND_NE", function: str | None = None,
                 schema: tuple[dict[str, TensorDescription], dict[str, TensorDescription]] | None = None):
        """``function``: of a multifunction model (None: its default); ``schema``: its (inputs,
        outputs) when known from the bundle's manifest, else read from the model (see
        ``compiled_schema`` for a compiled multifunction model)."""
        require("coreml")
        if compute_units not in COMPUTE_UNITS:
            raise BackendError(f"unknown compute units {compute_units!r}: use one of {', '.join(COMPUTE_UNITS)}")
        ct = import_coremltools()
        self.path = Path(path)
        self.compute_units = compute_units
        self.function = function
        self.inputs, self.outputs = schema or describe_model(self.path, function)
        units = ct.ComputeUnit[compute_units]
        try:  # function_name=None: Core ML's default function, or the only one
            if self.path.suffix == ".mlmodelc":
                self._model = ct.models.CompiledMLModel(str(self.path), compute_units=units, function_name=function)
            else:
                self._model = ct.models.MLModel(str(self.path), compute_units=units, function_name=function)
        except Exception as exc:  # coremltools raises bare Exceptions from Core ML
            raise BackendError(
                f"{self.path.name}: Core ML could not load it ({exc}); re-convert or download it again if it is damaged"
            ) from None

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = check_inputs(self.path, self.inputs, inputs)
        try:
            out = self._model.predict(arrays)
        except Exception as exc:
            raise BackendError(f"{self.path.name}: Core ML prediction failed ({exc})") from None
        return {name: output_array(desc, out[name]) for name, desc in self.outputs.items()}
