"""What each bundle component is: how to build its torch module and its Core ML interface.

The names, shapes and dtypes are those Apple's Swift ``StableDiffusion`` package feeds and reads
(``input_ids`` (1, 77) -> ``last_hidden_state``, ``pooled_outputs``; ``sample``, ``timestep``,
``encoder_hidden_states`` (B, C, 1, 77) -> ``noise_pred``; ``z`` -> ``image``; ``x`` ->
``latent``), so a bundle made here loads in apps built on that package. Every input and output is
declared float32, as Apple's own converter declares them (the Swift code builds float32
``MLShapedArray``s); the program casts inputs to float16 as its first ops, so the Neural Engine
still computes in float16. ``timestep`` is the exception inside the program: fractional timesteps
of the Euler and DPM schedules would be rounded to 0.25 steps in float16, so it and its sinusoidal
features stay float32 up to the time embedding's first layer (``export.float32_features_of``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..models import AttentionImpl, load_text_encoder, load_unet, load_vae_decoder, load_vae_encoder
from ..models.clip import CLIPTextConfig
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from ..runtime.bundle import COMPONENTS
from .export import TensorSpec
from .source import Source

VAE_SCALE = 8  # image side / latent side of every SD 1.x / 2.x VAE, as Apple's pipeline assumes


@dataclass(frozen=True)
class Geometry:
    """Sizes every component is converted for."""

    height: int  # image pixels
    width: int
    unet_batch: int  # 2: both guidance branches in one call; 1: one call per branch
    text_dim: int  # text embedding width (768 SD 1.x, 1024 SD 2.x)
    max_length: int = 77

    @property
    def latent(self) -> tuple[int, int]:
        return self.height // VAE_SCALE, self.width // VAE_SCALE


def source_config(source: Source, part: str, missing_ok: bool = False) -> dict[str, Any]:
    """The config of ``part`` (``unet``, ``vae``, ``text_encoder``) as the diffusers / transformers
    class reads it: the file's values over the class's defaults, so that a config.json written
    without some field means what it means to diffusers. A part the source lacks is a
    ``SourceError``, or with ``missing_ok`` the class's defaults alone (what a bundle without VAE
    models records of the VAE it will be used with: diffusers' default scaling factor)."""
    if missing_ok and not source.has_config(part):
        file_config: dict[str, Any] = {}
    else:
        file_config = getattr(source, f"{part}_config")()
    if part == "text_encoder":
        from transformers import CLIPTextConfig as TransformersConfig

        return TransformersConfig.from_dict(file_config).to_dict()
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = UNet2DConditionModel if part == "unet" else AutoencoderKL
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty} | file_config


@dataclass(frozen=True)
class Component:
    cli_name: str  # text-encoder, unet, ...
    source_part: str  # the diffusers subfolder it comes from: text_encoder, unet, vae
    build: Callable[[Source, AttentionImpl, int], torch.nn.Module]  # (source, attention, query_chunk)
    interface: Callable[[Geometry], tuple[list[TensorSpec], list[TensorSpec]]]
    description: str
    # The module config built from ``source_config`` (a ValueError names what is unsupported):
    # cheap, so every requested component's architecture is checked before any conversion.
    architecture: Callable[[dict[str, Any]], Any]
    float32_features: tuple[str, ...] = ()  # inputs whose element-wise features stay float32

    @property
    def name(self) -> str:  # the bundle's model name, e.g. "Unet"
        return COMPONENTS[self.cli_name]


def _text_encoder_io(g: Geometry):
    return (
        [TensorSpec("input_ids", (1, g.max_length), "float32", "Token ids (float), start token first, padded")],
        [
            TensorSpec("last_hidden_state", (1, g.max_length, g.text_dim), "float32", "Text embeddings after the final LayerNorm"),
            TensorSpec("pooled_outputs", (1, g.text_dim), "float32", "Embedding at the end-of-text token"),
        ],
    )


def _unet_io(g: Geometry):
    h, w = g.latent
    b = g.unet_batch
    return (
        [
            TensorSpec("sample", (b, 4, h, w), "float32", "Latents, scaled for this timestep by the scheduler"),
            TensorSpec("timestep", (b,), "float32", "Diffusion timestep per batch item"),
            TensorSpec("encoder_hidden_states", (b, g.text_dim, 1, g.max_length), "float32", "Text embeddings, (B, C, 1, S)"),
        ],
        [TensorSpec("noise_pred", (b, 4, h, w), "float32", "Model prediction (noise or v, per the manifest)")],
    )


def _vae_decoder_io(g: Geometry):
    h, w = g.latent
    return (
        [TensorSpec("z", (1, 4, h, w), "float32", "Latents divided by the VAE scaling factor")],
        [TensorSpec("image", (1, 3, g.height, g.width), "float32", "RGB image in [-1, 1] (unclamped)")],
    )


def _vae_encoder_io(g: Geometry):
    h, w = g.latent
    return (
        [TensorSpec("x", (1, 3, g.height, g.width), "float32", "RGB image in [-1, 1]")],
        [TensorSpec("latent", (1, 8, h, w), "float32", "Latent mean (channels 0-3) and log-variance (4-7), unscaled")],
    )


COMPONENT_SPECS: dict[str, Component] = {
    c.cli_name: c
    for c in (
        Component(
            "text-encoder",
            "text_encoder",
            lambda s, a, q: load_text_encoder(s.load_text_encoder(), a),
            _text_encoder_io,
            "CLIP text encoder",
            CLIPTextConfig.from_transformers,
        ),
        Component(
            "unet",
            "unet",
            lambda s, a, q: load_unet(s.load_unet(), a, q),
            _unet_io,
            "Denoising UNet",
            UNetConfig.from_diffusers,
            ("timestep",),
        ),
        Component(
            "vae-decoder",
            "vae",
            lambda s, a, q: load_vae_decoder(s.load_vae(), a, q),
            _vae_decoder_io,
            "VAE decoder: latents to image",
            VAEConfig.from_diffusers,
        ),
        Component(
            "vae-encoder",
            "vae",
            lambda s, a, q: load_vae_encoder(s.load_vae(), a, q),
            _vae_encoder_io,
            "VAE encoder: image to latent moments",
            VAEConfig.from_diffusers,
        ),
    )
}
