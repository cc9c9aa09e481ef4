"""``convert --compress``: every preset converted, run through the mil backend and measured
against the float16 bundle; the flags refused before any work; the mixed-bit analysis checked
against what it predicts and reused.

The models are tiny with random weights: their quantization error is not a trained model's (no
outliers, far fewer distinct layers), so the floors here say that a preset works and keeps its
order of quality, not what a real model's images lose (``benchmarks/compress_unet.py`` measures
SD 1.5's full-size UNet).

PSNR floors: uniform quantization of b bits gives a signal-to-noise ratio of about 6.02 b dB on
the weights, k-means a few dB more; a layer's output PSNR (peak to rms, the peak several rms) sits
some 10 dB above its weights' SNR and the errors of many layers add. The floors are 6 dB per bit
less a fixed 2-6 dB for that adding up; int8 per channel and palettize-8 sit near float16's own
rounding.
"""

from __future__ import annotations

import functools
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from coremltools.converters.mil.frontend.milproto import load as mil_load
from coremltools.models import MLModel

from coreml_sd.benchmarks.metrics import psnr
from coreml_sd.cli import main
from coreml_sd.contract import read_manifest
from coreml_sd.convert.compress import WEIGHT_THRESHOLD, compress_program, preset, weight_bytes
from coreml_sd.convert.converter import ConvertError, ConvertOptions, Progress, convert, plan
from coreml_sd.convert.sensitivity import Sensitivity, error_tables
from coreml_sd.convert.source import open_source
from coreml_sd.runtime.backends import load_model
from coreml_sd.runtime.pipeline import Pipeline
from helpers import one_line_error, pixels

COMPONENTS = ("text-encoder", "unet", "vae-decoder")
PROMPT = "a lighthouse on a cliff"

# preset: (bits per compressed weight, minimum target, Core ML specification version it needs,
#          PSNR floors in dB of TextEncoder, Unet, the whole image)
PRESETS = {
    "palettize-8": (8, "macOS13", 7, 50, 45, 38),
    "palettize-6": (6, "macOS13", 7, 40, 36, 33),
    "palettize-4": (4, "macOS13", 7, 30, 25, 24),
    "palettize-4-grouped": (4, "macOS15", 9, 30, 25, 24),
    "int8": (8, "macOS13", 7, 45, 40, 36),
    "int4-blocked": (4.5, "macOS15", 9, 28, 23, 22),  # 4 bits and a float16 scale per 32 weights
    "mixed-4.5": (4.5, "macOS13", 7, 30, 26, 24),
}


def _program_weights(package: Path) -> tuple[int, int]:
    """(all weight bytes, bytes of weights large enough to compress) of a float16 package."""
    spec = MLModel(str(package), skip_model_load=True).get_spec()
    program = mil_load.load(spec, specification_version=spec.specificationVersion,
                            file_weights_dir=str(package / "Data" / "com.apple.CoreML" / "weights"))
    total = large = 0
    for op in program.functions["main"].operations:
        value = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(value, np.ndarray) and value.dtype == np.float16 and value.size >= 10:
            total += value.nbytes
            large += value.nbytes if value.size > WEIGHT_THRESHOLD and value.ndim >= 2 else 0
    return total, large


def _feeds(model, timestep: float = 500.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    feeds = {}
    for name, d in model.inputs.items():
        if name == "input_ids":
            ids = np.full(d.shape, 49407.0, np.float32)
            ids[0, :7] = [49406, 320, 1125, 539, 320, 2368, 49407]
            feeds[name] = ids
        elif name == "timestep":
            feeds[name] = np.full(d.shape, timestep, np.float32)
        else:
            feeds[name] = rng.standard_normal(d.shape).astype(np.float32)
    return feeds


@functools.lru_cache(maxsize=2)  # the float16 bundle's image, once per worker
def _image(bundle: Path):
    return pixels(Pipeline.from_bundle(bundle, backend="mil").start(PROMPT, steps=4, seed=5, scheduler="euler").finish())[0]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_compresses_and_runs_through_mil(name, tiny_bundle):
    """Each preset: the manifest's record, the weight file's size against float16's, each
    compressed model's output and the whole image against the float16 bundle's, all through mil."""
    bits, target, spec_version, *floors = PRESETS[name]
    reference = tiny_bundle("sd1", "split-einsum")
    bundle = tiny_bundle("sd1", "split-einsum", components=COMPONENTS, compress=name)
    manifest = read_manifest(bundle)
    assert manifest["deployment_target"] == target
    assert manifest["components"]["VAEDecoder"]["compression"] is None  # the VAE stays float16 by default
    for model, floor in zip(("TextEncoder", "Unet"), floors):
        entry = manifest["components"][model]["compression"]
        package, float16 = bundle / f"{model}.mlpackage", reference / f"{model}.mlpackage"
        assert entry["preset"] == name and entry["deployment_target"] == target
        assert MLModel(str(package), skip_model_load=True).get_spec().specificationVersion == spec_version
        # Sizes: what the manifest says is what is on disk; the weights too small to compress stay
        # float16, the rest shrink to about bits/16 of their size.
        assert entry["bytes_after"] == weight_bytes(package)
        assert entry["bytes_before"] == weight_bytes(float16)  # what float16 takes, computed, not written
        total, large = _program_weights(float16)
        expected = (total - large + large * bits / 16) / total
        ratio = weight_bytes(package) / weight_bytes(float16)
        assert 0.85 * expected < ratio < 1.1 * expected + 0.02, (ratio, expected)
        ours, theirs = load_model(package, "mil"), load_model(float16, "mil")
        feeds = _feeds(theirs)
        got, want = ours.predict(feeds), theirs.predict(feeds)
        for key in want:
            assert np.isfinite(got[key]).all()
        first = next(iter(want))
        assert psnr(got[first], want[first]) >= floor, (model, psnr(got[first], want[first]))
    assert psnr(_image(bundle), _image(reference), peak=255) >= floors[2]


def test_mixed_bits_follow_the_analysis_and_reuse_it(tiny_bundle, tiny_sd1_dir, tmp_path):
    """mixed-4.5: per-layer bits from {1, 2, 4, 6, 8} averaging at most 4.5, recorded per layer;
    the analysis' predicted UNet PSNR close to the one measured through mil; a mixed-3.5 over the
    same bundle reuses the analysis, keeps the VAE and reconverts the rest."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("sd1", "split-einsum", components=COMPONENTS, compress="mixed-4.5"), bundle)
    entry = read_manifest(bundle)["components"]["Unet"]["compression"]
    assert set(entry["layer_bits"].values()) <= {1, 2, 4, 6, 8}
    assert entry["bits"] <= 4.5 and len(set(entry["layer_bits"].values())) >= 2
    assert entry["analysis"] == "Unet.sensitivity.json" and (bundle / "Unet.sensitivity.json").is_file()
    assert "Unet.sensitivity.json" in read_manifest(bundle)["files"]

    lines = []
    reference = tiny_bundle("sd1", "split-einsum")
    options = ConvertOptions(components=("unet", "vae-decoder"), compress="mixed-3.5", overwrite=True)  # the UNet's analysis
    convert(open_source(str(tiny_sd1_dir)), bundle, options, Progress(log=lines.append))
    text = "\n".join(lines)
    assert ("compressing unet as mixed-3.5; the VAE stays float16 (--compress-vae compresses it);"
            " minimum deployment target macOS 13 / iOS 16") in text
    assert "[unet] layer sensitivity: reused from the existing bundle" in text
    assert "[vae-decoder] unchanged: reused" in text
    assert "[unet] compress (mixed-3.5)" in text
    after = read_manifest(bundle)["components"]["Unet"]["compression"]
    assert after["preset"] == "mixed-3.5" and after["bits"] <= 3.5
    analysis = (bundle / "Unet.sensitivity.json").read_bytes()
    # The prediction: on inputs of the analysis' kind, the measured PSNR within 4 dB (a factor
    # 2.5 in squared error: the estimate of 16 probes varies by about a third per layer).
    ours, theirs = load_model(bundle / "Unet.mlpackage", "mil"), load_model(reference / "Unet.mlpackage", "mil")
    measured = np.mean([psnr(ours.predict(f)["noise_pred"], theirs.predict(f)["noise_pred"])
                        for f in (_feeds(theirs, t) for t in (100.0, 500.0, 900.0))])
    assert abs(measured - after["predicted_psnr_db"]) < 4, (measured, after["predicted_psnr_db"])
    assert analysis == (bundle / "Unet.sensitivity.json").read_bytes()


def test_error_tables_are_the_palettes_coremltools_writes():
    """The analysis' error of each float16 value is exactly what palettizing the tensor writes: the
    constant that coremltools' palettization makes (as the mil backend decompresses it) of a tensor
    of over 10,000 weights, which coremltools clusters with kmeans1d, as the analysis does."""
    import coremltools as ct
    import torch
    from coremltools.converters.mil import Builder as mb
    from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

    w = (torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.float16)
    tables = error_tables(w)
    codes = torch.from_numpy(w.numpy().view(np.uint16).astype(np.int64))
    for i, bits in enumerate((1, 2, 4, 6, 8)):
        @mb.program(input_specs=[mb.TensorSpec(shape=(1, 256))], opset_version=ct.target.iOS16)
        def prog(x):
            return mb.linear(x=mb.cast(x=x, dtype="fp16"), weight=w.numpy(), name="y")

        const = next(op.name for op in prog.functions["main"].operations
                     if op.op_type == "const" and getattr(op.outputs[0].val, "shape", ()) == (64, 256))
        compress_program(prog, preset(f"mixed-{bits}"), {const: bits})
        assert any(op.op_type == "constexpr_lut_to_dense" for op in prog.functions["main"].operations)
        WeightDecompressor(op_selector=lambda op: True).apply(prog)  # as the mil backend reads it
        written = next(op.outputs[0].val for op in prog.functions["main"].operations
                       if op.op_type == "const" and getattr(op.outputs[0].val, "shape", ()) == (64, 256))
        assert len(np.unique(written.view(np.uint16))) <= 2**bits  # (np.unique miscounts float16 here)
        predicted = (w.float() + tables[i][codes]).numpy().astype(np.float16)
        np.testing.assert_array_equal(predicted, written)


def test_allocation_meets_the_budget_with_the_least_error():
    """Against every assignment of a small case: the allocation's average is within budget and no
    assignment within budget has less predicted error than the convex-hull walk, unless the walk's
    extra error is small (it may step past a non-convex point)."""
    import itertools

    rng = np.random.default_rng(0)
    elements = {f"l{i}": int(n) for i, n in enumerate(rng.integers(1000, 9000, 5))}
    noise = {}
    for name in elements:
        scale = float(rng.uniform(0.1, 10))
        noise[name] = {b: scale * 4.0 ** -b for b in (1, 2, 4, 6, 8)}  # 6 dB per bit
    s = Sensitivity("k", elements, noise, peak=2.0, probes=1, seconds=0)
    total = sum(elements.values())
    for average in (2.0, 3.5, 4.5, 6.0):
        bits = s.allocate(average)
        assert sum(bits[n] * elements[n] for n in elements) <= average * total
        best = min(sum(noise[n][b] for n, b in zip(elements, choice))
                   for choice in itertools.product((1, 2, 4, 6, 8), repeat=len(elements))
                   if sum(b * elements[n] for n, b in zip(elements, choice)) <= average * total)
        assert sum(noise[n][bits[n]] for n in elements) <= 2 * best
    assert s.allocate(8) == dict.fromkeys(elements, 8)
    assert s.psnr(s.allocate(8)) == pytest.approx(10 * math.log10(4 / sum(v[8] for v in noise.values())))


@pytest.mark.parametrize("args, fragments", [
    (["--compress", "palettize-5"], ["unknown compression preset 'palettize-5'", "palettize-4", "mixed-B"]),
    (["--compress", "mixed-9"], ["from 1 to 8 bits"]),
    (["--compress-vae"], ["--compress-vae", "add --compress PRESET"]),
    (["--compress", "palettize-4-grouped", "--deployment-target", "macOS13"],
     ["needs macOS15 / iOS18", "palettize-4"]),
    (["--compress", "int4-blocked", "--deployment-target", "iOS17"], ["needs macOS15", "int8"]),
    (["--deployment-target", "macOS12"], ["unknown deployment target 'macOS12'", "macOS13 (iOS16)"]),
])
def test_impossible_combinations_are_refused_before_any_work(args, fragments, tiny_sd1_dir, tmp_path):
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["convert", str(tiny_sd1_dir), "-o", str(out), *args])
    one_line_error(result, *fragments)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_explicit_newer_target_is_kept(tiny_sd1_dir, tmp_path):
    p = plan(open_source(str(tiny_sd1_dir)), tmp_path / "b", ConvertOptions(compress="palettize-4", deployment_target="iOS18"))
    assert p.target == "macOS15"
    assert plan(open_source(str(tiny_sd1_dir)), tmp_path / "b", ConvertOptions()).target == "macOS13"
    with pytest.raises(ConvertError, match="needs macOS15"):
        plan(open_source(str(tiny_sd1_dir)), tmp_path / "b", ConvertOptions(compress="int4-blocked", deployment_target="macOS14"))


def test_bench_and_report_show_the_preset(tiny_bundle):
    """``bench`` records each model's preset from the manifest and ``report`` shows it in a column."""
    from coreml_sd.benchmarks.bench import bundle_info
    from coreml_sd.benchmarks.report import compression_label
    from coreml_sd.runtime.bundle import open_bundle

    components = bundle_info(open_bundle(tiny_bundle("sd1", "split-einsum", components=COMPONENTS,
                                                     compress="palettize-4")))["components"]
    assert components["Unet"] == {"precision": "float16", "compression": "palettize-4"}
    assert components["VAEDecoder"]["compression"] is None
    assert compression_label(components) == "Unet palettize-4; others none, palettize-4"


def test_compress_vae_compresses_the_vae_too(tiny_sd1_dir, tmp_path):
    """``--compress-vae``: the VAE decoder takes the preset too, and still decodes within 8 bits'
    error. (The tiny pipelines' VAE has no tensor large enough to compress: a VAE with a 64-channel
    last level comes in through ``--vae``.)"""
    from diffusers import AutoencoderKL

    from coreml_sd.testing.tiny_pipelines import init_weights, tiny_vae_config

    config = tiny_vae_config("sd1") | {"block_out_channels": [16, 16, 32, 64]}
    init_weights(AutoencoderKL.from_config(config), 0, "vae").save_pretrained(tmp_path / "vae")
    source = open_source(str(tiny_sd1_dir)).with_vae(str(tmp_path / "vae"))
    quiet = Progress(log=lambda line: None)
    convert(source, tmp_path / "float16", ConvertOptions(components=("vae-decoder",)), quiet)
    convert(source, tmp_path / "compressed", ConvertOptions(components=("vae-decoder",), compress="palettize-8",
                                                            compress_vae=True), quiet)
    entry = read_manifest(tmp_path / "compressed")["components"]["VAEDecoder"]["compression"]
    assert entry["preset"] == "palettize-8" and entry["bytes_after"] < 0.75 * entry["bytes_before"]
    ours = load_model(tmp_path / "compressed" / "VAEDecoder.mlpackage", "mil")
    theirs = load_model(tmp_path / "float16" / "VAEDecoder.mlpackage", "mil")
    feeds = _feeds(theirs)
    assert psnr(ours.predict(feeds)["image"], theirs.predict(feeds)["image"]) >= 40


# A minute of the suite for a combination: compression is family-blind, SDXL's inputs run through mil elsewhere.
@pytest.mark.slow
def test_sdxl_compressed_unet_through_mil(tiny_bundle):
    """SDXL's UNet (``text_embeds``, ``time_ids``) compressed, run through mil against the float16
    bundle. (TextEncoder2 is a CLIP text encoder as TextEncoder is, which the SD 1.x tests compress.)"""
    bundle = tiny_bundle("sdxl", "split-einsum", components=("unet",), compress="palettize-6")
    reference = tiny_bundle("sdxl", "split-einsum")
    assert read_manifest(bundle)["components"]["Unet"]["compression"]["preset"] == "palettize-6"
    ours, theirs = load_model(bundle / "Unet.mlpackage", "mil"), load_model(reference / "Unet.mlpackage", "mil")
    feeds = _feeds(theirs)
    feeds["time_ids"] = np.tile(np.array([128, 128, 0, 0, 128, 128], np.float32), (feeds["time_ids"].shape[0], 1))
    got, want = ours.predict(feeds)["noise_pred"], theirs.predict(feeds)["noise_pred"]
    assert np.isfinite(got).all() and psnr(got, want) >= 30


@pytest.mark.macos
@pytest.mark.parametrize("name", ["palettize-4", "int8", "mixed-4.5", "palettize-4-grouped", "int4-blocked"])
def test_core_ml_runs_each_preset_as_mil_does(name, tiny_bundle):
    """On a Mac, Core ML decompresses each preset's weights as the mil backend does: their outputs
    agree within float16 compute (CPU_ONLY; macOS 15 presets need macOS 15)."""
    import platform

    _, target, *_ = PRESETS[name]
    if target == "macOS15" and int(platform.mac_ver()[0].split(".")[0]) < 15:
        pytest.skip(f"{name} needs macOS 15")
    bundle = tiny_bundle("sd1", "split-einsum", components=COMPONENTS, compress=name)
    for model in ("TextEncoder", "Unet"):
        mil = load_model(bundle / f"{model}.mlpackage", "mil")
        core = load_model(bundle / f"{model}.mlpackage", "coreml", compute_units="CPU_ONLY")
        feeds = _feeds(mil)
        a, b = core.predict(feeds), mil.predict(feeds)
        for output in b:
            assert psnr(a[output], b[output]) > 35, (model, output)


def test_compression_progress_is_ours(monkeypatch):
    """coremltools' compression bar becomes our own line now and then, and nothing else is printed."""
    from coreml_sd.convert import quiet

    lines = []
    monkeypatch.setattr(quiet, "PROGRESS_SECONDS", -1)  # a line after every item but the last
    with quiet.library_output(False, lines.append):
        from coremltools.optimize.coreml import _quantization_passes

        assert list(_quantization_passes.tqdm(["a", "b", "c"], desc="Running compression pass", unit=" ops")) == ["a", "b", "c"]
    assert lines == ["  compressing: 1 of 3 large constants done", "  compressing: 2 of 3 large constants done"]
    assert _quantization_passes.tqdm is not quiet._every  # put back
