"""SDXL's text encoders against transformers, as diffusers' StableDiffusionXLPipeline reads them.

Encoder 1 is a ``CLIPTextModel`` (OpenAI CLIP ViT-L: quick_gelu, pads with the end token). The
UNet gets its ``hidden_states[-2]`` (no final LayerNorm); Apple's converter also outputs its
unprojected ``pooler_output``, which its Swift pipeline reads and drops. The tiny encoders have
three layers, so -2 is neither the embeddings nor the last layer.

Same weights, same inputs, float32: relative error (max abs difference over max abs reference)
below 1e-4, as in test_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from coreml_sd.models import AttentionImpl, load_text_encoder
from coreml_sd.testing.tiny_pipelines import tiny_text_encoder
from helpers import rel_err

IMPLS = list(AttentionImpl)
TOL = 1e-4
LAYERS = 3
# 2: what both of SDXL's published text encoder configs carry (legacy, so transformers pools at the
# largest id); 49407: the end-of-text id, as current configs give it.
EOS_TOKEN_IDS = [2, 49407]


def encoder_1(eos_token_id: int):
    return tiny_text_encoder("sd1", seed=11, num_hidden_layers=LAYERS, eos_token_id=eos_token_id)


def prompt_ids(pad: int) -> torch.Tensor:
    """Two tokenised prompts of different lengths, padded to 77 with ``pad``."""
    ids = torch.full((2, 77), pad)
    ids[:, 0] = 49406
    ids[0, 1:6] = torch.tensor([320, 1125, 539, 320, 2368])  # a photo of a cat
    ids[0, 6] = 49407
    ids[1, 1:40] = torch.arange(1000, 1039)
    ids[1, 40] = 49407
    return ids


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
    """Without hidden_layer: the same keys and outputs as before SDXL."""
    ref = encoder_1(49407)
    ours = load_text_encoder(ref, AttentionImpl.SPLIT_EINSUM)
    with torch.no_grad():
        want = ref(prompt_ids(pad=49407))
        hidden, pooled = ours(prompt_ids(pad=49407).float())
    assert rel_err(hidden, want.last_hidden_state) < TOL
    assert rel_err(pooled, want.pooler_output) < TOL
