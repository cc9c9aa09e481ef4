"""Write original-layout (LDM / CompVis) single-file checkpoints from diffusers folders, for tests.

Single-file checkpoints (the ``.safetensors`` files of model-sharing sites) keep the key layout of
the original Stable Diffusion code. No such file of a tiny model exists, so this module maps a
diffusers pipeline back to that layout: the inverse of diffusers' single-file conversion,
written for any ``layers_per_block`` and any mix of attention / plain blocks. The tests prove it
by loading the result through diffusers' own single-file loaders and comparing every tensor.

Layout, per component:

* UNet, ``model.diffusion_model.``: ``input_blocks.N`` numbers the down path (0: conv_in, then
  per level ``layers_per_block`` pairs ``.0`` resnet / ``.1`` transformer, then ``.0.op`` for the
  downsampler of every level but the last), ``middle_block.0/1/2`` (resnet, transformer,
  resnet), ``output_blocks.N`` the up path (``layers_per_block + 1`` entries per level, the
  upsampler as the last module of the level's last entry), ``time_embed.0/2``, ``out.0/2``;
  SDXL's embedding of the pooled text and time ids is ``label_emb.0.0/2``.
  Resnets name their layers ``in_layers.0/2``, ``emb_layers.1``, ``out_layers.0/3``,
  ``skip_connection``.
* VAE, ``first_stage_model.``: ``encoder.down.N.block.M`` / ``.downsample``, ``mid.block_1``,
  ``mid.attn_1`` (``norm``, ``q``/``k``/``v``/``proj_out`` as 1x1 convolutions), ``mid.block_2``,
  ``norm_out``; the decoder's ``up.N`` count from the lowest resolution *upwards*, the reverse of
  diffusers' ``up_blocks``. Resnet shortcuts are ``nin_shortcut``.
* Text encoder, SD 1.x: transformers' CLIP layout under ``cond_stage_model.transformer.``.
  SD 2.x: OpenCLIP's under ``cond_stage_model.model.`` (``resblocks.N`` with fused ``in_proj``
  q/k/v, ``ln_1``/``ln_2``, ``mlp.c_fc``/``c_proj``, ``positional_embedding``, ``ln_final``,
  ``text_projection``, ``logit_scale``), plus one final resblock the pipeline never uses, as in
  the real files (SD 2.x conditions on the penultimate layer of its 24-layer encoder).
* SDXL (SGM's layout): the first encoder in transformers' layout under
  ``conditioner.embedders.0.transformer.``, the second (OpenCLIP bigG) in OpenCLIP's under
  ``conditioner.embedders.1.model.``, all of whose layers the pipeline uses (it reads the
  penultimate layer's output, but the last layer also feeds the pooled, projected embedding),
  with its real ``text_projection`` (transposed: OpenCLIP multiplies ``x @ text_projection``).
  The refiner has only the second, as ``conditioner.embedders.0.model.``. SGM's denoiser keeps
  its noise levels as ``denoiser.sigmas``, in the file beside the models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from coreml_sd.contract import SD15_SCHEDULER_CONFIG

RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str] | None = None) -> str | None:
    """Map ``key`` through the longest matching diffusers prefix; rename its first inner part."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old + "."):
            rest = key[len(old) + 1 :]
            for a, b in (inner or {}).items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
                    break
            return f"{prefixes[old]}.{rest}"
    return None


def unet_prefixes(config: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(module prefixes of resnets, of everything else): diffusers name -> LDM name."""
    resnets: dict[str, str] = {}
    other = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled text + time ids embedding
        "add_embedding.linear_2": "label_emb.0.2",
    }
    layers = config["layers_per_block"]
    levels = len(config["down_block_types"])
    index = 1
    for level, kind in enumerate(config["down_block_types"]):
        for layer in range(layers):
            resnets[f"down_blocks.{level}.resnets.{layer}"] = f"input_blocks.{index}.0"
            if "CrossAttn" in kind:
                other[f"down_blocks.{level}.attentions.{layer}"] = f"input_blocks.{index}.1"
            index += 1
        if level < levels - 1:
            other[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    resnets["mid_block.resnets.0"] = "middle_block.0"
    other["mid_block.attentions.0"] = "middle_block.1"
    resnets["mid_block.resnets.1"] = "middle_block.2"
    index = 0
    for level, kind in enumerate(config["up_block_types"]):
        attention = "CrossAttn" in kind
        for layer in range(layers + 1):
            resnets[f"up_blocks.{level}.resnets.{layer}"] = f"output_blocks.{index}.0"
            if attention:
                other[f"up_blocks.{level}.attentions.{layer}"] = f"output_blocks.{index}.1"
            if layer == layers and level < levels - 1:  # the upsampler ends the level's last entry
                position = 2 if attention else 1
                other[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index}.{position}.conv"
            index += 1
    return resnets, other


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers UNet state dict -> LDM keys (without the ``model.diffusion_model.`` prefix)."""
    resnets, other = unet_prefixes(config)
    out = {}
    for key, value in state.items():
        new = _rename(key, resnets, RESNET_NAMES) or _rename(key, other)
        if new is None:
            raise KeyError(f"no LDM name for UNet tensor {key}")
        out[new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL state dict -> LDM keys (without ``first_stage_model.``)."""
    levels = len(config["down_block_types"])
    resnets = {}
    other = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for level in range(levels):
        resnets[f"encoder.down_blocks.{level}.resnets"] = f"encoder.down.{level}.block"
        other[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
        up = levels - 1 - level  # the original counts decoder levels from the lowest resolution
        resnets[f"decoder.up_blocks.{level}.resnets"] = f"decoder.up.{up}.block"
        other[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    attentions = {}
    for part in ("encoder", "decoder"):
        resnets[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        resnets[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        attentions[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    out = {}
    for key, value in state.items():
        attention = _rename(key, attentions, VAE_ATTENTION_NAMES)
        if attention is not None:
            if value.ndim == 2:  # the original's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
            out[attention] = value
            continue
        # resnets.M.x -> block.M.x; only the shortcut is renamed inside a VAE resnet
        new = _rename(key, resnets) or _rename(key, other) or key
        out[new.replace(".conv_shortcut.", ".nin_shortcut.")] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict (flat or ``text_model.``) -> SD 1.x layout (without the prefix)."""
    out = {"text_model." + k.removeprefix("text_model."): v for k, v in state.items()}
    # Real SD 1.x files carry the position-id buffer transformers no longer saves.
    out["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return out


def open_clip_to_ldm(
    state: dict[str, torch.Tensor], num_layers: int, seed: int = 0, unused_layer: bool = True
) -> dict[str, torch.Tensor]:
    """CLIPTextModel(WithProjection) state dict -> OpenCLIP layout (without ``...model.``).

    ``unused_layer``: add one unused final resblock (random values) as the real SD 2.x checkpoints
    have. Without a projection in ``state`` (SD 2.x), an identity one stands in for the unused
    projection, as diffusers reads its width.
    """
    flat = {k.removeprefix("text_model."): v for k, v in state.items()}
    width = flat["embeddings.token_embedding.weight"].shape[1]
    projection = flat.pop("text_projection.weight", None)
    out = {
        "token_embedding.weight": flat.pop("embeddings.token_embedding.weight"),
        "positional_embedding": flat.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": flat.pop("final_layer_norm.weight"),
        "ln_final.bias": flat.pop("final_layer_norm.bias"),
        "text_projection": torch.eye(width) if projection is None else projection.T,
        "logit_scale": torch.tensor(4.6052),  # CLIP's contrastive temperature, which no loader reads
    }
    for layer in range(num_layers):
        head = f"encoder.layers.{layer}."
        for part in ("weight", "bias"):
            qkv = [flat.pop(f"{head}self_attn.{p}_proj.{part}") for p in "qkv"]
            out[f"transformer.resblocks.{layer}.attn.in_proj_{part}"] = torch.cat(qkv)
    for key, value in flat.items():
        new = key.replace("encoder.layers.", "transformer.resblocks.")
        for a, b in OPEN_CLIP_NAMES.items():
            new = new.replace(f".{a}.", f".{b}.")
        out[new] = value
    if unused_layer:
        generator = torch.Generator().manual_seed(seed)
        last = f"transformer.resblocks.{num_layers - 1}."
        for key in [k for k in out if k.startswith(last)]:
            value = out[key]  # meta tensors (shapes only) stay meta
            extra = torch.empty_like(value) if value.is_meta else torch.randn(value.shape, generator=generator)
            out[key.replace(last, f"transformer.resblocks.{num_layers}.")] = extra
    return out


def text_encoders_to_ldm(folder: Path, components) -> dict[str, torch.Tensor]:
    """The text encoders of the pipeline in ``folder`` under their original prefixes."""
    tensors: dict[str, torch.Tensor] = {}
    sdxl = (folder / "text_encoder_2").is_dir()
    for part in ("text_encoder", "text_encoder_2"):
        if part not in components or not (folder / part).is_dir():
            continue
        config = json.loads((folder / part / "config.json").read_text())
        state = load_file(folder / part / "model.safetensors")
        if part == "text_encoder_2":  # OpenCLIP bigG; the refiner's only encoder, so its first embedder
            prefix = f"conditioner.embedders.{1 if (folder / 'text_encoder').is_dir() else 0}.model."
            ldm = open_clip_to_ldm(state, config["num_hidden_layers"], unused_layer=False)
        elif sdxl:  # OpenAI CLIP ViT-L
            prefix, ldm = "conditioner.embedders.0.transformer.", clip_to_ldm(state)
        elif config["hidden_act"] == "gelu":  # OpenCLIP (SD 2.x)
            prefix, ldm = "cond_stage_model.model.", open_clip_to_ldm(state, config["num_hidden_layers"])
        else:
            prefix, ldm = "cond_stage_model.transformer.", clip_to_ldm(state)
        tensors |= {prefix + k: v for k, v in ldm.items()}
    return tensors


def write_ldm_checkpoint(diffusers_folder: str | Path, out_path: str | Path, components=None, metadata=None) -> Path:
    """Write the pipeline in ``diffusers_folder`` as one original-layout ``.safetensors`` file.

    ``components`` (default: unet, vae and the text encoders the pipeline has) selects what the
    file contains, so tests can write checkpoints that lack one; ``metadata``: the header's.
    """
    folder, out_path = Path(diffusers_folder), Path(out_path)
    components = components or ("unet", "vae", "text_encoder", "text_encoder_2")
    tensors: dict[str, torch.Tensor] = {}
    if "unet" in components:
        config = json.loads((folder / "unet" / "config.json").read_text())
        state = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
        tensors |= {"model.diffusion_model." + k: v for k, v in unet_to_ldm(state, config).items()}
    if "vae" in components:
        config = json.loads((folder / "vae" / "config.json").read_text())
        state = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
        tensors |= {"first_stage_model." + k: v for k, v in vae_to_ldm(state, config).items()}
    tensors |= text_encoders_to_ldm(folder, components)
    # Training-time noise schedule buffers sit at the top level of real files; loaders skip them.
    start, end, n = (SD15_SCHEDULER_CONFIG[k] for k in ("beta_start", "beta_end", "num_train_timesteps"))
    betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    if (folder / "text_encoder_2").is_dir():  # SGM keeps the noise levels instead
        tensors["denoiser.sigmas"] = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()
    else:
        tensors["betas"] = betas.float()
        tensors["alphas_cumprod"] = alphas_cumprod.float()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_path, metadata=metadata)
    return out_path
