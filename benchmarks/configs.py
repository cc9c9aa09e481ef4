"""Full-size architecture configs for benchmarks (weights are random: no download needed).

Values are those of the public SD 1.5 checkpoint's `unet/config.json`, `vae/config.json` and
`text_encoder/config.json` (OpenAI CLIP ViT-L/14's text tower, legacy token ids included).
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


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m coreml_sd.benchmarks.configs OUT_DIR  (writes a random-weight SD 1.5 folder)")
    print(build_sd15_pipeline(sys.argv[1]))
