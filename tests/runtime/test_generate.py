"""`coreml-sd generate` end to end through the mil backend, against diffusers.

For every scheduler, on tiny SD 1.x and SD 2.x (v-prediction) models: the PNG the command writes
matches diffusers' StableDiffusionPipeline on the same weights, prompt, seed, steps and scheduler
at PSNR >= 30 dB (our float16 programs against diffusers' float32; measured 49-55 dB). Likewise
several images per prompt with a negative prompt, a UNet converted with batch 1, and
image-to-image against StableDiffusionImg2ImgPipeline. Plus determinism, files never
overwritten, PNG metadata, and every user mistake as a one-line error found before any model
loads.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from coreml_sd.benchmarks.metrics import psnr
from coreml_sd.cli import main
from coreml_sd.runtime.image import read_parameters
from coreml_sd.runtime.schedulers import SCHEDULER_NAMES, SCHEDULERS
from helpers import FAMILIES, coreml_sd_command, one_line_error, pixels

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

PROMPT = "a photo of a cat"


def generate(*args: str):
    return CliRunner().invoke(main, ["generate", *args])


def written(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return result.stdout.split()


def reference_pipeline(cls_name: str, folder, scheduler: str):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    spec = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, spec.diffusers_class).from_config(pipe.scheduler.config, **spec.overrides)
    return pipe


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_text_to_image_matches_diffusers(family, scheduler, tiny_bundle, request, tmp_path, record_property):
    steps = 4 if scheduler == "lcm" else 8
    bundle = tiny_bundle(family, "split-einsum")
    [png] = written(generate(PROMPT, "--bundle", str(bundle), "--seed", "42", "--steps", str(steps),
                             "--scheduler", scheduler, "-o", str(tmp_path)))
    folder = request.getfixturevalue(f"tiny_{family}_dir")
    ref = reference_pipeline("StableDiffusionPipeline", folder, scheduler)
    want = ref(PROMPT, num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(42)).images[0]
    score = psnr(pixels(png), pixels(want), peak=255)
    record_property("psnr", round(score, 1))
    assert score >= 30, f"{family} {scheduler}: {score:.1f} dB"


@pytest.mark.parametrize(
    ("family", "scheduler", "strength"),
    [("sd1", "ddim", 0.5), ("sd2", "euler-a", 0.75), ("sd1", "dpmpp-2m", 0.3)],
)
def test_image_to_image_matches_diffusers(family, scheduler, strength, tiny_bundle, request, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    bundle = tiny_bundle(family, "split-einsum")
    pngs = written(generate(PROMPT, "--bundle", str(bundle), "--seed", "7", "--steps", "10", "--scheduler", scheduler,
                            "--init-image", str(init), "--strength", str(strength), "-n", "2", "-o", str(tmp_path / "out")))
    folder = request.getfixturevalue(f"tiny_{family}_dir")
    ref = reference_pipeline("StableDiffusionImg2ImgPipeline", folder, scheduler)
    want = ref(PROMPT, image=Image.open(init), strength=strength, num_inference_steps=10, guidance_scale=7.5,
               num_images_per_prompt=2, generator=torch.Generator().manual_seed(7)).images
    assert len(pngs) == 2
    for png, image in zip(pngs, want):
        assert psnr(pixels(png), pixels(image), peak=255) >= 30
    assert "Denoising strength: " + f"{strength:g}" in read_parameters(pngs[0])


def test_several_images_with_a_negative_prompt_match_diffusers(tiny_bundle, tiny_sd1_dir, tmp_path):
    """-n 2 with guidance on: per image a [negative, prompt] pair through the batch-2 UNet, the
    starting noise of both images drawn as one tensor, as diffusers' num_images_per_prompt does."""
    negative = "blurry, low quality"
    pngs = written(generate(PROMPT, "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--seed", "21", "--steps", "6",
                            "--scheduler", "euler-a", "--negative-prompt", negative, "-n", "2", "-o", str(tmp_path)))
    ref = reference_pipeline("StableDiffusionPipeline", tiny_sd1_dir, "euler-a")
    want = ref(PROMPT, negative_prompt=negative, num_inference_steps=6, guidance_scale=7.5, num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(21)).images
    assert len(pngs) == 2 and not np.array_equal(pixels(pngs[0]), pixels(pngs[1]))
    for png, image in zip(pngs, want):
        assert psnr(pixels(png), pixels(image), peak=255) >= 30
    without = reference_pipeline("StableDiffusionPipeline", tiny_sd1_dir, "euler-a")(
        PROMPT, num_inference_steps=6, guidance_scale=7.5, num_images_per_prompt=2, generator=torch.Generator().manual_seed(21)
    ).images[0]
    assert psnr(pixels(pngs[0]), pixels(without), peak=255) < psnr(pixels(pngs[0]), pixels(want[0]), peak=255)  # it was used
    assert read_parameters(pngs[1]).splitlines()[1] == f"Negative prompt: {negative}"


def test_unet_batch_one_matches_diffusers(tiny_bundle, tiny_sd1_dir, tmp_path):
    """A bundle converted with --unet-batch-one: guidance as two batch-1 UNet calls per step."""
    bundle = tiny_bundle("sd1", "split-einsum", unet_batch=1)
    [png] = written(generate(PROMPT, "--bundle", str(bundle), "--seed", "8", "--steps", "5", "--scheduler", "dpmpp-2m",
                             "--negative-prompt", "dark", "-o", str(tmp_path)))
    ref = reference_pipeline("StableDiffusionPipeline", tiny_sd1_dir, "dpmpp-2m")
    want = ref(PROMPT, negative_prompt="dark", num_inference_steps=5, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(8)).images[0]
    assert psnr(pixels(png), pixels(want), peak=255) >= 30


def test_same_seed_same_file_never_overwritten(tiny_bundle, tmp_path):
    args = [PROMPT, "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--seed", "3", "--steps", "3", "-o", str(tmp_path)]
    [first] = written(generate(*args))
    [second] = written(generate(*args))
    assert first != second and first.endswith("a-photo-of-a-cat-3.png") and second.endswith("a-photo-of-a-cat-3-2.png")
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()
    [other] = written(generate(*args[:4], "4", *args[5:]))
    assert not np.array_equal(pixels(other), pixels(first))


def test_png_parameters(tiny_bundle, tmp_path):
    [png] = written(generate(PROMPT, "--bundle", str(tiny_bundle("sd2", "split-einsum")), "--seed", "5", "--steps", "2",
                             "--scheduler", "dpmpp-2m-karras", "--guidance", "6", "--negative-prompt", "blurry, dark",
                             "-o", str(tmp_path)))
    lines = read_parameters(png).splitlines()
    assert lines[0] == PROMPT
    assert lines[1] == "Negative prompt: blurry, dark"
    fields = dict(part.split(": ", 1) for part in lines[2].split(", "))
    assert fields["Steps"] == "2" and fields["Sampler"] == "DPM++ 2M Karras" and fields["CFG scale"] == "6"
    assert fields["Seed"] == "5" and fields["Size"] == "64x64" and fields["Model"]
    assert Image.open(png).size == (64, 64)


def test_guidance_off_uses_the_text_branch_only(tiny_bundle, tiny_sd1_dir, tmp_path):
    """guidance <= 1: no negative branch, as diffusers; two images share each batch-2 UNet call."""
    [a, b, c] = written(generate(PROMPT, "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--seed", "9", "--steps", "4",
                                 "--scheduler", "euler", "--guidance", "1", "-n", "3", "-o", str(tmp_path)))
    ref = reference_pipeline("StableDiffusionPipeline", tiny_sd1_dir, "euler")
    want = ref(PROMPT, num_inference_steps=4, guidance_scale=1.0, num_images_per_prompt=3,
               generator=torch.Generator().manual_seed(9)).images
    for png, image in zip((a, b, c), want):
        assert psnr(pixels(png), pixels(image), peak=255) >= 30


def test_long_prompts_are_truncated_with_a_warning(tiny_bundle, tmp_path):
    """The warning counts the words cut and shows how the cut starts, not the whole cut text."""
    prompt = " ".join(["cat"] * 75 + ["zebra"] + ["lion", "tiger", "bear"] * 400)  # 75 tokens fit beside start and end
    negative = " ".join(["dog"] * 76) + " giraffe"
    result = generate(prompt, "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--seed", "1", "--steps", "1",
                      "--negative-prompt", negative, "-o", str(tmp_path))
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        'warning: the prompt is longer than 77 tokens; 1201 words ignored, starting "zebra lion tiger bear lion ..."',
        'warning: the negative prompt is longer than 77 tokens; 2 words ignored, starting "dog giraffe"',
    ]


def test_negative_prompt_without_guidance_is_reported_not_recorded(tiny_bundle, tmp_path):
    result = generate(PROMPT, "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--seed", "1", "--steps", "1",
                      "--guidance", "1", "--negative-prompt", "blurry", "-o", str(tmp_path))
    [png] = written(result)
    assert "warning: --negative-prompt is ignored" in result.stderr and "--guidance" in result.stderr
    text = read_parameters(png)
    assert "Negative prompt" not in text and "blurry" not in text


def test_options_that_do_nothing_are_reported(tiny_bundle, tmp_path):
    """--strength without --init-image and --compute-units off the coreml backend change nothing:
    each is one warning line, not silently dropped; left at their defaults, nothing is said."""
    args = [PROMPT, "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--seed", "1", "--steps", "1", "--backend", "mil"]
    result = generate(*args, "--strength", "0.5", "--compute-units", "CPU_ONLY", "-o", str(tmp_path))
    written(result)
    assert [line for line in result.stderr.splitlines() if line.startswith("warning:")] == [
        "warning: --strength is ignored: it applies to image-to-image only; add --init-image to use it",
        "warning: --compute-units is ignored: the mil backend runs on the CPU; it applies to --backend coreml (macOS)",
    ]
    assert "warning:" not in generate(*args, "-o", str(tmp_path)).stderr


def test_init_image_of_another_shape_is_center_cropped(tiny_bundle, tmp_path):
    """A 128x64 image gives exactly the image its own center 64x64 gives (cropped, not stretched)."""
    wide = np.random.default_rng(3).integers(0, 255, (64, 128, 3), dtype=np.uint8)
    init, center = tmp_path / "wide.png", tmp_path / "center.png"
    Image.fromarray(wide).save(init)
    Image.fromarray(wide[:, 32:96]).save(center)
    args = ["--bundle", str(tiny_bundle("sd1", "split-einsum")), "--seed", "1", "--steps", "2", "--strength", "0.5"]
    result = generate(PROMPT, *args, "--init-image", str(init), "-o", str(tmp_path / "out"))
    [png] = written(result)
    assert "init image is 128x64" in result.stderr and "center 64x64 is used" in result.stderr
    assert Image.open(png).size == (64, 64)
    [same] = written(generate(PROMPT, *args, "--init-image", str(center), "-o", str(tmp_path / "out2")))
    assert np.array_equal(pixels(png), pixels(same))


# ------------------------------------------------------------------ refusals


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The names of the models the pipeline loads (each backend ``load_model`` call), in order."""
    from coreml_sd.runtime import pipeline

    names: list[str] = []
    load = pipeline.load_model

    def counting(path, *args, **kwargs):
        names.append(path.name)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load_model", counting)
    return names


def test_the_load_counter_counts(tiny_bundle, tmp_path, loads):
    """The fixture the next test relies on sees a successful run's loads."""
    written(generate(PROMPT, "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--steps", "1", "-o", str(tmp_path)))
    assert sorted(loads) == ["TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage"]


def test_mistakes_are_reported_before_any_model_loads(tiny_bundle, tmp_path, loads):
    bundle = str(tiny_bundle("sd1", "split-einsum"))
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64)).save(init)
    (tmp_path / "afile").write_text("x")
    cases = [
        (["--steps", "0"], "steps must be"),
        (["-n", "0"], "number of images"),
        (["--height", "128"], "converted for 64x64"),
        (["--seed", str(2**64)], "from 0 to 2^64-1"),
        (["--seed", "-1"], "the seed must be a whole number from 0 to 2^64-1 (18446744073709551615), got -1"),
        (["--steps", "100000"], "the pndm scheduler takes at most 1000 steps (the model's training timesteps), got --steps 1000"),
        (["--width", "0"], "--width must be a whole number of pixels >= 1, got 0"),
        (["--guidance", "-3"], "the guidance scale must be >= 0"),
        (["--init-image", str(tmp_path / "missing.png")], "cannot read init image"),
        (["--init-image", str(init), "--strength", "1.5"], "strength must be"),
        (["--init-image", str(init), "--strength", "0.05", "--steps", "5"], "raise --strength or --steps"),
        (["-o", str(tmp_path / "afile" / "sub")], "Not a directory"),
        (["-o", str(tmp_path / "afile")], "is a file"),
    ]
    for args, fragment in cases:
        out = [] if args[0] == "-o" else ["-o", str(tmp_path / "out")]
        one_line_error(generate(PROMPT, "--bundle", bundle, *args, *out), fragment)
        assert loads == [], args
    assert not (tmp_path / "out").exists()  # a refused request creates no output folder


@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's overflow / invalid-cast warnings must not leak
def test_nonfinite_output_is_an_error_naming_the_stage(tiny_bundle, tmp_path):
    """--guidance 1e30 leaves finite latents of ~1e30 after step 1, beyond float16: the UNet's
    prediction at step 2 is NaN. That is one error line naming the step, the first op that
    overflowed and the fix, not a black PNG; nothing is written, not even the output folders."""
    out = tmp_path / "new" / "out"
    result = generate(PROMPT, "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--seed", "1", "--steps", "3",
                      "--scheduler", "ddim", "--guidance", "1e30", "-o", str(out))
    one_line_error(result, "NaN or inf in the UNet at step 2 of 3", "(first at op ", "its input 'sample' reaches",
                   "lower --guidance (now 1e+30)")
    assert result.stdout == "" and not (tmp_path / "new").exists()


def test_a_failed_save_is_one_line_and_keeps_what_was_written(tiny_bundle, tmp_path, monkeypatch):
    from coreml_sd.runtime import image

    save = image.save_png
    calls = []

    def disk_fills_up(picture, params, directory):  # the second file hits a full disk
        calls.append(params.batch_pos)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(picture, params, directory)

    monkeypatch.setattr(image, "save_png", disk_fills_up)
    result = generate(PROMPT, "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--steps", "1", "-n", "2",
                      "-o", str(tmp_path))
    one_line_error(result, "No space left on device", "1 of 2 written")
    [first] = result.stdout.split()
    assert Image.open(first).size == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(first).name]


def test_errors(tiny_bundle, tmp_path):
    bundle = str(tiny_bundle("sd1", "split-einsum"))
    out = ["-o", str(tmp_path / "out")]
    one_line_error(generate(PROMPT, "--bundle", str(tmp_path / "none"), *out), "no such bundle")
    one_line_error(generate(PROMPT, "--bundle", bundle, "--steps", "0", *out), "steps must be")
    one_line_error(generate(PROMPT, "--bundle", bundle, "--height", "128", *out), "converted for 64x64")
    one_line_error(generate(PROMPT, "--bundle", bundle, "--init-image", str(tmp_path / "missing.png"), *out),
                   "cannot read init image")
    (tmp_path / "junk.png").write_text("not an image")
    one_line_error(generate(PROMPT, "--bundle", bundle, "--init-image", str(tmp_path / "junk.png"), *out),
                   "cannot read init image")
    result = generate(PROMPT, "--bundle", bundle, "--scheduler", "heun", *out)
    assert result.exit_code == 2 and "heun" in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_corrupt_and_incompatible_bundles(tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle("sd1", "split-einsum"), bundle)
    weights = bundle / "Unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    one_line_error(generate(PROMPT, "--bundle", str(bundle), "-o", str(tmp_path)), "does not match its sha256", "Unet.mlpackage")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(generate(PROMPT, "--bundle", str(bundle), "-o", str(tmp_path)), "format version 99", "re-convert")


def test_img2img_needs_a_vae_encoder(tiny_bundle, tmp_path):
    bundle = tiny_bundle("sd1", "split-einsum", components=("text-encoder", "unet", "vae-decoder"))
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64)).save(init)
    one_line_error(generate(PROMPT, "--bundle", str(bundle), "--init-image", str(init), "-o", str(tmp_path)),
                   "VAEEncoder", "vae-encoder")
    # Through the API, a request checked against a bundle that has one, run by a pipeline that has not.
    from coreml_sd.runtime.bundle import BundleError, open_bundle
    from coreml_sd.runtime.pipeline import Pipeline, check_request

    request = check_request(open_bundle(tiny_bundle("sd1", "split-einsum")), PROMPT, init_image=Image.open(init))
    with pytest.raises(BundleError,
                       match=r"the bundle has no VAEEncoder; image-to-image needs VAEEncoder "
                             r"\(convert with --components vae-encoder\)$"):
        Pipeline(open_bundle(bundle), backend="mil").generate(request)


def _unreadable_unet(bundle: Path, root: Path) -> Path:
    """Apple's packages layout of ``bundle`` (no manifest, so no hashes) with a UNet whose model
    description is garbage: reading it is the first thing that imports coremltools."""
    root.mkdir()
    for ours, sub in (("TextEncoder", "text_encoder"), ("Unet", "unet"), ("VAEDecoder", "vae_decoder")):
        shutil.copytree(bundle / f"{ours}.mlpackage", root / f"Stable_Diffusion_version_tiny_{sub}.mlpackage")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bundle / name, root / name)
    (root / "Stable_Diffusion_version_tiny_unet.mlpackage/Data/com.apple.CoreML/model.mlmodel").write_bytes(b"\xff" * 64)
    return root


@pytest.mark.parametrize("case", ["steps 0", "unreadable model"])
def test_a_real_process_prints_one_error_line(case, tiny_bundle, tmp_path):
    """The installed command in its own process, as a user runs it: the error is the only line on
    stderr (no traceback, and none of coremltools' import-time log lines off macOS)."""
    bundle = tiny_bundle("sd1", "split-einsum")
    args = ["--steps", "0"] if case == "steps 0" else []
    if case == "unreadable model":
        bundle = _unreadable_unet(bundle, tmp_path / "packages")
    done = subprocess.run([*coreml_sd_command(), "generate", PROMPT, "--bundle", str(bundle), *args, "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("Error: ")
    assert ("steps must be" in line) if case == "steps 0" else ("not a readable Core ML package" in line and "re-convert" in line)


def test_precision_float32_reaches_every_model(tiny_bundle, tiny_sd1_dir):
    """``precision="float32"`` (``--precision float32``) keeps the float16 activations of every
    model in float32: the final latents come measurably closer to diffusers' float32 run than the
    float16 programs' do (the weights are float16 in both, so neither is exact)."""
    from coreml_sd.runtime.pipeline import Pipeline

    bundle = tiny_bundle("sd1", "split-einsum")
    ref = reference_pipeline("StableDiffusionPipeline", tiny_sd1_dir, "ddim")
    want = ref(PROMPT, num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(3),
               output_type="latent").images.numpy()

    def final_latents(precision):
        run = Pipeline.from_bundle(bundle, backend="mil", precision=precision).start(PROMPT, steps=4, seed=3, scheduler="ddim")
        return [step.latents for step in run][-1]

    float16, float32 = psnr(final_latents(None), want), psnr(final_latents("float32"), want)  # measured 63.7 and 72.7 dB
    assert float32 > float16 + 6, (float16, float32)


def test_precision_override_is_for_the_mil_backend_only(tiny_bundle, tmp_path, loads):
    result = generate(PROMPT, "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--backend", "coreml",
                      "--precision", "float32", "-o", str(tmp_path / "out"))
    one_line_error(result, "--backend mil")
    assert loads == [] and not (tmp_path / "out").exists()
