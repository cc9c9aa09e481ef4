"""Helpers and constants several test modules share: ``from helpers import ...``.

pyproject.toml puts ``tests/`` on ``sys.path`` (pytest's ``pythonpath`` option), so this module
imports the same way in every test module, under ``--import-mode=importlib`` and in xdist
workers alike. It imports nothing heavy (no torch, no coremltools); fixtures live in the
conftest.py files.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

# The families the tiny models come in (the tiny_sd1_dir / tiny_sd2_dir fixtures of conftest.py).
FAMILIES = ("sd1", "sd2")

# (height, width) of the tiny several-size bundle (conftest.py's tiny_sizes_bundle), its default
# first: the tiny models' native 64x64, a portrait and a landscape size. Sides are multiples of 16
# (the VAE's 8 times the tiny UNet's 2); with split-einsum-v2's query chunk of 24 (conftest), no
# size's token count at the first attention level (64, 80, 96) is a multiple of the chunk.
TINY_SIZES = ((64, 64), (80, 64), (64, 96))


def size_function(height: int, width: int) -> str:
    """The function of a multifunction package that takes (height, width) images: "size_{W}x{H}"."""
    return f"size_{width}x{height}"


def one_line_error(result, *fragments: str) -> None:
    """A click ``CliRunner`` result that failed with one ``Error: ...`` line as the last line of
    stderr, holding every fragment, and no traceback."""
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    message = result.stderr.strip().splitlines()
    assert len(message) >= 1 and message[-1].startswith("Error: ")
    for fragment in fragments:
        assert fragment in message[-1], message[-1]


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| of two torch tensors of the same shape."""
    assert ours.shape == ref.shape
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def pixels(x):
    """RGB pixels as float64 (H, W, 3) arrays: of one image (a PIL image or an image file's path),
    or a list of them, one per image, of a pipeline result (anything with ``.images``)."""
    if hasattr(x, "images"):
        return [pixels(image) for image in x.images]
    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGB"), np.float64)
    with Image.open(x) as image:
        return np.asarray(image.convert("RGB"), np.float64)


def coreml_sd_command() -> list[str]:
    """The installed ``coreml-sd`` script beside this interpreter (else the module), as the start
    of a command line."""
    script = Path(sys.executable).with_name("coreml-sd")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "coreml_sd"]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c CODE ARGS`` in a fresh interpreter, its output captured as text; ``code`` is
    dedented, so it may be written indented inside a test."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=300)


def prompt_ids(pad: int):
    """Two tokenised prompts of different lengths as a (2, 77) torch tensor, padded with ``pad``:
    start token, "a photo of a cat" / 39 other ids, end token."""
    import torch

    ids = torch.full((2, 77), pad)
    ids[:, 0] = 49406
    ids[0, 1:6] = torch.tensor([320, 1125, 539, 320, 2368])  # a photo of a cat
    ids[0, 6] = 49407
    ids[1, 1:40] = torch.arange(1000, 1039)
    ids[1, 40] = 49407
    return ids
