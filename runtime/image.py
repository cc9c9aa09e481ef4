"""Images in and out: decoder output to PIL, init images to model input, PNG files with the
generation parameters other Stable Diffusion tools read.

The ``parameters`` text chunk follows the layout AUTOMATIC1111's web UI writes and most tools
(ComfyUI importers, civitai, image viewers) parse: the prompt, then ``Negative prompt: ...``, then
one line of ``Key: value`` pairs separated by ", ". A value holding ',', ':' or a newline is
written as a JSON string (quotes and backslashes escaped), the quoting that web UI writes and its
parser undoes; a value holding '"' is quoted too (the web UI leaves it bare, and a bare value
starting with '"' would be misread), so every value reads back exactly.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from .schedulers import SCHEDULERS

# Our scheduler names as those tools spell samplers (a name a config gives, such as
# "dpm-solver-multistep", has no spelling there and is written as it is).
SAMPLER_NAMES = {name: spec.a1111_name for name, spec in SCHEDULERS.items()}


@dataclass(frozen=True)
class Parameters:
    """What produced an image, enough to reproduce it."""

    prompt: str
    negative_prompt: str
    steps: int
    scheduler: str
    guidance_scale: float
    seed: int
    width: int
    height: int
    model: str
    rng: str = "torch"
    batch_size: int = 1
    batch_pos: int = 0
    strength: float | None = None  # img2img only
    # SDXL, each written only when it was given (or, for the aesthetic scores, used)
    prompt_2: str = ""
    negative_prompt_2: str = ""
    original_size: tuple[int, int] | None = None  # (height, width), as diffusers orders it
    crop: tuple[int, int] | None = None  # (top, left)
    refiner: str | None = None  # the refiner's model name
    refiner_start: float | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None

    def infotext(self) -> str:
        fields = [
            ("Steps", self.steps),
            ("Sampler", SAMPLER_NAMES.get(self.scheduler, self.scheduler)),
            ("CFG scale", f"{self.guidance_scale:g}"),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
            ("Model", self.model),
        ]
        if self.strength is not None:
            fields.append(("Denoising strength", f"{self.strength:g}"))
        fields += self._xl_fields()
        if self.batch_size > 1:
            fields += [("Batch size", self.batch_size), ("Batch pos", self.batch_pos)]
        if self.rng != "torch":
            fields.append(("RNG", self.rng))
        fields.append(("Version", "coreml-sd"))
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields))
        return "\n".join(lines)


    def _xl_fields(self) -> list[tuple[str, object]]:
        """SDXL's fields. "Refiner" and "Refiner switch at" as AUTOMATIC1111's web UI writes them;
        the others are keys of our own, which its parser (and the readers that copy it) keep as
        they keep any key; sizes as "WxH", like "Size"."""
        fields: list[tuple[str, object]] = []
        if self.prompt_2:
            fields.append(("Prompt 2", self.prompt_2))
        if self.negative_prompt_2:
            fields.append(("Negative prompt 2", self.negative_prompt_2))
        if self.original_size is not None:
            fields.append(("Original size", f"{self.original_size[1]}x{self.original_size[0]}"))
        if self.crop is not None and tuple(self.crop) != (0, 0):
            fields += [("Crop top", self.crop[0]), ("Crop left", self.crop[1])]
        if self.refiner is not None:
            fields += [("Refiner", self.refiner), ("Refiner switch at", f"{self.refiner_start:g}")]
        if self.aesthetic_score is not None:
            fields.append(("Aesthetic score", f"{self.aesthetic_score:g}"))
        if self.negative_aesthetic_score is not None:
            fields.append(("Negative aesthetic score", f"{self.negative_aesthetic_score:g}"))
        return fields


def _quote(value) -> str:
    """A key-value line's value: as is, or as a JSON string when it would break the line's
    parsing (a ',' or ':' inside, a newline, or a '"' that would read as an opening quote)."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """Decoder output (N, 3, H, W) in [-1, 1] to 8-bit images, rounded as diffusers rounds."""
    pixels = np.clip(images.astype(np.float32) / 2 + 0.5, 0, 1)
    pixels = np.round(pixels.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]


def crop_box(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centered region (left, upper, right, lower) of an image of ``image_size`` (width,
    height) that has the aspect ratio of ``target`` (width, height): the whole image when the
    ratios agree, else the image less equal strips off both ends of its relatively longer side."""
    (w, h), (tw, th) = image_size, target
    if w * th > h * tw:  # wider than the target: keep the full height
        cw, ch = h * tw / th, h
    elif w * th < h * tw:  # taller: keep the full width
        cw, ch = w, w * th / tw
    else:
        return (0, 0, w, h)
    left, upper = (w - cw) / 2, (h - ch) / 2
    return (left, upper, left + cw, upper + ch)


class ImageError(ValueError):
    """An init image that cannot be used (one-line message naming the fix)."""


def read_image(path: str | Path) -> Image.Image:
    """An init image file as 8-bit RGB, upright (its EXIF orientation applied, as a phone's
    viewer shows it), fully read (the file is closed on return); see ``to_rgb`` for the modes."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice it and refuses above; this function refuses
            # both itself, in one line with the size, instead of printing Pillow's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if limit is not None and image.width * image.height > limit:
                    raise ImageError(_too_large(path, f"{image.width}x{image.height} ({_mp(image.width * image.height)})",
                                                limit))
                return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as exc:
        # Raised while opening, before the image (and its width and height) exists.
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = _mp(int(pixels.group(1))) if pixels else f"over {_mp(2 * limit)}"
        raise ImageError(_too_large(path, size, limit)) from None
    except ImageError:
        raise
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read init image {path}: {exc}") from None


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} MP"


def _too_large(path, size: str, limit: int) -> str:
    return (f"init image {path} is {size}, too large to read safely; scale it down below {_mp(limit)} "
            "(the model uses it at its own size, such as 512x512)")


# Integer modes holding 16 bits a sample (16-bit PNG and TIFF, PGM): Pillow's convert("L") clips
# them at 255, which turns all but the darkest tenth of a percent white.
_WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: 16-bit samples scaled to 8 bits (65535 -> 255), transparency (an
    alpha channel, or a palette's or gray image's transparent color) flattened onto white as
    AUTOMATIC1111 flattens init images, every other mode by Pillow's ``convert``."""
    if image.mode in _WIDE_MODES:
        # point() on an "I" image is a linear map; the + 0.5 rounds where it would truncate.
        image = image.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, "white")
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` as RGB (``to_rgb``) at ``size`` (height, width), never stretched: scaled to cover
    that size keeping its aspect ratio and center-cropped (AUTOMATIC1111's "Crop and resize"); an
    image of the right size is returned as is."""
    image = to_rgb(image)
    h, w = size
    if image.size == (w, h):
        return image
    return image.resize((w, h), Image.LANCZOS, box=crop_box(image.size, (w, h)))


def from_pil(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """An init image as encoder input (1, 3, H, W) in [-1, 1], fitted to ``size`` (height, width)
    by ``fit_image``."""
    array = np.asarray(fit_image(image, size), dtype=np.float32) / 255.0
    return (array * 2 - 1).transpose(2, 0, 1)[None]


def prepare_output(directory: Path) -> Path:
    """Create ``directory`` if needed and check that files can be created in it (raises
    ``OSError``: a file in the way, no permission, a read-only or full file system), so that a
    bad output folder is found before any work, not after it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(prefix=".tmp-", dir=directory) as probe:
        probe.write(b"\0")
        probe.flush()
    return directory


def slug(prompt: str, limit: int = 60) -> str:
    """A file-name-safe stem from a prompt: lowercase words joined by '-'."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    text = "-".join(words)[:limit].rstrip("-")
    return text or "image"


def save_png(image: Image.Image, params: Parameters, directory: Path) -> Path:
    """Write ``image`` to a new file named from prompt and seed (``-2``, ``-3`` ... if taken): an
    existing file is never overwritten, even by a concurrent run. Returns the path written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params.infotext())
    stem = f"{slug(params.prompt)}-{params.seed}"
    if params.batch_size > 1:
        stem += f"-{params.batch_pos + 1}of{params.batch_size}"
    # Not mkstemp: its files are always 0600, and the link below would keep that mode; a file
    # created with 0666 gets what the umask leaves (0644 under 022), as any new file should.
    tmp = directory / f".tmp-{secrets.token_hex(8)}.png"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        for n in range(1, 10_000):
            target = directory / (f"{stem}.png" if n == 1 else f"{stem}-{n}.png")
            if _claim(tmp, target):
                return target
        raise OSError(f"no free file name for {stem} in {directory}")
    finally:
        os.unlink(tmp)


def _claim(tmp: Path, target: Path) -> bool:
    """Give the finished file ``tmp`` the name ``target`` unless that name exists (atomically)."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive create, then copy
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as out:
            out.write(tmp.read_bytes())
        return True


def read_parameters(path: Path) -> str | None:
    """The ``parameters`` text of a PNG written by ``save_png`` (or another SD tool)."""
    with Image.open(path) as image:
        return image.info.get("parameters")
