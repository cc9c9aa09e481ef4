"""What coreml-sd converts, and how a source is told no.

Shared by the readers of each kind of SOURCE (``diffusers_folder``, ``single_file``) and by
``source``, which opens them; it imports none of them. Everything here is a pure function of
configs or names: no file is read.

Every failure a user can fix raises :class:`SourceError`, one line naming the problem and the
fix. Checkpoints of other families (inpainting, SD3, Flux, ...) are recognised and refused.
"""

from __future__ import annotations

from typing import Any

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
SUPPORTED = "coreml-sd converts Stable Diffusion 1.x, 2.x and XL (base, refiner, Turbo) text-to-image checkpoints only"
SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONFIG_FIX = "pass --config <diffusers folder or hub id>"


class SourceError(Exception):
    """A checkpoint that cannot be used; the message is one line naming the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever was interpolated


def unsupported(where: str, what: str) -> SourceError:
    """The refusal of a checkpoint of another family; ``what`` says which."""
    return SourceError(f"{where} is {what}; {SUPPORTED}: pass an SD 1.x, 2.x or XL checkpoint")


def pickle_refused(what: str) -> SourceError:
    """The refusal of pickled weights the user did not allow (``--allow-pickle``)."""
    return SourceError(
        f"{what} is a pickle, and loading a pickle can execute arbitrary code: convert it to"
        " .safetensors, or pass --allow-pickle if you trust its origin"
    )


def detect_family(
    unet_config: dict[str, Any],
    text_encoder_config: dict[str, Any] | None = None,
    text_encoder_2_config: dict[str, Any] | None = None,
) -> str:
    """Return ``"sd1"``, ``"sd2"``, ``"sdxl"`` or ``"sdxl-refiner"`` for a supported pipeline's configs.

    SDXL's UNet adds a "text_time" embedding of the pooled text embedding and of the time ids, 6
    for the base and 5 for the refiner: the count is the embedding's input width less the pooled
    width (the second encoder's projection), over each id's width. Without the second encoder's
    config, the refiner is told apart by its lacking the first encoder.

    The families differ structurally in the text encoder: SD 1.x uses OpenAI's CLIP ViT-L/14,
    whose MLP activation is quick-GELU; SD 2.x uses OpenCLIP ViT-H/14 with exact GELU. So the
    text encoder's ``hidden_act`` decides when it is known. Otherwise the UNet does: SD 2.x
    cross-attends to 1024-wide embeddings (SD 1.x: 768) and, unlike SD 1.x, projects into its
    transformer blocks with linear layers. Width alone could not classify the tiny test models
    (32 and 64 wide); activation and projection type do.
    """
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl-refiner" if _time_ids(unet_config, text_encoder_2_config, text_encoder_config) == 5 else "sdxl"
    activation = (text_encoder_config or {}).get("hidden_act")
    if activation in ("gelu", "quick_gelu"):
        return "sd2" if activation == "gelu" else "sd1"
    if unet_config.get("cross_attention_dim") == 1024 or unet_config.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def _time_ids(unet: dict[str, Any], text_encoder_2: dict[str, Any] | None, text_encoder: dict[str, Any] | None) -> int:
    """How many time ids an SDXL UNet embeds (6 base, 5 refiner)."""
    width, per_id = unet.get("projection_class_embeddings_input_dim"), unet.get("addition_time_embed_dim")
    pooled = (text_encoder_2 or {}).get("projection_dim")
    if isinstance(width, int) and isinstance(per_id, int) and isinstance(pooled, int) and per_id > 0:
        return (width - pooled) // per_id
    return 6 if text_encoder is not None else 5


def check_pipeline(model_index: dict[str, Any], where: str) -> None:
    """Refuse pipelines other than SD 1.x / 2.x / XL text-to-image, judged from ``model_index.json``."""
    name = str(model_index.get("_class_name", ""))
    if "Inpaint" in name:
        raise unsupported(where, f"an inpainting pipeline ({name})")
    if name not in SUPPORTED_PIPELINES:
        raise unsupported(where, f"a {name or 'unnamed'} pipeline, not a StableDiffusionPipeline")


def check_unet(config: dict[str, Any], where: str) -> None:
    """Refuse UNets of other pipelines sharing the SD layout (inpainting, pix2pix, ...)."""
    embedding = config.get("addition_embed_type")
    if embedding not in (None, "text_time"):
        raise unsupported(where, f"a checkpoint whose UNet takes {embedding!r} embeddings")
    check_in_channels(config.get("in_channels", 4), where)


def check_in_channels(in_channels: int, where: str) -> None:
    """Refuse UNets that take more than the 4 latent channels (inpainting, image-conditioned)."""
    if in_channels == 9:
        raise unsupported(where, "an inpainting checkpoint (its UNet takes 9 input channels)")
    if in_channels != 4:
        raise unsupported(where, f"an image-conditioned checkpoint (its UNet takes {in_channels} channels)")
