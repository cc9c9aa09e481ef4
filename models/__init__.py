"""Torch modules laid out for the Neural Engine, loading diffusers / transformers weights."""

from .attention import AttentionImpl
from .model_io import load_text_encoder, load_text_encoder_with_projection, load_unet, load_vae_decoder, load_vae_encoder

__all__ = [
    "AttentionImpl",
    "load_text_encoder",
    "load_text_encoder_with_projection",
    "load_unet",
    "load_vae_decoder",
    "load_vae_encoder",
]
