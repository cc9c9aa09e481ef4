"""Fixtures shared by the runtime tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from coreml_sd.convert.clip_vocab import find_clip_bpe, write_clip_vocab


@pytest.fixture(scope="session")
def clip_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with CLIP's ``vocab.json`` and ``merges.txt``, built from open_clip's BPE file.

    Built once per session; skipped (not failed) where ``open_clip_torch`` is not installed, since
    it is only a source of the vocabulary data, not a dependency of the code under test.
    """
    try:
        bpe_path = find_clip_bpe()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out_dir = tmp_path_factory.mktemp("clip_vocab")
    write_clip_vocab(out_dir, bpe_path)
    return out_dir
