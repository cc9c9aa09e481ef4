"""The converter lets coremltools check a program once per pass pipeline, not after every pass
(``export._validated_once_per_pipeline``): the same ML program comes out, a broken program is
still refused, and coremltools is left as it was found, also when a conversion fails."""

from __future__ import annotations

import coremltools as ct
import pytest
import torch
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipelineManager
from coremltools.converters.mil.mil.program import Program

from coreml_sd.convert.export import _validated_once_per_pipeline


class _Block(torch.nn.Module):
    """Enough of a UNet's ops for the default pipeline's fusions: conv + bias + scale, group norm,
    linear layers, softmax attention."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        h = self.norm(self.conv(x) * 0.5).flatten(2).transpose(1, 2)
        weights = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) * 8**-0.5, dim=-1)
        return weights @ self.v(h)


def _convert():
    torch.manual_seed(0)
    traced = torch.jit.trace(_Block().eval(), torch.zeros(1, 4, 6, 6))
    model = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 4, 6, 6))], convert_to="mlprogram",
                       minimum_deployment_target=ct.target.macOS13, skip_model_load=True)
    return model.get_spec()


def test_the_program_is_the_one_checked_after_every_pass():
    want = _convert()
    with _validated_once_per_pipeline():
        got = _convert()
    # Byte for byte, but for the conversion date coremltools records.
    for spec in (want, got):
        spec.description.metadata.userDefined.pop("com.github.apple.coremltools.conversion_date", None)
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)


def _broken_program() -> Program:
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def program(x):
        return mb.relu(x=mb.add(x=x, y=1.0))

    relu = next(op for op in program.functions["main"].operations if op.op_type == "relu")
    relu.inputs["x"].remove_child_op(relu)  # relu reads a var that no longer lists it as a reader
    return program


def test_a_broken_program_is_still_refused():
    program = _broken_program()
    with pytest.raises(Exception, match="consumed by op"):
        program.validate()  # what coremltools finds
    with _validated_once_per_pipeline(), pytest.raises(Exception, match="consumed by op"):
        PassPipelineManager.apply_pipeline(program, ct.PassPipeline.EMPTY)


def test_coremltools_is_left_as_it_was():
    apply, validate = PassPipelineManager.__dict__["apply_pipeline"], Program.validate
    with pytest.raises(RuntimeError), _validated_once_per_pipeline():
        assert PassPipelineManager.__dict__["apply_pipeline"] is not apply
        raise RuntimeError("a conversion that fails")
    assert PassPipelineManager.__dict__["apply_pipeline"] is apply and Program.validate is validate
    # A pipeline whose pass fails halfway (here on the broken graph) leaves coremltools' own check
    # in place too.
    with _validated_once_per_pipeline(), pytest.raises(Exception, match="relu"):
        PassPipelineManager.apply_pipeline(_broken_program(), ct.PassPipeline.DEFAULT)
    assert Program.validate is validate
