"""The Stable Diffusion VAE (AutoencoderKL) halves: decoder and encoder.

``VAEDecoder``: ``z`` (B, 4, h, w) *unscaled* latents (the caller divides by the checkpoint's
scaling factor, as Apple's Swift pipeline does) -> ``image`` (B, 3, 8h, 8w) in [-1, 1] (not
clamped). ``post_quant_conv`` is part of it.
``VAEEncoder``: ``x`` (B, 3, H, W) image in [-1, 1] -> ``latent`` (B, 8, H/8, W/8): the Gaussian's
mean (channels 0-3) and log-variance (4-7) after ``quant_conv``; sampling and scaling stay with
the caller.

Convolutions work on (B, C, H, W); the single-head mid-block attention switches to (B, C, 1, H*W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, AttentionImpl
from .resnet import Downsample, ResnetBlock, Upsample

_EPS = 1e-6  # every GroupNorm of the SD VAE


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> VAEConfig:
        for key, ok in (
            ("mid_block_add_attention", True),
            ("use_quant_conv", True),
            ("use_post_quant_conv", True),
            ("act_fn", "silu"),
            ("force_upcast", None),  # any value: a runtime hint, not architecture
        ):
            if ok is not None and key in cfg and cfg[key] != ok:
                raise ValueError(f"unsupported VAE config: {key}={cfg[key]!r}")
        if any(t != "DownEncoderBlock2D" for t in cfg["down_block_types"]) or any(
            t != "UpDecoderBlock2D" for t in cfg["up_block_types"]
        ):
            raise ValueError("unsupported VAE config: only DownEncoderBlock2D / UpDecoderBlock2D blocks")
        n, down, up = len(cfg["block_out_channels"]), len(cfg["down_block_types"]), len(cfg["up_block_types"])
        if down != n or up != n:
            raise ValueError(f"unsupported VAE config: {n} block_out_channels for {down} down and {up} up blocks")
        if cfg.get("shift_factor") not in (None, 0, 0.0):
            raise ValueError(f"unsupported VAE config: shift_factor={cfg['shift_factor']!r}")
        return cls(
            in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"],
            latent_channels=cfg["latent_channels"],
            block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=cfg["layers_per_block"],
            norm_num_groups=cfg["norm_num_groups"],
        )


class MidBlock(nn.Module):
    """Resnet, single-head self-attention over all pixels, resnet."""

    def __init__(self, c: int, groups: int, impl: AttentionImpl, query_chunk: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups, _EPS), ResnetBlock(c, c, groups, _EPS)])
        self.group_norm = nn.GroupNorm(groups, c, eps=_EPS)
        self.attention = Attention(c, 1, impl, qkv_bias=True, query_chunk=query_chunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        b, c, h, w = x.shape
        y = self.attention(self.group_norm(x).view(b, c, 1, h * w)).view(b, c, h, w)
        return self.resnets[1](x + y)


class _Level(nn.Module):
    def __init__(self, resnets: list[ResnetBlock]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)


class VAEDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig, attention: AttentionImpl | str = AttentionImpl.SPLIT_EINSUM, query_chunk: int = 512):
        super().__init__()
        impl, ch, g = AttentionImpl.parse(attention), cfg.block_out_channels, cfg.norm_num_groups
        self.cfg = cfg
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid_block = MidBlock(ch[-1], g, impl, query_chunk)
        rev = list(reversed(ch))
        self.up_blocks = nn.ModuleList()
        c_prev = rev[0]
        for i, c in enumerate(rev):
            level = _Level([ResnetBlock(c_prev if j == 0 else c, c, g, _EPS) for j in range(cfg.layers_per_block + 1)])
            level.upsamplers = nn.ModuleList([Upsample(c)]) if i < len(rev) - 1 else None
            self.up_blocks.append(level)
            c_prev = c
        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, 4, h, w), unscaled -> image (B, 3, 8h, 8w) in about [-1, 1]."""
        x = self.mid_block(self.conv_in(self.post_quant_conv(z)))
        for level in self.up_blocks:
            for res in level.resnets:
                x = res(x)
            if level.upsamplers is not None:
                x = level.upsamplers[0](x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAEEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig, attention: AttentionImpl | str = AttentionImpl.SPLIT_EINSUM, query_chunk: int = 512):
        super().__init__()
        impl, ch, g = AttentionImpl.parse(attention), cfg.block_out_channels, cfg.norm_num_groups
        self.cfg = cfg
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        c_prev = ch[0]
        for i, c in enumerate(ch):
            level = _Level([ResnetBlock(c_prev if j == 0 else c, c, g, _EPS) for j in range(cfg.layers_per_block)])
            level.downsamplers = nn.ModuleList([Downsample(c, asymmetric_pad=True)]) if i < len(ch) - 1 else None
            self.down_blocks.append(level)
            c_prev = c
        self.mid_block = MidBlock(ch[-1], g, impl, query_chunk)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> latent moments (B, 8, H/8, W/8): mean, then log-variance."""
        h = self.conv_in(x)
        for level in self.down_blocks:
            for res in level.resnets:
                h = res(h)
            if level.downsamplers is not None:
                h = level.downsamplers[0](h)
        h = self.mid_block(h)
        return self.quant_conv(self.conv_out(F.silu(self.conv_norm_out(h))))
