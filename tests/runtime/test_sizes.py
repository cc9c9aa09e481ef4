"""Bundles of several image sizes (``convert --sizes``) in the runtime.

A request's height and width pick one of the bundle's sizes (default: its first); the UNet and
VAE load that size's function, the text encoder its only one. Generating at a size of the
multi-size bundle at its default size gives the image the single-size bundle gives (same seed;
other sizes are compared with diffusers in tests/convert/test_sizes.py), with the size in the
PNG's parameters and an init image fitted to it; a pipeline asked for another size
swaps its UNet and VAE for that size's, keeping the text encoder. Sizes the bundle lacks, and
malformed ``sizes`` fields, are one-line errors.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from coreml_sd.cli import main
from coreml_sd.runtime.bundle import BundleError, open_bundle
from coreml_sd.runtime.image import read_parameters
from coreml_sd.runtime.pipeline import GenerationError, Pipeline, check_request
from helpers import TINY_SIZES, one_line_error, pixels, size_function

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

PROMPT = "a lighthouse at dusk"
FIRST, OTHER = TINY_SIZES[0], TINY_SIZES[1]
LISTED = ", ".join(f"{w}x{h}" for h, w in TINY_SIZES)


def test_bundle_sizes_and_at(tiny_sizes_bundle, tiny_sized):
    bundle = open_bundle(tiny_sizes_bundle)
    assert bundle.sizes == TINY_SIZES and bundle.image_size == FIRST and bundle.function == size_function(*FIRST)
    other = bundle.at(*OTHER)
    assert (other.image_size, other.latent_size, other.function) == (OTHER, (OTHER[0] // 8, OTHER[1] // 8),
                                                                     size_function(*OTHER))
    assert other.sizes == bundle.sizes and bundle.image_size == FIRST  # a copy; the bundle is unchanged
    assert [other.function_of(n) for n in ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder")] == [
        None, *[size_function(*OTHER)] * 3]
    single = open_bundle(tiny_sized(64, 64))  # no "sizes" in its manifest: the one it was converted for
    assert single.sizes == ((64, 64),) and single.function is None and single.at(64, 64).function is None


def test_a_size_the_bundle_lacks_lists_its_sizes(tiny_sizes_bundle, tiny_sized):
    with pytest.raises(BundleError) as error:
        open_bundle(tiny_sizes_bundle).at(640, 640)
    assert str(error.value) == f"this bundle has no 640x640 size: it has {LISTED}; re-convert with --sizes to add one"
    with pytest.raises(BundleError) as error:
        open_bundle(tiny_sized(64, 64)).at(48, 64)  # a one-size bundle
    assert str(error.value) == ("this bundle was converted for 64x64 images; re-convert with --width/--height to "
                                "generate 64x48")
    with pytest.raises(GenerationError, match=f"^this bundle has no 64x32 size: it has {LISTED}; re-convert"):
        check_request(open_bundle(tiny_sizes_bundle), PROMPT, height=32)  # width: the default size's
    one_line_error(CliRunner().invoke(main, ["generate", PROMPT, "--bundle", str(tiny_sizes_bundle), "--width", "640",
                                             "--height", "640"]), f"this bundle has no 640x640 size: it has {LISTED}")


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda m: m.update(sizes="64x48"), "field 'sizes' is \"64x48\", expected [{\"height\", \"width\", \"function\"}"),
    (lambda m: m.update(sizes=[]), "field 'sizes' is [], expected"),
    (lambda m: m["sizes"][1].update(height=60), "field 'sizes' is"),
    (lambda m: m["sizes"][1].update(function=""), "field 'sizes' is"),
    (lambda m: m["sizes"].reverse(), "expected distinct sizes, each with its own function, the first the image_size"),
    (lambda m: m["sizes"][1].update(height=FIRST[0], width=FIRST[1]), "expected distinct sizes"),
    (lambda m: m["sizes"][1].update(function=None), "each with its own function"),
])
def test_malformed_sizes_name_the_field(tiny_sizes_bundle, tmp_path, edit, expected):
    bundle = shutil.copytree(tiny_sizes_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as error:
        open_bundle(bundle, verify=False)
    assert expected in str(error.value) and "re-convert the bundle with 'coreml-sd convert'" in str(error.value)
    assert "\n" not in str(error.value)


def test_generate_at_the_default_size_is_the_single_size_bundle(tiny_sizes_bundle, tiny_sized, tmp_path):
    """Through the CLI and the mil backend: no --width/--height means the first size, the same
    pixels as the single-size bundle of that size, the size in the PNG's parameters."""
    for (h, w), options in ((FIRST, []),):
        pngs = {}
        for kind, bundle in (("multi", tiny_sizes_bundle), ("single", tiny_sized(h, w))):
            result = CliRunner().invoke(main, ["generate", PROMPT, "--bundle", str(bundle), "--seed", "4", "--steps", "1",
                                               "--backend", "mil", "-o", str(tmp_path / f"{kind}-{w}x{h}"), *options])
            assert result.exit_code == 0, result.output
            [pngs[kind]] = result.stdout.split()
        with Image.open(pngs["multi"]) as image:
            assert image.size == (w, h)
        np.testing.assert_array_equal(pixels(pngs["multi"]), pixels(pngs["single"]))
        assert f"Size: {w}x{h}" in read_parameters(pngs["multi"])
        assert read_parameters(pngs["multi"]) == read_parameters(pngs["single"]).replace(tiny_sized(h, w).name,
                                                                                         tiny_sizes_bundle.name)


def test_a_pipeline_switches_sizes(tiny_sizes_bundle, tiny_sized):
    """One pipeline, requests alternating sizes: each loads its size's UNet and VAE (the text
    encoder stays), and gives what a pipeline of that size's single bundle gives."""
    pipe = Pipeline.from_bundle(tiny_sizes_bundle, backend="mil")
    assert pipe.sizes == TINY_SIZES
    assert pipe.slots["Unet"].model.function == size_function(*FIRST)  # loaded on construction
    encoder = pipe.slots["TextEncoder"].model
    first = pipe(PROMPT, steps=1, seed=8)
    assert first.timings.load == 0.0 and first.images[0].size == (FIRST[1], FIRST[0])
    other = pipe(PROMPT, steps=1, seed=8, height=OTHER[0], width=OTHER[1])
    assert other.timings.load > 0 and other.images[0].size == (OTHER[1], OTHER[0])
    assert (other.parameters[0].width, other.parameters[0].height) == (OTHER[1], OTHER[0])
    assert pipe.slots["Unet"].model.function == pipe.slots["VAEDecoder"].model.function == size_function(*OTHER)
    assert pipe.slots["TextEncoder"].model is encoder
    fresh = Pipeline(open_bundle(tiny_sizes_bundle).at(*OTHER), backend="mil")(PROMPT, steps=1, seed=8)
    np.testing.assert_array_equal(pixels(other)[0], pixels(fresh)[0])
    again = pipe(PROMPT, steps=1, seed=8)  # back to the first size
    np.testing.assert_array_equal(pixels(again)[0], pixels(first)[0])


def test_init_image_is_fitted_to_the_chosen_size(tiny_sizes_bundle):
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 100, 3), np.uint8))
    bundle = open_bundle(tiny_sizes_bundle)
    for h, w in TINY_SIZES:
        request = check_request(bundle, PROMPT, init_image=picture, strength=0.5, steps=2, seed=3, height=h, width=w)
        assert request.init_image.size == (w, h) and request.image_size == (h, w)
    h, w = OTHER
    options = dict(init_image=picture, strength=0.5, steps=2, seed=3, height=h, width=w)
    ours = Pipeline(bundle, backend="mil", reduce_memory=True)(PROMPT, **options)
    assert ours.images[0].size == (w, h) and ours.parameters[0].strength == 0.5


def test_the_refiner_must_have_the_chosen_size(tiny_sizes_bundle, tiny_sized):
    """Checked against the bundles alone (SD 1.x bundles labelled SDXL: ``check_request`` loads no
    model): a multi-size refiner serves each of its sizes at that size's function."""
    base = dataclasses.replace(open_bundle(tiny_sizes_bundle), family="sdxl")
    refiner = dataclasses.replace(open_bundle(tiny_sizes_bundle), family="sdxl-refiner")
    for h, w in TINY_SIZES:
        request = check_request(base, PROMPT, height=h, width=w, refiner=refiner, steps=4)
        assert request.refiner.image_size == (h, w) and request.refiner.function == size_function(h, w)
    small = dataclasses.replace(open_bundle(tiny_sized(64, 64)), family="sdxl-refiner")
    with pytest.raises(GenerationError) as error:
        check_request(base, PROMPT, height=OTHER[0], width=OTHER[1], refiner=small, steps=4)
    assert str(error.value) == (f"the refiner has no {OTHER[1]}x{OTHER[0]} size (it has 64x64); generate at one of its "
                                "sizes or re-convert it with --sizes to add one")
    assert check_request(base, PROMPT, height=64, width=64, refiner=small, steps=4).refiner.image_size == (64, 64)


def test_help_names_the_sizes():
    text = CliRunner().invoke(main, ["generate", "--help"]).output
    assert "one of the bundle's sizes (default: its first)" in " ".join(text.split())


def test_check_runs_every_size(tiny_sizes_bundle):
    result = CliRunner().invoke(main, ["check", str(tiny_sizes_bundle), "--backend", "mil"])
    assert result.exit_code == 0, result.output
    runs = 1 + 3 * len(TINY_SIZES)  # the text encoder once, the UNet and both VAEs per size
    assert f"; {runs} models ran with finite outputs (mil backend)" in result.stdout
    for size in TINY_SIZES:
        for name in ("Unet", "VAEDecoder", "VAEEncoder"):
            assert f"{name} {size_function(*size)}: running once on probe inputs (mil backend)" in result.stderr
    assert "TextEncoder: running once" in result.stderr
