"""Does a converted float16 package overflow? Run it once, through the mil backend, and look.

SDXL's stock VAE is the case in point: its activations exceed float16's +-65504, so in float16 it
decodes to NaN (a black image), which diffusers' ``force_upcast`` works around by decoding in
float32. The VAE config's flag says what its authors found; the package itself is what will run,
so the converter asks it: the float16 decoder gets a probe latent of the spread a finished
denoising gives (unit variance once scaled, so N(0, 1) divided by the scaling factor), the encoder
a probe image in [-1, 1], and a non-finite output sends that component back to be converted in
float32. A VAE whose float16 output is finite (the "fp16-fix" fine-tune) stays float16.

The mil backend executes the package op by op with float16 tensors kept float16, so an overflow
shows as it would on a device (``runtime/backends/mil.py``). This is the one place ``convert``
imports from ``runtime``: the backend is the only executor of Core ML packages off macOS, and the
design's one-way dependency (DESIGN.md) stops short of the converter checking its own output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The components whose float16 output is probed, and how their probe input is made.
FLOAT16_PROBES = ("VAEDecoder", "VAEEncoder")
_SEED = 20231


def probe_inputs(name: str, shapes: dict[str, tuple[int, ...]], scaling_factor: float) -> dict[str, np.ndarray]:
    """The probe input of the model ``name`` (one of ``FLOAT16_PROBES``), by input name."""
    rng = np.random.default_rng(_SEED)
    (input_name, shape), = shapes.items()
    if name == "VAEDecoder":
        return {input_name: (rng.standard_normal(shape) / scaling_factor).astype(np.float32)}
    # An image: smooth colour ramps and texture, in [-1, 1] as the encoder takes it.
    h, w = shape[-2:]
    ramp = np.linspace(-1, 1, h)[:, None] * np.linspace(1, -1, w)[None, :]
    image = np.stack([ramp, ramp.T if h == w else -ramp, np.zeros_like(ramp)]) + 0.2 * rng.standard_normal((3, h, w))
    return {input_name: np.clip(image, -1, 1)[None].astype(np.float32)}


def float16_failure(package: Path, name: str, scaling_factor: float) -> str | None:
    """Why ``package`` (model ``name``) fails in float16 on its probe input, or None if its
    outputs are finite."""
    from ..runtime.backends import load_model  # see the module docstring

    model = load_model(package, "mil")
    inputs = probe_inputs(name, {n: d.shape for n, d in model.inputs.items()}, scaling_factor)
    with np.errstate(over="ignore", invalid="ignore"):
        outputs = model.predict(inputs)
    for output, value in outputs.items():
        if not np.isfinite(value).all():
            find = getattr(model, "find_nonfinite", None)
            found = find(inputs) if find is not None else None
            where = f", first at op {found[0]} {found[1]!r}" if found else ""
            probe = "latent" if name == "VAEDecoder" else "image"
            return f"its output {output!r} holds inf or NaN on a probe {probe}{where}"
    return None
