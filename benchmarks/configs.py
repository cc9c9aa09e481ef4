"""Full-size architecture configs for benchmarks (weights are random: no download needed).

Values are those of the public checkpoints' config files: SD 1.5's `unet/config.json`,
`vae/config.json` and `text_encoder/config.json` (OpenAI CLIP ViT-L/14's text tower, legacy token
ids included), and SDXL base 1.0's (stabilityai/stable-diffusion-xl-base-1.0) `unet/config.json`
and `text_encoder_2/config.json` (OpenCLIP ViT-bigG/14's text tower with its projection); SDXL's
first encoder is SD 1.5's, its VAE SD 1.5's architecture with another scaling factor.
"""

from __future__ import annotations

from pathlib import Path

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD15_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_UNET_PARAMETERS = 2_567_463_684  # counted on the published weights

SDXL_TEXT_ENCODER_2 = {
    "architectures": ["CLIPTextModelWithProjection"],
    "model_type": "clip_text_model",
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}


def sd15_unet(seed: int = 0):
    """A diffusers UNet2DConditionModel with SD 1.5's architecture and seeded random weights."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD15_UNET).eval()


def build_sd15_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a diffusers folder with SD 1.5's full architecture and seeded random weights.

    Initialised like the tiny test models (``testing.tiny_pipelines.init_weights``, decoder entry scaled
    down the same way), so activations stay in a trained model's float16 range and a benchmark
    of it exercises the same numbers of operations, bytes and layouts as the real checkpoint.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from coreml_sd.testing.tiny_pipelines import DECODER_INPUT_SCALE, init_weights, write_pipeline

    unet = init_weights(UNet2DConditionModel(**SD15_UNET), seed, "unet").eval()
    vae = init_weights(AutoencoderKL(**SD15_VAE), seed, "vae").eval()
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(DECODER_INPUT_SCALE)
    text_encoder = init_weights(CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)), seed, "text_encoder").eval()
    return write_pipeline(out_dir, "sd1", unet, vae, text_encoder)


def _random(module, seed: int, component: str):
    """``module`` (built on the meta device) with deterministic random weights, allocated once:
    a full-size model is not first filled with its constructor's initialisation."""
    from coreml_sd.testing.tiny_pipelines import init_weights

    buffers = {name: value for name, value in module.named_buffers() if value.device.type != "meta"}
    module = module.to_empty(device="cpu")
    for name, value in buffers.items():  # buffers computed at construction (e.g. CLIP's position ids)
        module.get_buffer(name).copy_(value)
    return init_weights(module, seed, component).eval()


def build_sdxl_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a diffusers folder with SDXL base's full architecture and seeded random weights, in
    float32 as the published repository's default files are (no variants).

    The tiny SDXL folder provides the tokenizers, scheduler and ``model_index.json``; its models
    are then replaced by full-size ones: the UNet (2.6 B parameters), OpenAI CLIP ViT-L (SD 1.5's
    text encoder), OpenCLIP bigG with its projection and SD 1.5's VAE architecture. Each is
    written and freed before the next, so writing needs one UNet's weights of memory (~10 GB).
    """
    import json

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from coreml_sd.testing.tiny_pipelines import DECODER_INPUT_SCALE, SDXL_VAE_SCALING_FACTOR, build_tiny_sdxl_pipeline

    out_dir = build_tiny_sdxl_pipeline(out_dir, seed=seed)
    builders = {
        "unet": lambda: UNet2DConditionModel(**SDXL_UNET),
        "vae": lambda: AutoencoderKL(**(SD15_VAE | {"sample_size": 1024, "scaling_factor": SDXL_VAE_SCALING_FACTOR})),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2)),
    }
    for part, build in builders.items():
        with torch.device("meta"):
            module = build()
        module = _random(module, seed, part)
        if part == "unet" and (count := sum(p.numel() for p in module.parameters())) != SDXL_UNET_PARAMETERS:
            raise AssertionError(f"SDXL_UNET builds {count:,} parameters, the published UNet has {SDXL_UNET_PARAMETERS:,}")
        if part == "vae":
            with torch.no_grad():  # as build_sd15_pipeline: decoder input in a trained model's range
                module.post_quant_conv.weight.mul_(DECODER_INPUT_SCALE)
        for old in (out_dir / part).glob("*"):
            old.unlink()
        module.save_pretrained(out_dir / part, safe_serialization=True, max_shard_size="20GB")
        del module
    index = json.loads((out_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    return out_dir


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    sdxl = "--sdxl" in args
    folders = [a for a in args if a != "--sdxl"]
    if len(folders) != 1:
        raise SystemExit("usage: python -m coreml_sd.benchmarks.configs OUT_DIR [--sdxl]  (random-weight SD 1.5 or SDXL folder)")
    print((build_sdxl_pipeline if sdxl else build_sd15_pipeline)(folders[0]))
