"""The Python API: generator form (pause, resume, finish), requests checked before models load,
reduce_memory, bundles in Apple's layouts, the package's lazy re-exports, and (on a Mac) the
coreml backend against the mil one."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from coreml_sd.benchmarks.metrics import psnr
from coreml_sd.runtime.bundle import BundleError, open_bundle
from coreml_sd.runtime.pipeline import GenerationError, NonFiniteError, Pipeline, check_request
from coreml_sd.runtime.request import make_scheduler
from helpers import pixels

PROMPT = "a watercolour of a lighthouse"


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Pipeline.from_bundle(tiny_bundle("sd1", "split-einsum"), backend="mil")


def test_generator_form_yields_every_step_and_can_stop_early(pipe):
    run = pipe.start(PROMPT, steps=5, seed=11, scheduler="euler")
    steps = list(run)
    assert [s.index for s in steps] == [1, 2, 3, 4, 5] and {s.total for s in steps} == {5}
    assert [s.timestep for s in steps] == [float(t) for t in run.timesteps]
    full = run.finish()
    assert len(full.images) == 1 and full.images[0].size == (64, 64)
    assert len(full.timings.unet) == 5 and all(t > 0 for t in full.timings.unet)

    early = pipe.start(PROMPT, steps=5, seed=11, scheduler="euler")
    for step in early:
        if step.index == 2:
            break
    assert np.array_equal(early.latents, steps[1].latents)  # same stream, stopped after step 2
    partial = early.finish()
    assert not np.array_equal(np.asarray(partial.images[0]), np.asarray(full.images[0]))


@pytest.fixture(scope="module")
def lean(tiny_bundle):
    return Pipeline.from_bundle(tiny_bundle("sd1", "split-einsum"), backend="mil", reduce_memory=True)


# euler-a draws noise every step, dpmpp-2m and pndm keep a history.
@pytest.mark.parametrize("scheduler", ["euler-a", "dpmpp-2m", "pndm"])
def test_pause_and_resume_give_the_uninterrupted_result(pipe, lean, scheduler):
    whole = pipe.start(PROMPT, steps=5, seed=3, scheduler=scheduler)
    latents = [step.latents.copy() for step in whole]
    run = lean.start(PROMPT, steps=5, seed=3, scheduler=scheduler)
    for step in run:
        if step.index == 2:
            break
    assert lean.slots["Unet"].model is not None  # paused, not finished: the generator still holds the UNet
    total = len(run.timesteps)  # 5, or 6 for pndm (PLMS repeats its first timestep)
    assert run.remaining == total - 2 and len(latents) == total
    rest = list(run)  # resumes at step 3
    assert [s.index for s in rest] == list(range(3, total + 1))
    for got, want in zip(rest, latents[2:]):
        np.testing.assert_array_equal(got.latents, want)
    assert list(run) == []  # all steps done: nothing more, no error
    result = run.finish()
    assert all(slot.model is None for slot in lean.slots.values())
    np.testing.assert_array_equal(pixels(result)[0], pixels(whole.finish())[0])
    assert run.finish() is result
    with pytest.raises(GenerationError, match="finished"):
        iter(run)


def test_finish_closes_an_iteration_the_caller_still_holds(lean):
    run = lean.start(PROMPT, steps=4, seed=3, scheduler="euler-a")
    steps = iter(run)
    assert next(steps).index == 1 and lean.slots["Unet"].model is not None  # in use
    result = run.finish()
    assert all(slot.model is None for slot in lean.slots.values())
    assert len(result.timings.unet) == 1
    with pytest.raises(StopIteration):
        next(steps)


def test_a_failed_step_ends_the_generation(pipe):
    run = pipe.start(PROMPT, steps=3, seed=3)
    from coreml_sd.runtime.backends import BackendError

    for branch in (run.cond, run.uncond):  # the UNet refuses this context
        branch["encoder_hidden_states"] = branch["encoder_hidden_states"][..., :5]
    with pytest.raises(BackendError, match="encoder_hidden_states"):
        list(run)
    with pytest.raises(GenerationError, match="failed"):
        list(run)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_nonfinite_output_names_the_stage(pipe):
    """Latents of ~1e30 (guidance 1e30) are beyond float16: decoded after one step, the VAE
    decoder gives NaN; denoised further, the UNet's next step does. Either is an error, never an image."""
    with pytest.raises(NonFiniteError, match=r"^NaN or inf in the VAE decoder \(first at op .*'z' reaches .*lower --guidance"):
        pipe(PROMPT, steps=1, seed=1, guidance_scale=1e30, scheduler="euler")
    run = pipe.start(PROMPT, steps=3, seed=1, guidance_scale=1e30, scheduler="euler")
    with pytest.raises(NonFiniteError, match=r"^NaN or inf in the UNet at step 2 of 3 \(first at op "):
        list(run)
    with pytest.raises(GenerationError, match="failed"):
        list(run)


def test_load_time_is_per_run(pipe, lean):
    assert pipe.load_time > 0  # the eager pipeline loaded its models on construction ...
    assert pipe(PROMPT, steps=1, seed=1).timings.load == 0.0  # ... so a run loads nothing
    assert lean.load_time == 0.0
    first, second = lean(PROMPT, steps=1, seed=1), lean(PROMPT, steps=1, seed=1)
    assert first.timings.load > 0 and second.timings.load > 0 and first.timings is not second.timings


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 0}, "steps must be"),
        ({"steps": 2.5}, "steps must be"),
        ({"num_images": 0}, "number of images"),
        ({"guidance_scale": float("nan")}, "guidance scale"),
        ({"scheduler": "heun"}, "unknown scheduler"),
        ({"height": 128}, "converted for 64x64"),
        ({"seed": 2**64}, r"seed must be a whole number from 0 to 2\^64-1"),
        ({"seed": -1}, r"seed must be a whole number from 0 to 2\^64-1 \(18446744073709551615\), got -1"),
        ({"width": 0}, "--width must be a whole number of pixels >= 1, got 0"),
        ({"guidance_scale": -2.0}, r"guidance scale must be >= 0 \(<= 1 turns guidance off\)"),
        ({"steps": 1001}, r"the pndm scheduler takes at most 1000 steps \(the model's training timesteps\), got --steps 1001"),
        ({"steps": 100000, "scheduler": "euler"}, "the euler scheduler takes at most 1000 steps"),
        ({"steps": 51, "scheduler": "lcm"}, r"the lcm scheduler takes at most 50 steps \(its distillation's original_inference"),
        ({"rng": "urandom"}, "unknown rng kind"),
        ({"init_image": "/nonexistent.png"}, "cannot read init image"),
        ({"init_image": Image.new("RGB", (64, 64)), "strength": 0}, "strength must be"),
        ({"init_image": Image.new("RGB", (64, 64)), "strength": 0.05, "steps": 5}, "raise --strength or --steps"),
    ],
)
def test_requests_are_checked_against_the_bundle_alone(tiny_bundle, options, message):
    """No pipeline, so no model: what ``coreml-sd generate`` relies on to fail fast."""
    bundle = open_bundle(tiny_bundle("sd1", "split-einsum"))
    with pytest.raises(GenerationError, match=message):
        check_request(bundle, PROMPT, **options)


def test_steps_up_to_the_schedulers_limit_and_no_more(tiny_bundle):
    """Each scheduler takes up to the training timesteps (LCM: its distillation's steps), one
    step each (PNDM: plus its repeated warm-up step), and refuses one more, naming the limit;
    PNDM used to run 1002 steps all at timestep 1 for 1001."""
    bundle = open_bundle(tiny_bundle("sd1", "split-einsum"))
    for scheduler, limit in (("pndm", 1000), ("ddim", 1000), ("euler", 1000), ("dpmpp-2m", 1000), ("lcm", 50)):
        check_request(bundle, PROMPT, steps=limit, scheduler=scheduler)
        sched = make_scheduler(bundle, scheduler)
        sched.set_timesteps(limit)
        assert len(sched.timesteps) == limit + (scheduler == "pndm"), scheduler
        with pytest.raises(GenerationError, match=f"at most {limit} steps"):
            check_request(bundle, PROMPT, steps=limit + 1, scheduler=scheduler)


def test_an_unsupported_bundle_scheduler_names_the_option(tiny_bundle):
    bundle = open_bundle(tiny_bundle("sd1", "split-einsum"))
    heun = dataclasses.replace(bundle, scheduler_config={**bundle.scheduler_config, "_class_name": "HeunDiscreteScheduler"})
    with pytest.raises(GenerationError, match=r"'HeunDiscreteScheduler' is not supported; pick one with --scheduler \(pndm, "):
        check_request(heun, PROMPT)
    assert check_request(heun, PROMPT, scheduler="euler").scheduler == "euler"


def test_a_request_is_reusable(pipe):
    request = check_request(pipe.bundle, PROMPT, steps=2, scheduler="euler-a")  # random seed, drawn once
    a, b = pipe.generate(request), pipe.generate(request)
    for run in (a, b):
        list(run)
    np.testing.assert_array_equal(pixels(a.finish())[0], pixels(b.finish())[0])
    assert a.finish().parameters[0].seed == request.seed


def test_negative_prompt_truncation_and_guidance_off(pipe):
    long = " ".join(["dog"] * 80) + " zebra"
    run = pipe.start(PROMPT, negative_prompt=long, steps=1, seed=2)
    assert run.truncated == "" and "zebra" in run.negative_truncated
    result = run.finish()
    assert result.negative_truncated == run.negative_truncated and result.parameters[0].negative_prompt == long
    # guidance <= 1: the negative prompt is not used, so neither encoded nor recorded
    off = pipe.start(PROMPT, negative_prompt=long, steps=1, seed=2, guidance_scale=1.0)
    assert off.negative_truncated == ""
    assert off.finish().parameters[0].negative_prompt == ""


def test_call_equals_generator_form_and_seeds_are_deterministic(pipe):
    a = pipe(PROMPT, steps=3, seed=5)
    b = pipe(PROMPT, steps=3, seed=5)
    c = pipe(PROMPT, steps=3, seed=6)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))
    assert a.parameters[0].seed == 5 and a.parameters[0].scheduler == "pndm"  # the model's own scheduler


def test_reduce_memory_gives_the_same_image(tiny_bundle, pipe):
    lean = Pipeline.from_bundle(tiny_bundle("sd1", "split-einsum"), backend="mil", reduce_memory=True)
    assert all(slot.model is None for slot in lean.slots.values())
    a = lean(PROMPT, steps=3, seed=8)
    assert all(slot.model is None for slot in lean.slots.values())  # released after use
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(pipe(PROMPT, steps=3, seed=8).images[0]))


def test_numpy_rng_and_random_seed(pipe):
    a = pipe(PROMPT, steps=2, seed=1, rng="numpy")
    b = pipe(PROMPT, steps=2, seed=1)
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert pipe(PROMPT, steps=1).parameters[0].seed >= 0
    with pytest.raises(GenerationError, match="unknown rng kind"):
        pipe.start(PROMPT, rng="urandom")


# ------------------------------------------------------------------ Apple's layouts


def apple_packages(bundle, root, chunked=False):
    """Our bundle rearranged as Apple's hub repos lay out a model: packages/ with long names,
    tokenizer files in the sibling compiled/ folder."""
    packages, compiled = root / "packages", root / "compiled"
    packages.mkdir(parents=True)
    compiled.mkdir()
    prefix = "Stable_Diffusion_version_tiny_sd1"
    for ours, sub in (("TextEncoder", "text_encoder"), ("VAEDecoder", "vae_decoder"), ("VAEEncoder", "vae_encoder")):
        shutil.copytree(bundle / f"{ours}.mlpackage", packages / f"{prefix}_{sub}.mlpackage")
    if chunked:
        import coremltools as ct

        # Core ML would check the chunks by running them; this test's own assertion does that here.
        ct.models.utils.bisect_model(str(bundle / "Unet.mlpackage"), str(root / "chunks"), check_output_correctness=False)
        for i in (1, 2):
            [chunk] = (root / "chunks").glob(f"*chunk{i}.mlpackage")
            shutil.move(chunk, packages / f"{prefix}_unet_chunk{i}.mlpackage")
    else:
        shutil.copytree(bundle / "Unet.mlpackage", packages / f"{prefix}_unet.mlpackage")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bundle / name, compiled / name)
    return packages


def test_apple_packages_layout_generates_the_same_image(tiny_bundle, tmp_path, pipe):
    packages = apple_packages(tiny_bundle("sd1", "split-einsum"), tmp_path / "repo")
    bundle = open_bundle(packages)
    assert bundle.layout == "apple-packages" and bundle.family == "sd1" and bundle.name == "tiny_sd1"
    assert bundle.image_size == (64, 64) and bundle.unet_batch == 2 and bundle.prediction_type == "epsilon"
    apple = Pipeline.from_bundle(packages, backend="mil")
    a = apple(PROMPT, steps=3, seed=4, scheduler="ddim")
    b = pipe(PROMPT, steps=3, seed=4, scheduler="ddim")
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_chunked_unet_runs_as_one(tiny_bundle, tmp_path, pipe):
    packages = apple_packages(tiny_bundle("sd1", "split-einsum"), tmp_path / "repo", chunked=True)
    bundle = open_bundle(packages)
    assert len(bundle.models["Unet"].packages) == 2
    chunked = Pipeline.from_bundle(packages, backend="mil")
    a = chunked(PROMPT, steps=3, seed=4, scheduler="ddim")
    b = pipe(PROMPT, steps=3, seed=4, scheduler="ddim")
    assert psnr(np.asarray(a.images[0], float), np.asarray(b.images[0], float), peak=255) > 45
    with pytest.raises(NonFiniteError, match=r"UNet at step 2 of 3 \(first at op \w+ '\w+'"):  # found through the chunks
        chunked(PROMPT, steps=3, seed=4, scheduler="ddim", guidance_scale=1e30)


def test_layout_errors(tiny_bundle, tmp_path):
    packages = apple_packages(tiny_bundle("sd1", "split-einsum"), tmp_path / "repo")
    (tmp_path / "repo" / "compiled" / "vocab.json").unlink()
    with pytest.raises(BundleError, match="no vocab.json and merges.txt"):
        open_bundle(packages)
    (tmp_path / "only").mkdir()
    with pytest.raises(BundleError, match="neither a coreml-sd bundle"):
        open_bundle(tmp_path / "only")
    # Compiled models are for Core ML; the mil backend says so instead of failing obscurely.
    compiled = tmp_path / "compiled"
    compiled.mkdir()
    for name in ("TextEncoder", "Unet", "VAEDecoder"):
        (compiled / f"{name}.mlmodelc").mkdir()
    with pytest.raises(BundleError):  # no tokenizer files
        open_bundle(compiled)


@pytest.mark.macos
@pytest.mark.parametrize("units", ["CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL"])
def test_coreml_backend_agrees_with_mil(tiny_bundle, units):
    from coreml_sd.runtime.backends import load_model

    bundle = tiny_bundle("sd1", "split-einsum")
    rng = np.random.default_rng(0)
    for name in ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"):
        mil = load_model(bundle / f"{name}.mlpackage", "mil")
        feeds = {n: (np.full(d.shape, 49407.0, np.float32) if n == "input_ids"
                     else rng.standard_normal(d.shape).astype(np.float32))
                 for n, d in mil.inputs.items()}
        core = load_model(bundle / f"{name}.mlpackage", "coreml", compute_units=units)
        a, b = core.predict(feeds), mil.predict(feeds)
        for output in b:
            assert psnr(a[output], b[output]) > 35, (name, output, units)


@pytest.mark.macos
def test_compiled_resources_layout_generates(tiny_bundle, tmp_path):
    import coremltools as ct

    bundle = tiny_bundle("sd1", "split-einsum")
    resources = tmp_path / "Resources"
    resources.mkdir()
    for name in ("TextEncoder", "Unet", "VAEDecoder"):
        ct.utils.compile_model(str(bundle / f"{name}.mlpackage"), str(resources / f"{name}.mlmodelc"))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bundle / name, resources / name)
    assert open_bundle(resources).layout == "apple-compiled"
    result = Pipeline.from_bundle(resources, backend="coreml", compute_units="CPU_ONLY")(PROMPT, steps=3, seed=4)
    reference = Pipeline.from_bundle(bundle, backend="mil")(PROMPT, steps=3, seed=4)
    assert psnr(np.asarray(result.images[0], float), np.asarray(reference.images[0], float), peak=255) > 30


def test_coreml_backend_refuses_off_macos(tiny_bundle):
    if sys.platform == "darwin":
        pytest.skip("this checks the refusal elsewhere")
    from coreml_sd.runtime.backends import BackendError, load_model

    with pytest.raises(BackendError, match="needs macOS"):
        load_model(tiny_bundle("sd1", "split-einsum") / "Unet.mlpackage", "coreml")


# ------------------------------------------------------------------ the package


def test_package_reexports_the_api_lazily():
    """``from coreml_sd import Pipeline`` works, yet ``import coreml_sd`` (what ``coreml-sd
    --help`` starts with) imports none of numpy, Pillow, coremltools or torch."""
    code = (
        "import sys, coreml_sd, coreml_sd.runtime\n"
        "heavy = [m for m in ('numpy', 'PIL', 'coremltools', 'torch') if m in sys.modules]\n"
        "from coreml_sd import Pipeline, BundleError\n"
        "from coreml_sd.runtime import Pipeline as Same, check_request\n"
        "from coreml_sd.runtime.pipeline import Pipeline as Defined\n"
        "assert Pipeline is Same is Defined and 'Pipeline' in dir(coreml_sd)\n"
        "print(','.join(heavy) or 'none')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "none", out.stdout
    missing = subprocess.run([sys.executable, "-c", "import coreml_sd; coreml_sd.Nope"], capture_output=True, text=True)
    assert missing.returncode != 0 and "has no attribute 'Nope'" in missing.stderr
