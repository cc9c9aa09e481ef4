"""How each bundle component is built as a torch module, per family.

What a component *is* (its bundle name, inputs and outputs) is the family's description
(``coreml_sd.families``); this module adds what only conversion needs: the Neural-Engine-shaped
module (``models/``) that implements it, and its architecture config, checked before any work.
``timestep`` stays float32 inside the UNet program up to the time embedding: fractional
timesteps of the Euler and DPM schedules would be rounded to 0.25 steps in float16
(``export.float32_features_of``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..families import ComponentSpec
from ..models import AttentionImpl, load_text_encoder, load_unet, load_vae_decoder, load_vae_encoder
from ..models.clip import CLIPTextConfig
from ..models.model_io import load_text_encoder_with_projection
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from .source import Source


def source_config(source: Source, part: str, missing_ok: bool = False) -> dict[str, Any]:
    """The config of ``part`` (``unet``, ``vae``, ``text_encoder``) as the diffusers / transformers
    class reads it: the file's values over the class's defaults, so that a config.json written
    without some field means what it means to diffusers. A part the source lacks is a
    ``SourceError``, or with ``missing_ok`` the class's defaults alone (what a bundle without VAE
    models records of the VAE it will be used with: diffusers' default scaling factor)."""
    file_config = {} if missing_ok and not source.has_config(part) else source.config(part)
    if part.startswith("text_encoder"):
        from transformers import CLIPTextConfig as TransformersConfig

        return TransformersConfig.from_dict(file_config).to_dict()
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = UNet2DConditionModel if part == "unet" else AutoencoderKL
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty} | file_config


Build = Callable[[torch.nn.Module, AttentionImpl, int], torch.nn.Module]  # (source module, attention, query_chunk)


@dataclass(frozen=True)
class Builder:
    """How to make one component's torch module from the source's."""

    # The module config built from ``source_config`` (a ValueError names what is unsupported):
    # cheap, so every requested component's architecture is checked before any conversion.
    architecture: Callable[[dict[str, Any]], Any]
    build: Build


def _projected(config: dict[str, Any]) -> CLIPTextConfig:
    """The architecture of a text encoder with a projection, which its config must size."""
    if not config.get("projection_dim"):
        raise ValueError("its text encoder config gives no projection_dim, which SDXL's second encoder has")
    return CLIPTextConfig.from_transformers(config)


# By ``ComponentSpec.module``. SDXL's encoders condition on their penultimate layer (-2).
BUILDERS: dict[str, Builder] = {
    "text-encoder": Builder(CLIPTextConfig.from_transformers, lambda m, a, q: load_text_encoder(m, a)),
    "text-encoder-penultimate": Builder(CLIPTextConfig.from_transformers, lambda m, a, q: load_text_encoder(m, a, -2)),
    "text-encoder-projection-penultimate": Builder(_projected, lambda m, a, q: load_text_encoder_with_projection(m, a, -2)),
    "unet": Builder(UNetConfig.from_diffusers, load_unet),
    "vae-decoder": Builder(VAEConfig.from_diffusers, load_vae_decoder),
    "vae-encoder": Builder(VAEConfig.from_diffusers, load_vae_encoder),
}


def build_module(source: Source, spec: ComponentSpec, attention: AttentionImpl, query_chunk: int) -> torch.nn.Module:
    """The Neural-Engine-shaped module of ``spec``, holding the source's weights (float32)."""
    return BUILDERS[spec.module].build(source.load(spec.source_part), attention, query_chunk)
