"""The Stable Diffusion 1.x / 2.x / XL UNet, laid out for the Neural Engine.

Inputs as Core ML receives them: ``sample`` (B, 4, h, w) latents, ``timestep`` (B,) float and
``encoder_hidden_states`` (B, C_text, 1, 77), the text embeddings already in (B, C, 1, S) layout;
SDXL UNets (``addition_embed_type="text_time"``) also take ``text_embeds`` (B, P), the pooled
text embedding, and ``time_ids`` (B, N), the size and crop conditioning (N = 6: original size,
crop offset, target size) or, for the refiner, N = 5 (the target size replaced by an aesthetic
score). Output: the model prediction (B, 4, h, w) (noise or v, per the checkpoint).

Inside the transformer blocks activations are (B, C, 1, H*W); linear layers are 1x1
convolutions, LayerNorm works over channels, attention is one of ``AttentionImpl``. The module is
built from a ``UNetConfig``; weights come from a diffusers ``UNet2DConditionModel`` through
``model_io.load_unet`` (a reshape of linear weights, nothing else).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, AttentionImpl
from .layer_norm import LayerNormBC1S
from .resnet import Downsample, ResnetBlock, Upsample

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_block(value: Any, n: int, name: str) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n:
        raise ValueError(f"unsupported UNet config: {name} has {len(values)} entries for {n} blocks")
    return values


@dataclass(frozen=True)
class UNetConfig:
    """The architecture fields of a diffusers ``UNet2DConditionModel`` config that SD 1.x/2.x/XL use."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    cross_attention_dim: int
    num_heads: tuple[int, ...]  # per down block (diffusers' historical `attention_head_dim`)
    transformer_layers: tuple[int, ...]  # per down block
    use_linear_projection: bool
    norm_num_groups: int
    norm_eps: float
    flip_sin_to_cos: bool
    freq_shift: float
    # SDXL's "text_time" addition embedding (None without it): the width of each time id's
    # sinusoidal features, and the input width of ``add_embedding`` (P + N * that width; diffusers
    # calls it ``projection_class_embeddings_input_dim``).
    addition_time_embed_dim: int | None = None
    addition_embed_dim: int | None = None

    # Config values under which these fields mean what this module computes; anything else in
    # a checkpoint's config is refused by name rather than silently converted wrong.
    _REQUIRED = {
        "mid_block_type": ("UNetMidBlock2DCrossAttn",),
        "class_embed_type": (None,),
        "addition_embed_type": (None, "text_time"),
        "encoder_hid_dim": (None,),
        "time_embedding_type": ("positional",),
        "time_cond_proj_dim": (None,),
        "resnet_time_scale_shift": ("default",),
        "act_fn": ("silu",),
        "center_input_sample": (False,),
        "dual_cross_attention": (False,),
        "only_cross_attention": (False,),
        "conv_in_kernel": (3,),
        "conv_out_kernel": (3,),
        "mid_block_scale_factor": (1, 1.0),
        "downsample_padding": (1,),
        "num_class_embeds": (None,),
        "attention_type": ("default",),
        "reverse_transformer_layers_per_block": (None,),
        "encoder_hid_dim_type": (None,),
        "resnet_skip_time_act": (False,),
        "resnet_out_scale_factor": (1, 1.0),
        "time_embedding_dim": (None,),
        "time_embedding_act_fn": (None,),
        "timestep_post_act": (None,),
        "class_embeddings_concat": (False,),
        "mid_block_only_cross_attention": (None, False),
        "cross_attention_norm": (None,),
    }

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> UNetConfig:
        for key, allowed in cls._REQUIRED.items():
            if key in cfg and cfg[key] not in allowed and not (isinstance(cfg[key], list) and not any(cfg[key])):
                raise ValueError(f"unsupported UNet config: {key}={cfg[key]!r}")
        n = len(cfg["block_out_channels"])
        down, up = tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"])
        if len(down) != n or len(up) != n:
            raise ValueError(f"unsupported UNet config: {n} block_out_channels for {len(down)} down and {len(up)} up blocks")
        for t in down:
            if t not in _DOWN:
                raise ValueError(f"unsupported UNet down block {t!r}")
        for t in up:
            if t not in _UP:
                raise ValueError(f"unsupported UNet up block {t!r}")
        heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
        if not isinstance(cfg["layers_per_block"], int):
            raise ValueError("unsupported UNet config: layers_per_block per block")
        transformer_layers = _per_block(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
        if not all(isinstance(layers, int) for layers in transformer_layers):
            raise ValueError(f"unsupported UNet config: transformer_layers_per_block={cfg['transformer_layers_per_block']!r}")
        time_dim, embed_dim = cls._text_time(cfg)
        return cls(
            in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"],
            block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=cfg["layers_per_block"],
            down_block_types=down,
            up_block_types=up,
            cross_attention_dim=cfg["cross_attention_dim"],
            num_heads=_per_block(heads, n, "attention heads"),
            transformer_layers=transformer_layers,
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
            freq_shift=cfg.get("freq_shift", 0),
            addition_time_embed_dim=time_dim,
            addition_embed_dim=embed_dim,
        )

    @staticmethod
    def _text_time(cfg: dict[str, Any]) -> tuple[int | None, int | None]:
        """(addition_time_embed_dim, projection input width) of an SDXL config, (None, None) otherwise."""
        time_dim, embed_dim = cfg.get("addition_time_embed_dim"), cfg.get("projection_class_embeddings_input_dim")
        if cfg.get("addition_embed_type") != "text_time":
            # diffusers reads the projection width only for an addition or class embedding: refused
            # above, so a width here would describe weights this module does not have.
            if embed_dim is not None:
                raise ValueError(f"unsupported UNet config: projection_class_embeddings_input_dim={embed_dim!r}")
            return None, None
        if not isinstance(time_dim, int) or not isinstance(embed_dim, int):
            raise ValueError(
                "unsupported UNet config: addition_embed_type='text_time' needs addition_time_embed_dim and "
                f"projection_class_embeddings_input_dim, not {time_dim!r} and {embed_dim!r}"
            )
        if time_dim % 2:  # diffusers zero-pads odd widths; no published model has one
            raise ValueError(f"unsupported UNet config: addition_time_embed_dim={time_dim!r} (odd)")
        return time_dim, embed_dim


class FeedForward(nn.Module):
    """GEGLU: project to 2x the inner width, gate one half with GELU of the other."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.proj_in = nn.Conv2d(dim, inner * 2, 1)
        self.proj_out = nn.Conv2d(inner, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj_in(x).chunk(2, dim=1)
        return self.proj_out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention over the text, feed-forward; each pre-normed and residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, impl: AttentionImpl, eps: float, query_chunk: int):
        super().__init__()
        self.norm1 = LayerNormBC1S(dim, eps)
        self.attn1 = Attention(dim, heads, impl, query_chunk=query_chunk)
        self.norm2 = LayerNormBC1S(dim, eps)
        self.attn2 = Attention(dim, heads, impl, context_dim=context_dim, query_chunk=query_chunk)
        self.norm3 = LayerNormBC1S(dim, eps)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, 1, S); context: (B, C_text, 1, 77)."""
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 projection into (B, C, 1, H*W), transformer blocks, projection back, residual."""

    def __init__(self, channels: int, heads: int, layers: int, cfg: UNetConfig, impl: AttentionImpl, query_chunk: int):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, cfg.cross_attention_dim, impl, cfg.norm_eps, query_chunk)
            for _ in range(layers)
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).view(b, c, 1, h * w)
        for block in self.transformer_blocks:
            y = block(y, context)
        return self.proj_out(y.view(b, c, h, w)) + x


class _Stage(nn.Module):
    """One resolution level: resnets, each optionally followed by a spatial transformer."""

    def __init__(self, resnets: list[ResnetBlock], attentions: list[SpatialTransformer] | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig, attention: AttentionImpl | str = AttentionImpl.SPLIT_EINSUM, query_chunk: int = 512):
        super().__init__()
        impl = AttentionImpl.parse(attention)
        self.cfg = cfg
        ch = cfg.block_out_channels
        temb = ch[0] * 4
        groups, eps = cfg.norm_num_groups, cfg.norm_eps

        def resnet(c_in: int, c_out: int) -> ResnetBlock:
            return ResnetBlock(c_in, c_out, groups, eps, temb)

        def transformer(c: int, level: int) -> SpatialTransformer:
            return SpatialTransformer(c, cfg.num_heads[level], cfg.transformer_layers[level], cfg, impl, query_chunk)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = nn.ModuleDict({"linear_1": nn.Conv2d(ch[0], temb, 1), "linear_2": nn.Conv2d(temb, temb, 1)})
        self.add_embedding = None
        if cfg.addition_embed_dim is not None:
            self.add_embedding = nn.ModuleDict(
                {"linear_1": nn.Conv2d(cfg.addition_embed_dim, temb, 1), "linear_2": nn.Conv2d(temb, temb, 1)}
            )

        self.down_blocks = nn.ModuleList()
        c_prev = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            cross = kind == "CrossAttnDownBlock2D"
            resnets = [resnet(c_prev if j == 0 else ch[i], ch[i]) for j in range(cfg.layers_per_block)]
            attns = [transformer(ch[i], i) for _ in resnets] if cross else None
            stage = _Stage(resnets, attns)
            stage.downsamplers = nn.ModuleList([Downsample(ch[i])]) if i < len(ch) - 1 else None
            self.down_blocks.append(stage)
            c_prev = ch[i]

        self.mid_block = _Stage([resnet(ch[-1], ch[-1]), resnet(ch[-1], ch[-1])], [transformer(ch[-1], len(ch) - 1)])

        # Up path: channels reversed; each stage eats layers_per_block + 1 skip connections.
        rev = list(reversed(ch))
        skips = self._skip_channels()
        self.up_blocks = nn.ModuleList()
        c_prev = rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            level = len(ch) - 1 - i
            resnets = []
            for _ in range(cfg.layers_per_block + 1):
                resnets.append(resnet(c_prev + skips.pop(), rev[i]))
                c_prev = rev[i]
            attns = [transformer(rev[i], level) for _ in resnets] if kind == "CrossAttnUpBlock2D" else None
            stage = _Stage(resnets, attns)
            stage.upsamplers = nn.ModuleList([Upsample(rev[i])]) if i < len(ch) - 1 else None
            self.up_blocks.append(stage)

        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        for name, value in self.constant_buffers().items():
            self.register_buffer(name, value, persistent=False)

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers computed from the config, not loaded (rebuilt after a meta-device construction)."""
        buffers = {"time_freqs": self._frequencies(self.cfg.block_out_channels[0])}
        if self.cfg.addition_time_embed_dim is not None:
            buffers["add_time_freqs"] = self._frequencies(self.cfg.addition_time_embed_dim)
        return buffers

    def _frequencies(self, width: int) -> torch.Tensor:
        """The width // 2 frequencies of diffusers' ``get_timestep_embedding`` (max period 10000)."""
        half = width // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device="cpu") / (half - self.cfg.freq_shift)
        return torch.exp(exponent)

    def _skip_channels(self) -> list[int]:
        """Channels of each skip tensor the down path leaves, in push order."""
        ch, out = self.cfg.block_out_channels, [self.cfg.block_out_channels[0]]
        for i in range(len(ch)):
            out += [ch[i]] * self.cfg.layers_per_block
            if i < len(ch) - 1:
                out.append(ch[i])
        return out

    def _sinusoid(self, args: torch.Tensor) -> torch.Tensor:
        """sin and cos of phases (..., F), concatenated in the config's order: (..., 2F)."""
        sin, cos = torch.sin(args), torch.cos(args)
        return torch.cat([cos, sin] if self.cfg.flip_sin_to_cos else [sin, cos], dim=-1)

    def time_features(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sinusoidal features of the (possibly fractional) timesteps: (B,) -> (B, C0, 1, 1)."""
        args = timestep.float()[:, None] * self.time_freqs[None, :]
        return self._sinusoid(args)[:, :, None, None]

    def time_ids_features(self, time_ids: torch.Tensor) -> torch.Tensor:
        """Sinusoidal features of each time id, one id's after another: (B, N) -> (B, N*D, 1, 1).

        Computed like ``time_features`` from the input alone up to the concatenation, because the
        ids are sizes of up to ~1024 and the phases need float32 just as the timestep's do (see
        ``convert/export.float32_features_of``, which keeps these ops float32 when the input is
        listed); the features, in [-1, 1], are rounded to float16 where they meet ``text_embeds``.
        """
        b = time_ids.shape[0]
        args = time_ids.float()[:, :, None] * self.add_time_freqs[None, None, :]  # (B, N, D/2)
        return self._sinusoid(args).reshape(b, -1, 1, 1)

    def text_time_embedding(self, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """SDXL's addition to the time embedding: text_embeds (B, P), time_ids (B, N) -> (B, 4*C0, 1, 1)."""
        b, p = text_embeds.shape
        n = time_ids.shape[1]
        if p + n * self.cfg.addition_time_embed_dim != self.cfg.addition_embed_dim:
            raise ValueError(
                f"text_embeds width {p} and {n} time ids of {self.cfg.addition_time_embed_dim} features do not "
                f"make the add_embedding input width {self.cfg.addition_embed_dim}"
            )
        features = torch.cat([text_embeds.reshape(b, p, 1, 1), self.time_ids_features(time_ids)], dim=1)
        emb = self.add_embedding["linear_1"](features)
        return self.add_embedding["linear_2"](F.silu(emb))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample (B, 4, h, w), timestep (B,), encoder_hidden_states (B, C_text, 1, 77) -> (B, 4, h, w);
        text_embeds (B, P) and time_ids (B, N) exactly when the config has the text-time embedding."""
        context = encoder_hidden_states
        temb = self.time_embedding["linear_1"](self.time_features(timestep))
        temb = self.time_embedding["linear_2"](F.silu(temb))  # (B, 4*C0, 1, 1)
        if (text_embeds is None, time_ids is None) != (self.add_embedding is None,) * 2:
            wanted = "needs" if self.add_embedding is not None else "takes no"
            raise ValueError(f"this UNet {wanted} text_embeds and time_ids")
        if self.add_embedding is not None:
            temb = temb + self.text_time_embedding(text_embeds, time_ids)

        x = self.conv_in(sample)
        skips = [x]
        for stage in self.down_blocks:
            for j, res in enumerate(stage.resnets):
                x = res(x, temb)
                if stage.attentions is not None:
                    x = stage.attentions[j](x, context)
                skips.append(x)
            if stage.downsamplers is not None:
                x = stage.downsamplers[0](x)
                skips.append(x)

        x = self.mid_block.resnets[0](x, temb)
        x = self.mid_block.attentions[0](x, context)
        x = self.mid_block.resnets[1](x, temb)

        for stage in self.up_blocks:
            for j, res in enumerate(stage.resnets):
                x = res(torch.cat([x, skips.pop()], dim=1), temb)
                if stage.attentions is not None:
                    x = stage.attentions[j](x, context)
            if stage.upsamplers is not None:
                x = stage.upsamplers[0](x)

        return self.conv_out(F.silu(self.conv_norm_out(x)))
