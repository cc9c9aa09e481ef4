"""Weights last: ``coreml-sd convert`` traces and converts with stand-in weights and places the
real ones, loaded in float16, into the ML program afterwards (``convert.export``).

The reference is the whole conversion of the module holding its float32 weights
(``export.to_coreml``), as every conversion was made before: the same program, op for op, and
the same outputs within float16 rounding, executed by the mil backend. Also: the guard that
refuses a program whose stand-ins a coremltools pass changed, and the float16 load of a folder's
UNet, which reads its file a group of tensors at a time.
"""

from __future__ import annotations

import shutil

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil.frontend.milproto import load as mil_load
from coremltools.converters.mil.mil.types import builtin_to_string
from safetensors.torch import load_file, save_file

from coreml_sd.benchmarks.metrics import psnr
from coreml_sd.convert import diffusers_folder
from coreml_sd.convert.components import build_module
from coreml_sd.convert.converter import ConvertOptions, plan
from coreml_sd.convert.export import (
    finish,
    place_weights,
    stand_in_weights,
    take_slots,
    to_coreml,
    to_program,
    trace,
)
from coreml_sd.convert.source import SourceError, open_source
from coreml_sd.families import TensorSpec
from coreml_sd.models import AttentionImpl
from coreml_sd.runtime.backends import load_model

from .test_source import saved_weights


def program_ops(path) -> list[tuple[str, str, tuple]]:
    """Each non-constant op of a package's program: type, output dtype and shape."""
    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    program = mil_load.load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    return [
        (op.op_type, builtin_to_string(op.outputs[0].dtype), tuple(op.outputs[0].shape))
        for op in program.functions["main"].operations
        if op.op_type != "const"
    ]


def feeds_for(model) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(desc.shape).astype(np.float32) for name, desc in model.inputs.items()}
    feeds["timestep"] = np.array([999.0, 457.25], np.float32)  # large and fractional
    if "time_ids" in feeds:
        feeds["time_ids"] = np.array([[128, 128, 0, 0, 128, 128], [256, 192, 16, 0, 128, 128]], np.float32)
    return feeds


# The two conversions differ only where coremltools folds the attention scale dh**-0.25 into q's and
# k's weights: here the float16 weights times the scale rounded to float16 (2**-12 relative),
# rounded again; before, the float32 product rounded once. Measured: 72.4 dB on SD 1.x (dh = 8),
# identical outputs on the tiny SDXL UNet (dh = 16: a scale of 0.5 is exact either way). A weight
# in the wrong slot, or the scale lost, costs tens of dB.
SAME_MODEL_PSNR = 65


# SDXL's case is opt-in (--run-slow): its bundle tests already run every SDXL package, converted
# weights-last as always, against diffusers through mil (test_sdxl_convert.py).
@pytest.mark.parametrize("family", ["sd1", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_weights_last_is_the_whole_conversion(family, tiny_bundle, request, tmp_path):
    source = open_source(str(request.getfixturevalue(f"tiny_{family}_dir")))
    p = plan(source, tmp_path / "unused", ConvertOptions(components=("unet",)))
    spec = p.components[0]
    inputs, outputs = spec.io(p.geometry)
    module = build_module(source, spec, AttentionImpl.SPLIT_EINSUM, 512)  # float32, as before
    whole = tmp_path / "Unet.mlpackage"
    to_coreml(trace(module, inputs), inputs, outputs, {}, "whole", spec.float32_features).save(str(whole))
    last = tiny_bundle(family) / "Unet.mlpackage"  # as `coreml-sd convert` makes it

    ops = program_ops(last)
    assert ops == program_ops(whole)
    # The timestep's (and SDXL's time ids') sinusoidal features stay float32.
    assert {dtype for op, dtype, _ in ops if op in ("sin", "cos")} == {"fp32"}
    model = load_model(last, backend="mil")
    feeds = feeds_for(model)
    got, want = model.predict(feeds), load_model(whole, backend="mil").predict(feeds)
    for name, reference in want.items():
        assert psnr(got[name], reference) >= SAME_MODEL_PSNR, name


class ScaledProjection(torch.nn.Module):
    """A 1x1 convolution whose output is scaled, as attention scales q and k."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(8, 16, 1)
        self.norm = torch.nn.GroupNorm(4, 16)

    def forward(self, x):
        return self.norm(self.proj(x) * 0.5)


def test_weight_names_follow_a_weight_through_the_fold(tmp_path):
    """``WeightNames``: after the weight passes fold the scale into the convolution, its new weight
    constant is still known as the parameter it came from (what a mixed-bit preset's bits are
    keyed by); the graph's own constants are nobody's."""
    from coreml_sd.convert.export import WeightNames, run_weight_passes

    torch.manual_seed(0)
    real = ScaledProjection().eval()
    with torch.device("meta"):
        module = ScaledProjection().eval()
    stand_ins = stand_in_weights(module)
    inputs, outputs = [TensorSpec("x", (1, 8, 4, 4))], [TensorSpec("y", (1, 16, 4, 4))]
    program = to_program(trace(module, inputs), inputs, outputs)
    names = WeightNames(place_weights(take_slots(program, stand_ins), real.state_dict()))
    run_weight_passes(program)
    ops = program.functions["main"].operations
    conv = next(op for op in ops if op.op_type == "conv")
    assert "mul" not in [op.op_type for op in ops]  # folded: the convolution's weight is a new constant
    assert names.of(conv.weight.op) == "proj.weight" and names.of(conv.bias.op) == "proj.bias"
    assert {names.of(op) for op in ops if op.op_type == "const"} >= {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert {names.of(op) for op in ops if op.op_type == "const" and op.outputs[0].val is not None
            and getattr(op.outputs[0].val, "size", 0) == 1} <= {None}  # shapes, epsilons: the graph's


def test_stand_ins_are_placed_and_a_changed_one_is_refused(tmp_path):
    torch.manual_seed(0)
    real = ScaledProjection().eval()
    with torch.device("meta"):
        module = ScaledProjection().eval()
    stand_ins = stand_in_weights(module)
    assert len(set(stand_ins.values.values())) == 4  # one value per parameter, none shared
    for p in module.parameters():  # a value broadcast: no memory
        assert p.stride() == (0,) * p.dim() and p.unique().tolist() == [stand_ins.values[n] for n, q in
                                                                         module.named_parameters() if q is p]
    inputs, outputs = [TensorSpec("x", (1, 8, 4, 4))], [TensorSpec("y", (1, 16, 4, 4))]
    traced = trace(module, inputs)

    # coremltools' whole pipeline folds the scale into the convolution: its stand-ins are gone.
    whole = ct.convert(traced, convert_to="milinternal", inputs=[ct.TensorType(name="x", shape=(1, 8, 4, 4))],
                       minimum_deployment_target=ct.target.macOS13)
    with pytest.raises(ValueError, match=r"no constant of the program holds proj\.\w+ \(2 weights\)"):
        take_slots(whole, stand_ins)

    program = to_program(traced, inputs, outputs)
    slots = take_slots(program, stand_ins)
    assert sorted(slots) == sorted(stand_ins.values)
    place_weights(slots, real.state_dict())
    path = tmp_path / "m.mlpackage"
    finish(program, inputs, outputs, {}, "scaled").save(str(path))
    assert "mul" not in [op for op, _, _ in program_ops(path)]  # the scale was folded, after placing
    x = np.random.default_rng(0).standard_normal((1, 8, 4, 4)).astype(np.float32)
    with torch.no_grad():
        want = real(torch.from_numpy(x)).numpy()
    assert psnr(load_model(path, backend="mil").predict({"x": x})["y"], want) >= 60


def test_safetensors_read_a_group_at_a_time(tmp_path, monkeypatch):
    tensors = {f"w{i}": torch.randn(64, 32) for i in range(5)} | {"ids": torch.arange(7)}
    save_file(tensors, tmp_path / "a.safetensors")
    save_file({"b": torch.randn(3, 3)}, tmp_path / "b.safetensors")
    monkeypatch.setattr(diffusers_folder, "_READ_GROUP_BYTES", 3 * 64 * 32 * 4)  # three tensors a group
    got = diffusers_folder.read_safetensors([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], torch.float16)
    want = load_file(tmp_path / "a.safetensors") | load_file(tmp_path / "b.safetensors")
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        expected = value.half() if value.is_floating_point() else value
        assert got[key].dtype == expected.dtype and torch.equal(got[key], expected), key


def test_unet_loads_in_float16(tiny_sdxl_dir, tmp_path):
    unet = open_source(str(tiny_sdxl_dir)).load("unet", torch.float16)
    saved = saved_weights(tiny_sdxl_dir, "unet")
    state = unet.state_dict()
    assert sorted(state) == sorted(saved) and not unet.training
    assert all(state[k].dtype == torch.float16 and torch.equal(state[k], saved[k].half()) for k in saved)

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_sdxl_dir, folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    damaged = load_file(path)
    del damaged["conv_in.bias"]
    save_file(damaged, path, metadata={"format": "pt"})
    with pytest.raises(SourceError, match=r"the unet weights of .* do not match unet/config.json \(1 missing tensors"):
        open_source(str(folder)).load("unet", torch.float16)
