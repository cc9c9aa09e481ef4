"""Each Neural-Engine-shaped wrapper against the diffusers / transformers module it loads from.

Same weights, same inputs, float32: relative error (max abs difference over max abs reference)
below 1e-4. The tiny models have both families' structural variants (int vs per-block head
counts, conv vs linear projections, quick_gelu vs gelu), and v2 runs with a query chunk that
leaves a partial last chunk at every attention resolution.
"""

from __future__ import annotations

import pytest
import torch

from coreml_sd.models import AttentionImpl, load_text_encoder, load_unet, load_vae_decoder, load_vae_encoder
from coreml_sd.testing.tiny_pipelines import tiny_text_encoder, tiny_unet, tiny_vae
from helpers import FAMILIES, prompt_ids, rel_err

IMPLS = list(AttentionImpl)
TOL = 1e-4
CHUNK = 24  # 8x8 latents: 64 = 2*24 + 16 tokens; mid block 4x4: 16 < 24


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.mark.parametrize("impl", IMPLS)
def test_unet(family, impl):
    ref = tiny_unet(family, sample_size=8, seed=1)
    g = torch.Generator().manual_seed(0)
    ctx_dim = ref.config.cross_attention_dim
    sample = torch.randn(2, 4, 8, 8, generator=g)
    timestep = torch.tensor([981.0, 3.5])  # fractional timesteps occur with Euler schedules
    context = torch.randn(2, 77, ctx_dim, generator=g)
    ours = load_unet(ref, impl, query_chunk=CHUNK)
    with torch.no_grad():
        want = ref(sample, timestep, context).sample
        got = ours(sample, timestep, context.transpose(1, 2).unsqueeze(2))  # (B, C, 1, 77)
    assert rel_err(got, want) < TOL
    # The output depends on the text: a parity test on a model that ignores it proves little.
    with torch.no_grad():
        other = ref(sample, timestep, torch.randn(2, 77, ctx_dim, generator=g)).sample
    assert rel_err(other, want) > 1e-3


# 49407: the end-of-text id, as current configs give it. 2: the legacy value of every published
# SD 1.x / 2.x text encoder config, for which transformers pools at the largest input id instead.
@pytest.mark.parametrize("eos_token_id", [49407, 2])
@pytest.mark.parametrize("impl", IMPLS)
def test_text_encoder(family, impl, eos_token_id):
    ref = tiny_text_encoder(family, seed=2, eos_token_id=eos_token_id)
    assert ref.config.eos_token_id == eos_token_id
    pad = 49407 if family == "sd1" else 0  # SD 1.x pads with the end token, SD 2.x with "!"
    ids = prompt_ids(pad)
    ours = load_text_encoder(ref, impl)
    with torch.no_grad():
        want = ref(ids)
        hidden, pooled = ours(ids.float())  # Core ML feeds ids as float32
    assert rel_err(hidden, want.last_hidden_state) < TOL
    assert rel_err(pooled, want.pooler_output) < TOL
    # Pooled output is taken at each prompt's own end token, not a fixed position.
    assert torch.allclose(pooled[0], hidden[0, 6]) and torch.allclose(pooled[1], hidden[1, 40])


@pytest.mark.parametrize("impl", IMPLS)
def test_vae_decoder(family, impl):
    ref = tiny_vae(family, sample_size=8, seed=3)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ours = load_vae_decoder(ref, impl, query_chunk=CHUNK)
    with torch.no_grad():
        want = ref.decode(z).sample
        got = ours(z)
    assert got.shape == (1, 3, 64, 64)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_vae_encoder(family, impl):
    ref = tiny_vae(family, sample_size=8, seed=3)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    ours = load_vae_encoder(ref, impl, query_chunk=CHUNK)
    with torch.no_grad():
        dist = ref.encode(image).latent_dist
        got = ours(image)
    assert got.shape == (1, 8, 8, 8)
    assert rel_err(got[:, :4], dist.mean) < TOL
    assert rel_err(got[:, 4:], dist.logvar) < TOL


def test_weights_are_shared_not_copied():
    """Peak memory during conversion: the wrapper must alias the source tensors."""
    ref = tiny_unet("sd1", seed=0)
    ours = load_unet(ref, AttentionImpl.SPLIT_EINSUM)
    src = ref.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    dst = ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert dst.shape == (*src.shape, 1, 1)
    assert dst.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()


def test_mismatched_weights_are_refused():
    from coreml_sd.models.model_io import load_weights, map_unet_weights
    from coreml_sd.models.unet import UNet, UNetConfig

    ref = tiny_unet("sd1", seed=0)
    state = ref.state_dict()
    model = UNet(UNetConfig.from_diffusers(dict(ref.config)))
    with pytest.raises(ValueError, match="missing"):
        load_weights(model, {k: v for k, v in state.items() if "conv_out" not in k}, map_unet_weights)
    state["conv_in.weight"] = state["conv_in.weight"][:, :3]
    with pytest.raises(ValueError, match="conv_in.weight: source shape"):
        load_weights(model, state, map_unet_weights)


def test_unsupported_unet_config_is_named():
    from coreml_sd.models.unet import UNetConfig

    cfg = dict(tiny_unet("sd1").config)
    cfg["addition_embed_type"] = "text_time"  # SDXL
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        UNetConfig.from_diffusers(cfg)
