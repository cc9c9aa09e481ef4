"""Tiny Stable Diffusion pipelines (SD 1.x and 2.x shaped) for tests and the offline demo.

No model hub is reachable from the build machines, so tests need real diffusers-format folders
built locally. The models here keep every structural feature of their family that conversion
code can trip over (cross-attention, the 8x VAE, conv vs linear transformer projections, a list
``attention_head_dim``, upcast attention, quick-GELU vs GELU text encoder, the family's pad
token, the family's real scheduler config) while having about a million parameters in total.

Weights are not the constructors' defaults: PyTorch initialises every norm to the identity and
the output of a random network can hide whole sub-graphs (an attention block whose output is
swamped, or a zero tensor), which would make parity tests pass for the wrong reason. Each tensor
is instead drawn from its own generator, seeded from ``(seed, component, tensor name)``, so a
weight does not depend on construction order and the same seed writes byte-identical files.

The file layout is that of the published Stable Diffusion repositories, including the
``text_model.`` prefix on the text encoder's weights (recent transformers would save them
without it; every real repository has it, so that is what loaders must handle).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..contract import SD15_SCHEDULER_CONFIG
from ..families import FAMILIES as _FAMILIES
from .clip_vocab import BOS_TOKEN, EOS_TOKEN, write_clip_vocab

__all__ = [
    "FAMILIES",
    "PAD_TOKENS",
    "SDXL_SCHEDULER_CONFIG",
    "SDXL_TURBO_SCHEDULER_CONFIG",
    "build_tiny_pipeline",
    "build_tiny_sdxl_pipeline",
    "init_weights",
    "tiny_model_index",
    "tiny_scheduler_config",
    "tiny_sdxl_unet",
    "tiny_sdxl_unet_config",
    "tiny_text_encoder",
    "tiny_text_encoder_config",
    "tiny_tokenizer_config",
    "tiny_unet",
    "tiny_unet_config",
    "tiny_vae",
    "tiny_vae_config",
    "write_pipeline",
]

FAMILIES = ("sd1", "sd2")  # the families of build_tiny_pipeline; SDXL has build_tiny_sdxl_pipeline
PAD_TOKENS = {name: family.pad_token for name, family in _FAMILIES.items()}
BOS_ID, EOS_ID = 49406, 49407
PAD_IDS = {"sd1": EOS_ID, "sd2": 0}

# The spreads of the re-initialisation (see init_weights).
NORM_SCALE_STD = 0.1  # norm weights: 1 + N(0, 0.1), so no norm is the identity
BIAS_STD = 0.05

# What each family's published scheduler_config.json holds (keys absent there stay absent here:
# readers must apply diffusers' defaults, e.g. SD 1.5 has no prediction_type).
_SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": {**SD15_SCHEDULER_CONFIG, "_diffusers_version": "0.6.0"},  # runwayml / stable-diffusion-v1-5
    "sd2": {  # stabilityai / stable-diffusion-2-1: SD 1.5's schedule, DDIM, v-prediction
        **SD15_SCHEDULER_CONFIG,
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.8.0",
        "prediction_type": "v_prediction",
    },
}


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    return family


# -- configs ----------------------------------------------------------------------------------


def tiny_unet_config(family: str = "sd1", sample_size: int = 8) -> dict[str, Any]:
    """``UNet2DConditionModel`` config: two levels of 32 and 64 channels with SD's block pattern
    (cross-attention blocks above, plain ``DownBlock2D`` / ``UpBlock2D`` at the deepest level,
    attention again in the mid block), so both block kinds are exercised with few attentions.

    ``attention_head_dim`` is, for historical reasons, the number of heads in diffusers' UNet:
    SD 1.x gives one int for every level, SD 2.x a list (a head width of 16 everywhere here).
    """
    config: dict[str, Any] = {
        "act_fn": "silu",
        "block_out_channels": [32, 64],
        "center_input_sample": False,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "out_channels": 4,
        "sample_size": sample_size,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    }
    if _check_family(family) == "sd1":
        config.update(cross_attention_dim=32, attention_head_dim=2)
    else:
        config.update(
            cross_attention_dim=64,
            attention_head_dim=[2, 4],
            use_linear_projection=True,
            upcast_attention=True,
        )
    return config


# SDXL's conditioning widths in the tiny models: the pooled text embedding (``text_embeds``; 1280 in
# SDXL, the second encoder's projection) and each time id's sinusoidal features (256 in SDXL).
TINY_SDXL_POOLED_DIM = 32
TINY_SDXL_TIME_EMBED_DIM = 8
SDXL_TIME_IDS = {False: 6, True: 5}  # base: original size, crop, target size; refiner: aesthetic score for the target


def tiny_sdxl_unet_config(refiner: bool = False, sample_size: int = 16, layers_per_block: int = 2) -> dict[str, Any]:
    """``UNet2DConditionModel`` config shaped like SDXL base (or refiner) at a tiny size.

    Kept from SDXL: the "text_time" addition embedding (``text_embeds`` plus sinusoidal features of
    each time id; 6 ids for the base, 5 for the refiner), a first level without attention, a list
    ``attention_head_dim`` (a head width of 16 everywhere here), linear projections, two layers per
    block (``layers_per_block``: the pipelines' UNets have one, which halves their conversion and
    run time in tests; the module tests keep two). The base has three levels with transformer
    depths [1, 1, 2], so the deepest is deeper, as SDXL's [1, 2, 10] are, and the up path must
    reverse them; its cross-attention width (64) is
    wider than the pooled embedding (32), as SDXL's concatenated two encoders (2048) are wider than
    the second encoder's pooled output (1280). The refiner, like SDXL's, has four levels of which
    the last is without attention, one int depth and one text width (the second encoder only).

    The default ``sample_size`` of 16 latents puts attention at 8x8 and 4x4 (and 2x2 below).
    """
    n_ids = SDXL_TIME_IDS[refiner]
    config: dict[str, Any] = {
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,  # as SDXL's config has it; read only for "text" embeddings
        "addition_time_embed_dim": TINY_SDXL_TIME_EMBED_DIM,
        "center_input_sample": False,
        "class_embed_type": None,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": layers_per_block,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": TINY_SDXL_POOLED_DIM + n_ids * TINY_SDXL_TIME_EMBED_DIM,
        "sample_size": sample_size,
        "use_linear_projection": True,
    }
    if not refiner:
        config.update(
            attention_head_dim=[2, 3, 4],
            block_out_channels=[32, 48, 64],
            cross_attention_dim=64,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            transformer_layers_per_block=[1, 1, 2],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        )
    else:
        config.update(
            attention_head_dim=[1, 2, 3, 3],
            block_out_channels=[16, 32, 48, 48],
            cross_attention_dim=TINY_SDXL_POOLED_DIM,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            transformer_layers_per_block=2,
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        )
    return config


def tiny_vae_config(family: str = "sd1", sample_size: int = 8) -> dict[str, Any]:
    """``AutoencoderKL`` config: four levels, so images are 8x the latent side, as in real SD.

    Both families share the VAE architecture; ``family`` is only validated.
    """
    _check_family(family)
    return {
        "act_fn": "silu",
        "block_out_channels": [16, 16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": 8 * sample_size,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def tiny_text_encoder_config(family: str = "sd1") -> dict[str, Any]:
    """``transformers.CLIPTextConfig`` fields: OpenAI CLIP-like (sd1) or OpenCLIP-like (sd2)."""
    config: dict[str, Any] = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "num_hidden_layers": 2,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_IDS[_check_family(family)],
        "layer_norm_eps": 1e-05,
        "attention_dropout": 0.0,
        "dropout": 0.0,
    }
    if family == "sd1":
        config.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, hidden_act="quick_gelu")
    else:
        config.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, hidden_act="gelu")
    config["projection_dim"] = config["hidden_size"]
    return config


def tiny_scheduler_config(family: str = "sd1") -> dict[str, Any]:
    """The family's real scheduler config: SD 1.5's PNDM (epsilon) or SD 2.1's DDIM (v)."""
    return json.loads(json.dumps(_SCHEDULER_CONFIGS[_check_family(family)]))  # a deep copy


def tiny_tokenizer_config(family: str = "sd1") -> dict[str, Any]:
    """``tokenizer_config.json`` for ``transformers.CLIPTokenizer`` with the family's pad token."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": PAD_TOKENS[_check_family(family)],
    }


def tiny_model_index(family: str = "sd1") -> dict[str, Any]:
    """``model_index.json`` of a ``StableDiffusionPipeline`` without safety checker."""
    scheduler_class = tiny_scheduler_config(family)["_class_name"]
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


# -- weights ----------------------------------------------------------------------------------


def _generator(seed: int, component: str, name: str) -> torch.Generator:
    """A generator private to one tensor, so its values depend on nothing but its identity."""
    digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int, component: str) -> torch.nn.Module:
    """Overwrite every floating-point parameter of ``module`` deterministically; return it.

    * matrices, conv kernels and embeddings: N(0, 1/fan_in), which keeps activations of order
      one through the stack, so attention logits are neither flat nor saturated;
    * 1-d ``weight`` (GroupNorm / LayerNorm scales): 1 + N(0, 0.1), never the identity;
    * biases: N(0, 0.05), never zero.
    """
    for name, param in module.named_parameters():
        if not param.is_floating_point():
            continue
        g = _generator(seed, component, name)
        noise = torch.randn(param.shape, generator=g, dtype=torch.float32)
        if param.ndim >= 2:
            fan_in = math.prod(param.shape[1:])
            value = noise / math.sqrt(fan_in)
        elif name.endswith("weight"):
            value = 1.0 + NORM_SCALE_STD * noise
        else:
            value = BIAS_STD * noise
        param.copy_(value)
    return module


def tiny_unet(family: str = "sd1", sample_size: int = 8, seed: int = 0):
    """A deterministically initialised tiny ``UNet2DConditionModel`` in eval mode."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(tiny_unet_config(family, sample_size))
    return init_weights(unet, seed, "unet").eval()


def tiny_sdxl_unet(refiner: bool = False, sample_size: int = 16, seed: int = 0, layers_per_block: int = 2):
    """A deterministically initialised tiny SDXL-shaped ``UNet2DConditionModel`` in eval mode."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(tiny_sdxl_unet_config(refiner, sample_size, layers_per_block))
    return init_weights(unet, seed, "unet_refiner" if refiner else "unet").eval()


# A random UNet is no denoiser: its noise prediction is not correlated with the latents the way a
# trained one's is, so after a full schedule its latents have a standard deviation near 10 where
# a trained model's stay near 1. Decoded as they are, they would overflow the float16 decoder's
# GroupNorm (as they would on a Mac). The tiny decoder's entry convolution is scaled down by this
# factor so that it sees activations of the range a trained SD decoder sees, and float16 results
# in tests are representative of real models.
DECODER_INPUT_SCALE = 0.1


def tiny_vae(family: str = "sd1", sample_size: int = 8, seed: int = 0):
    """A deterministically initialised tiny ``AutoencoderKL`` in eval mode."""
    from diffusers import AutoencoderKL

    vae = init_weights(AutoencoderKL.from_config(tiny_vae_config(family, sample_size)), seed, "vae")
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(DECODER_INPUT_SCALE)
    return vae.eval()


def tiny_text_encoder(family: str = "sd1", seed: int = 0, **changes: Any):
    """A deterministically initialised tiny ``transformers.CLIPTextModel`` in eval mode;
    ``changes`` override fields of ``tiny_text_encoder_config(family)``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**(tiny_text_encoder_config(family) | changes))
    return init_weights(CLIPTextModel(config), seed, "text_encoder").eval()


# -- SDXL ----------------------------------------------------------------------------------------

# What stabilityai/stable-diffusion-xl-base-1.0's (and the refiner's) scheduler_config.json holds.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# stabilityai/sdxl-turbo's: Euler ancestral over trailing timesteps, for 1 to 4 steps.
SDXL_TURBO_SCHEDULER_CONFIG: dict[str, Any] = SDXL_SCHEDULER_CONFIG | {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    "timestep_spacing": "trailing",
}
SDXL_VAE_SCALING_FACTOR = 0.13025
TINY_SDXL_TEXT_LAYERS = 3  # so that the penultimate layer SDXL reads is neither the first nor the last


def tiny_sdxl_text_encoders(seed: int = 0):
    """SDXL's two encoders at a tiny size: a ``CLIPTextModel`` shaped like OpenAI's CLIP ViT-L
    (quick-GELU, 32 wide) and a ``CLIPTextModelWithProjection`` shaped like OpenCLIP bigG (GELU,
    32 wide, projected to ``TINY_SDXL_POOLED_DIM``); 32 + 32 is the tiny base UNet's text width."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    first = CLIPTextConfig(**(tiny_text_encoder_config("sd1") | {"num_hidden_layers": TINY_SDXL_TEXT_LAYERS}))
    second = tiny_text_encoder_config("sd2") | {
        "architectures": ["CLIPTextModelWithProjection"],
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
        "num_hidden_layers": TINY_SDXL_TEXT_LAYERS, "projection_dim": TINY_SDXL_POOLED_DIM,
    }
    return (init_weights(CLIPTextModel(first), seed, "text_encoder").eval(),
            init_weights(CLIPTextModelWithProjection(CLIPTextConfig(**second)), seed, "text_encoder_2").eval())


def _sdxl_model_index(refiner: bool, scheduler_class: str) -> dict[str, Any]:
    """``model_index.json`` as the published SDXL base (text-to-image) and refiner (image-to-image,
    second encoder only, aesthetic score) repositories have it."""
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": not refiner,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if refiner:
        index["requires_aesthetics_score"] = True
    return index


def _write_tokenizer(folder: Path, family: str) -> None:
    write_clip_vocab(folder)
    tokenizer = tiny_tokenizer_config(family)
    _write_json(folder / "tokenizer_config.json", tokenizer)
    special = {k: tokenizer[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    _write_json(folder / "special_tokens_map.json", special)


def build_tiny_sdxl_pipeline(out_dir: str | Path, refiner: bool = False, seed: int = 0, sample_size: int = 16,
                             turbo: bool = False) -> Path:
    """Write a tiny SDXL base (``StableDiffusionXLPipeline``) or refiner
    (``StableDiffusionXLImg2ImgPipeline``) folder; return its path. ``turbo``: SDXL-Turbo's
    scheduler config. The refiner has the second encoder and its tokenizer only."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet = tiny_sdxl_unet(refiner, sample_size, seed, layers_per_block=1)  # see tiny_sdxl_unet_config
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    vae = tiny_vae("sd1", sample_size, seed)
    vae.register_to_config(scaling_factor=SDXL_VAE_SCALING_FACTOR)
    vae.save_pretrained(out_dir / "vae", safe_serialization=True)
    first, second = tiny_sdxl_text_encoders(seed)
    if not refiner:
        _save_text_encoder(first, out_dir / "text_encoder")
        _write_tokenizer(out_dir / "tokenizer", "sd1")
    _save_text_encoder(second, out_dir / "text_encoder_2")
    _write_tokenizer(out_dir / "tokenizer_2", "sd2")  # pads with "!", as the published tokenizer_2 does
    scheduler = SDXL_TURBO_SCHEDULER_CONFIG if turbo else SDXL_SCHEDULER_CONFIG
    _write_json(out_dir / "scheduler" / "scheduler_config.json", scheduler)
    _write_json(out_dir / "model_index.json", _sdxl_model_index(refiner, scheduler["_class_name"]))
    return out_dir


# -- writing ----------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8", newline="")


def _save_text_encoder(text_encoder, out_dir: Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` in the layout of the published repos."""
    text_encoder.config.save_pretrained(out_dir)
    # transformers >= 5.6 flattened CLIPTextModel (no `.text_model` attribute); the published
    # files still name every tensor `text_model.*`, and transformers maps that prefix on load.
    prefix = "" if hasattr(text_encoder, "text_model") else "text_model."
    tensors = {prefix + k: v.contiguous() for k, v in text_encoder.state_dict().items()}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})


def write_pipeline(out_dir: str | Path, family: str, unet, vae, text_encoder) -> Path:
    """Write a ``StableDiffusionPipeline`` folder from modules, with the family's real tokenizer
    files, scheduler config and ``model_index.json``; return its path."""
    _check_family(family)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    vae.save_pretrained(out_dir / "vae", safe_serialization=True)
    _save_text_encoder(text_encoder, out_dir / "text_encoder")

    write_clip_vocab(out_dir / "tokenizer")
    tokenizer = tiny_tokenizer_config(family)
    _write_json(out_dir / "tokenizer" / "tokenizer_config.json", tokenizer)
    special = {key: tokenizer[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    _write_json(out_dir / "tokenizer" / "special_tokens_map.json", special)

    _write_json(out_dir / "scheduler" / "scheduler_config.json", tiny_scheduler_config(family))
    _write_json(out_dir / "model_index.json", tiny_model_index(family))
    return out_dir


def build_tiny_pipeline(
    out_dir: str | Path, family: str = "sd1", seed: int = 0, sample_size: int = 8
) -> Path:
    """Write a tiny ``StableDiffusionPipeline`` folder to ``out_dir``; return its path.

    The folder loads offline with ``diffusers.StableDiffusionPipeline.from_pretrained(out_dir)``.
    ``sample_size`` is the latent side; images are ``8 * sample_size`` pixels wide. The same
    ``seed`` writes byte-identical weight files.
    """
    return write_pipeline(out_dir, family, tiny_unet(family, sample_size, seed), tiny_vae(family, sample_size, seed),
                          tiny_text_encoder(family, seed))
