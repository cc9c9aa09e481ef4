"""Weights from diffusers / transformers modules into the Neural-Engine-shaped modules.

Each ``map_*_weights(key, value)`` is a pure function from one source state-dict entry to the
entries it becomes (none when the tensor belongs to another component). Our modules keep the
source parameter names wherever they can, so mapping is mostly identity; the renames are listed
below. One reshape is applied by ``load_weights`` to every tensor: a 2-D linear weight (out, in)
becomes the 4-D weight (out, in, 1, 1) of the 1x1 convolution that replaces the linear layer.
Key sets and every shape are asserted; tensors are assigned, not copied, so the converted module
shares memory with the source, and modules are constructed on the meta device so that no second
set of (random) weights is ever allocated: peak memory stays at one copy of the model.

The ``*_module`` functions build a module from its source's config alone, without weights: the
``load_*`` functions fill it from a source module, and conversion traces it with stand-in weights
before any are loaded (``convert.export.stand_in_weights``). ``dtype`` casts the weights where
they differ from it (a source loaded in that dtype is shared, not copied).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .attention import AttentionImpl
from .clip import CLIPTextConfig, CLIPTextEncoder
from .unet import UNet, UNetConfig
from .vae import VAEConfig, VAEDecoder, VAEEncoder

Mapping = Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        key = key.replace(old, new)
    return key


_UNET_RENAMES = (
    (".to_out.0.", ".to_out."),  # diffusers keeps a Dropout beside the output projection
    (".ff.net.0.proj.", ".ff.proj_in."),  # GEGLU projection
    (".ff.net.2.", ".ff.proj_out."),
)


def map_unet_weights(key: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [(_rename(key, _UNET_RENAMES), value)]


_CLIP_RENAMES = (
    ("text_model.", ""),
    ("embeddings.", ""),
    ("encoder.layers.", "layers."),
    ("self_attn.q_proj.", "self_attn.to_q."),
    ("self_attn.k_proj.", "self_attn.to_k."),
    ("self_attn.v_proj.", "self_attn.to_v."),
    ("self_attn.out_proj.", "self_attn.to_out."),
)


def map_clip_weights(key: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    if key.endswith("position_ids"):  # a buffer of arange(77) some checkpoints carry
        return []
    return [(_rename(key, _CLIP_RENAMES), value)]


_VAE_RENAMES = (
    ("mid_block.attentions.0.group_norm.", "mid_block.group_norm."),
    ("mid_block.attentions.0.", "mid_block.attention."),
    (".to_out.0.", ".to_out."),
)


def _map_vae_half(prefix: str, conv: str) -> Mapping:
    def mapping(key: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if key.startswith(conv + "."):
            return [(key, value)]
        if key.startswith(prefix):
            return [(_rename(key[len(prefix) :], _VAE_RENAMES), value)]
        return []  # the other half of the autoencoder

    return mapping


map_vae_decoder_weights = _map_vae_half("decoder.", "post_quant_conv")
map_vae_encoder_weights = _map_vae_half("encoder.", "quant_conv")


def load_weights(
    module: nn.Module, source: dict[str, torch.Tensor], mapping: Mapping, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Load ``source`` (a state dict) into ``module`` through ``mapping``; exact key sets, exact
    shapes, weights in ``dtype``."""
    target = module.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        for new_key, new_value in mapping(key, value):
            if new_key in mapped:
                raise ValueError(f"two source tensors map to {new_key}")
            mapped[new_key] = new_value
    missing, unexpected = sorted(target.keys() - mapped.keys()), sorted(mapped.keys() - target.keys())
    if missing or unexpected:
        raise ValueError(f"weights do not fit {type(module).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in mapped.items():
        want = target[key].shape
        if value.dim() == 2 and len(want) == 4 and want[2:] == (1, 1):
            value = value[:, :, None, None]  # linear (out, in) -> 1x1 conv (out, in, 1, 1): a view
        if value.shape != want:
            raise ValueError(f"{key}: source shape {tuple(value.shape)} does not fit {tuple(want)}")
        mapped[key] = value.to(dtype)
    module.load_state_dict(mapped, strict=True, assign=True)
    return with_constant_buffers(module).eval()


def with_constant_buffers(module: nn.Module) -> nn.Module:
    """``module`` with its buffers computed from the config (not in any checkpoint) rebuilt on
    the CPU, where a meta-device construction left them without values."""
    for sub in module.modules():
        if hasattr(sub, "constant_buffers"):
            for name, value in sub.constant_buffers().items():
                sub.register_buffer(name, value, persistent=False)
    return module


def _on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module without allocating its parameters (they are assigned from the source)."""
    with torch.device("meta"):
        module = factory()
    return with_constant_buffers(module)


def unet_module(config: dict, attention: AttentionImpl | str, query_chunk: int = 512) -> UNet:
    """A ``UNet`` without weights, from a diffusers ``UNet2DConditionModel`` config."""
    return _on_meta(lambda: UNet(UNetConfig.from_diffusers(config), attention, query_chunk))


def text_encoder_module(
    config: dict, attention: AttentionImpl | str, hidden_layer: int | None = None, projection: bool = False
) -> CLIPTextEncoder:
    """A ``CLIPTextEncoder`` without weights, from a transformers ``CLIPTextConfig`` dict;
    ``projection``: with the config's ``projection_dim`` (``CLIPTextModelWithProjection``)."""
    cfg = CLIPTextConfig.from_transformers(config)
    projection_dim = config["projection_dim"] if projection else None
    return _on_meta(lambda: CLIPTextEncoder(cfg, attention, hidden_layer, projection_dim=projection_dim))


def vae_decoder_module(config: dict, attention: AttentionImpl | str, query_chunk: int = 512) -> VAEDecoder:
    """A ``VAEDecoder`` without weights, from a diffusers ``AutoencoderKL`` config."""
    return _on_meta(lambda: VAEDecoder(VAEConfig.from_diffusers(config), attention, query_chunk))


def vae_encoder_module(config: dict, attention: AttentionImpl | str, query_chunk: int = 512) -> VAEEncoder:
    """A ``VAEEncoder`` without weights, from a diffusers ``AutoencoderKL`` config."""
    return _on_meta(lambda: VAEEncoder(VAEConfig.from_diffusers(config), attention, query_chunk))


def load_unet(
    source: nn.Module, attention: AttentionImpl | str, query_chunk: int = 512, dtype: torch.dtype = torch.float32
) -> UNet:
    """A ``UNet`` from a diffusers ``UNet2DConditionModel`` (sharing its weights)."""
    return load_weights(unet_module(dict(source.config), attention, query_chunk), source.state_dict(), map_unet_weights, dtype)


def load_text_encoder(
    source: nn.Module, attention: AttentionImpl | str, hidden_layer: int | None = None, dtype: torch.dtype = torch.float32
) -> CLIPTextEncoder:
    """A ``CLIPTextEncoder`` from a transformers ``CLIPTextModel`` (sharing its weights);
    ``hidden_layer`` as in ``CLIPTextEncoder`` (SDXL's first encoder: -2)."""
    model = text_encoder_module(source.config.to_dict(), attention, hidden_layer)
    return load_weights(model, source.state_dict(), map_clip_weights, dtype)


def load_text_encoder_with_projection(
    source: nn.Module, attention: AttentionImpl | str, hidden_layer: int | None = None, dtype: torch.dtype = torch.float32
) -> CLIPTextEncoder:
    """A ``CLIPTextEncoder`` whose pooled output is ``text_embeds``, from a transformers
    ``CLIPTextModelWithProjection`` (SDXL's second encoder, with ``hidden_layer=-2``).

    Its keys are ``text_projection.weight`` (projection_dim, hidden_size) beside the text model's,
    which carry the ``text_model.`` prefix in transformers 5.x as in 4.x and in the published
    files (unlike a 5.x ``CLIPTextModel``, whose own keys have lost it); ``map_clip_weights``
    takes either, and a plain ``CLIPTextModel`` is refused for lacking the projection.
    """
    model = text_encoder_module(source.config.to_dict(), attention, hidden_layer, projection=True)
    return load_weights(model, source.state_dict(), map_clip_weights, dtype)


def load_vae_decoder(
    source: nn.Module, attention: AttentionImpl | str, query_chunk: int = 512, dtype: torch.dtype = torch.float32
) -> VAEDecoder:
    """A ``VAEDecoder`` from a diffusers ``AutoencoderKL``."""
    model = vae_decoder_module(dict(source.config), attention, query_chunk)
    return load_weights(model, source.state_dict(), map_vae_decoder_weights, dtype)


def load_vae_encoder(
    source: nn.Module, attention: AttentionImpl | str, query_chunk: int = 512, dtype: torch.dtype = torch.float32
) -> VAEEncoder:
    """A ``VAEEncoder`` from a diffusers ``AutoencoderKL``."""
    model = vae_encoder_module(dict(source.config), attention, query_chunk)
    return load_weights(model, source.state_dict(), map_vae_encoder_weights, dtype)
