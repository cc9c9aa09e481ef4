"""Multifunction packages (one function per image size, ``convert --sizes``) through the backends.

The default function of the tiny several-size bundle's UNet and VAE packages, run by name through
the mil backend, gives what the one-size package of that size gives (other sizes are compared with
diffusers in tests/convert/test_sizes.py); no function means the package's default, the first size;
a function the package lacks is a one-line error listing those it has; only the function asked
for is read.
"""

from __future__ import annotations

import numpy as np
import pytest

from coreml_sd.runtime.backends import BackendError, describe_model, load_model
from helpers import TINY_SIZES, size_function

SIZED = ("Unet", "VAEDecoder", "VAEEncoder")


def _feeds(model) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(d.shape).astype(np.float32) for name, d in model.inputs.items()}


@pytest.mark.parametrize("name", SIZED)
def test_the_default_size_runs_as_its_single_size_package(name, tiny_sizes_bundle, tiny_sized):
    for h, w in TINY_SIZES[:1]:
        function = size_function(h, w)
        multi = load_model(tiny_sizes_bundle / f"{name}.mlpackage", "mil", function=function)
        single = load_model(tiny_sized(h, w) / f"{name}.mlpackage", "mil")
        assert multi.function == function and multi.inputs == single.inputs and multi.outputs == single.outputs
        feeds = _feeds(single)
        ours, reference = multi.predict(feeds), single.predict(feeds)
        for out in reference:
            np.testing.assert_array_equal(ours[out], reference[out], err_msg=f"{name} {function} {out}")


def test_no_function_means_the_first_size(tiny_sizes_bundle, tiny_sized):
    """What a caller unaware of functions gets, described and loaded: the default function, the
    bundle's first size."""
    (h, w) = TINY_SIZES[0]
    path = tiny_sizes_bundle / "Unet.mlpackage"
    single = describe_model(tiny_sized(h, w) / "Unet.mlpackage")
    assert describe_model(path) == describe_model(path, size_function(h, w)) == single
    assert describe_model(path)[0]["sample"].shape == (2, 4, h // 8, w // 8)
    model = load_model(path, "mil")
    assert model.function == size_function(h, w) and (model.inputs, model.outputs) == single
    # every size's description differs: the default really is chosen, not any function
    assert len({describe_model(path, size_function(*size))[0]["sample"].shape for size in TINY_SIZES}) == len(TINY_SIZES)


def test_unknown_function_lists_the_functions(tiny_sizes_bundle):
    have = ", ".join(size_function(*size) for size in TINY_SIZES)
    path = tiny_sizes_bundle / "Unet.mlpackage"
    for load in (lambda: describe_model(path, "size_640x640"), lambda: load_model(path, "mil", function="size_640x640")):
        with pytest.raises(BackendError) as error:
            load()
        assert str(error.value) == f"Unet.mlpackage: no function 'size_640x640'; it has {have}"


def test_single_function_package_takes_no_function_name(tiny_sized):
    path = tiny_sized(64, 64) / "VAEDecoder.mlpackage"
    assert describe_model(path, "main") == describe_model(path)
    assert load_model(path, "mil", function="main").function is None
    with pytest.raises(BackendError, match=r"^VAEDecoder.mlpackage: no function 'size_64x64': it is a single-function "
                                           r"model \(one image size\), load it without one$"):
        load_model(path, "mil", function="size_64x64")


def test_only_the_function_asked_for_is_read(tiny_sizes_bundle, monkeypatch):
    """coremltools' loader builds every function it is given, each with its own copy of the
    shared weights: the mil backend hands it the one function it runs."""
    from coremltools.converters.mil.frontend.milproto import load as mil_load

    seen = []
    real = mil_load.load

    def spy(spec, *args, **kwargs):
        seen.append(sorted(spec.mlProgram.functions))
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(mil_load, "load", spy)
    last = size_function(*TINY_SIZES[-1])
    load_model(tiny_sizes_bundle / "VAEDecoder.mlpackage", "mil", function=last)
    load_model(tiny_sizes_bundle / "VAEDecoder.mlpackage", "mil")
    assert seen == [[last], [size_function(*TINY_SIZES[0])]]


def test_program_lacking_a_described_function_is_refused(tiny_sizes_bundle, tmp_path):
    """A damaged multifunction package: its description names a function its program lacks."""
    import shutil

    import coremltools as ct

    copy = shutil.copytree(tiny_sizes_bundle / "VAEDecoder.mlpackage", tmp_path / "VAEDecoder.mlpackage")
    spec = ct.utils.load_spec(str(copy))
    last = size_function(*TINY_SIZES[-1])
    del spec.mlProgram.functions[last]
    kept = ", ".join(size_function(*size) for size in TINY_SIZES[:-1])
    (copy / "Data/com.apple.CoreML/model.mlmodel").write_bytes(spec.SerializeToString())
    with pytest.raises(BackendError, match=rf"^{copy}: its program has no function '{last}', which its description "
                                           rf"names \(it has: {kept}\); re-convert it$"):
        load_model(copy, "mil", function=last)


@pytest.mark.macos
@pytest.mark.parametrize("compiled", [False, True])
def test_core_ml_runs_each_function(compiled, tiny_sizes_bundle, tiny_sized, tmp_path):
    """Core ML itself, by function name, against the mil backend on the same package (a compiled
    copy takes its descriptions from the package beside it)."""
    import shutil

    import coremltools as ct

    path = tiny_sizes_bundle / "VAEDecoder.mlpackage"
    if compiled:
        package = shutil.copytree(path, tmp_path / path.name)
        compiled_path = ct.utils.compile_model(str(package), str(tmp_path / "VAEDecoder.mlmodelc"))
        path = package.with_suffix(".mlmodelc")
        assert str(path) == str(compiled_path)
    for h, w in TINY_SIZES:
        function = size_function(h, w)
        ours = load_model(path, "coreml", "CPU_ONLY", function=function)
        reference = load_model(tiny_sizes_bundle / "VAEDecoder.mlpackage", "mil", function=function)
        assert ours.inputs == reference.inputs
        feeds = _feeds(reference)
        np.testing.assert_allclose(ours.predict(feeds)["image"], reference.predict(feeds)["image"], atol=2e-2)
