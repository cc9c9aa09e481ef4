"""``convert --sizes``: one bundle for several image sizes, the UNet and VAE as multifunction
packages (one function a size, the weights stored once), checked on the packages themselves.

What an app that knows nothing of functions sees is the default function: Apple's Swift package
loads each model with ``MLModel(contentsOf:configuration:)`` and no function name
(``swift/StableDiffusion/pipeline/ManagedMLModel.swift`` line 71, apple/ml-stable-diffusion at
e12202c) and reads the latent size from the UNet's ``sample`` input description (``Unet.swift``
lines 63-68), so the default function must describe exactly what the one-size package does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from click.testing import CliRunner

from coreml_sd.cli import main
from coreml_sd.contract import read_manifest
from coreml_sd.convert.converter import ConvertOptions, Progress, convert
from coreml_sd.convert.source import open_source
from helpers import TINY_SIZES, one_line_error

SIZES = TINY_SIZES  # 64x64 (the default), 64x80 and 96x64 (width x height); see helpers
SIZED = ("Unet", "VAEDecoder", "VAEEncoder")


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def sized(tiny_sizes_bundle):
    return tiny_sizes_bundle


def test_sizes_make_one_package_per_model_with_a_function_per_size(sized, tiny_bundle):
    """The manifest lists the sizes, first the default; the UNet's and VAE's packages have one
    function per size for macOS 15, the text encoder one function for macOS 13 (reused from the
    one-size bundle); the weights are stored once."""
    manifest = read_manifest(sized)
    assert manifest["sizes"] == [{"height": h, "width": w, "function": f"size_{w}x{h}"} for h, w in SIZES]
    assert manifest["image_size"] == [64, 64] and manifest["deployment_target"] == "macOS15"
    for name in SIZED:
        spec = ct.utils.load_spec(str(sized / f"{name}.mlpackage"))
        assert spec.specificationVersion == 9 and manifest["components"][name]["deployment_target"] == "macOS15"
        assert [f.name for f in spec.description.functions] == [f"size_{w}x{h}" for h, w in SIZES]
        assert spec.description.defaultFunctionName == "size_64x64"
        functions = manifest["components"][name]["functions"]
        for function in spec.description.functions:  # each function's shapes, as the manifest records them
            shapes = {f.name: list(f.type.multiArrayType.shape) for f in function.input}
            assert shapes == {k: v["shape"] for k, v in functions[function.name]["inputs"].items()}
        if name == "Unet":
            portrait = {f.name: list(f.type.multiArrayType.shape) for f in spec.description.functions[1].input}
            assert portrait["sample"] == [2, 4, 10, 8]  # 64 wide, 80 high: (height, width) / 8
    text = ct.utils.load_spec(str(sized / "TextEncoder.mlpackage"))
    assert not text.description.functions and "functions" not in manifest["components"]["TextEncoder"]
    assert text.specificationVersion == 7 and manifest["components"]["TextEncoder"]["deployment_target"] == "macOS13"

    # Bytes: the weights once, whatever the number of sizes. Each function adds its program
    # (model.mlmodel, the graph): a few hundred KB here, as much as the tiny models' weights, but
    # the same few hundred KB against SD 1.5's 1.7 GB (benchmarks/multisize.py measures that).
    single = tiny_bundle("sd1", "split-einsum-v2")
    weights, programs = "Data/com.apple.CoreML/weights/weight.bin", "Data/com.apple.CoreML/model.mlmodel"
    for name in SIZED:
        ratio = (sized / f"{name}.mlpackage" / weights).stat().st_size / (single / f"{name}.mlpackage" / weights).stat().st_size
        assert ratio <= 1.04, (name, ratio)
    graphs = sum((single / f"{name}.mlpackage" / programs).stat().st_size for name in SIZED)
    assert _bytes(sized) <= 1.04 * _bytes(single) + (len(SIZES) - 1) * 1.1 * graphs, (_bytes(sized), _bytes(single), graphs)


def test_default_function_is_the_one_size_package(sized, tiny_bundle):
    """A consumer that ignores functions sees the default function: the same inputs and outputs
    (names, shapes, types, descriptions) and metadata as the one-size package of that size."""
    single = tiny_bundle("sd1", "split-einsum-v2")
    for name in SIZED:
        multi = ct.utils.load_spec(str(sized / f"{name}.mlpackage"))
        one = ct.utils.load_spec(str(single / f"{name}.mlpackage"))
        default = next(f for f in multi.description.functions if f.name == multi.description.defaultFunctionName)
        assert list(default.input) == list(one.description.input), name
        assert list(default.output) == list(one.description.output), name
        assert dict(multi.description.metadata.userDefined) == dict(one.description.metadata.userDefined)


def test_one_size_stays_a_single_function_package(tiny_bundle):
    """Without --sizes (or with one size) nothing changes: single-function packages for macOS 13,
    and the manifest's one size has no function name."""
    bundle = tiny_bundle("sd1", "split-einsum-v2")
    manifest = read_manifest(bundle)
    assert manifest["sizes"] == [{"height": 64, "width": 64, "function": None}]
    assert manifest["deployment_target"] == "macOS13"
    assert not ct.utils.load_spec(str(bundle / "Unet.mlpackage")).description.functions


@pytest.mark.parametrize("args, fragments", [
    (["--sizes", "64x64,64x80", "--width", "64"], ["--sizes lists every size", "drop --width/--height"]),
    (["--sizes", "64x64,64x64"], ["--sizes lists 64x64 twice"]),
    (["--sizes", "64x64,60x64"], ["--sizes 60x64: width 60", "multiple of 8"]),
    (["--sizes", "64x64,72x64"], ["--sizes 72x64: width 72", "latent side 9 is not a multiple of 2", "multiple of 16 pixels"]),
    (["--sizes", "64x64,64x80", "--deployment-target", "macOS14"],
     ["2 sizes makes multifunction packages, which need macOS15 / iOS18", "--deployment-target macOS14"]),
])
def test_impossible_sizes_are_refused_before_any_work(args, fragments, tiny_sd1_dir, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tiny_sd1_dir), "-o", str(tmp_path / "out"), *args])
    one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))


def test_malformed_sizes_are_a_usage_error(tiny_sd1_dir, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tiny_sd1_dir), "-o", str(tmp_path / "out"), "--sizes", "64x64,wide"])
    assert result.exit_code == 2 and "'wide' is not WIDTHxHEIGHT in pixels" in result.output
    assert "Traceback" not in result.output


def test_sizes_with_compression_share_the_compressed_weights(sized, tiny_bundle, tiny_sd1_dir, tmp_path):
    """--sizes with --compress: the first function's weights are compressed once and the others
    take the same constants, so the UNet's weight file is the one-size compressed package's, not
    three times it; every function runs through mil against the float16 one of its size."""
    from coreml_sd.benchmarks.metrics import psnr
    from coreml_sd.runtime.backends import load_model

    bundle = tmp_path / "bundle"
    shutil.copytree(sized, bundle)
    lines = []
    options = ConvertOptions(attention="split-einsum-v2", query_chunk=24, sizes=SIZES, compress="palettize-4",
                             components=("unet",), overwrite=True)
    convert(open_source(str(tiny_sd1_dir)), bundle, options, Progress(log=lines.append))
    text = "\n".join(lines)
    assert "sizes 64x64, 64x80, 96x64: one function per size" in text and "macOS 15 / iOS 18" in text
    assert text.count("compress (palettize-4) ...") == 1  # once, not once per size
    entry = read_manifest(bundle)["components"]["Unet"]["compression"]
    weights = "Unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    one_size = tiny_bundle("sd1", "split-einsum", components=("text-encoder", "unet", "vae-decoder"), compress="palettize-4")
    compressed = (bundle / weights).stat().st_size
    assert entry["bytes_after"] == compressed and entry["bits"] == 4
    assert compressed <= 1.04 * (one_size / weights).stat().st_size, (compressed, (one_size / weights).stat().st_size)
    for h, w in SIZES:
        ours = load_model(bundle / "Unet.mlpackage", "mil", function=f"size_{w}x{h}")
        theirs = load_model(sized / "Unet.mlpackage", "mil", function=f"size_{w}x{h}")
        rng = np.random.default_rng(0)
        feeds = {n: rng.standard_normal(d.shape).astype(np.float32) for n, d in theirs.inputs.items()}
        feeds["timestep"] = np.full(theirs.inputs["timestep"].shape, 500.0, np.float32)
        got, want = ours.predict(feeds)["noise_pred"], theirs.predict(feeds)["noise_pred"]
        assert np.isfinite(got).all() and psnr(got, want) >= 25, (h, w, psnr(got, want))


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for h, w in SIZES])
def test_each_size_generates_what_diffusers_does_at_that_size(size, sized, tiny_sd1_dir, tmp_path, record_property):
    """``generate --width W --height H`` on the several-size bundle (split-einsum-v2: each size's
    queries chunked, none a multiple of the chunk) against diffusers' pipeline at that size, same
    weights, seed and scheduler: >= 30 dB (float16 programs against float32 torch), and the PNG's
    parameters say the size."""
    import torch

    from coreml_sd.benchmarks.metrics import psnr
    from coreml_sd.runtime.image import read_parameters
    from helpers import pixels

    from ..runtime.test_generate import PROMPT, reference_pipeline

    h, w = size
    result = CliRunner().invoke(main, ["generate", PROMPT, "--bundle", str(sized), "--width", str(w), "--height", str(h),
                                       "--seed", "42", "--steps", "6", "--scheduler", "euler", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    [png] = result.stdout.split()
    ref = reference_pipeline("StableDiffusionPipeline", tiny_sd1_dir, "euler")
    want = ref(PROMPT, height=h, width=w, num_inference_steps=6, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(42)).images[0]
    assert pixels(png).shape == (h, w, 3)
    score = psnr(pixels(png), pixels(want), peak=255)
    record_property("psnr", round(score, 1))
    assert score >= 30, f"{w}x{h}: {score:.1f} dB"
    assert f"Size: {w}x{h}" in read_parameters(png)


def test_image_to_image_at_another_size_uses_that_size_encoder(sized, tiny_sd1_dir, tmp_path):
    """img2img at the portrait size: the VAE encoder's function of that size, against diffusers'
    image-to-image pipeline on the same init image."""
    import torch
    from PIL import Image

    from coreml_sd.benchmarks.metrics import psnr
    from helpers import pixels

    from ..runtime.test_generate import PROMPT, reference_pipeline

    h, w = SIZES[1]
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(init)
    result = CliRunner().invoke(main, ["generate", PROMPT, "--bundle", str(sized), "--width", str(w), "--height", str(h),
                                       "--seed", "7", "--steps", "6", "--scheduler", "ddim", "--init-image", str(init),
                                       "--strength", "0.6", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    [png] = result.stdout.split()
    ref = reference_pipeline("StableDiffusionImg2ImgPipeline", tiny_sd1_dir, "ddim")
    want = ref(PROMPT, image=Image.open(init), strength=0.6, num_inference_steps=6, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(7)).images[0]
    assert psnr(pixels(png), pixels(want), peak=255) >= 30
