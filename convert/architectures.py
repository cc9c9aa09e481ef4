"""The architectures a single-file checkpoint may have without ``--config``, shipped as configs.

A single file holds weights only. Most fine-tunes share one of five published architectures, so
the package ships their small diffusers config files under ``configs/<name>/`` (the pipeline's
``model_index.json``, each part's ``config.json``, the scheduler's, each tokenizer's pad token),
with the published values, and one copy of CLIP's BPE vocabulary (``configs/clip/``) that all
their tokenizers share. Nothing here needs the hub: a user converting offline has everything.

Each name is also accepted by ``--config``: ``--config sd2-512`` converts an SD 2.x file as
512-pixel epsilon model, which its weights alone cannot tell from a 768-pixel v one.
Which architecture a file has is decided in ``single_file``, from its tensors' names and shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .diffusers_folder import DiffusersFolder, _pad_token, file_identities

__all__ = ["ARCHITECTURES", "Architecture", "CLIP_MERGES", "CLIP_VOCAB", "ShippedConfigs", "shipped"]

CONFIGS = Path(__file__).parent / "configs"
# OpenAI CLIP's vocabulary and merge rules (MIT licence, see configs/clip/LICENSE) in the form the
# Hugging Face CLIP repositories publish (vocab.json, merges.txt), derived from CLIP's BPE list
# (coreml_sd.testing.clip_vocab). SD 1.x, 2.x and both SDXL tokenizers use them; only their pad
# tokens differ. Shipped because a single file has no tokenizer and open_clip, whose BPE list the
# tests derive them from, is no runtime dependency.
CLIP_VOCAB = CONFIGS / "clip" / "vocab.json"
CLIP_MERGES = CONFIGS / "clip" / "merges.txt"


@dataclass(frozen=True)
class Architecture:
    label: str  # how messages name it
    repo: str  # the hub repository whose configs these are


ARCHITECTURES = {
    "sd15": Architecture("SD 1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sd2-512": Architecture("SD 2.x 512 epsilon", "stabilityai/stable-diffusion-2-base"),
    "sd2-768-v": Architecture("SD 2.x 768 v-prediction", "stabilityai/stable-diffusion-2-1"),
    "sdxl-base": Architecture("SDXL base 1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
    "sdxl-refiner": Architecture("SDXL refiner 1.0", "stabilityai/stable-diffusion-xl-refiner-1.0"),
}


@dataclass
class ShippedConfigs(DiffusersFolder):
    """A shipped architecture: a diffusers layout without weights whose tokenizers share the
    package's CLIP vocabulary instead of holding a copy each."""

    def tokenizer_files(self, family: str) -> tuple[Path, Path, str]:
        part = "tokenizer_2" if family == "sdxl-refiner" else "tokenizer"
        return CLIP_VOCAB, CLIP_MERGES, _pad_token(self.root / part, family)

    def identity(self, component: str) -> Iterator[str]:
        if component != "tokenizer":
            yield from super().identity(component)
            return
        folders = [self.root / "tokenizer", self.root / "tokenizer_2"]
        yield from file_identities([CLIP_VOCAB, CLIP_MERGES, *(p for f in folders for p in f.glob("*"))])


def shipped(name: str, allow_pickle: bool = False) -> ShippedConfigs:
    """The shipped configs of architecture ``name`` (a key of ``ARCHITECTURES``)."""
    label = ARCHITECTURES[name].label
    return ShippedConfigs(CONFIGS / name, f"coreml-sd's built-in {label} config ({name})", allow_pickle)
