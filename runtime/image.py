"""Images in and out: decoder output to PIL, init images to model input, PNG files with the
generation parameters other Stable Diffusion tools read.

The ``parameters`` text chunk follows the layout AUTOMATIC1111's web UI writes and most tools
(ComfyUI importers, civitai, image viewers) parse: the prompt, then ``Negative prompt: ...``, then
one line of ``Key: value`` pairs separated by ", ".
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

# Our scheduler names as those tools spell samplers.
SAMPLER_NAMES = {
    "pndm": "PLMS",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler-a": "Euler a",
    "dpmpp-2m": "DPM++ 2M",
    "dpmpp-2m-karras": "DPM++ 2M Karras",
    "lcm": "LCM",
}


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


def _quote(value) -> str:
    text = str(value)
    return f'"{text}"' if any(c in text for c in ',:\n"') else text


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """Decoder output (N, 3, H, W) in [-1, 1] to 8-bit images, rounded as diffusers rounds."""
    pixels = np.clip(images.astype(np.float32) / 2 + 0.5, 0, 1)
    pixels = np.round(pixels.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]


def from_pil(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """An init image as encoder input (1, 3, H, W) in [-1, 1], resized to ``size`` (height, width)."""
    image = image.convert("RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (array * 2 - 1).transpose(2, 0, 1)[None]


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
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        for n in range(1, 10_000):
            target = directory / (f"{stem}.png" if n == 1 else f"{stem}-{n}.png")
            if _claim(Path(tmp), target):
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
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as out:
            out.write(tmp.read_bytes())
        return True


def read_parameters(path: Path) -> str | None:
    """The ``parameters`` text of a PNG written by ``save_png`` (or another SD tool)."""
    with Image.open(path) as image:
        return image.info.get("parameters")
