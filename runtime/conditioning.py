"""Prompts to UNet conditioning, as the bundle's family describes it (``families.Conditioning``).

SD 1.x / 2.x: one CLIP encoder, whose ``last_hidden_state`` (1, 77, C) becomes the UNet's
``encoder_hidden_states`` in its (1, C, 1, 77) layout. A family with several encoders joins their
hidden states along channels in the order it lists them, as diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..families import Conditioning
from .backends import Model
from .nonfinite import all_finite, nonfinite_error
from .tokenizer import CLIPTokenizer


@dataclass(frozen=True)
class Encoded:
    inputs: dict[str, np.ndarray]  # UNet inputs for one image, batch 1: encoder_hidden_states (1, C, 1, 77)
    truncated: str  # prompt text cut at the token limit ("" if none), as the first tokenizer reports it


def encode_prompt(prompt: str, conditioning: Conditioning, tokenizers: dict[str, CLIPTokenizer],
                  encoders: dict[str, Model], precision: str | None = None) -> Encoded:
    """The UNet's conditioning inputs for ``prompt``; ``tokenizers`` and ``encoders`` by model name.
    NaN or inf out of an encoder raises ``NonFiniteError`` (``precision``: the models' override)."""
    hidden, truncated = [], None
    for use in conditioning.encoders:
        tokens = tokenizers[use.model].tokenize(prompt)
        truncated = tokens.truncated if truncated is None else truncated
        inputs = {"input_ids": np.asarray([tokens.ids], dtype=np.float32)}
        out = encoders[use.model].predict(inputs)[use.hidden].astype(np.float32)  # (1, 77, C)
        if not all_finite(out):
            stage = "text encoder" if len(conditioning.encoders) == 1 else f"text encoder {use.model}"
            raise nonfinite_error(stage, encoders[use.model], inputs, precision)
        hidden.append(out)
    states = np.concatenate(hidden, axis=-1).transpose(0, 2, 1)[:, :, None, :]  # (1, C, 1, 77): the UNet's layout
    return Encoded({"encoder_hidden_states": states}, truncated or "")
