"""Model families, each described once: what its bundle holds and how the parts talk.

A family names its components (with each model's inputs and outputs as functions of the sizes
converted for), the models every text-to-image run needs, how a prompt becomes the UNet's
conditioning, and its latent constants. ``convert`` builds and declares models from it, the
runtime feeds them from it, ``bench`` checks bundles against it. The torch modules that implement
a component live in ``models/``; the mapping from component to module in ``convert/components.py``.

Model names, input and output names and shapes are those Apple's Swift ``StableDiffusion``
package feeds and reads, so a bundle loads in apps built on it (apple/ml-stable-diffusion at
e12202c, ``swift/StableDiffusion/pipeline/``): ``TextEncoder.swift`` lines 75-89 feed
``input_ids`` as Float32 and read ``last_hidden_state``; ``Unet.swift`` lines 106-111 feed
``sample``, ``timestep`` and ``encoder_hidden_states``; ``Decoder.swift`` and ``Encoder.swift``
feed their model's one input and read its first output. Every input and
output is declared float32 by choice: Swift feeds and reads Float32 either way and Core ML
converts, while Apple's own converter declares the UNet's and VAE's inputs float16. A float32
``timestep`` keeps the UNet near 64 dB PSNR against its torch source at t=981, where a float16 one
measures about 51 dB. The programs cast inputs to float16 as their first ops, so the Neural
Engine still computes in float16.

Adding a family: one ``Family`` here, its torch modules in ``models/``, its builders in
``convert/components.py``, and its parity tests.

This module imports neither torch nor coremltools.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Pad tokens of the two CLIP tokenizers SD uses: OpenAI CLIP pads with the end token, OpenCLIP
# (SD 2.x, SDXL's second encoder) with "!" (id 0), as diffusers' tokenizer configs say.
END_OF_TEXT = "<|endoftext|>"
OPEN_CLIP_PAD = "!"


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the Core ML model declares it."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"  # "float16" | "float32": what the model declares, whatever it computes in
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class EncoderWidths:
    """The widths of one text encoder's outputs."""

    hidden: int  # hidden states, per token
    pooled: int  # the pooled vector: hidden width, or the projection's for an encoder with one


@dataclass(frozen=True)
class Geometry:
    """The sizes a bundle's models are converted for."""

    height: int  # image pixels
    width: int
    unet_batch: int  # 2: both guidance branches in one call; 1: one call per branch
    text_dim: int  # the UNet's cross-attention width (768 SD 1.x, 1024 SD 2.x, 2048 SDXL, 1280 its refiner)
    max_length: int = 77  # tokens per prompt
    vae_scale: int = 8  # image side / latent side
    latent_channels: int = 4
    # Each text encoder's output widths, by model name; an encoder absent here has the UNet's
    # text width for both (SD 1.x / 2.x).
    encoders: tuple[tuple[str, EncoderWidths], ...] = ()
    pooled_dim: int = 0  # the UNet's ``text_embeds`` width (SDXL); 0: no such input
    time_ids: int = 0  # how many ``time_ids`` the UNet takes (SDXL 6, its refiner 5); 0: none

    @property
    def latent(self) -> tuple[int, int]:
        return self.height // self.vae_scale, self.width // self.vae_scale

    def encoder(self, name: str) -> EncoderWidths:
        return dict(self.encoders).get(name, EncoderWidths(self.text_dim, self.text_dim))


IO = tuple[list[TensorSpec], list[TensorSpec]]


@dataclass(frozen=True)
class ComponentSpec:
    """One model of a bundle."""

    name: str  # the bundle's model name (Apple's resource name), e.g. "Unet"
    cli_name: str  # as ``--components`` spells it, e.g. "unet"
    source_part: str  # the diffusers subfolder its weights come from: text_encoder, unet, vae
    description: str
    io: Callable[[Geometry], IO]  # (inputs, outputs)
    # Inputs whose element-wise features stay float32 inside a float16 program (see
    # ``convert/export.float32_features_of``).
    float32_features: tuple[str, ...] = ()
    # Which torch module implements it (``convert/components.BUILDERS``); default: ``cli_name``.
    builder: str = ""

    @property
    def module(self) -> str:
        return self.builder or self.cli_name


@dataclass(frozen=True)
class TextEncoderUse:
    """One text encoder of the conditioning: which model, which output, how prompts are padded."""

    model: str  # bundle model name
    hidden: str  # the output whose hidden states condition the UNet, (1, 77, C)
    pad_token: str  # the family's default; a bundle's tokenizer files may name another


@dataclass(frozen=True)
class Conditioning:
    """How a prompt becomes the UNet's conditioning: each encoder's ``hidden`` output, joined
    along channels in this order and laid out (B, C, 1, 77), is ``encoder_hidden_states``.

    SDXL adds two inputs: ``text_embeds``, the ``pooled_outputs`` of the encoder named by
    ``pooled``, and ``time_ids``, the image's micro-conditioning: ``"size"``, six numbers
    (original height and width, crop top and left, target height and width), or ``"aesthetic"``,
    five (original size, crop, and an aesthetic score in place of the target size: the refiner's).
    """

    encoders: tuple[TextEncoderUse, ...]
    pooled: str | None = None
    time_ids: str | None = None  # None | "size" | "aesthetic"

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(use.model for use in self.encoders)


@dataclass(frozen=True)
class Family:
    name: str  # as the manifest records it
    label: str  # for messages
    components: tuple[ComponentSpec, ...]  # in conversion order
    required: tuple[str, ...]  # the models every text-to-image run needs
    conditioning: Conditioning
    default_size: tuple[int, int]  # (height, width) pixels the family's models are usually trained at
    vae_scale: int = 8  # image side / latent side
    latent_channels: int = 4
    vae_scaling_factor: float = 0.18215  # diffusers' default, for a pipeline without a VAE config
    unet: str = "Unet"  # the denoiser's model name

    @property
    def time_ids(self) -> int:
        """How many ``time_ids`` its UNet takes (0: none)."""
        return {"size": 6, "aesthetic": 5}.get(self.conditioning.time_ids or "", 0)

    @property
    def pad_token(self) -> str:
        return self.conditioning.encoders[0].pad_token

    def component(self, cli_name: str) -> ComponentSpec:
        return next(c for c in self.components if c.cli_name == cli_name)


# ------------------------------------------------------------------ SD 1.x and 2.x


_INPUT_IDS = "Token ids (float), start token first, padded"


def _text_encoder_io(g: Geometry) -> IO:
    widths = g.encoder("TextEncoder")
    return (
        [TensorSpec("input_ids", (1, g.max_length), description=_INPUT_IDS)],
        [
            TensorSpec(
                "last_hidden_state", (1, g.max_length, widths.hidden), description="Text embeddings after the final LayerNorm"
            ),
            TensorSpec("pooled_outputs", (1, widths.pooled), description="Embedding at the end-of-text token"),
        ],
    )


def _unet_io(g: Geometry) -> IO:
    h, w = g.latent
    b, c = g.unet_batch, g.latent_channels
    return (
        [
            TensorSpec("sample", (b, c, h, w), description="Latents, scaled for this timestep by the scheduler"),
            TensorSpec("timestep", (b,), description="Diffusion timestep per batch item"),
            TensorSpec("encoder_hidden_states", (b, g.text_dim, 1, g.max_length), description="Text embeddings, (B, C, 1, S)"),
            # SDXL's micro-conditioning, in the order of the module's forward (models/unet.py).
            *([TensorSpec("text_embeds", (b, g.pooled_dim), description="Pooled text embedding")] if g.pooled_dim else []),
            *([TensorSpec("time_ids", (b, g.time_ids), description="Original size, crop top-left, then target size "
                          "(base) or aesthetic score (refiner)")] if g.time_ids else []),
        ],
        [TensorSpec("noise_pred", (b, c, h, w), description="Model prediction (noise or v, per the manifest)")],
    )


def _vae_decoder_io(g: Geometry) -> IO:
    h, w = g.latent
    return (
        [TensorSpec("z", (1, g.latent_channels, h, w), description="Latents divided by the VAE scaling factor")],
        [TensorSpec("image", (1, 3, g.height, g.width), description="RGB image in [-1, 1] (unclamped)")],
    )


def _vae_encoder_io(g: Geometry) -> IO:
    h, w = g.latent
    return (
        [TensorSpec("x", (1, 3, g.height, g.width), description="RGB image in [-1, 1]")],
        [TensorSpec("latent", (1, 2 * g.latent_channels, h, w),
                    description="Latent mean (first half of the channels) and log-variance (second half), unscaled")],
    )


SD_COMPONENTS = (
    ComponentSpec("TextEncoder", "text-encoder", "text_encoder", "CLIP text encoder", _text_encoder_io),
    ComponentSpec("Unet", "unet", "unet", "Denoising UNet", _unet_io, float32_features=("timestep",)),
    ComponentSpec("VAEDecoder", "vae-decoder", "vae", "VAE decoder: latents to image", _vae_decoder_io),
    ComponentSpec("VAEEncoder", "vae-encoder", "vae", "VAE encoder: image to latent moments", _vae_encoder_io),
)



def _stable_diffusion(name: str, label: str, pad_token: str, default_size: tuple[int, int]) -> Family:
    """SD 1.x and 2.x: one CLIP encoder, the same four components."""
    return Family(
        name=name,
        label=label,
        components=SD_COMPONENTS,
        required=("TextEncoder", "Unet", "VAEDecoder"),
        conditioning=Conditioning((TextEncoderUse("TextEncoder", "last_hidden_state", pad_token),)),
        default_size=default_size,
    )


SD1 = _stable_diffusion("sd1", "Stable Diffusion 1.x", END_OF_TEXT, (512, 512))
# SD 2.x conditions on OpenCLIP's penultimate layer; its published text encoder config already
# stops there (num_hidden_layers 23 of 24), so the converted model's last_hidden_state is it.
# Its default size is that of the 768 v-prediction models; SD 2 base is 512.
SD2 = _stable_diffusion("sd2", "Stable Diffusion 2.x", OPEN_CLIP_PAD, (768, 768))

# ------------------------------------------------------------------ SDXL
#
# As Apple's Swift ``StableDiffusionXLPipeline`` loads and feeds them (e12202c):
# ``StableDiffusionXL+Resources.swift`` lines 27-36 name the models (TextEncoder, TextEncoder2,
# Unet, UnetRefiner, VAEDecoder, VAEEncoder; TextEncoder is optional, as a refiner has none) and
# line 68 pads the second tokenizer with "!"; ``TextEncoderXL.swift`` lines 85-86 read
# ``hidden_embeds`` and ``pooled_outputs`` from each encoder; ``StableDiffusionXLPipeline.swift``
# lines 285-310 concatenate the two encoders' hidden states (768 + 1280) for the base, give the
# refiner the second's alone, and take ``text_embeds`` from the second's pooled output, while lines
# 326-357 build ``time_ids`` (batch, 6) for the base and (batch, 5) for the refiner, which line 153
# tells apart by that input's last dimension; ``Unet.swift`` lines 165-174 feed ``sample``,
# ``timestep`` (always batch 2), ``encoder_hidden_states``, ``text_embeds`` and ``time_ids``.
# Both encoders condition on their penultimate layer (diffusers' ``hidden_states[-2]``); the first
# one's pooled output is CLIP's unprojected ``pooler_output``, the second one's its projection,
# ``text_embeds``.


def _xl_text_encoder_io(name: str) -> Callable[[Geometry], IO]:
    def io(g: Geometry) -> IO:
        widths = g.encoder(name)
        return (
            [TensorSpec("input_ids", (1, g.max_length), description=_INPUT_IDS)],
            [
                TensorSpec("hidden_embeds", (1, g.max_length, widths.hidden),
                           description="Hidden states of the penultimate layer"),
                TensorSpec("pooled_outputs", (1, widths.pooled), description="Pooled embedding at the end-of-text token"),
            ],
        )

    return io


_XL_TEXT_ENCODER = ComponentSpec("TextEncoder", "text-encoder", "text_encoder", "CLIP ViT-L text encoder",
                                 _xl_text_encoder_io("TextEncoder"), builder="text-encoder-penultimate")
_XL_TEXT_ENCODER_2 = ComponentSpec("TextEncoder2", "text-encoder-2", "text_encoder_2",
                                   "OpenCLIP ViT-bigG text encoder with projection",
                                   _xl_text_encoder_io("TextEncoder2"), builder="text-encoder-projection-penultimate")
# The time ids are sizes up to thousands of pixels, embedded by sinusoids: float32 keeps them exact.
_XL_UNET_FLOAT32 = ("timestep", "time_ids")
_VAE = SD_COMPONENTS[2:]

SDXL = Family(
    name="sdxl",
    label="Stable Diffusion XL",
    components=(_XL_TEXT_ENCODER, _XL_TEXT_ENCODER_2,
                ComponentSpec("Unet", "unet", "unet", "Denoising UNet (SDXL)", _unet_io, float32_features=_XL_UNET_FLOAT32),
                *_VAE),
    required=("TextEncoder", "TextEncoder2", "Unet", "VAEDecoder"),
    conditioning=Conditioning(
        (TextEncoderUse("TextEncoder", "hidden_embeds", END_OF_TEXT),
         TextEncoderUse("TextEncoder2", "hidden_embeds", OPEN_CLIP_PAD)),
        pooled="TextEncoder2",
        time_ids="size",
    ),
    default_size=(1024, 1024),
    vae_scaling_factor=0.13025,
)
SDXL_REFINER = Family(
    name="sdxl-refiner",
    label="Stable Diffusion XL refiner",
    components=(_XL_TEXT_ENCODER_2,
                ComponentSpec("UnetRefiner", "unet", "unet", "Denoising UNet (SDXL refiner)", _unet_io,
                              float32_features=_XL_UNET_FLOAT32),
                *_VAE),
    required=("TextEncoder2", "UnetRefiner", "VAEDecoder"),
    conditioning=Conditioning((TextEncoderUse("TextEncoder2", "hidden_embeds", OPEN_CLIP_PAD),), pooled="TextEncoder2",
                              time_ids="aesthetic"),
    default_size=(1024, 1024),
    vae_scaling_factor=0.13025,
    unet="UnetRefiner",
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL, SDXL_REFINER)}
# Every --components name any family has, in conversion order (the refiner's UNet is "unet" too).
COMPONENT_NAMES: tuple[str, ...] = ("text-encoder", "text-encoder-2", "unet", "vae-decoder", "vae-encoder")
# Every model name any family has, in conversion order.
MODEL_NAMES: tuple[str, ...] = tuple(dict.fromkeys(c.name for f in FAMILIES.values() for c in f.components))


def family(name: str) -> Family:
    """The family named ``name``; ``KeyError`` for an unknown one."""
    return FAMILIES[name]
