"""SDXL generation through the mil backend, against diffusers on the same tiny weights.

Whole images match diffusers' StableDiffusionXLPipeline (same weights, prompt, seed, steps and
scheduler) at PSNR >= 30 dB, our float16 programs against diffusers' float32 (measured 54-59 dB):
several schedulers, guidance off, no negative prompt (zeros) and a given one, a second prompt,
a non-default original size and crop, and SDXL-Turbo's trailing Euler ancestral in 1, 2 and 4
steps. Base plus refiner matches diffusers' two-pipeline hand-off (``denoising_end`` into
``StableDiffusionXLImg2ImgPipeline(denoising_start=...)`` with one generator) at the same bar.
The conditioning itself (both encoders, pooled embeddings, zeros, time ids of base and refiner)
is compared input by input, where a change too small to move a 30 dB image bar (the refiner's
aesthetic score over its last steps) still shows. Plus Apple's SDXL layouts, the CLI options and
PNG fields, requests refused in one line, ``check`` and ``bench`` on an SDXL bundle.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from coreml_sd.benchmarks.metrics import psnr
from coreml_sd.cli import main
from coreml_sd.runtime.bundle import BundleError, open_bundle, refiner_of
from coreml_sd.runtime.image import read_parameters
from coreml_sd.runtime.pipeline import GenerationError, Pipeline, check_request
from coreml_sd.runtime.schedulers import SCHEDULERS
from helpers import one_line_error, pixels

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

PROMPT = "a photo of a cat"
GUIDANCE = 7.5  # ours by default; diffusers' SDXL default is 5, so the reference is always told
# diffusers' keyword for each of our options, where it differs
DIFFUSERS_NAMES = {"scheduler": None, "steps": "num_inference_steps", "crop": "crops_coords_top_left",
                   "num_images": "num_images_per_prompt", "refiner": None, "refiner_start": None, "seed": None}


@pytest.fixture(scope="module")
def base_bundle(tiny_bundle) -> Path:
    return tiny_bundle("sdxl")


@pytest.fixture(scope="module")
def refiner_bundle(tiny_bundle) -> Path:
    return tiny_bundle("sdxl-refiner")


@pytest.fixture(scope="module")
def base(base_bundle) -> Pipeline:
    return Pipeline.from_bundle(base_bundle, backend="mil")


@pytest.fixture(scope="module")
def refiner(refiner_bundle) -> Pipeline:
    return Pipeline.from_bundle(refiner_bundle, backend="mil")


def reference(cls_name: str, folder: Path, scheduler: str | None):
    """diffusers' pipeline on the tiny folder, with our scheduler's diffusers counterpart (None:
    the folder's own); no watermark, which would change pixels after decoding."""
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        spec = SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, spec.diffusers_class).from_config(pipe.scheduler.config, **spec.overrides)
    return pipe


def diffusers_options(options: dict) -> dict:
    """Our options as diffusers' keywords: an empty negative prompt is diffusers' None."""
    out = {"guidance_scale": GUIDANCE}
    for name, value in options.items():
        key = DIFFUSERS_NAMES.get(name, name)
        if key is not None:
            out[key] = value
    return out


def score(ours, theirs) -> float:
    return psnr(pixels(ours), pixels(theirs), peak=255)


# ------------------------------------------------------------------ the conditioning, input by input


def test_conditioning_matches_diffusers(base, refiner, tiny_sdxl_dir, tiny_sdxl_refiner_dir):
    """Both branches of the base and the refiner: hidden states (>= 60 dB: float16 encoders,
    measured 71-77), pooled embeddings and time ids (exact) as diffusers' encode_prompt and
    _get_add_time_ids give them; no negative prompt is zeros on the base (force_zeros_for_empty_prompt
    in its manifest) and an encoded "" on the refiner (whose model_index sets it false)."""
    ref = reference("StableDiffusionXLPipeline", tiny_sdxl_dir, None)
    ref_refiner = reference("StableDiffusionXLImg2ImgPipeline", tiny_sdxl_refiner_dir, None)
    assert base.bundle.force_zeros and not refiner.bundle.force_zeros

    def compare(ours, hidden, pooled, ids):
        ours_hidden = ours.inputs["encoder_hidden_states"][:, :, 0, :].transpose(0, 2, 1)  # back to (1, 77, C)
        assert psnr(ours_hidden, hidden.numpy()) >= 60
        assert psnr(ours.inputs["text_embeds"], pooled.numpy()) >= 60
        np.testing.assert_array_equal(ours.inputs["time_ids"], ids.numpy())

    options = dict(prompt_2="a dog", negative_prompt="blurry", negative_prompt_2="dark", original_size=(96, 200),
                   crop=(8, 16), aesthetic_score=7.0, negative_aesthetic_score=3.0)
    request = check_request(base.bundle, PROMPT, refiner=refiner.bundle, **options)
    with torch.no_grad():
        hidden, neg_hidden, pooled, neg_pooled = ref.encode_prompt(
            PROMPT, prompt_2="a dog", negative_prompt="blurry", negative_prompt_2="dark", device="cpu")
        ids = ref._get_add_time_ids((96, 200), (8, 16), (128, 128), torch.float32, 32)
        positive, negative = base.condition(request)
        compare(positive, hidden, pooled, ids)
        compare(negative, neg_hidden, neg_pooled, ids)  # the base's negative time ids are the text branch's

        # The refiner's one encoder reads the first prompt (diffusers pairs texts with encoders).
        hidden, neg_hidden, pooled, neg_pooled = ref_refiner.encode_prompt(
            PROMPT, prompt_2="a dog", negative_prompt="blurry", negative_prompt_2="dark", device="cpu")
        ids, neg_ids = ref_refiner._get_add_time_ids((96, 200), (8, 16), (128, 128), 7.0, 3.0, (96, 200), (0, 0),
                                                     (128, 128), torch.float32, 32)
        positive, negative = refiner.condition(request)
        compare(positive, hidden, pooled, ids)
        compare(negative, neg_hidden, neg_pooled, neg_ids)  # its negative crop: diffusers' default, (0, 0)

        plain = check_request(base.bundle, PROMPT, refiner=refiner.bundle)
        hidden, neg_hidden, pooled, neg_pooled = ref.encode_prompt(PROMPT, device="cpu")
        positive, negative = base.condition(plain)
        compare(positive, hidden, pooled, ref._get_add_time_ids((128, 128), (0, 0), (128, 128), torch.float32, 32))
        assert not neg_hidden.any() and not neg_pooled.any()
        assert not negative.inputs["encoder_hidden_states"].any() and not negative.inputs["text_embeds"].any()
        hidden, neg_hidden, pooled, neg_pooled = ref_refiner.encode_prompt(PROMPT, device="cpu")
        _, negative = refiner.condition(plain)
        ids = ref_refiner._get_add_time_ids((128, 128), (0, 0), (128, 128), 6.0, 2.5, (128, 128), (0, 0), (128, 128),
                                            torch.float32, 32)[1]
        compare(negative, neg_hidden, neg_pooled, ids)  # "" encoded, default aesthetic score 2.5


def test_second_prompts_are_truncated_on_their_own(base):
    long = " ".join(["dog"] * 80) + " zebra"
    run = base.start(PROMPT, prompt_2=long, negative_prompt_2=long + " lion", steps=1, seed=1)  # encoded, not denoised
    assert run.truncated == "" and "zebra" in run.truncated_2
    assert run.negative_truncated == "" and run.negative_truncated_2.endswith("zebra lion")


# ------------------------------------------------------------------ whole images


@pytest.mark.parametrize("options", [
    {"scheduler": None, "steps": 8},  # the bundle's own: Euler over leading timesteps; no negative prompt: zeros
    {"scheduler": "dpmpp-2m", "steps": 6, "prompt_2": "a dog", "negative_prompt": "blurry", "original_size": (96, 200),
     "crop": (8, 16)},
    {"scheduler": "ddim", "steps": 6, "negative_prompt": "blurry", "negative_prompt_2": "dark"},
    {"scheduler": "euler-a", "steps": 6, "guidance_scale": 0.0, "num_images": 2},  # both images in one batch-2 call
], ids=["euler-zeros", "dpmpp-prompt2-size-crop", "ddim-negative2", "euler-a-unguided"])
def test_text_to_image_matches_diffusers(base, tiny_sdxl_dir, options, record_property):
    ours = base(PROMPT, seed=42, **options)
    ref = reference("StableDiffusionXLPipeline", tiny_sdxl_dir, options["scheduler"])
    want = ref(PROMPT, generator=torch.Generator().manual_seed(42), **diffusers_options(options)).images
    assert len(ours.images) == len(want)
    scores = [score(a, b) for a, b in zip(ours.images, want)]
    record_property("psnr", [round(s, 1) for s in scores])
    assert min(scores) >= 30, scores


def test_turbo_matches_diffusers(tiny_bundle, tiny_sdxl_turbo_dir):
    """SDXL-Turbo: the base's architecture with its own scheduler config (Euler ancestral,
    trailing timesteps), run without guidance in 1 to 4 steps. Its bundle is converted from the
    Turbo folder (reusing the base bundle's packages: tests/conftest.py), so the scheduler config
    comes through conversion as a user's would."""
    bundle = tiny_bundle("sdxl-turbo")
    assert json.loads((bundle / "scheduler_config.json").read_text())["timestep_spacing"] == "trailing"
    turbo = Pipeline.from_bundle(bundle, backend="mil")
    ref = reference("StableDiffusionXLPipeline", tiny_sdxl_turbo_dir, None)
    for steps in (1, 2, 4):
        ours = turbo(PROMPT, steps=steps, guidance_scale=0.0, seed=7)
        assert ours.parameters[0].scheduler == "euler-a"
        want = ref(PROMPT, num_inference_steps=steps, guidance_scale=0.0, generator=torch.Generator().manual_seed(7))
        assert score(ours.images[0], want.images[0]) >= 30, steps


# ------------------------------------------------------------------ the refiner hand-off


def handoff_reference(tiny_sdxl_dir, tiny_sdxl_refiner_dir, options: dict, restart: bool = False):
    """diffusers' documented two-pipeline hand-off, one generator through both (``restart``: the
    refiner given a fresh generator of the same seed instead). With ``init_image``, the base is
    diffusers' SDXL image-to-image pipeline."""
    scheduler, start = options.get("scheduler"), options.get("refiner_start", 0.8)
    them = diffusers_options(options)
    generator = torch.Generator().manual_seed(options["seed"])
    base_only = {k: v for k, v in them.items() if "aesthetic" not in k}
    if "init_image" in options:
        base_only["image"] = base_only.pop("init_image")
    latents = reference("StableDiffusionXLImg2ImgPipeline" if "init_image" in options else "StableDiffusionXLPipeline",
                        tiny_sdxl_dir, scheduler)(
        PROMPT, generator=generator, denoising_end=start, output_type="latent", **base_only).images
    refiner_only = {k: v for k, v in them.items() if not k.startswith("prompt_2") and k not in ("init_image", "strength")}
    if restart:
        generator = torch.Generator().manual_seed(options["seed"])
    return reference("StableDiffusionXLImg2ImgPipeline", tiny_sdxl_refiner_dir, scheduler)(
        PROMPT, image=latents, generator=generator, denoising_start=start, **refiner_only).images[0]


def test_refiner_handoff_matches_diffusers(base, refiner, tiny_sdxl_dir, tiny_sdxl_refiner_dir):
    """The bundle's Euler from 0.8: 8 steps of the base, then 2 of the refiner from its own
    schedule, decoded by the refiner's VAE; and the refiner given as a path (loaded once, kept)."""
    options = {"scheduler": None, "steps": 10, "seed": 42}
    run = base.start(PROMPT, refiner=refiner, **options)
    steps = list(run)
    assert [s.index for s in steps] == list(range(1, 11)) and {s.total for s in steps} == {10}
    assert [len(p.timesteps) for p in run.phases] == [8, 2] and run.phases[1].pipe is refiner
    result = run.finish()
    assert score(result.images[0], handoff_reference(tiny_sdxl_dir, tiny_sdxl_refiner_dir, options)) >= 30
    by_path = base(PROMPT, refiner=str(refiner.bundle.path), **options)
    np.testing.assert_array_equal(pixels(by_path)[0], pixels(result)[0])
    assert len(base._refiners) == 1


def test_refiner_handoff_from_the_cli_matches_diffusers(base_bundle, refiner_bundle, tiny_sdxl_dir, tiny_sdxl_refiner_dir,
                                                         tmp_path):
    """Euler ancestral (noise drawn every step, one stream through both models) handing off at
    0.5, with a negative prompt, a second prompt, original size, crop and aesthetic scores; the
    PNG's parameters carry the SDXL fields, which read back as written."""
    options = {"scheduler": "euler-a", "steps": 8, "seed": 42, "refiner_start": 0.5, "negative_prompt": "blurry, dark",
               "prompt_2": "a dog, sitting", "original_size": (96, 200), "crop": (8, 16), "aesthetic_score": 7.0,
               "negative_aesthetic_score": 3.0}
    result = CliRunner().invoke(main, [
        "generate", PROMPT, "--bundle", str(base_bundle), "--seed", "42", "--steps", "8", "--scheduler", "euler-a",
        "--refiner", str(refiner_bundle), "--refiner-start", "0.5", "--negative-prompt", "blurry, dark",
        "--prompt-2", "a dog, sitting", "--original-size", "200x96", "--crop", "8,16", "--aesthetic-score", "7",
        "--negative-aesthetic-score", "3", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    [png] = result.stdout.split()
    got = score(png, handoff_reference(tiny_sdxl_dir, tiny_sdxl_refiner_dir, options))
    # The refiner's noise continues the base's stream: a fresh one moves the image only to ~37 dB.
    assert got >= 30 and got > score(png, handoff_reference(tiny_sdxl_dir, tiny_sdxl_refiner_dir, options, restart=True)) + 10
    lines = read_parameters(png).splitlines()
    assert lines[:2] == [PROMPT, "Negative prompt: blurry, dark"]
    # Values with a comma are quoted, as test_image.py checks readers parse them.
    for field in ('Prompt 2: "a dog, sitting"', "Original size: 200x96", "Crop top: 8", "Crop left: 16",
                  "Refiner: tiny_sdxl_refiner", "Refiner switch at: 0.5", "Aesthetic score: 7",
                  "Negative aesthetic score: 3", "Size: 128x128", "Sampler: Euler a"):
        assert f", {field}," in lines[2], field


def test_image_to_image_then_refiner_matches_diffusers(base, refiner, tiny_sdxl_dir, tiny_sdxl_refiner_dir):
    """An init image: the base denoises the part of its image-to-image schedule above the
    hand-off, as diffusers' SDXL image-to-image pipeline with denoising_end does."""
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    options = {"scheduler": "dpmpp-2m", "steps": 10, "seed": 4, "init_image": init, "strength": 0.7, "refiner_start": 0.5}
    run = base.start(PROMPT, refiner=refiner, **options)
    assert [len(p.timesteps) for p in run.phases] == [2, 5]  # 7 of 10 steps at strength 0.7, 5 below the hand-off
    for _ in run:
        pass
    assert score(run.finish().images[0], handoff_reference(tiny_sdxl_dir, tiny_sdxl_refiner_dir, options)) >= 30


def test_reduce_memory_releases_the_base_unet_before_the_refiner_loads(base, refiner_bundle):
    """Paused across the hand-off and resumed, with models loaded per use: the same image as an
    eager run, the base's UNet gone before the refiner's is loaded, and nothing held at the end."""
    lean = Pipeline(base.bundle, backend="mil", reduce_memory=True)
    options = dict(steps=5, seed=3, scheduler="euler", refiner_start=0.6)
    run = lean.start(PROMPT, refiner=refiner_bundle, **options)
    [lean_refiner] = lean._refiners.values()
    assert lean_refiner.reduce_memory
    for step in run:
        if step.index == 3:  # the base's last step (3 of 5 at 0.6)
            break
    assert lean.slots["Unet"].model is not None and lean_refiner.slots["UnetRefiner"].model is None
    seen = []
    for _ in run:
        seen.append((lean.slots["Unet"].model is None, lean_refiner.slots["UnetRefiner"].model is not None))
    assert seen == [(True, True)] * 2
    result = run.finish()
    assert all(slot.model is None for pipe in (lean, lean_refiner) for slot in pipe.slots.values())
    eager = base(PROMPT, refiner=refiner_bundle, **options)
    np.testing.assert_array_equal(pixels(result)[0], pixels(eager)[0])


# ------------------------------------------------------------------ requests refused


@pytest.mark.parametrize(("family", "options", "message"), [
    ("sd1", {"prompt_2": "x"}, "--prompt-2 is an SDXL option; this bundle is Stable Diffusion 1.x"),
    ("sd1", {"original_size": (64, 64)}, "--original-size is an SDXL option"),
    ("sd1", {"refiner": "somewhere"}, "--refiner is an SDXL option"),
    ("sdxl-refiner", {"prompt_2": "x"}, "--prompt-2 is read by the second text encoder of an SDXL base; this Stable "
                                        "Diffusion XL refiner bundle has one encoder"),
    ("sdxl", {"aesthetic_score": 5.0}, "--aesthetic-score conditions the SDXL refiner; add --refiner"),
    ("sdxl", {"refiner_start": 0.5}, "--refiner-start says where the refiner takes over; add --refiner"),
    ("sdxl", {"crop": (-1, 0)}, "the crop must be two whole numbers of pixels >= 0, (top, left), got (-1, 0)"),
    ("sdxl", {"original_size": (0, 64)}, "the original size must be two whole numbers of pixels >= 1"),
    ("sdxl", {"refiner": "BASE"}, "is not an SDXL refiner (Stable Diffusion XL); pass a bundle converted from an SDXL"),
    ("sdxl", {"refiner": "REFINER", "refiner_start": 1.0}, "--refiner-start must be a fraction of the schedule between"),
    ("sdxl", {"refiner": "REFINER", "steps": 2, "refiner_start": 0.3}, "--refiner-start 0.3 of 2 steps leaves the base no "
                                                                      "step; raise --steps or move --refiner-start toward 1"),
    # Leading timesteps end at 1: only a hand-off below it leaves the refiner nothing.
    ("sdxl", {"refiner": "REFINER", "steps": 3, "refiner_start": 0.9995}, "leaves the refiner no step"),
    ("sdxl", {"refiner": "SMALL"}, "the refiner was converted for 64x64 images, the base for 128x128"),
    ("sdxl-refiner", {"refiner": "REFINER"}, "a refiner finishes an SDXL base's generation; this bundle is Stable "
                                             "Diffusion XL refiner"),
])
def test_requests_are_checked_without_loading_models(tiny_bundle, family, options, message):
    """``check_request`` alone (what ``coreml-sd generate`` runs before loading anything)."""
    bundle = open_bundle(tiny_bundle(family))
    refiners = {"BASE": tiny_bundle("sdxl"), "REFINER": tiny_bundle("sdxl-refiner")}
    if options.get("refiner") == "SMALL":
        options["refiner"] = dataclasses.replace(open_bundle(refiners["REFINER"]), image_size=(64, 64))
    elif options.get("refiner") in refiners:
        options["refiner"] = refiners[options["refiner"]]
    with pytest.raises(GenerationError) as error:
        check_request(bundle, PROMPT, **options)
    assert message in str(error.value), str(error.value)


def test_cli_refusals_are_one_line_and_load_nothing(tiny_bundle, tmp_path):
    sdxl, sd1 = str(tiny_bundle("sdxl")), str(tiny_bundle("sd1"))
    for bundle, args, fragment in [
        (sdxl, ["--original-size", "200"], "'200' is not WIDTHxHEIGHT in pixels, such as 1024x768"),
        (sdxl, ["--crop", "8x16"], "'8x16' is not TOP,LEFT in pixels"),
        (sdxl, ["--negative-aesthetic-score", "2"], "--negative-aesthetic-score conditions the SDXL refiner"),
        (sdxl, ["--refiner", str(tmp_path / "nope")], "no such bundle directory"),
        (sd1, ["--negative-prompt-2", "x"], "--negative-prompt-2 is an SDXL option; this bundle is Stable Diffusion 1.x"),
    ]:
        one_line_error(CliRunner().invoke(main, ["generate", PROMPT, "--bundle", bundle, *args, "-o", str(tmp_path / "o")]),
                       fragment)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ Apple's layouts


def apple_packages(folder: Path, model: str, parts: list[tuple[Path, str]]) -> Path:
    """A packages/ folder as Apple's converter names it, linking our packages under its long
    names (``Stable_Diffusion_version_<model>_<submodule>.mlpackage``), with the tokenizer files
    in the sibling compiled/ folder."""
    packages, compiled = folder / "packages", folder / "compiled"
    packages.mkdir(parents=True)
    compiled.mkdir()
    for package, sub in parts:
        (packages / f"Stable_Diffusion_version_{model}_{sub}.mlpackage").symlink_to(package, target_is_directory=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(parts[0][0].parent / name, compiled / name)
    return packages


def test_apple_sdxl_packages_generate_as_ours(base, refiner, base_bundle, refiner_bundle, tmp_path):
    """A base and a refiner each in Apple's packages/ layout (the refiner converted alone, its UNet
    named like a base's and told apart by its 5 time ids) give our bundles' image exactly, with
    SDXL's scheduler as the default; a base folder holding the refiner beside it ("_refiner") is
    read with both UNets, its refiner sharing the folder's second encoder and VAE."""
    apple_base = apple_packages(tmp_path / "base", "sdxl_base", [
        (base_bundle / "TextEncoder.mlpackage", "text_encoder"), (base_bundle / "TextEncoder2.mlpackage", "text_encoder_2"),
        (base_bundle / "Unet.mlpackage", "unet"), (base_bundle / "VAEDecoder.mlpackage", "vae_decoder")])
    apple_refiner = apple_packages(tmp_path / "refiner", "sdxl_refiner", [
        (refiner_bundle / "TextEncoder2.mlpackage", "text_encoder_2"), (refiner_bundle / "UnetRefiner.mlpackage", "unet"),
        (refiner_bundle / "VAEDecoder.mlpackage", "vae_decoder")])
    opened = open_bundle(apple_base)
    assert (opened.layout, opened.family, opened.name, opened.image_size) == ("apple-packages", "sdxl", "sdxl_base", (128, 128))
    assert opened.force_zeros and opened.pad_token == "<|endoftext|>"
    alone = open_bundle(apple_refiner)
    assert (alone.family, alone.unet, alone.pad_token, alone.force_zeros) == ("sdxl-refiner", "UnetRefiner", "!", False)
    assert refiner_of(alone) is alone and refiner_of(opened) is None

    options = dict(steps=4, seed=5, refiner_start=0.5, negative_prompt="blurry")
    apple = Pipeline(opened, backend="mil")(PROMPT, refiner=apple_refiner, **options)
    np.testing.assert_array_equal(pixels(apple)[0], pixels(base(PROMPT, refiner=refiner, **options))[0])
    assert apple.parameters[0].refiner == "sdxl_refiner"

    (apple_base / "Stable_Diffusion_version_sdxl_base_refiner.mlpackage").symlink_to(
        refiner_bundle / "UnetRefiner.mlpackage", target_is_directory=True)
    both = open_bundle(apple_base)
    assert both.family == "sdxl" and both.models["UnetRefiner"].packages[0].name.endswith("_refiner.mlpackage")
    inner = refiner_of(both)
    assert (inner.family, inner.name, sorted(inner.models)) == ("sdxl-refiner", "sdxl_base", ["TextEncoder2", "UnetRefiner",
                                                                                             "VAEDecoder"])
    assert inner.models["TextEncoder2"] is both.models["TextEncoder2"] and inner.image_size == (128, 128)
    check_request(opened, PROMPT, refiner=apple_base)  # a path to such a folder is a refiner too


def fake_compiled(folder: Path, name: str, inputs: dict[str, list[int]], outputs: dict[str, list[int]],
                  sub: str = "") -> None:
    """A compiled model's metadata.json as the Core ML compiler writes it (all the layout reads),
    with the class name it records for one of Apple's packages (submodule ``sub``)."""
    def schema(table):
        return [{"name": n, "dataType": "Float32", "shape": json.dumps(s)} for n, s in table.items()]

    (folder / f"{name}.mlmodelc").mkdir(parents=True)
    meta = {"inputSchema": schema(inputs), "outputSchema": schema(outputs),
            "generatedClassName": f"Stable_Diffusion_version_xl_{sub or name}"}
    (folder / f"{name}.mlmodelc" / "metadata.json").write_text(json.dumps([meta]))


def test_apple_compiled_sdxl_resources_are_read(base_bundle, tmp_path):
    """Resources as Apple's converter bundles them for Swift: TextEncoder2.mlmodelc and
    UnetRefiner.mlmodelc beside the base's models. Read without Core ML (from metadata.json);
    the mil backend refuses to run them in one line."""
    resources = tmp_path / "Resources"
    text = ({"input_ids": [1, 77]}, {"hidden_embeds": [1, 77, 768], "pooled_outputs": [1, 768]})
    text_2 = ({"input_ids": [1, 77]}, {"hidden_embeds": [1, 77, 1280], "pooled_outputs": [1, 1280]})
    fake_compiled(resources, "TextEncoder", *text)
    fake_compiled(resources, "TextEncoder2", *text_2)
    for name, sub, width, ids in (("Unet", "unet", 2048, [2, 6]), ("UnetRefiner", "refiner", 1280, [2, 5])):
        fake_compiled(resources, name, {"sample": [2, 4, 128, 128], "timestep": [2], "encoder_hidden_states": [2, width, 1, 77],
                                        "text_embeds": [2, 1280], "time_ids": ids}, {"noise_pred": [2, 4, 128, 128]}, sub)
    fake_compiled(resources, "VAEDecoder", {"z": [1, 4, 128, 128]}, {"image": [1, 3, 1024, 1024]})
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(base_bundle / name, resources / name)
    bundle = open_bundle(resources)
    assert (bundle.layout, bundle.family, bundle.image_size, bundle.unet_batch) == ("apple-compiled", "sdxl", (1024, 1024), 2)
    assert bundle.vae_scaling == 0.13025 and bundle.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    inner = refiner_of(bundle)
    assert bundle.name == inner.name == "xl" and inner.family == "sdxl-refiner" and inner.unet_batch == 2
    with pytest.raises(GenerationError, match="exist only as compiled .mlmodelc, which only the coreml backend"):
        Pipeline(bundle, backend="mil")
    shutil.rmtree(resources / "TextEncoder2.mlmodelc")
    with pytest.raises(BundleError, match="no TextEncoder2 model in this apple-compiled folder; it is not a complete "
                                          "Stable Diffusion XL pipeline"):
        open_bundle(resources)


def test_a_flat_time_ids_input_is_fed_flat():
    """Early Apple conversions declare the base's time_ids (12,) for the two branches' (2, 6)."""
    from coreml_sd.runtime.backends import TensorDescription
    from coreml_sd.runtime.guidance import GuidedUNet

    class Flat:
        inputs = {"time_ids": TensorDescription("time_ids", (12,), "float32")}

        def predict(self, inputs):
            self.seen = inputs
            return {"noise_pred": np.zeros((2, 4, 2, 2), np.float32)}

    model = Flat()
    cond = {"time_ids": np.array([[1, 2, 3, 4, 5, 6]], np.float32)}
    GuidedUNet(model, 2, cond, {"time_ids": cond["time_ids"] + 10}, 7.5).predict(np.zeros((1, 4, 2, 2), np.float32), 1.0)
    np.testing.assert_array_equal(model.seen["time_ids"], [11, 12, 13, 14, 15, 16, 1, 2, 3, 4, 5, 6])


# ------------------------------------------------------------------ check and bench


def test_check_and_bench_run_an_sdxl_bundle(base_bundle, tmp_path):
    """``check`` probes every model, the UNet's text_embeds and time_ids included; ``bench`` runs
    the pipeline on it and records the family."""
    result = CliRunner().invoke(main, ["check", str(base_bundle), "--backend", "mil"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("5 models ran with finite outputs (mil backend)")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--bundle", str(base_bundle), "--steps", "2", "--runs", "1", "--warmup", "0",
                                       "--backend", "mil", "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["bundle"]["family"] == "sdxl" and record["results"][0]["status"] == "ok"
    assert record["results"][0]["unet_ms_per_step"]["count"] == 2
