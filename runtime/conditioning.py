"""Prompts to UNet conditioning, as the bundle's family describes it (``families.Conditioning``).

SD 1.x / 2.x: one CLIP encoder, whose ``last_hidden_state`` (1, 77, C) becomes the UNet's
``encoder_hidden_states`` in its (1, C, 1, 77) layout.

SDXL, as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` computes it: each encoder reads
its own text (the base's second encoder ``prompt_2``, the first's text where none is given), their
penultimate-layer ``hidden_embeds`` are joined along channels in the family's order, and the
pooled output of the family's ``pooled`` encoder is ``text_embeds``. The refiner has the second
encoder only, which reads the first text: diffusers pairs texts with encoders in order, so its
refiner never reads ``prompt_2``. ``time_ids`` carry the image's micro-conditioning (``time_ids``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..families import Conditioning
from .backends import Model
from .nonfinite import all_finite, nonfinite_error
from .tokenizer import CLIPTokenizer

# The pooled output of every SDXL text encoder (TextEncoderXL.swift lines 85-86 read it so).
POOLED = "pooled_outputs"


@dataclass(frozen=True)
class Encoded:
    """UNet inputs for one image, batch 1: encoder_hidden_states (1, C, 1, 77), and for SDXL
    text_embeds (1, P)."""

    inputs: dict[str, np.ndarray]
    truncated: tuple[str, ...]  # per encoder, the text cut at its token limit ("" if none)


def encode_prompt(texts: Sequence[str], conditioning: Conditioning, tokenizers: dict[str, CLIPTokenizer],
                  encoders: dict[str, Model], precision: str | None = None) -> Encoded:
    """The UNet's text conditioning: encoder ``i`` of the family reads ``texts[i]`` (texts beyond
    the family's encoders are not read); ``tokenizers`` and ``encoders`` by model name. NaN or
    inf out of an encoder raises ``NonFiniteError`` (``precision``: the models' override)."""
    if len(texts) < len(conditioning.encoders):
        raise ValueError(f"{len(conditioning.encoders)} encoders need as many texts, got {len(texts)}")
    hidden, truncated, inputs = [], [], {}
    for use, text in zip(conditioning.encoders, texts):
        tokens = tokenizers[use.model].tokenize(text)
        truncated.append(tokens.truncated)
        feeds = {"input_ids": np.asarray([tokens.ids], dtype=np.float32)}
        outputs = encoders[use.model].predict(feeds)
        wanted = [use.hidden, *([POOLED] if use.model == conditioning.pooled else [])]
        if not all(all_finite(outputs[name]) for name in wanted):
            stage = "text encoder" if len(conditioning.encoders) == 1 else f"text encoder {use.model}"
            raise nonfinite_error(stage, encoders[use.model], feeds, precision)
        hidden.append(outputs[use.hidden].astype(np.float32))  # (1, 77, C)
        if use.model == conditioning.pooled:
            inputs["text_embeds"] = outputs[POOLED].astype(np.float32)  # (1, P)
    states = np.concatenate(hidden, axis=-1).transpose(0, 2, 1)[:, :, None, :]  # (1, C, 1, 77): the UNet's layout
    return Encoded({"encoder_hidden_states": states, **inputs}, tuple(truncated))


def zeros_like(encoded: Encoded) -> Encoded:
    """Conditioning of zeros in place of an encoded text: SDXL's negative branch when no
    negative prompt is given (diffusers' ``force_zeros_for_empty_prompt``)."""
    return Encoded({name: np.zeros_like(value) for name, value in encoded.inputs.items()},
                   ("",) * len(encoded.truncated))


def time_ids(conditioning: Conditioning, original_size: tuple[int, int], crop: tuple[int, int],
             target_size: tuple[int, int], aesthetic_score: float) -> dict[str, np.ndarray]:
    """SDXL's ``time_ids`` input (1, 6) or (1, 5), as diffusers' ``_get_add_time_ids`` lays it out:
    original (height, width), crop (top, left), then the target (height, width) for the base or
    the aesthetic score for the refiner. Empty for a family without them (SD 1.x / 2.x)."""
    if conditioning.time_ids is None:
        return {}
    last = (*target_size,) if conditioning.time_ids == "size" else (aesthetic_score,)
    return {"time_ids": np.asarray([[*original_size, *crop, *last]], dtype=np.float32)}
