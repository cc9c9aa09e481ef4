"""Attention implementations against torch's own scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coreml_sd.models.attention import MASK_VALUE, AttentionImpl, attention
from coreml_sd.models.layer_norm import LayerNormBC1S
from helpers import rel_err

IMPLS = list(AttentionImpl)


def reference(q, k, v, heads, mask=None):
    """(B, C, 1, S) tensors through torch SDPA on (B, heads, S, dh)."""
    b, c, _, s_q = q.shape

    def split(x):
        return x.view(b, heads, c // heads, -1).transpose(2, 3)

    bias = None if mask is None else mask.permute(0, 2, 3, 1)  # (B, S_k, 1, S_q) -> (B, 1, S_q, S_k)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
    return out.transpose(2, 3).reshape(b, c, 1, s_q)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("s_q", "s_k", "heads", "chunk"),
    [(64, 77, 2, 512), (2304, 77, 1, 512), (2304, 2304, 1, 512), (50, 50, 4, 16)],
)
def test_matches_sdpa(impl, s_q, s_k, heads, chunk):
    """2304 tokens (48x48 latents: SD 2.x at 768 px) is 4 full 512-chunks plus 256 queries."""
    g = torch.Generator().manual_seed(s_q + s_k + heads)
    c = 8 * heads
    q, k, v = (torch.randn(2, c, 1, s, generator=g) for s in (s_q, s_k, s_k))
    got = attention(q, k, v, heads, impl, query_chunk=chunk)
    assert got.shape == (2, c, 1, s_q)
    assert rel_err(got, reference(q, k, v, heads)) < 1e-5


def test_v2_computes_the_last_partial_chunk():
    """The queries past the last full chunk must be attended like all others, not dropped or zeroed."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 1, 2304, generator=g) for _ in range(3))
    got = attention(q, k, v, 2, AttentionImpl.SPLIT_EINSUM_V2, query_chunk=512)
    tail = reference(q, k, v, 2)[..., 2048:]
    assert rel_err(got[..., 2048:], tail) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_mask(impl):
    s = 77
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 32, 1, s, generator=g) for _ in range(3))
    keys, queries = torch.arange(s)[:, None], torch.arange(s)[None, :]
    mask = torch.where(keys > queries, MASK_VALUE, 0.0).view(1, s, 1, s)
    got = attention(q, k, v, 4, impl, mask=mask, query_chunk=20)
    assert rel_err(got, reference(q, k, v, 4, mask)) < 1e-5
    # The first query sees only the first key: its output is that key's value.
    assert torch.allclose(got[..., 0], v[..., 0], atol=1e-5)


def test_float16_logits_stay_finite():
    """q.k of 60000-scale logits overflows float16 unless the scale is applied first."""
    q = torch.full((1, 64, 1, 4), 40.0, dtype=torch.float16)
    k = torch.full((1, 64, 1, 4), 40.0, dtype=torch.float16)  # q.k = 102400 > 65504; scaled: 12800
    v = torch.randn(1, 64, 1, 4).half()
    out = attention(q, k, v, 1, AttentionImpl.SPLIT_EINSUM)
    assert torch.isfinite(out).all()
    assert torch.isinf((q * k).sum(dim=1)).all()  # the unscaled product really overflows


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'.*split-einsum-v2"):
        AttentionImpl.parse("flash")


def test_layer_norm_matches_torch_and_survives_float16():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 96, 1, 7, generator=g) * 3 + 1
    ln = LayerNormBC1S(96)
    with torch.no_grad():
        ln.weight.normal_(generator=g)
        ln.bias.normal_(generator=g)
    ref = torch.nn.functional.layer_norm(x.squeeze(2).transpose(1, 2), (96,), ln.weight, ln.bias, 1e-5)
    assert rel_err(ln(x), ref.transpose(1, 2).unsqueeze(2)) < 1e-5
    # An outlier channel (as CLIP's residual stream has) at 2000 squares to 4e6, past float16's
    # 65504, while the variance itself (about 4e4) fits: the naive mean(c^2) gives inf/NaN.
    big = torch.randn(1, 96, 1, 5, generator=g).half()
    big[:, 7] = 2000.0
    out = ln.half()(big)
    assert torch.isfinite(out).all()
    centred = big - big.mean(dim=1, keepdim=True)
    assert torch.isinf((centred * centred).mean(dim=1)).all()
    ref16 = torch.nn.functional.layer_norm(
        big.float().squeeze(2).transpose(1, 2), (96,), ln.weight.float(), ln.bias.float(), 1e-5
    )
    assert rel_err(out.float(), ref16.transpose(1, 2).unsqueeze(2)) < 1e-2
