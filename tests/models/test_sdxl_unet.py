"""The SDXL-shaped UNet (text-time addition embedding) against diffusers, base and refiner.

Same weights, same inputs, float32: relative error (max abs difference over max abs reference)
below 1e-4, as for the SD 1.x / 2.x components (test_parity.py); every operation is the same up
to summation order, so float32 rounding alone separates the two. The tiny models keep SDXL's
structure (see ``tiny_sdxl_unet_config``); v2 runs with a query chunk that leaves a partial last
chunk at every attention resolution of 16x16 latents.
"""

from __future__ import annotations

import pytest
import torch

from coreml_sd.models import AttentionImpl, load_unet
from coreml_sd.models.unet import UNetConfig
from coreml_sd.testing.tiny_pipelines import SDXL_TIME_IDS, TINY_SDXL_POOLED_DIM, tiny_sdxl_unet, tiny_sdxl_unet_config
from helpers import rel_err

IMPLS = list(AttentionImpl)
TOL = 1e-4
CHUNK = 12  # attention at 8x8 (64 = 5*12 + 4 tokens), 4x4 (16 = 12 + 4) and 2x2 (4 < 12)
SIZE = 16
# Realistic conditioning, two images: (original h, w, crop top, left, target h, w) for the base,
# (original h, w, crop top, left, aesthetic score) for the refiner; values up to 1024 are what
# makes the sinusoid phases large.
TIME_IDS = {
    False: torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 64.0, 32.0, 1024.0, 1024.0]]),
    True: torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0], [768.0, 1344.0, 64.0, 32.0, 2.5]]),
}


@pytest.fixture(scope="module", params=[False, True], ids=["base", "refiner"])
def refiner(request):
    return request.param


@pytest.fixture(scope="module")
def reference(refiner):
    return tiny_sdxl_unet(refiner, sample_size=SIZE, seed=1)


def _inputs(ref, refiner: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 4, SIZE, SIZE, generator=g),
        "timestep": torch.tensor([999.0, 3.5]),  # fractional timesteps occur with Euler schedules
        "encoder_hidden_states": torch.randn(2, 77, ref.config.cross_attention_dim, generator=g),
        "text_embeds": torch.randn(2, TINY_SDXL_POOLED_DIM, generator=g),
        "time_ids": TIME_IDS[refiner],
    }


def _diffusers(ref, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
        return ref(x["sample"], x["timestep"], x["encoder_hidden_states"], added_cond_kwargs=added).sample


def _ours(model, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        context = x["encoder_hidden_states"].transpose(1, 2).unsqueeze(2)  # (B, C, 1, 77)
        return model(x["sample"], x["timestep"], context, x["text_embeds"], x["time_ids"])


@pytest.mark.parametrize("impl", IMPLS)
def test_sdxl_unet(reference, refiner, impl):
    x = _inputs(reference, refiner)
    assert x["time_ids"].shape == (2, SDXL_TIME_IDS[refiner])
    ours = load_unet(reference, impl, query_chunk=CHUNK)
    want = _diffusers(reference, x)
    got = _ours(ours, x)
    assert got.shape == want.shape == (2, 4, SIZE, SIZE)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("name", ["encoder_hidden_states", "text_embeds", "time_ids"])
def test_output_depends_on_each_condition(reference, refiner, name):
    """A parity test on a model that ignores an input proves little about that input's path."""
    x = _inputs(reference, refiner)
    want = _diffusers(reference, x)
    changed = dict(x)
    if name == "time_ids":  # another size: a crop of half the image
        changed[name] = x[name] * torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.5][: x[name].shape[1]]) + torch.tensor(
            [0.0, 0.0, 256.0, 256.0, 0.0, 0.0][: x[name].shape[1]]
        )
    else:
        changed[name] = torch.randn(x[name].shape, generator=torch.Generator().manual_seed(7))
    other = _diffusers(reference, changed)
    assert rel_err(other, want) > 1e-3
    assert rel_err(_ours(load_unet(reference, AttentionImpl.SPLIT_EINSUM), changed), other) < TOL


def test_time_ids_features_match_diffusers(reference):
    """Each id's features in diffusers' order (flatten, embed, reshape), at phases up to 1344."""
    ours = load_unet(reference, AttentionImpl.ORIGINAL)
    time_ids = TIME_IDS[False]
    want = reference.add_time_proj(time_ids.flatten()).reshape(2, -1)
    assert torch.equal(ours.time_ids_features(time_ids)[:, :, 0, 0], want)


def test_inputs_follow_the_config(reference, refiner):
    x = _inputs(reference, refiner)
    ours = load_unet(reference, AttentionImpl.SPLIT_EINSUM)
    context = x["encoder_hidden_states"].transpose(1, 2).unsqueeze(2)
    with pytest.raises(ValueError, match="needs text_embeds and time_ids"):
        ours(x["sample"], x["timestep"], context)
    with pytest.raises(ValueError, match="time ids of 8 features do not make the add_embedding input width"):
        ours(x["sample"], x["timestep"], context, x["text_embeds"], x["time_ids"][:, :4])


def test_add_embedding_weights_are_checked(reference):
    from coreml_sd.models.model_io import load_weights, map_unet_weights
    from coreml_sd.models.unet import UNet

    model = UNet(UNetConfig.from_diffusers(dict(reference.config)))
    state = reference.state_dict()
    with pytest.raises(ValueError, match="missing.*add_embedding.linear_1.weight"):
        load_weights(model, {k: v for k, v in state.items() if not k.startswith("add_embedding.")}, map_unet_weights)
    state["add_embedding.linear_1.weight"] = state["add_embedding.linear_1.weight"][:, :-8]
    with pytest.raises(ValueError, match="add_embedding.linear_1.weight: source shape"):
        load_weights(model, state, map_unet_weights)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"addition_embed_type": "text_image"}, "addition_embed_type='text_image'"),
        ({"addition_time_embed_dim": None}, "addition_embed_type='text_time' needs addition_time_embed_dim"),
        ({"projection_class_embeddings_input_dim": None}, "needs addition_time_embed_dim and projection"),
        ({"addition_time_embed_dim": 7}, "addition_time_embed_dim=7"),
        ({"class_embed_type": "projection"}, "class_embed_type='projection'"),
        ({"transformer_layers_per_block": [[1], [1, 1], [2, 2]]}, "transformer_layers_per_block="),
        ({"reverse_transformer_layers_per_block": [[2, 2, 2], [1, 1, 1], [1, 1, 1]]}, "reverse_transformer_layers"),
        ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]}, "SimpleCrossAttn"),
        ({"mid_block_type": "UNetMidBlock2D"}, "mid_block_type='UNetMidBlock2D'"),
    ],
)
def test_unsupported_sdxl_config_is_named(change, message):
    cfg = tiny_sdxl_unet_config() | change
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_diffusers(cfg)


def test_projection_width_without_text_time_is_refused():
    cfg = tiny_sdxl_unet_config() | {"addition_embed_type": None}
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=80"):
        UNetConfig.from_diffusers(cfg)


class _TextTime(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, text_embeds, time_ids):
        return self.unet.text_time_embedding(text_embeds, time_ids)


def test_time_ids_features_stay_float32_in_a_float16_program(reference, refiner):
    """Converted with ``time_ids`` among the float32 features, the phases (up to ~1024 radians)
    and their sin and cos stay float32 up to where they meet ``text_embeds``; the add_embedding's
    convolutions run in float16 like the rest of the program."""
    from coremltools.converters.mil.mil import types

    from coreml_sd.convert.export import to_coreml, trace
    from coreml_sd.families import TensorSpec

    inputs = [TensorSpec("text_embeds", (2, TINY_SDXL_POOLED_DIM)), TensorSpec("time_ids", (2, SDXL_TIME_IDS[refiner]))]
    module = _TextTime(load_unet(reference, AttentionImpl.SPLIT_EINSUM))
    outputs = [TensorSpec("emb", (2, 4 * reference.config.block_out_channels[0], 1, 1))]
    model = to_coreml(trace(module, inputs), inputs, outputs, {}, "text-time", ("time_ids",))
    dtypes = {}
    for op in model._mil_program.functions["main"].operations:
        dtypes.setdefault(op.op_type, set()).add(types.builtin_to_string(op.outputs[0].dtype))
    assert dtypes["sin"] == dtypes["cos"] == dtypes["mul"] == {"fp32"}
    assert dtypes["conv"] == {"fp16"}
