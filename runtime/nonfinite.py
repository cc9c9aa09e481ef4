"""NaN or inf out of a stage: a one-line error naming the stage, where it started, and the fix.

A float16 overflow inside a model becomes inf and then NaN, which the image conversion would
save as a black picture. ``Generation`` checks each stage's output instead (text encoder, every
UNet step, VAE decoder) and, on failure, says where it started: on the mil backend, the first
op whose output is not finite although its inputs are (``find_nonfinite``); and whether an input
was already beyond float16's range (the overflow happened upstream, e.g. latents blown up by a
huge guidance scale).
"""

from __future__ import annotations

import numpy as np

from .backends import Model
from .request import GenerationError

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


class NonFiniteError(GenerationError):
    """A stage produced NaN or inf; nothing was decoded or saved from it."""


def all_finite(array: np.ndarray) -> bool:
    return bool(np.isfinite(array).all())


def locate(model: Model, inputs: dict[str, np.ndarray]) -> tuple[str, bool]:
    """Where the NaN/inf of ``model.predict(inputs)`` starts, as a parenthesised phrase ("" when
    nothing can be told), and whether the cause lies upstream: an input that is not finite or
    beyond float16's range. Our programs compute in float16 (a float32 input is cast first), so
    such an input overflows on a device whatever its declared type."""
    where, upstream = [], False
    find = getattr(model, "find_nonfinite", None)  # the mil backend (and chunked models of it)
    found = find(inputs) if find is not None else None
    if found is not None:
        where.append(f"first at op {found[0]} {found[1]!r}")
    for name, value in inputs.items():
        value = np.asarray(value)
        if value.dtype.kind != "f" or not value.size:
            continue
        if not all_finite(value):
            where.append(f"its input {name!r} already holds NaN or inf")
        elif (peak := float(np.abs(value).max())) > FLOAT16_MAX:
            where.append(f"its input {name!r} reaches {peak:.3g}, beyond float16's +-65504")
        else:
            continue
        upstream = True
        break
    return (f" ({'; '.join(where)})" if where else ""), upstream


def nonfinite_error(stage: str, model: Model, inputs: dict[str, np.ndarray], precision: str | None,
                    guidance: float | None = None) -> NonFiniteError:
    """The error for NaN/inf out of ``model.predict(inputs)`` in ``stage``; ``guidance``: the
    guidance scale when it shaped this stage's input (None when guidance is off or irrelevant)."""
    where, upstream = locate(model, inputs)
    return NonFiniteError(f"NaN or inf in the {stage}{where}; {fix(upstream, precision, guidance)}")


def fix(upstream: bool, precision: str | None, guidance: float | None) -> str:
    if upstream and guidance is not None:
        return f"lower --guidance (now {guidance:g})"
    if precision == "float32":
        return "it happens without float16 rounding too, so the model is damaged: re-convert the bundle"
    return "run with --backend mil --precision float32 to tell a float16 overflow from a damaged model"
