"""Classifier-free guidance: the guided noise prediction for N images from a UNet of batch 1 or 2.

As diffusers orders them, the negative ("unconditional") branch comes first. With guidance, each
image takes one batch-2 call holding both branches, or two batch-1 calls; without it, the text
branch alone, two images per call on a batch-2 UNet. The conditioning of each call never changes
between steps, so it is batched once, on construction.
"""

from __future__ import annotations

import time

import numpy as np

from .backends import Model


def _stack(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _as_declared(inputs: dict[str, np.ndarray], unet: Model) -> dict[str, np.ndarray]:
    """Each input in the shape the model declares when it holds the same values in another one:
    early SDXL conversions of Apple's take the two branches' ``time_ids`` flat, (12,) for (2, 6)
    (StableDiffusionXLPipeline.swift lines 346-349)."""
    declared = getattr(unet, "inputs", {})
    out = {}
    for name, value in inputs.items():
        shape = declared[name].shape if name in declared else value.shape
        out[name] = value.reshape(shape) if value.shape != shape and value.size == np.prod(shape) else value
    return out


class GuidedUNet:
    """``predict(x, t)``: the (guided) model prediction for latents ``x`` (N, 4, h, w).

    ``cond`` and ``uncond`` are the UNet's conditioning inputs for one image (batch 1);
    ``uncond`` is None when guidance is off. ``model_time`` accumulates the seconds spent in UNet
    calls; ``failed_inputs`` holds the inputs of the first call whose prediction held NaN or inf
    (None while every prediction is finite), for the caller to diagnose."""

    def __init__(self, unet: Model, batch: int, cond: dict[str, np.ndarray], uncond: dict[str, np.ndarray] | None,
                 scale: float):
        self.unet, self.batch, self.scale = unet, batch, np.float32(scale)
        self.guided = uncond is not None
        if not self.guided:
            self.calls = [_stack([cond] * batch)]
        elif batch == 2:
            self.calls = [_stack([uncond, cond])]
        else:
            self.calls = [uncond, cond]
        self.calls = [_as_declared(call, unet) for call in self.calls]
        self.model_time = 0.0
        self.failed_inputs: dict[str, np.ndarray] | None = None

    def _call(self, samples: np.ndarray, t: float, conditioning: dict[str, np.ndarray]) -> np.ndarray:
        start = time.perf_counter()
        timestep = np.full(len(samples), t, np.float32)
        inputs = {"sample": samples, "timestep": timestep, **conditioning}
        out = self.unet.predict(inputs)["noise_pred"]
        self.model_time += time.perf_counter() - start
        if self.failed_inputs is None and not np.isfinite(out).all():
            self.failed_inputs = inputs
        return out.astype(np.float32)

    def predict(self, x: np.ndarray, t: float) -> np.ndarray:
        if self.guided:
            preds = []
            for image in np.split(x, len(x)):
                if len(self.calls) == 1:  # both branches in one batch-2 call
                    uncond, cond = np.split(self._call(np.concatenate([image, image]), t, self.calls[0]), 2)
                else:
                    uncond, cond = (self._call(image, t, c) for c in self.calls)
                preds.append(uncond + self.scale * (cond - uncond))
            return np.concatenate(preds)
        preds = []
        for i in range(0, len(x), self.batch):  # the last call padded with its last image
            chunk = x[i : i + self.batch]
            pad = self.batch - len(chunk)
            samples = np.concatenate([chunk, chunk[-1:].repeat(pad, axis=0)]) if pad else chunk
            preds.append(self._call(samples, t, self.calls[0])[: len(chunk)])
        return np.concatenate(preds)
