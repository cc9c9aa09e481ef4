"""The mil backend runs what `coreml-sd convert` wrote, and agrees with the torch source.

For every component and attention implementation of the tiny SD 1.x / 2.x bundles: the package
executed op by op matches the torch module it was converted from (same weights, same inputs) at
PSNR >= 40 dB in float16; a float32 program matches near-exactly. Also: load-time refusal of
unknown ops, float16 overflow surfacing as inf/NaN, compressed (palettized) weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from coreml_sd.benchmarks.metrics import psnr
from coreml_sd.convert.components import COMPONENT_SPECS, Geometry
from coreml_sd.convert.export import to_coreml, trace
from coreml_sd.convert.source import open_source
from coreml_sd.runtime.backends import BackendError, load_model

FAMILIES = ("sd1", "sd2")
ATTENTIONS = ("original", "split-einsum", "split-einsum-v2")
COMPONENTS = {"TextEncoder": "text-encoder", "Unet": "unet", "VAEDecoder": "vae-decoder", "VAEEncoder": "vae-encoder"}


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
    return COMPONENT_SPECS[component].build(open_source(str(tiny_dir)), attention, chunk)


def run_torch(module: torch.nn.Module, model, feeds: dict) -> dict[str, np.ndarray]:
    with torch.no_grad():
        result = module(*(torch.from_numpy(feeds[n]) for n in model.inputs))
    result = result if isinstance(result, tuple) else (result,)
    return {n: r.numpy() for n, r in zip(model.outputs, result)}


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_packages_match_torch(family, attention, tiny_bundle, request, record_property):
    bundle = tiny_bundle(family, attention)
    chunk = json.loads((bundle / "manifest.json").read_text())["query_chunk"]
    tiny_dir = request.getfixturevalue(f"tiny_{family}_dir")
    for name, component in COMPONENTS.items():
        model = load_model(bundle / f"{name}.mlpackage", backend="mil")
        feeds = feeds_for(model)
        got = model.predict(feeds)
        want = run_torch(torch_module(tiny_dir, component, attention, chunk), model, feeds)
        for output, reference in want.items():
            assert got[output].dtype == np.float32 and got[output].shape == reference.shape
            score = psnr(got[output], reference)
            record_property(f"psnr_{name}_{output}", round(score, 1))
            assert score >= 40, f"{name}.{output}: PSNR {score:.1f} dB"


def test_float32_program_is_near_exact(tiny_sd2_dir, tmp_path):
    """With a float32 program the backend adds only float32 rounding. The program itself deviates
    from torch by a little more: coremltools lowers GroupNorm's affine step to batch_norm with
    mean 0, variance 1 and the norm's epsilon, so each GroupNorm scales by 1/sqrt(1 + 1e-5)
    (5e-6 relative, on device too); through the tiny UNet that accumulates to ~3e-4."""
    for component in ("unet", "text-encoder", "vae-decoder"):
        module = torch_module(tiny_sd2_dir, component, "split-einsum", 512)
        inputs, outputs = COMPONENT_SPECS[component].interface(Geometry(64, 64, 2, 64))
        path = tmp_path / f"{component}.mlpackage"
        to_coreml(trace(module, inputs), inputs, outputs, {}, component, precision="float32").save(str(path))
        model = load_model(path, backend="mil")
        feeds = feeds_for(model, seed=1)
        got, want = model.predict(feeds), run_torch(module, model, feeds)
        for output, reference in want.items():
            err = np.abs(got[output] - reference).max() / np.abs(reference).max()
            assert err < 1e-3, f"{component}.{output}: relative error {err:.2e}"
            assert psnr(got[output], reference) > 75


def test_float32_override_only_removes_activation_rounding(tiny_bundle, tiny_sd1_dir):
    """On a float16 program the override keeps activations in float32: closer to torch (the weights
    stay float16-rounded, so not exact), and never further."""
    path = tiny_bundle("sd1", "split-einsum") / "Unet.mlpackage"
    fp16, fp32 = load_model(path, "mil"), load_model(path, "mil", precision="float32")
    feeds = feeds_for(fp16, seed=2)
    want = run_torch(torch_module(tiny_sd1_dir, "unet", "split-einsum", 512), fp16, feeds)["noise_pred"]
    assert psnr(fp32.predict(feeds)["noise_pred"], want) > psnr(fp16.predict(feeds)["noise_pred"], want) + 3


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


def save_program(prog, path) -> None:
    import coremltools as ct

    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.macOS13, skip_model_load=True,
               compute_precision=ct.precision.FLOAT16).save(str(path))


def test_unknown_op_fails_at_load_time(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((4, 3))])
    def prog(x):
        return mb.cumsum(x=mb.relu(x=x), axis=0)

    path = tmp_path / "Cumsum.mlpackage"
    save_program(prog, path)
    with pytest.raises(BackendError, match=r"Cumsum.mlpackage: the mil backend does not implement op cumsum"):
        load_model(path, backend="mil")


def test_float16_overflow_shows_as_on_device(tmp_path):
    """300 * 300 = 90000 > 65504: inf in float16, then inf - inf = NaN; float32 keeps it finite."""

    @mb.program(input_specs=[mb.TensorSpec((2, 2))])
    def prog(x):
        big = mb.mul(x=x, y=x)
        return mb.sub(x=big, y=mb.mul(x=big, y=0.5))

    path = tmp_path / "Square.mlpackage"
    save_program(prog, path)
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


def test_palettized_weights(tiny_bundle, tiny_sd1_dir, tmp_path):
    """Compressed weights (constexpr_lut_to_dense) are decompressed at load time and used."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    dense = tiny_bundle("sd1", "split-einsum") / "VAEDecoder.mlpackage"
    config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="uniform", nbits=4, weight_threshold=256))
    palettized = cto.palettize_weights(ct.models.MLModel(str(dense), skip_model_load=True), config)
    path = tmp_path / "VAEDecoder.mlpackage"
    palettized.save(str(path))
    model = load_model(path, "mil")
    assert "constexpr_lut_to_dense" in str(palettized.get_spec().mlProgram)
    feeds = feeds_for(model)
    want = run_torch(torch_module(tiny_sd1_dir, "vae-decoder", "split-einsum", 512), model, feeds)["image"]
    got, unpalettized = model.predict(feeds)["image"], load_model(dense, "mil").predict(feeds)["image"]
    assert 15 < psnr(got, want) < psnr(unpalettized, want)  # 4-bit weights: close, but not the same


# ------------------------------------------------------------------ interface


def test_descriptions_and_input_checks(tiny_bundle, tmp_path):
    model = load_model(tiny_bundle("sd1", "split-einsum") / "Unet.mlpackage", "mil")
    assert {n: (d.shape, d.dtype) for n, d in model.inputs.items()} == {
        "sample": ((2, 4, 8, 8), "float16"),
        "timestep": ((2,), "float32"),
        "encoder_hidden_states": ((2, 32, 1, 77), "float16"),
    }
    assert {n: (d.shape, d.dtype) for n, d in model.outputs.items()} == {"noise_pred": ((2, 4, 8, 8), "float32")}
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
