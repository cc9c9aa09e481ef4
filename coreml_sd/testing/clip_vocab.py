"""Build CLIP's ``vocab.json`` and ``merges.txt`` from the BPE file shipped by ``open_clip_torch``.

Stable Diffusion's text encoders (SD 1.x: OpenAI CLIP ViT-L/14; SD 2.x: OpenCLIP ViT-H/14) share
one byte-level BPE vocabulary. The Hugging Face repositories ship it as ``vocab.json`` (token ->
id) plus ``merges.txt`` (ranked merge rules); ``open_clip_torch`` ships only the original gzip'd
merge list. This module derives the former from the latter, so no network access is needed.

How the 49408 ids are laid out (the order OpenAI's CLIP tokenizer builds them in):

* ids 0..255: the 256 byte symbols of the byte-to-unicode alphabet, printable bytes first;
* ids 256..511: the same 256 symbols with the end-of-word marker ``</w>`` appended;
* ids 512..49405: one token per merge rule, in rank order, spelled as the two halves joined;
* ids 49406 and 49407: ``<|startoftext|>`` and ``<|endoftext|>``.

Only the first 48894 merges of the BPE file are used: CLIP's vocabulary size 49408 is fixed as
``49152 - 256 - 2`` merges past the file's header line, plus the 512 byte symbols and 2 specials.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from pathlib import Path

from ..runtime.tokenizer import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, byte_symbols

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MERGES_HEADER",
    "NUM_MERGES",
    "VOCAB_SIZE",
    "build_vocab",
    "byte_symbols",
    "find_clip_bpe",
    "read_merges",
    "write_clip_vocab",
]

BPE_RESOURCE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # 48894: CLIP's fixed vocabulary budget, see module docstring
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408
# Hugging Face's BPE readers skip a first line starting with "#version"; the CLIP repositories
# carry this header, and transformers' slow tokenizer drops the first line unconditionally.
MERGES_HEADER = "#version: 0.2"


def find_clip_bpe() -> Path:
    """Return the path of CLIP's BPE merge list inside the installed ``open_clip_torch``.

    The file is located through the distribution's file records rather than by importing
    ``open_clip``, whose import pulls in torch and other heavy dependencies.
    """
    try:
        files = importlib.metadata.files("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        files = None
    for record in files or ():
        if str(record).replace("\\", "/") == BPE_RESOURCE:
            path = Path(record.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"CLIP's BPE file ({BPE_RESOURCE}) was not found: open_clip_torch is not installed "
        "(or is incomplete). Install it without its heavy dependencies: "
        "pip install --no-deps open_clip_torch==3.3.0"
    )


def read_merges(bpe_path: str | Path, count: int = NUM_MERGES) -> list[tuple[str, str]]:
    """Read the first ``count`` merge rules (after the header line) from the gzip'd BPE file."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        header = f.readline()
        if "#version" not in header:
            raise ValueError(f"{bpe_path}: first line {header!r} is not a '#version' header")
        merges = []
        for line in f:
            if len(merges) == count:
                break
            # A rule is two symbols separated by one space; no byte symbol is whitespace.
            left, sep, right = line.rstrip("\n").partition(" ")
            if not sep or not left or not right:
                raise ValueError(f"{bpe_path}: malformed merge rule {line!r}")
            merges.append((left, right))
    if len(merges) != count:
        raise ValueError(f"{bpe_path}: only {len(merges)} merge rules, {count} needed")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Return the token -> id mapping for the given merges (see the module docstring for layout)."""
    alphabet = list(byte_symbols().values())
    tokens = alphabet + [symbol + END_OF_WORD for symbol in alphabet]
    tokens += [left + right for left, right in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    # A duplicate would silently shift every later id; CLIP's merges are all distinct.
    if len(vocab) != len(tokens):
        raise ValueError("merge rules produce duplicate tokens; not a CLIP BPE file")
    return vocab


def write_clip_vocab(out_dir: str | Path, bpe_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` for CLIP into ``out_dir``; return their paths.

    ``bpe_path`` defaults to the file found by :func:`find_clip_bpe`. The JSON is written
    compactly with raw (non-escaped) UTF-8 in id order, the way the Hugging Face CLIP
    repositories store it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = read_merges(bpe_path if bpe_path is not None else find_clip_bpe())
    vocab = build_vocab(merges)

    vocab_path = out_dir / "vocab.json"
    merges_path = out_dir / "merges.txt"
    # newline="" keeps "\n" line ends on every platform, as in the published files.
    vocab_text = json.dumps(vocab, ensure_ascii=False, separators=(",", ":"))
    vocab_path.write_text(vocab_text, encoding="utf-8", newline="")
    lines = [MERGES_HEADER] + [f"{left} {right}" for left, right in merges]
    merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
    return vocab_path, merges_path
