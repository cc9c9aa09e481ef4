"""The CLIP text encoders of Stable Diffusion, laid out for the Neural Engine.

Input: ``input_ids`` (B, 77) as float (Core ML programs take token ids as float32; they are
exact integers below 2**24). The residual stream runs as (B, C, 1, 77) in between. Two outputs:

* hidden states (B, 77, C): by default ``last_hidden_state``, the last layer's output after the
  final LayerNorm, as SD 1.x / 2.x condition on it. With ``hidden_layer`` set, transformers'
  ``hidden_states[hidden_layer]`` instead (0 = the embeddings, -1 = the last layer), which never
  passes the final LayerNorm: SDXL conditions on ``-2`` of both its encoders (Apple's name for this
  output: ``hidden_embeds``).
* ``pooled_outputs`` (B, C): the final-LayerNorm output of the last layer at the first
  end-of-text token (transformers' ``pooler_output``, whichever ``hidden_layer``); with a
  ``projection_dim``, that vector through the bias-free ``text_projection`` instead, (B, P):
  ``text_embeds`` of a ``CLIPTextModelWithProjection`` (SDXL's second encoder).

Built from a ``CLIPTextConfig``; weights come from a transformers ``CLIPTextModel`` through
``model_io.load_text_encoder``, or a ``CLIPTextModelWithProjection`` through
``model_io.load_text_encoder_with_projection``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import MASK_VALUE, Attention, AttentionImpl
from .layer_norm import LayerNormBC1S

_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_length: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int

    @classmethod
    def from_transformers(cls, cfg: dict[str, Any]) -> CLIPTextConfig:
        if cfg.get("hidden_act") not in _ACTIVATIONS:
            raise ValueError(f"unsupported text encoder config: hidden_act={cfg.get('hidden_act')!r}")
        eos = cfg.get("eos_token_id", 2)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            max_length=cfg["max_position_embeddings"],
            hidden_act=cfg["hidden_act"],
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
            # Legacy configs carry eos_token_id 2, where the reference pools at argmax(id); the end
            # token has the largest id of the CLIP vocabulary, so that is where it sits.
            eos_token_id=eos if eos != 2 else cfg["vocab_size"] - 1,
        )


class MLP(nn.Module):
    def __init__(self, dim: int, inner: int, act: str):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, inner, 1)
        self.fc2 = nn.Conv2d(inner, dim, 1)
        self.quick = act == "quick_gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else nn.functional.gelu(h)
        return self.fc2(h)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, impl: AttentionImpl):
        super().__init__()
        self.layer_norm1 = LayerNormBC1S(cfg.hidden_size, cfg.layer_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads, impl, qkv_bias=True)
        self.layer_norm2 = LayerNormBC1S(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask=mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEncoder(nn.Module):
    def __init__(
        self,
        cfg: CLIPTextConfig,
        attention: AttentionImpl | str = AttentionImpl.SPLIT_EINSUM,
        hidden_layer: int | None = None,
        projection_dim: int | None = None,
    ):
        super().__init__()
        impl = AttentionImpl.parse(attention)
        self.cfg = cfg
        # hidden_after: the number of layers whose output is read (None: last_hidden_state, after the
        # final LayerNorm). transformers' hidden_states hold the embeddings, then each layer's output.
        if hidden_layer is None:
            self.hidden_after = None
        elif -(cfg.num_layers + 1) <= hidden_layer <= cfg.num_layers:
            self.hidden_after = hidden_layer % (cfg.num_layers + 1)
        else:
            raise ValueError(f"hidden_layer {hidden_layer} is outside the {cfg.num_layers + 1} hidden states of this encoder")
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.hidden_size)
        self.layers = nn.ModuleList(EncoderLayer(cfg, impl) for _ in range(cfg.num_layers))
        self.final_layer_norm = LayerNormBC1S(cfg.hidden_size, cfg.layer_norm_eps)
        # None adds no parameter: SD 1.x / 2.x weight keys stay as they are.
        self.text_projection = None if projection_dim is None else nn.Conv2d(cfg.hidden_size, projection_dim, 1, bias=False)
        for name, value in self.constant_buffers().items():
            self.register_buffer(name, value, persistent=False)

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers computed from the config, not loaded (rebuilt after a meta-device construction)."""
        s = self.cfg.max_length
        # Causal mask in the (1, S_k, 1, S_q) layout of the attention weights: key k is hidden
        # from query q when k > q.
        keys, queries = torch.arange(s, device="cpu")[:, None], torch.arange(s, device="cpu")[None, :]
        causal = torch.where(keys > queries, MASK_VALUE, 0.0).view(1, s, 1, s)
        return {"causal_mask": causal}

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, 77) float or int -> hidden states (B, 77, C), pooled_outputs (B, C or P)."""
        ids = input_ids.long()
        x = self.token_embedding(ids) + self.position_embedding.weight[None]  # (B, S, C)
        x = x.transpose(1, 2).unsqueeze(2)  # (B, C, 1, S)
        # Every layer runs whichever hidden state is read: the pooled output needs the last one.
        chosen = x if self.hidden_after == 0 else None
        for n, layer in enumerate(self.layers, start=1):
            x = layer(x, self.causal_mask)
            if n == self.hidden_after:
                chosen = x
        x = self.final_layer_norm(x)
        final = x.squeeze(2).transpose(1, 2)  # (B, S, C)
        hidden = final if chosen is None else chosen.squeeze(2).transpose(1, 2)
        # Pool at the first end-of-text token: argmax returns the first maximum.
        eos_at = (ids == self.cfg.eos_token_id).int().argmax(dim=1)
        pooled = final[torch.arange(final.shape[0]), eos_at]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled[:, :, None, None]).flatten(1)  # (B, P)
        return hidden, pooled
