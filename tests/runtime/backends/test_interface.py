"""The interface both backends share: input validation, output dtypes, load errors for damaged
packages, and the Core ML path's independence from torch and from coremltools' import noise.

Tests use small purpose-built programs (fast); the coreml backend's cases run on macOS only.
"""

from __future__ import annotations

import os
import re
import shutil

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from coreml_sd.runtime.backends import BackendError, describe_model, load_model
from helpers import run_python

BACKENDS = ["mil", pytest.param("coreml", marks=pytest.mark.macos)]


@pytest.fixture
def mixed_package(program_package):
    """Inputs x float32 (2, 3) and i int32 (2,); outputs x * 2 (float32) and i + 1 (int32)."""

    @mb.program(input_specs=[mb.TensorSpec((2, 3)), mb.TensorSpec((2,), dtype=types.int32)])
    def prog(x, i):
        return mb.mul(x=x, y=2.0, name="doubled"), mb.add(x=i, y=1, name="next")

    return program_package(prog, "Mixed")


@pytest.fixture
def float16_package(program_package):
    """A program declaring its input and output float16 (as our packages did before inputs became
    float32): y = x * 2^-10, exact in float16 for every float16 x."""

    @mb.program(input_specs=[mb.TensorSpec((2,), dtype=types.fp16)], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.mul(x=x, y=np.float16(2.0**-10), name="y")

    return program_package(prog, "Half")


# ------------------------------------------------------------------ inputs


VALID = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.array([3, -4], np.int32)}
INVALID = [
    ({"x": np.full((2, 3), "a")}, r"input 'x' holds <U1 data; the model takes float32 of shape \(2, 3\)"),
    ({"x": VALID["x"] + 1j}, r"input 'x' holds complex64 data; the model takes float32 of shape \(2, 3\)"),
    ({"x": VALID["x"] > 0}, r"input 'x' holds bool data; the model takes float32"),
    ({"x": np.array([[None] * 3] * 2)}, r"input 'x' holds object data; the model takes float32"),
    ({"x": [[1.0, 2.0, 3.0], [4.0]]}, r"input 'x' is not an array .*; the model takes float32 of shape \(2, 3\)"),
    ({"x": VALID["x"][:1]}, r"input 'x' has shape \(1, 3\), the model takes float32 of shape \(2, 3\)"),
    ({"i": np.array([1.5, 2.0])}, r"input 'i' holds float64 data; the model takes int32 of shape \(2,\)"),
    ({"i": np.array([True, False])}, r"input 'i' holds bool data; the model takes int32"),
    ({"i": np.array([2**31, 0], np.int64)}, r"input 'i' holds values beyond int32; the model takes int32"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("change", "message"), INVALID, ids=[f"invalid-{i}" for i in range(len(INVALID))])
def test_invalid_inputs_are_named_in_one_line(backend, change, message, mixed_package):
    model = load_model(mixed_package, backend=backend)
    with pytest.raises(BackendError, match=r"^Mixed.mlpackage: " + message) as error:
        model.predict({**VALID, **change})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_must_be_a_mapping(backend, mixed_package):
    model = load_model(mixed_package, backend=backend)
    for given, kind in ((list(VALID.values()), "list"), (None, "NoneType"), (VALID["x"], "ndarray")):
        with pytest.raises(BackendError,
                           match=rf"^Mixed.mlpackage: inputs must be a mapping of input name to array, not {kind}$"):
            model.predict(given)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_names_that_do_not_match_are_listed(backend, mixed_package):
    model = load_model(mixed_package, backend=backend)
    for given, names in (({"x": VALID["x"]}, "['x']"), ({**VALID, 7: VALID["x"]}, "['7', 'i', 'x']")):
        with pytest.raises(BackendError, match=re.escape(f"Mixed.mlpackage: inputs {names} do not match the model's ['i', 'x']")):
            model.predict(given)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numeric_inputs_of_another_type_are_cast(backend, mixed_package):
    """Integers for a float input (token ids arrive as ints), python lists, float64: cast as Core ML
    casts. Outputs come back as float32 for floats, int32 for ints."""
    model = load_model(mixed_package, backend=backend)
    out = model.predict({"x": [[0, 1, 2], [3, 4, 5]], "i": np.array([3, -4], np.int64)})
    assert out["doubled"].dtype == np.float32 and out["next"].dtype == np.int32
    np.testing.assert_array_equal(out["doubled"], [[0, 2, 4], [6, 8, 10]])
    np.testing.assert_array_equal(out["next"], [4, -3])


# ------------------------------------------------------------------ outputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_outputs_come_back_as_float32_with_float16_values(backend, float16_package):
    model = load_model(float16_package, backend=backend)
    assert model.inputs["x"].dtype == "float16" and model.outputs["y"].dtype == "float16"
    x = np.array([0.1, 3000.0], np.float32)  # 0.1 is not a float16: the input rounds, as on device
    y = model.predict({"x": x})["y"]
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32) / 1024)
    assert y[0] != np.float32(0.1) / 1024


# ------------------------------------------------------------------ damaged packages


@pytest.fixture
def weighted_package(program_package):
    """y = x W with a 64x64 W: large enough to be stored in weight.bin."""
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec((1, 64))])
    def prog(x):
        return mb.linear(x=x, weight=weight, name="y")

    path = program_package(prog, "Weighted")
    assert (path / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size > 64 * 64 * 2
    return path


def _damaged(package, tmp_path, relative: str, keep: float):
    """A copy of ``package`` with the file ``relative`` cut to ``keep`` of its length."""
    copy = tmp_path / "damaged" / package.name
    shutil.copytree(package, copy)
    target = copy / relative
    os.truncate(target, int(target.stat().st_size * keep))
    return copy


def test_truncated_weights_name_the_package(weighted_package, tmp_path):
    damaged = _damaged(weighted_package, tmp_path, "Data/com.apple.CoreML/weights/weight.bin", 0.5)
    describe_model(damaged)  # the description lives in model.mlmodel, intact
    with pytest.raises(BackendError,
                       match=rf"^{damaged}: its program or weights cannot be read "
                             r".*re-convert it \(or download it again\)$") as error:
        load_model(damaged, backend="mil")
    assert "\n" not in str(error.value)


def test_truncated_program_names_the_package(weighted_package, tmp_path):
    damaged = _damaged(weighted_package, tmp_path, "Data/com.apple.CoreML/model.mlmodel", 0.5)
    for load in (describe_model, lambda p: load_model(p, backend="mil")):
        with pytest.raises(BackendError,
                           match=rf"^{damaged}: not a readable Core ML package .*re-convert it \(or download it again\)$"):
            load(damaged)


def test_program_without_main_is_refused(weighted_package, tmp_path):
    """A package whose only function is not called 'main' (as a multifunction package can be)."""
    copy = tmp_path / "renamed" / weighted_package.name
    shutil.copytree(weighted_package, copy)
    spec_path = copy / "Data/com.apple.CoreML/model.mlmodel"
    spec = ct.utils.load_spec(str(copy))
    functions = spec.mlProgram.functions
    functions["other"].CopyFrom(functions["main"])
    del functions["main"]
    spec_path.write_bytes(spec.SerializeToString())
    with pytest.raises(BackendError, match=rf"^{copy}: its program has no 'main' function \(it has: other\); re-convert"):
        load_model(copy, backend="mil")


# ------------------------------------------------------------------ the Core ML path without torch


def test_core_ml_path_needs_no_torch(mixed_package):
    """With torch made unimportable, describing a package, choosing a backend and importing the
    runtime work, and nothing imports torch. (coremltools itself imports torch when it is
    installed; that is outside our control, so torch is hidden here, not merely unused.)"""
    result = run_python(f"""
        import sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        from coreml_sd.runtime.backends import BackendError, describe_model, load_model
        import coreml_sd.runtime.backends.coreml, coreml_sd.runtime.bundle, coreml_sd.runtime.pipeline

        inputs, outputs = describe_model({str(mixed_package)!r})
        assert sorted(inputs) == ["i", "x"] and inputs["x"].shape == (2, 3), inputs
        assert outputs["next"].dtype == "int32", outputs
        if sys.platform == "darwin":
            load_model({str(mixed_package)!r}, backend="coreml")
        else:
            try:
                load_model({str(mixed_package)!r}, backend="coreml")
                raise SystemExit("the coreml backend loaded off macOS")
            except BackendError as error:
                assert "needs macOS" in str(error), error
        try:
            load_model({str(mixed_package)!r}, backend="mil")
            raise SystemExit("the mil backend loaded without torch")
        except BackendError as error:
            assert "needs torch" in str(error), error
        leaked = sorted(k for k, v in sys.modules.items() if k.split(".")[0] == "torch" and v is not None)
        assert not leaked, leaked
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_describing_a_package_prints_nothing(mixed_package):
    """coremltools logs about its missing Core ML binding (off macOS) and our newer torch when it
    is imported; the runtime's import of it drops exactly those lines, and only while importing."""
    result = run_python(f"""
        from coreml_sd.runtime.backends import describe_model
        describe_model({str(mixed_package)!r})
        import logging
        assert not logging.getLogger("coremltools").filters
    """)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""


@pytest.mark.parametrize(
    ("message", "noise"),
    [
        ("Failed to load _MLModelProxy: No module named 'coremltools.libcoremlpython'", True),
        ("Failed to load _MLNeuralEngineComputeDeviceProxy: No module named 'coremltools.libcoremlpython'", True),
        ("Torch version 2.13.0+cpu has not been tested with coremltools. You may run into unexpected errors. "
         "Torch 2.7.0 is the most recent version that has been tested.", True),
        ("Failed to load _MLModelProxy: dlopen(libcoremlpython.so): symbol not found", False),  # a real failure
        ("TensorFlow version 9.0.0 has not been tested with coremltools. You may run into unexpected errors.", False),
        ("Failed to load _MLModelProxy: No module named 'coremltools.libcoremlpython' (and more)", False),
    ],
)
def test_only_the_known_import_noise_is_dropped(message, noise):
    import logging

    from coreml_sd.system import _not_import_noise

    record = logging.LogRecord("coremltools", logging.WARNING, __file__, 0, message, None, None)
    assert _not_import_noise(record) is not noise


def test_a_constant_output_is_the_callers_copy(program_package):
    """An output the program computes as a constant: editing the returned array changes nothing
    the next call returns."""

    @mb.program(input_specs=[mb.TensorSpec((2,), dtype=types.fp32)], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.add(x=x, y=np.float32(1.0), name="y"), mb.const(val=np.array([1.0, 2.0], np.float32), name="c")

    model = load_model(program_package(prog, "ConstOut"), backend="mil")
    first = model.predict({"x": np.zeros(2, np.float32)})
    first["c"][0] = 99.0
    assert model.predict({"x": np.zeros(2, np.float32)})["c"].tolist() == [1.0, 2.0]
