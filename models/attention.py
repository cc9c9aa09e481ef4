"""Scaled dot-product attention in the Neural Engine's (batch, channels, 1, sequence) layout.

Every tensor here is 4-D, ``(B, C, 1, S)``: channels on axis 1 and the sequence on the last axis,
so that linear layers are 1x1 convolutions and no transpose of a large activation is needed
(the layout the Neural Engine executes natively).

Three implementations, chosen by a constructor argument (never a global switch):

``original``
    All heads at once through a (B, heads, dh, S) view. Fewest ops; what the GPU likes.
``split-einsum``
    One branch per head, each an einsum over explicit channel slices, weights laid out as
    (B, S_k, 1, S_q) with the softmax over the key axis. Avoids the multi-head reshape, which the
    Neural Engine handles poorly.
``split-einsum-v2``
    As split-einsum, with the queries also cut into chunks of ``query_chunk`` so that no
    (S_k, S_q) weight tensor grows past what the Neural Engine holds at large latents. Chunking
    is exact at every length: the last, shorter chunk is computed too. (A widely used reference
    implementation computes only ``S_q // chunk`` full chunks and drops the remaining queries, e.g.
    at 48x48 latents: 2304 tokens = 4 x 512 + 256.)

Float16 note: the softmax scale dh**-0.5 is applied as dh**-0.25 to both q and k *before* the
product, so q.k stays within float16 range where scaling afterwards would overflow to inf first
(the failure that diffusers' ``upcast_attention`` works around by running in float32; doing that
in Core ML would move every attention off the Neural Engine). coremltools folds these scalar
multiplications into the preceding 1x1 convolution weights, so they cost nothing at run time.
"""

from __future__ import annotations

import enum

import torch
from torch import nn

# A large negative for masked logits that float16 can hold: softmax still gives exactly 0 for it,
# while -inf or finfo(float32).min turn into NaN/inf in a float16 program.
MASK_VALUE = -1e4


class AttentionImpl(str, enum.Enum):
    ORIGINAL = "original"
    SPLIT_EINSUM = "split-einsum"
    SPLIT_EINSUM_V2 = "split-einsum-v2"

    @classmethod
    def parse(cls, value: str | AttentionImpl) -> AttentionImpl:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown attention implementation {value!r} (use one of: {names})") from None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    impl: AttentionImpl,
    mask: torch.Tensor | None = None,
    query_chunk: int = 512,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh) + mask) v, per head.

    q: (B, C, 1, S_q); k, v: (B, C, 1, S_k); mask: additive, (1 or B, S_k, 1, S_q) (keys on axis 1,
    as the split-einsum weights). Returns (B, C, 1, S_q). C = heads * dh.
    """
    b, c, _, s_q = q.shape
    dh = c // heads
    scale = dh**-0.25  # applied to both q and k: see the float16 note in the module docstring
    q, k = q * scale, k * scale
    if impl is AttentionImpl.ORIGINAL:
        return _all_heads(q, k, v, heads, mask)
    chunk = query_chunk if impl is AttentionImpl.SPLIT_EINSUM_V2 else s_q
    k_t = k.transpose(1, 3)  # (B, S_k, 1, C): head slices become last-axis slices
    out = []
    for h in range(heads):
        lo, hi = h * dh, (h + 1) * dh
        q_h, k_h, v_h = q[:, lo:hi], k_t[:, :, :, lo:hi], v[:, lo:hi]
        # Chunk the queries; range(0, s_q, chunk) includes the final partial chunk.
        for start in range(0, s_q, chunk):
            stop = min(start + chunk, s_q)
            q_c = q_h if (start, stop) == (0, s_q) else q_h[:, :, :, start:stop]
            weights = torch.einsum("bchq,bkhc->bkhq", q_c, k_h)  # (B, S_k, 1, q)
            if mask is not None:
                weights = weights + (mask if (start, stop) == (0, s_q) else mask[:, :, :, start:stop])
            weights = weights.softmax(dim=1)  # over keys
            out.append(torch.einsum("bkhq,bchk->bchq", weights, v_h))  # (B, dh, 1, q)
    if chunk >= s_q:
        return torch.cat(out, dim=1)
    n_chunks = -(-s_q // chunk)
    per_head = [torch.cat(out[h * n_chunks : (h + 1) * n_chunks], dim=3) for h in range(heads)]
    return torch.cat(per_head, dim=1)


def _all_heads(q, k, v, heads, mask):
    b, c, _, s_q = q.shape
    dh = c // heads
    q = q.view(b, heads, dh, s_q)  # (B, h, dh, S_q)
    k = k.view(b, heads, dh, -1)  # (B, h, dh, S_k)
    v = v.view(b, heads, dh, -1)
    weights = torch.einsum("bhcq,bhck->bhqk", q, k)  # (B, h, S_q, S_k)
    if mask is not None:
        weights = weights + mask.permute(0, 2, 3, 1)  # (B, S_k, 1, S_q) -> (B, 1, S_q, S_k)
    weights = weights.softmax(dim=3)
    out = torch.einsum("bhqk,bhck->bhcq", weights, v)  # (B, h, dh, S_q)
    return out.reshape(b, c, 1, s_q)


class Attention(nn.Module):
    """Multi-head attention with 1x1-convolution projections, on (B, C, 1, S) tensors.

    Self-attention when ``context`` is None, else cross-attention over ``context``
    (B, context_dim, 1, S_k). Parameter names follow diffusers' ``Attention`` (to_q, to_k, to_v,
    to_out) so the weight mapping is a reshape, not a rename.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        impl: AttentionImpl,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        query_chunk: int = 512,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        context_dim = context_dim or dim
        self.heads, self.impl, self.query_chunk = heads, AttentionImpl.parse(impl), query_chunk
        self.to_q = nn.Conv2d(dim, dim, 1, bias=qkv_bias)
        self.to_k = nn.Conv2d(context_dim, dim, 1, bias=qkv_bias)
        self.to_v = nn.Conv2d(context_dim, dim, 1, bias=qkv_bias)
        self.to_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        context = x if context is None else context
        out = attention(
            self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.impl, mask, self.query_chunk
        )
        return self.to_out(out)
