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
from ..models import AttentionImpl
from ..models.clip import CLIPTextConfig
from ..models.model_io import (
    Mapping,
    load_weights,
    map_clip_weights,
    map_unet_weights,
    map_vae_decoder_weights,
    map_vae_encoder_weights,
    text_encoder_module,
    unet_module,
    vae_decoder_module,
    vae_encoder_module,
)
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


Module = Callable[[dict[str, Any], AttentionImpl, int], torch.nn.Module]  # (source config, attention, query_chunk)


@dataclass(frozen=True)
class Builder:
    """How to make one component's torch module from the source's."""

    # The module config built from ``source_config`` (a ValueError names what is unsupported):
    # cheap, so every requested component's architecture is checked before any conversion.
    architecture: Callable[[dict[str, Any]], Any]
    module: Module  # the module without weights (meta device), from ``source_config``
    mapping: Mapping  # the source's state dict -> the module's (``models.model_io``)


def _projected(config: dict[str, Any]) -> CLIPTextConfig:
    """The architecture of a text encoder with a projection, which its config must size."""
    if not config.get("projection_dim"):
        raise ValueError("its text encoder config gives no projection_dim, which SDXL's second encoder has")
    return CLIPTextConfig.from_transformers(config)


# By ``ComponentSpec.module``. SDXL's encoders condition on their penultimate layer (-2).
BUILDERS: dict[str, Builder] = {
    "text-encoder": Builder(CLIPTextConfig.from_transformers, lambda c, a, q: text_encoder_module(c, a), map_clip_weights),
    "text-encoder-penultimate": Builder(
        CLIPTextConfig.from_transformers, lambda c, a, q: text_encoder_module(c, a, -2), map_clip_weights
    ),
    "text-encoder-projection-penultimate": Builder(
        _projected, lambda c, a, q: text_encoder_module(c, a, -2, projection=True), map_clip_weights
    ),
    "unet": Builder(UNetConfig.from_diffusers, unet_module, map_unet_weights),
    "vae-decoder": Builder(VAEConfig.from_diffusers, vae_decoder_module, map_vae_decoder_weights),
    "vae-encoder": Builder(VAEConfig.from_diffusers, vae_encoder_module, map_vae_encoder_weights),
}


def empty_module(spec: ComponentSpec, config: dict[str, Any], attention: AttentionImpl, query_chunk: int) -> torch.nn.Module:
    """The Neural-Engine-shaped module of ``spec`` without weights (on the meta device), from its
    source part's ``config`` (``source_config``)."""
    return BUILDERS[spec.module].module(config, attention, query_chunk)


def build_module(
    source: Source, spec: ComponentSpec, attention: AttentionImpl, query_chunk: int, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The Neural-Engine-shaped module of ``spec``, holding the source's weights in ``dtype``
    (loaded in it: a float16 module never holds a float32 copy)."""
    weights = source.load(spec.source_part, dtype)
    module = empty_module(spec, source_config(source, spec.source_part), attention, query_chunk)
    return load_weights(module, weights.state_dict(), BUILDERS[spec.module].mapping, dtype)
