from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from coreml_sd.cli import main
from coreml_sd.runtime import image as img
from coreml_sd.runtime.image import (
    ImageError,
    Parameters,
    crop_box,
    fit_image,
    from_pil,
    prepare_output,
    read_image,
    read_parameters,
    save_png,
    slug,
    to_pil,
)

PARAMS = Parameters("a cat, sitting", "blurry", 20, "euler-a", 7.5, 42, 512, 768, "sd15", strength=0.6)


def test_infotext_layout_other_tools_parse():
    text = PARAMS.infotext()
    lines = text.splitlines()
    assert lines[:2] == ["a cat, sitting", "Negative prompt: blurry"]
    assert lines[2].startswith("Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: sd15, ")
    assert "Denoising strength: 0.6" in lines[2]
    # A value with a comma is quoted so the key-value line still splits.
    quoted = Parameters("p", "", 1, "ddim", 1.0, 1, 8, 8, "org/model, v2").infotext()
    assert 'Model: "org/model, v2"' in quoted and "Negative prompt" not in quoted


# The key-value line as readers of this format parse it: `Key: value` separated by ", ", where a
# value is either a double-quoted JSON string (escapes included) or runs to the next comma.
PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def read_pairs(line: str) -> dict[str, str]:
    return {k: json.loads(v) if v.startswith('"') else v for k, v in PAIR.findall(line)}


@pytest.mark.parametrize("model", ['org/model, v2', 'a "quoted" name', 'trailing "', 'C:\\models\\sd', 'plain'])
def test_every_value_reads_back_exactly(model):
    line = Parameters("p", "", 1, "ddim", 7.5, 3, 8, 8, model).infotext().splitlines()[-1]
    fields = read_pairs(line)
    assert fields["Model"] == model and fields["Seed"] == "3" and fields["Version"] == "coreml-sd"
    if model == "plain":
        assert "Model: plain," in line  # only values that need it are quoted


def test_to_pil_rounds_like_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    x = np.random.default_rng(0).uniform(-1.2, 1.2, (2, 3, 16, 8)).astype(np.float32)
    ours = [np.asarray(i) for i in to_pil(x)]
    theirs = [np.asarray(i) for i in VaeImageProcessor().postprocess(torch.from_numpy(x), output_type="pil")]
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_from_pil_range_and_resize():
    image = Image.fromarray(np.array([[[0, 255, 128]] * 4] * 2, np.uint8))  # 4 wide, 2 high
    x = from_pil(image, (2, 4))
    assert x.shape == (1, 3, 2, 4) and x.dtype == np.float32
    assert x[0, 0].min() == -1.0 and x[0, 1].max() == 1.0
    assert from_pil(image, (8, 16)).shape == (1, 3, 8, 16)


def test_crop_box():
    assert crop_box((640, 480), (512, 512)) == (80, 0, 560, 480)  # wider: equal strips off left and right
    assert crop_box((480, 640), (512, 512)) == (0, 80, 480, 560)
    assert crop_box((1024, 1024), (512, 512)) == (0, 0, 1024, 1024)
    assert crop_box((1000, 500), (768, 512)) == (125, 0, 875, 500)  # 3:2 of a 2:1 image


def test_fit_image_crops_the_center_and_never_stretches():
    # Columns: 2 red, 4 blue, 2 green; fitting to a 4x4 square keeps exactly the blue centre.
    row = [[255, 0, 0]] * 2 + [[0, 0, 255]] * 4 + [[0, 255, 0]] * 2
    wide = Image.fromarray(np.array([row] * 4, np.uint8))
    np.testing.assert_array_equal(np.asarray(fit_image(wide, (4, 4))), np.full((4, 4, 3), [0, 0, 255], np.uint8))
    # Same aspect ratio: a plain resize, nothing cut.
    same = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 32, 3), dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(fit_image(same, (8, 16))), np.asarray(same.resize((16, 8), Image.LANCZOS)))
    assert fit_image(same.convert("L"), (16, 32)).mode == "RGB"


# ------------------------------------------------------------------ reading init images


def test_exif_orientation_is_applied(tmp_path):
    """A phone portrait is stored landscape with EXIF orientation 6 ("rotate 90 degrees clockwise
    to show"): read upright, as every image viewer shows it."""
    stored = np.zeros((16, 32, 3), np.uint8)  # 32 wide, 16 high: red top half, blue bottom half
    stored[:8, :, 0] = 255
    stored[8:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(stored).save(tmp_path / "portrait.jpg", quality=95, exif=exif)
    upright = np.asarray(read_image(tmp_path / "portrait.jpg")).astype(int)
    assert upright.shape == (32, 16, 3)  # 16 wide, 32 high
    # Turned clockwise, the top (red) is now the right half, the bottom (blue) the left half.
    assert upright[16, 12].tolist() == pytest.approx([255, 0, 0], abs=12)
    assert upright[16, 3].tolist() == pytest.approx([0, 0, 255], abs=12)


def test_16_bit_gray_is_scaled_to_8_bits(tmp_path):
    gradient = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    Image.fromarray(gradient).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as stored:
        assert stored.mode == "I;16"  # really a 16-bit file
    rgb = np.asarray(read_image(tmp_path / "gray16.png"))
    want = np.round(gradient / 257).astype(np.uint8)  # 65535 -> 255
    assert rgb.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], want)
    # A 32-bit integer image holding 16-bit samples (Pillow's "I") reads the same.
    np.testing.assert_array_equal(np.asarray(fit_image(Image.fromarray(gradient.astype(np.int32)), (32, 32)))[..., 0], want)


def test_transparency_is_flattened_onto_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    assert np.asarray(fit_image(rgba, (1, 2))).tolist() == [[[255, 255, 255], [255, 0, 0]]]
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor Pillow's "should be converted to RGBA" warning
        assert np.asarray(read_image(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [0, 0, 255]]]


@pytest.mark.parametrize(("size", "shown"), [((12, 10), "12x10 (0.00012 MP)"), ((15, 15), "0.000225 MP")],
                         ids=["over-the-limit", "over-twice-the-limit"])
def test_huge_image_is_a_one_line_error(tmp_path, monkeypatch, size, shown):
    """Pillow warns (DecompressionBombWarning) above its pixel limit and raises above twice it;
    a limit of 100 pixels stands in for the default ~89 MP so the test files stay tiny."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", size).save(tmp_path / "huge.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing leaks as a warning
        with pytest.raises(ImageError) as caught:
            read_image(tmp_path / "huge.png")
    assert str(caught.value) == (f"init image {tmp_path / 'huge.png'} is {shown}, too large to read safely; "
                                 "scale it down below 0.0001 MP (the model uses it at its own size, such as 512x512)")


def test_huge_init_image_in_the_cli(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (15, 15)).save(tmp_path / "huge.png")
    result = CliRunner().invoke(main, ["generate", "a cat", "--bundle", str(tiny_bundle("sd1", "split-einsum")),
                                       "--init-image", str(tmp_path / "huge.png"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: init image ") and "too large to read safely; scale it down below" in line
    assert not (tmp_path / "out").exists()


def test_prepare_output(tmp_path):
    assert prepare_output(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        prepare_output(tmp_path / "file" / "sub")
    with pytest.raises(FileExistsError):
        prepare_output(tmp_path / "file")
    assert not [p for p in (tmp_path / "a" / "b").iterdir()]  # the write probe leaves nothing


def test_slug():
    assert slug("A Photo of a CAT!") == "a-photo-of-a-cat"
    assert slug("   ") == "image"
    assert len(slug("word " * 50)) <= 60


def test_save_never_overwrites(tmp_path):
    existing = tmp_path / "a-cat-sitting-42.png"
    existing.write_bytes(b"keep me")
    first = save_png(Image.new("RGB", (4, 4), "red"), PARAMS, tmp_path)
    second = save_png(Image.new("RGB", (4, 4), "blue"), PARAMS, tmp_path)
    assert existing.read_bytes() == b"keep me"
    assert first.name == "a-cat-sitting-42-2.png" and second.name == "a-cat-sitting-42-3.png"
    assert read_parameters(first) == PARAMS.infotext()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_save_without_hard_links(tmp_path, monkeypatch):
    """File systems without hard links fall back to an exclusive create: still never overwriting."""

    def no_links(src, dst):
        raise PermissionError("links not supported")

    monkeypatch.setattr(img.os, "link", no_links)
    (tmp_path / "a-cat-sitting-42.png").write_bytes(b"keep me")
    path = save_png(Image.new("RGB", (4, 4)), PARAMS, tmp_path)
    assert path.name == "a-cat-sitting-42-2.png" and Image.open(path).size == (4, 4)
    assert (tmp_path / "a-cat-sitting-42.png").read_bytes() == b"keep me"


@pytest.fixture
def umask():
    """Factory: ``umask(mask)`` sets the process umask for the test; the old one is restored after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-links"])
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)], ids=["022", "027", "002"])
def test_saved_files_follow_the_umask(tmp_path, monkeypatch, umask, links, mask, mode):
    if not links:
        def no_links(src, dst):
            raise PermissionError("links not supported")

        monkeypatch.setattr(img.os, "link", no_links)
    umask(mask)
    path = save_png(Image.new("RGB", (2, 2)), PARAMS, tmp_path)
    assert path.stat().st_mode & 0o777 == mode


def test_batch_files_are_numbered(tmp_path):
    names = [save_png(Image.new("RGB", (2, 2)), Parameters("x", "", 1, "ddim", 7.5, 9, 2, 2, "m", batch_size=2, batch_pos=i),
                      tmp_path).name
             for i in range(2)]
    assert names == ["x-9-1of2.png", "x-9-2of2.png"]


def test_verification_cache_still_catches_changes(tmp_path, monkeypatch):
    from coreml_sd.contract import hash_tree
    from coreml_sd.runtime.bundle import BundleError, verify_cached

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "b").mkdir()
    f = tmp_path / "b" / "w.bin"
    f.write_bytes(b"x" * 1000)
    files = hash_tree(tmp_path / "b", "w.bin")
    verify_cached(tmp_path / "b", files)
    assert list((tmp_path / "cache").rglob("*.json"))  # remembered
    f.write_bytes(b"y" * 1000)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(BundleError, match="does not match its sha256"):
        verify_cached(tmp_path / "b", files)
