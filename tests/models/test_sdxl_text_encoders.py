"""SDXL's two text encoders against transformers, as diffusers' StableDiffusionXLPipeline reads them.

Encoder 1 is a ``CLIPTextModel`` (OpenAI CLIP ViT-L: quick_gelu, pads with the end token),
encoder 2 a ``CLIPTextModelWithProjection`` (OpenCLIP bigG: gelu, pads with "!", id 0). The UNet
gets each one's ``hidden_states[-2]`` (no final LayerNorm) and encoder 2's ``text_embeds``;
Apple's converter also outputs encoder 1's unprojected ``pooler_output``, which its Swift
pipeline reads and drops. The tiny encoders have three layers, so -2 is neither the embeddings
nor the last layer, and encoder 2 a projection_dim unlike its hidden_size, so that a transposed
projection cannot fit.

Same weights, same inputs, float32: relative error (max abs difference over max abs reference)
below 1e-4, as in test_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from coreml_sd.models import AttentionImpl, load_text_encoder, load_text_encoder_with_projection
from coreml_sd.testing.tiny_pipelines import init_weights, tiny_text_encoder, tiny_text_encoder_config
from helpers import prompt_ids, rel_err

IMPLS = list(AttentionImpl)
TOL = 1e-4
LAYERS = 3
PROJECTION_DIM = 48  # hidden_size of the sd2-shaped encoder is 64
# 2: what both of SDXL's published text encoder configs carry (legacy, so transformers pools at the
# largest id); 49407: the end-of-text id, as current configs give it.
EOS_TOKEN_IDS = [2, 49407]


def encoder_1(eos_token_id: int):
    return tiny_text_encoder("sd1", seed=11, num_hidden_layers=LAYERS, eos_token_id=eos_token_id)


def encoder_2(eos_token_id: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    fields = tiny_text_encoder_config("sd2") | {
        "architectures": ["CLIPTextModelWithProjection"],
        "num_hidden_layers": LAYERS,
        "projection_dim": PROJECTION_DIM,
        "eos_token_id": eos_token_id,
    }
    model = CLIPTextModelWithProjection(CLIPTextConfig(**fields))
    return init_weights(model, 12, "text_encoder_2").eval()


@pytest.mark.parametrize("eos_token_id", EOS_TOKEN_IDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_encoder_1(impl, eos_token_id):
    ref = encoder_1(eos_token_id)
    ids = prompt_ids(pad=49407)
    ours = load_text_encoder(ref, impl, hidden_layer=-2)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        hidden, pooled = ours(ids.float())  # Core ML feeds ids as float32
    assert len(want.hidden_states) == LAYERS + 1
    assert rel_err(hidden, want.hidden_states[-2]) < TOL
    assert rel_err(pooled, want.pooler_output) < TOL
    # Penultimate, not the last layer nor the LayerNorm'd output: they would fail the check above.
    assert rel_err(want.hidden_states[-1], want.hidden_states[-2]) > 1e-2
    assert rel_err(want.last_hidden_state, want.hidden_states[-2]) > 1e-2


@pytest.mark.parametrize("eos_token_id", EOS_TOKEN_IDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_encoder_2(impl, eos_token_id):
    ref = encoder_2(eos_token_id)
    ids = prompt_ids(pad=0)
    ours = load_text_encoder_with_projection(ref, impl, hidden_layer=-2)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        hidden, text_embeds = ours(ids.float())
        last = ref.text_model(ids).last_hidden_state
    assert text_embeds.shape == (2, PROJECTION_DIM)
    assert rel_err(hidden, want.hidden_states[-2]) < TOL
    assert rel_err(text_embeds, want.text_embeds) < TOL
    # The reference pools at each prompt's own end token (not at the first pad, id 0).
    at_eos = torch.stack([last[0, 6], last[1, 40]]) @ ref.text_projection.weight.T
    assert torch.allclose(want.text_embeds, at_eos, atol=1e-6)


@pytest.mark.parametrize("hidden_layer", range(-(LAYERS + 1), LAYERS + 1))
def test_every_hidden_layer(hidden_layer):
    """transformers' numbering: 0 the embeddings, -1 (= LAYERS) the last layer before its LayerNorm;
    the pooled output stays the last layer's whichever is read."""
    ref = encoder_1(49407)
    ids = prompt_ids(pad=49407)
    ours = load_text_encoder(ref, AttentionImpl.ORIGINAL, hidden_layer=hidden_layer)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        hidden, pooled = ours(ids.float())
    assert rel_err(hidden, want.hidden_states[hidden_layer]) < TOL
    assert rel_err(pooled, want.pooler_output) < TOL


def test_hidden_layer_out_of_range_is_refused():
    from coreml_sd.models.clip import CLIPTextConfig, CLIPTextEncoder

    cfg = CLIPTextConfig.from_transformers(encoder_1(2).config.to_dict())
    for bad in (LAYERS + 1, -(LAYERS + 2)):
        with pytest.raises(ValueError, match=f"hidden_layer {bad} is outside the {LAYERS + 1} hidden states"):
            CLIPTextEncoder(cfg, hidden_layer=bad)


def test_sd_1_and_2_encoder_is_unchanged():
    """No projection and no hidden_layer: the same keys and outputs as before SDXL."""
    ref = encoder_1(49407)
    ours = load_text_encoder(ref, AttentionImpl.SPLIT_EINSUM)
    assert not any("projection" in key for key in ours.state_dict())
    with torch.no_grad():
        want = ref(prompt_ids(pad=49407))
        hidden, pooled = ours(prompt_ids(pad=49407).float())
    assert rel_err(hidden, want.last_hidden_state) < TOL
    assert rel_err(pooled, want.pooler_output) < TOL


def test_the_wrong_loader_is_refused():
    """The key check tells the two models apart: each loader takes only its own."""
    with pytest.raises(ValueError, match=r"unexpected \['text_projection.weight'\]"):
        load_text_encoder(encoder_2(2), AttentionImpl.ORIGINAL, hidden_layer=-2)
    with pytest.raises(ValueError, match=r"missing \['text_projection.weight'\]"):
        load_text_encoder_with_projection(encoder_1(2), AttentionImpl.ORIGINAL, hidden_layer=-2)


def test_projection_shape_is_checked():
    from coreml_sd.models.clip import CLIPTextConfig, CLIPTextEncoder
    from coreml_sd.models.model_io import load_weights, map_clip_weights

    ref = encoder_2(2)
    cfg = CLIPTextConfig.from_transformers(ref.config.to_dict())
    state = ref.state_dict()
    state["text_projection.weight"] = state["text_projection.weight"].T.contiguous()  # (64, 48)
    model = CLIPTextEncoder(cfg, projection_dim=PROJECTION_DIM)
    with pytest.raises(ValueError, match=r"text_projection.weight: source shape \(64, 48, 1, 1\)"):
        load_weights(model, state, map_clip_weights)


def test_projection_weight_is_shared_not_copied():
    ref = encoder_2(2)
    ours = load_text_encoder_with_projection(ref, AttentionImpl.SPLIT_EINSUM, hidden_layer=-2)
    src, dst = ref.text_projection.weight, ours.text_projection.weight
    assert dst.shape == (PROJECTION_DIM, 64, 1, 1)
    assert dst.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
