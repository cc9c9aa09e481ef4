"""The mil backend runs what `coreml-sd convert` wrote, and agrees with the torch source.

For every component and attention implementation of the tiny SD 1.x / 2.x bundles: the package
executed op by op matches the torch module it was converted from (same weights, same inputs) at
PSNR >= 40 dB in float16, and near-exactly with the float32 override (against the module with
its weights rounded to float16, as the package stores them); a float32 program matches
near-exactly. Also: load-time refusal of unknown ops, float16 overflow surfacing as inf/NaN (and
where it starts), compressed weights decompressing exactly as coremltools does.
"""

from __future__ import annotations

import json

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from coreml_sd.benchmarks.metrics import psnr
from coreml_sd.convert.components import build_module
from coreml_sd.convert.export import to_coreml, trace
from coreml_sd.convert.source import open_source
from coreml_sd.families import SD1, Geometry
from coreml_sd.models import AttentionImpl
from coreml_sd.runtime.backends import BackendError, load_model
from helpers import FAMILIES

ATTENTIONS = ("original", "split-einsum", "split-einsum-v2")
COMPONENTS = {spec.name: spec.cli_name for spec in SD1.components}


def feeds_for(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Realistic inputs from the package's own descriptions."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, desc in model.inputs.items():
        if name == "input_ids":
            ids = np.full(desc.shape, 49407.0, np.float32)
            ids[0, :7] = [49406, 320, 1125, 539, 320, 2368, 49407]  # a photo of a cat
            out[name] = ids
        elif name == "timestep":
            out[name] = np.array([999.0, 457.25][: desc.shape[0]], np.float32)  # large and fractional
        elif name == "x":
            out[name] = rng.uniform(-1, 1, desc.shape).astype(np.float32)
        else:
            out[name] = rng.standard_normal(desc.shape).astype(np.float32)
    return out


def torch_module(tiny_dir, component: str, attention: str, chunk: int) -> torch.nn.Module:
    """The torch wrapper a bundle's package was converted from (same weights, same attention)."""
    return build_module(open_source(str(tiny_dir)), SD1.component(component), AttentionImpl.parse(attention), chunk)


def run_torch(module: torch.nn.Module, model, feeds: dict) -> dict[str, np.ndarray]:
    with torch.no_grad():
        result = module(*(torch.from_numpy(feeds[n]) for n in model.inputs))
    result = result if isinstance(result, tuple) else (result,)
    return {n: r.numpy() for n, r in zip(model.outputs, result)}


def with_float16_weights(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its parameters rounded to float16, as a float16 package stores them.
    Buffers are left alone: those that reach the program as constants the converter keeps in
    float32 (the timestep frequencies, see ``export.float32_features_of``) or rounds itself."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


# The issue asks for >= 40 dB. Measured here: 69.5-74.8 dB for every component, family and
# attention (float16 storage costs ~2^-11 relative per op). The 60 dB floor keeps ~10 dB of margin
# for other CPUs' float32 summation order while catching what 40 dB would let through: a
# kernel off by 1% (a wrong epsilon, a mask broadcast on the wrong axis) lands near 40 dB.
ISSUE_PSNR, FLOOR_PSNR = 40, 60
# With the float32 override, against the module with float16 weights, the only differences left
# are float32 summation order (~1e-7 relative: ~120 dB, measured 117-118 dB on SD 2.x's text
# encoder) and constants the converter itself rounded to float16 that are no module parameter:
# SD 1.x's attention scale 1/sqrt(32) and quick-GELU's 1.702 (1e-4 relative each), GroupNorm's
# affine lowering. Measured: 91.5 dB (SD 1.x UNet) to 118 dB. One float16 rounding of the inputs
# alone (the bug this guards against: the override rounding float16-declared inputs) brings the
# UNet and VAEs to 86-87 dB; float16 activations throughout, to 70-75 dB.
OVERRIDE_PSNR = 88


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_packages_match_torch(family, attention, tiny_bundle, request, record_property):
    bundle = tiny_bundle(family, attention)
    chunk = json.loads((bundle / "manifest.json").read_text())["query_chunk"]
    tiny_dir = request.getfixturevalue(f"tiny_{family}_dir")
    for name, component in COMPONENTS.items():
        path = bundle / f"{name}.mlpackage"
        model, override = load_model(path, backend="mil"), load_model(path, backend="mil", precision="float32")
        feeds = feeds_for(model)
        module = torch_module(tiny_dir, component, attention, chunk)
        got, want = model.predict(feeds), run_torch(module, model, feeds)
        got32, want16 = override.predict(feeds), run_torch(with_float16_weights(module), model, feeds)
        for output, reference in want.items():
            assert got[output].dtype == np.float32 and got[output].shape == reference.shape
            score, exact = psnr(got[output], reference), psnr(got32[output], want16[output])
            record_property(f"psnr_{name}_{output}", round(score, 1))
            record_property(f"psnr_override_{name}_{output}", round(exact, 1))
            assert score >= ISSUE_PSNR, f"{name}.{output}: PSNR {score:.1f} dB"
            assert score >= FLOOR_PSNR, f"{name}.{output}: PSNR {score:.1f} dB, below the measured 69.5+ by 10 dB"
            assert exact >= OVERRIDE_PSNR, f"{name}.{output}: float32 override at {exact:.1f} dB from torch"


def test_float32_program_is_near_exact(tiny_sd2_dir, tmp_path):
    """With a float32 program the backend adds only float32 rounding. The program itself deviates
    from torch by a little more: coremltools lowers GroupNorm's affine step to batch_norm with
    mean 0, variance 1 and the norm's epsilon, so each GroupNorm scales by 1/sqrt(1 + 1e-5)
    (5e-6 relative, on device too); through the tiny UNet that accumulates to ~3e-4."""
    for component in ("unet", "text-encoder", "vae-decoder"):
        module = torch_module(tiny_sd2_dir, component, "split-einsum", 512)
        inputs, outputs = SD1.component(component).io(Geometry(64, 64, 2, 64))
        path = tmp_path / f"{component}.mlpackage"
        to_coreml(trace(module, inputs), inputs, outputs, {}, component, precision="float32").save(str(path))
        model = load_model(path, backend="mil")
        feeds = feeds_for(model, seed=1)
        got, want = model.predict(feeds), run_torch(module, model, feeds)
        for output, reference in want.items():
            err = np.abs(got[output] - reference).max() / np.abs(reference).max()
            assert err < 1e-3, f"{component}.{output}: relative error {err:.2e}"
            assert psnr(got[output], reference) > 75


@pytest.mark.parametrize("declared", ["fp32", "fp16"])
def test_float32_override_never_rounds_to_float16(declared, program_package):
    """y = x * 2^-10 for x = 1e5: y (97.66) is within float16 range, x is not. A float16 program
    overflows, on device and here, whether its input is declared float16 or float32 (then the
    converter casts it to float16 inside, as Apple's converter does); the override must neither
    round the input nor the cast, giving y exactly."""

    @mb.program(input_specs=[mb.TensorSpec((2,), dtype=getattr(types, declared))], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.mul(x=x, y=np.array(2.0**-10, np.float16 if declared == "fp16" else np.float32), name="y")

    path = program_package(prog, f"Scale{declared}")
    plain, override = load_model(path, "mil"), load_model(path, "mil", precision="float32")
    assert plain.inputs["x"].dtype == {"fp16": "float16", "fp32": "float32"}[declared]
    if declared == "fp32":
        assert [s.op_type for s in plain._ops][:2] == ["cast", "mul"]  # the converter's cast to float16
    x = np.array([1e5, 3.0], np.float32)
    assert np.isinf(plain.predict({"x": x})["y"][0])
    np.testing.assert_array_equal(override.predict({"x": x})["y"], [1e5 / 1024, 3.0 / 1024])


def test_timestep_features_stay_float32(tiny_bundle, tiny_sd1_dir):
    """Large timesteps must not cost accuracy: the UNet's sinusoidal features are float32."""
    path = tiny_bundle("sd1", "split-einsum") / "Unet.mlpackage"
    model = load_model(path, "mil")
    module = torch_module(tiny_sd1_dir, "unet", "split-einsum", 512)
    scores = []
    for t in ([1.0, 3.0], [999.0, 981.0]):
        feeds = {**feeds_for(model, seed=3), "timestep": np.array(t, np.float32)}
        scores.append(psnr(model.predict(feeds)["noise_pred"], run_torch(module, model, feeds)["noise_pred"]))
    assert scores[1] > 60 and scores[1] > scores[0] - 6, scores


# ------------------------------------------------------------------ refusals and overflow


def test_unknown_op_fails_at_load_time(program_package):
    @mb.program(input_specs=[mb.TensorSpec((4, 3))])
    def prog(x):
        return mb.cumsum(x=mb.relu(x=x), axis=0)

    path = program_package(prog, "Cumsum")
    with pytest.raises(BackendError, match=r"Cumsum.mlpackage: the mil backend does not implement op cumsum"):
        load_model(path, backend="mil")


def test_float16_overflow_shows_as_on_device(program_package):
    """300 * 300 = 90000 > 65504: inf in float16, then inf - inf = NaN; float32 keeps it finite."""

    @mb.program(input_specs=[mb.TensorSpec((2, 2))])
    def prog(x):
        big = mb.mul(x=x, y=x)
        return mb.sub(x=big, y=mb.mul(x=big, y=0.5))

    path = program_package(prog, "Square")
    x = np.array([[300.0, 1.0], [-300.0, 2.0]], np.float32)
    out = load_model(path, "mil").predict({"x": x})
    name = next(iter(out))
    assert np.isinf(out[name][0, 0]) or np.isnan(out[name][0, 0])
    assert out[name][0, 1] == pytest.approx(0.5)
    exact = load_model(path, "mil", precision="float32").predict({"x": x})[name]
    assert exact[0, 0] == pytest.approx(45000.0)


def test_overflow_in_a_real_decoder(tiny_bundle):
    """Latents far outside the trained range overflow the decoder's GroupNorm variance in float16:
    (x - mean)^2 becomes inf, x / sqrt(inf) = 0, and the image silently collapses (finite, wrong),
    as it would on a Mac. find_nonfinite names the op where it starts."""
    model = load_model(tiny_bundle("sd1", "split-einsum") / "VAEDecoder.mlpackage", "mil")
    exact = load_model(model.path, "mil", precision="float32")
    z = feeds_for(model)["z"]
    assert psnr(model.predict({"z": z})["image"], exact.predict({"z": z})["image"]) > 40
    assert model.find_nonfinite({"z": z}) is None
    big = z * 3000
    assert psnr(model.predict({"z": big})["image"], exact.predict({"z": big})["image"]) < 25
    op_type, op_name = model.find_nonfinite({"z": big})
    assert op_type in ("square", "mul", "reduce_mean", "reduce_sum"), (op_type, op_name)
    assert exact.find_nonfinite({"z": big}) is None


def test_find_nonfinite_names_the_op_inside_a_fused_attention(program_package):
    """Attention logits q.k = 300 * 300 overflow float16; softmax then turns inf into NaN. The
    attention is fused for predict, yet the op named is the program's logits matmul."""

    # (B, heads, dh, S) each, float16 so that no converter casts sit between the attention's ops
    @mb.program(input_specs=[mb.TensorSpec((1, 1, 1, 4), dtype=types.fp16) for _ in "qkv"], opset_version=ct.target.iOS16)
    def prog(q, k, v):
        logits = mb.matmul(x=q, y=k, transpose_x=True, name="logits")  # (B, h, Sq, Sk)
        probs = mb.softmax(x=logits, axis=3, name="probs")
        return mb.matmul(x=v, y=probs, transpose_y=True, name="values")

    model = load_model(program_package(prog, "Attention"), "mil")
    assert "attention" in [s.op_type for s in model._steps], "the pattern must be fused for this test"
    q = np.array([[[[300.0, 1.0, 0.5, 0.0]]]], np.float32)
    feeds = {name: q for name in model.inputs}
    assert np.isnan(model.predict(feeds)[next(iter(model.outputs))]).any()
    op_type, op_name = model.find_nonfinite(feeds)
    assert op_type == "matmul" and op_name.startswith("logits"), (op_type, op_name)


def _compress(model, how: str, **config):
    """``model`` compressed by coremltools: how = palettize | quantize | prune (+ joint: a pruned
    model palettized keeping its sparsity). Weights of >= 256 elements only."""
    import coremltools.optimize.coreml as cto

    kinds = {"palettize": (cto.palettize_weights, cto.OpPalettizerConfig),
             "quantize": (cto.linear_quantize_weights, cto.OpLinearQuantizerConfig),
             "prune": (cto.prune_weights, cto.OpMagnitudePrunerConfig)}
    joint = config.pop("joint", None)
    if joint:
        model = _compress(model, "prune", target_sparsity=0.5)
    compress, op_config = kinds[how]
    options = {"joint_compression": True} if joint else {}
    return compress(model, cto.OptimizationConfig(global_config=op_config(weight_threshold=256, **config)), **options)


def _constexpr_ops(model) -> set[str]:
    return {op.op_type for f in model._mil_program.functions.values() for op in f.operations
            if op.op_type.startswith("constexpr_")}


def _check_decompression(dense, compressed, ops: set[str], feeds: dict, tmp_path) -> None:
    """``compressed`` holds exactly ``ops``; through the mil backend it gives exactly what the same
    package decompressed by coremltools (``decompress_weights``) gives, and not what ``dense``
    gives (the compressed weights are used)."""
    import coremltools.optimize.coreml as cto

    assert _constexpr_ops(compressed) == ops
    compressed.save(str(tmp_path / "compressed.mlpackage"))
    cto.decompress_weights(compressed).save(str(tmp_path / "decompressed.mlpackage"))
    got = load_model(tmp_path / "compressed.mlpackage", "mil").predict(feeds)
    want = load_model(tmp_path / "decompressed.mlpackage", "mil").predict(feeds)
    plain = load_model(dense, "mil").predict(feeds)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
        assert not np.array_equal(got[name], plain[name])


# macOS 13 programs (what convert writes): iOS 16 constexpr ops.
COMPRESSIONS = {
    "lut-4bit": ("palettize", {"mode": "uniform", "nbits": 4}, {"constexpr_lut_to_dense"}),
    "lut-8bit": ("palettize", {"mode": "uniform", "nbits": 8}, {"constexpr_lut_to_dense"}),
    "affine-int8": ("quantize", {"mode": "linear_symmetric", "dtype": "int8"}, {"constexpr_affine_dequantize"}),
    "affine-uint8": ("quantize", {"mode": "linear", "dtype": "uint8"}, {"constexpr_affine_dequantize"}),
    "sparse": ("prune", {"target_sparsity": 0.5}, {"constexpr_sparse_to_dense"}),
}


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_compressed_weights_decompress_exactly(compression, tiny_bundle, tmp_path):
    dense = tiny_bundle("sd1", "split-einsum") / "VAEDecoder.mlpackage"
    how, config, ops = COMPRESSIONS[compression]
    compressed = _compress(ct.models.MLModel(str(dense), skip_model_load=True), how, **config)
    _check_decompression(dense, compressed, ops, feeds_for(load_model(dense, "mil")), tmp_path)


# iOS 18 programs add grouped palettes, blockwise quantization and chains of constexpr ops.
COMPRESSIONS_IOS18 = {
    "lut-grouped": ("palettize", {"mode": "uniform", "nbits": 4, "granularity": "per_grouped_channel", "group_size": 16},
                    {"constexpr_lut_to_dense"}),
    "lut-channel-scale": ("palettize", {"mode": "uniform", "nbits": 4, "enable_per_channel_scale": True},
                          {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"}),
    "int4-blockwise": ("quantize", {"mode": "linear", "dtype": "int4", "granularity": "per_block", "block_size": 16},
                       {"constexpr_blockwise_shift_scale"}),
    "sparse-lut": ("palettize", {"mode": "uniform", "nbits": 4, "joint": True},
                   {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"}),
}


@pytest.mark.parametrize("compression", list(COMPRESSIONS_IOS18))
def test_compressed_weights_decompress_exactly_ios18(compression, program_package, tmp_path):
    rng = np.random.default_rng(0)
    conv_w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    linear_w = rng.standard_normal((48, 64)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec((1, 16, 8, 8))], opset_version=ct.target.iOS18)
    def prog(x):
        y = mb.reshape(x=mb.conv(x=x, weight=conv_w, pad_type="same"), shape=[1, 32, 64])
        return mb.linear(x=y, weight=linear_w, name="y")

    dense = program_package(prog, "Dense", target=ct.target.iOS18)
    model = ct.models.MLModel(str(dense), skip_model_load=True)
    how, config, ops = COMPRESSIONS_IOS18[compression]
    feeds = {"x": rng.standard_normal((1, 16, 8, 8)).astype(np.float32)}
    _check_decompression(dense, _compress(model, how, **dict(config)), ops, feeds, tmp_path)


# ------------------------------------------------------------------ interface


def test_descriptions_and_input_checks(tiny_bundle, tmp_path):
    """Descriptions are read from the package: what convert declared for the tiny SD 1.x UNet."""
    model = load_model(tiny_bundle("sd1", "split-einsum") / "Unet.mlpackage", "mil")
    declared_inputs, declared_outputs = SD1.component("unet").io(Geometry(64, 64, 2, 32))
    assert {n: (d.shape, d.dtype) for n, d in model.inputs.items()} == {s.name: (s.shape, s.dtype) for s in declared_inputs}
    assert {n: (d.shape, d.dtype) for n, d in model.outputs.items()} == {s.name: (s.shape, s.dtype) for s in declared_outputs}
    assert model.inputs["sample"].shape == (2, 4, 8, 8) and model.inputs["timestep"].dtype == "float32"
    feeds = feeds_for(model)
    with pytest.raises(BackendError, match="input 'sample' has shape \\(1, 4, 8, 8\\)"):
        model.predict({**feeds, "sample": feeds["sample"][:1]})
    with pytest.raises(BackendError, match="do not match"):
        model.predict({k: v for k, v in feeds.items() if k != "timestep"})
    with pytest.raises(BackendError, match="unknown backend"):
        load_model(model.path, backend="metal")
    compiled = tmp_path / "Unet.mlmodelc"
    compiled.mkdir()
    with pytest.raises(BackendError, match="runs .mlpackage files"):
        load_model(compiled, backend="mil")


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_fused_attention_agrees_with_op_by_op(attention, tiny_bundle):
    """Chunked attention rounds each intermediate where the program does; only the order of float32
    sums differs from op-by-op execution (one float16 ulp here and there)."""
    from coreml_sd.runtime.backends.mil import MILModel

    for family in FAMILIES:
        bundle = tiny_bundle(family, attention)
        for name in ("TextEncoder", "Unet", "VAEDecoder"):  # causal mask, cross-attention, one head
            fused = MILModel(bundle / f"{name}.mlpackage")
            plain = MILModel(bundle / f"{name}.mlpackage", fuse_attention=False)
            assert any(s.op_type == "attention" for s in fused._steps), f"{family} {attention} {name}: nothing fused"
            assert not any(s.op_type == "attention" for s in plain._steps)
            feeds = feeds_for(fused, seed=4)
            a, b = fused.predict(feeds), plain.predict(feeds)
            for output in a:
                assert psnr(a[output], b[output]) > 65, f"{family} {attention} {name}.{output}"
