"""Fixtures for the conversion tests: single-file checkpoints, and no network.

Every test here runs with the Hugging Face hub in offline mode and an empty, private hub cache,
so nothing can reach the network or the user's cache; tests that exercise the hub code path
build a cache of their own. The tiny pipelines and bundles come from tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .ldm_checkpoint import write_ldm_checkpoint


@pytest.fixture(autouse=True)
def offline_hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline mode and an empty hub cache for every test; returns the cache folder."""
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hub_cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_sd1_single_file(tiny_sd1_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_sd1_dir`` as one original-layout (LDM) ``.safetensors`` checkpoint."""
    return write_ldm_checkpoint(tiny_sd1_dir, tmp_path_factory.mktemp("single") / "tiny_sd1.safetensors")


@pytest.fixture(scope="session")
def tiny_sd2_single_file(tiny_sd2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_sd2_dir`` as one original-layout (LDM) ``.safetensors`` checkpoint."""
    return write_ldm_checkpoint(tiny_sd2_dir, tmp_path_factory.mktemp("single") / "tiny_sd2.safetensors")
