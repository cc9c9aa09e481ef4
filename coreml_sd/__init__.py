"""coreml-sd: Stable Diffusion on Apple Silicon through Core ML.

    from coreml_sd import Pipeline
    result = Pipeline.from_bundle("sd15")("a photo of a cat", steps=20, seed=42)
    result.images[0].save("cat.png")

The runtime's public API (``coreml_sd.runtime``) is re-exported here and imported on first use,
so ``import coreml_sd`` and ``coreml-sd --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_RUNTIME = (
    "Pipeline", "Generation", "GenerationError", "Request", "Result", "Step", "Timings", "check_request",
    "Bundle", "BundleError", "open_bundle", "Parameters", "read_parameters", "BackendError", "load_model",
)
__all__ = ["__version__", *_RUNTIME]

if TYPE_CHECKING:
    from .runtime import (
        BackendError, Bundle, BundleError, Generation, GenerationError, Parameters, Pipeline, Request, Result, Step,
        Timings, check_request, load_model, open_bundle, read_parameters,
    )


def __getattr__(name: str) -> Any:
    if name not in _RUNTIME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.runtime"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_RUNTIME})
