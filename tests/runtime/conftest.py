"""Fixtures shared by the runtime tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from coreml_sd.testing.clip_vocab import find_clip_bpe, write_clip_vocab

# open_clip_torch is not in the `dev` extra: its own dependencies (torchvision, timm) break beside
# the pinned torch, so ./dev installs it alone, without them.
MISSING_VOCAB = (
    "open_clip_torch, the only source of CLIP's BPE vocabulary, is not installed: "
    "./dev installs it (or: pip install --no-deps open_clip_torch==3.3.0)"
)


@pytest.fixture(scope="session")
def clip_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with CLIP's ``vocab.json`` and ``merges.txt``, built from open_clip's BPE file.

    Built once per session. Fails (never skips) where ``open_clip_torch`` is missing: it is the
    only source of a real vocabulary, and a silently skipped tokenizer parity suite would pass
    a broken tokenizer. tests/conftest.py treats the tiny models' vocabulary the same way.
    """
    try:
        bpe_path = find_clip_bpe()
    except FileNotFoundError:
        pytest.fail(MISSING_VOCAB, pytrace=False)
    out_dir = tmp_path_factory.mktemp("clip_vocab")
    write_clip_vocab(out_dir, bpe_path)
    return out_dir
