"""coreml-sd: Stable Diffusion on Apple Silicon through Core ML.

    from coreml_sd import Pipeline
    result = Pipeline.from_bundle("sd15")("a photo of a cat", steps=20, seed=42)
    result.images[0].save("cat.png")

The runtime's public API (``coreml_sd.runtime``) is re-exported here and imported on first use,
so ``import coreml_sd`` and ``coreml-sd --help`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import runtime as _runtime  # light: its own names load on first use too

__version__ = "0.1.0"

_RUNTIME = _runtime.__all__  # the runtime's public names, listed once (in runtime/__init__.py)
__all__ = ["__version__", *_RUNTIME]

if TYPE_CHECKING:
    from .runtime import (
        BackendError,
        Bundle,
        BundleError,
        Generation,
        GenerationError,
        Parameters,
        Pipeline,
        Request,
        Result,
        Step,
        Timings,
        check_request,
        load_model,
        open_bundle,
        read_parameters,
    )


def __getattr__(name: str) -> Any:
    if name not in _RUNTIME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_runtime, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_RUNTIME})
