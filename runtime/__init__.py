"""Stage 2: from a bundle and a prompt to images (``coreml_sd.runtime``).

    from coreml_sd.runtime import Pipeline
    images = Pipeline.from_bundle("sd15")("a photo of a cat", seed=42).images

The public names below are imported on first use (module ``__getattr__``), so importing the
package costs nothing: numpy, Pillow and coremltools load only when a name is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule defining it
_EXPORTS = {
    "Pipeline": "pipeline",
    "Generation": "pipeline",
    "GenerationError": "request",
    "Request": "request",
    "Result": "pipeline",
    "Step": "pipeline",
    "Timings": "pipeline",
    "check_request": "request",
    "Bundle": "bundle",
    "BundleError": "bundle",
    "open_bundle": "bundle",
    "Parameters": "image",
    "read_parameters": "image",
    "BackendError": "backends",
    "load_model": "backends",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .backends import BackendError, load_model
    from .bundle import Bundle, BundleError, open_bundle
    from .image import Parameters, read_parameters
    from .pipeline import Generation, Pipeline, Result, Step, Timings
    from .request import GenerationError, Request, check_request


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
