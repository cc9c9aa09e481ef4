"""The conversion plan: every cheap check before any conversion, components chosen from the
family description."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from coreml_sd.convert.converter import ConvertError, ConvertOptions, plan
from coreml_sd.convert.source import open_source


def test_the_plan_takes_components_and_sizes_from_the_family(tiny_sd2_dir: Path, tmp_path: Path) -> None:
    p = plan(open_source(str(tiny_sd2_dir)), tmp_path / "out", ConvertOptions(components=("vae-decoder", "unet")))
    assert p.family.name == "sd2"
    assert [c.name for c in p.components] == ["Unet", "VAEDecoder"]  # the family's order, not the request's
    assert (p.geometry.height, p.geometry.width, p.geometry.text_dim) == (64, 64, 64)  # sample_size 8, cross-attention 64
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_a_unet_without_sample_size_asks_for_the_size_and_names_the_usual_one(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_sd1_dir, tmp_path / "pipe")
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "sample_size"}))
    with pytest.raises(ConvertError, match=r"no sample_size: pass --height \(Stable Diffusion 1\.x models are usually 512\)"):
        plan(open_source(str(folder)), tmp_path / "out")
    assert plan(open_source(str(folder)), tmp_path / "out", ConvertOptions(height=128, width=64)).geometry.latent == (16, 8)
