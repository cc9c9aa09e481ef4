"""`coreml-sd check`: every file re-hashed, every model run once, each problem named."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from coreml_sd.cli import main
from coreml_sd.contract import MANIFEST, hash_tree
from coreml_sd.runtime.bundle import open_bundle

UNET_WEIGHTS = "Unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
NOT_OK_TAIL = "; re-convert it with 'coreml-sd convert' (or download it again)"


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    """A copy of the tiny SD 1.x bundle, ours to damage."""
    return Path(shutil.copytree(tiny_bundle("sd1", "split-einsum"), tmp_path / "bundle"))


def check(*args: str):
    return CliRunner().invoke(main, ["check", *args])


def files_listed(bundle: Path) -> int:
    return len(json.loads((bundle / MANIFEST).read_text())["files"])


def flip_a_byte_keeping_size_and_mtime(path: Path, at: int = 200) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_sound_bundle_passes(bundle):
    result = check(str(bundle), "--backend", "mil")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"bundle OK: {files_listed(bundle)} files match {MANIFEST}; 4 models ran with finite outputs (mil backend)"]
    for name in ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"):
        assert f"{name}: running once on probe inputs (mil backend)" in result.stderr
    assert result.stderr.count("  outputs finite") == 4


def test_a_byte_flipped_in_place_fools_the_cache_but_not_check(bundle):
    """The runtime trusts a file whose size and mtime match its last check; `check` hashes."""
    open_bundle(bundle, verify=True)  # a successful open warms the cache
    flip_a_byte_keeping_size_and_mtime(bundle / UNET_WEIGHTS)
    open_bundle(bundle, verify=True)  # fooled: no error
    result = check(str(bundle), "--no-run")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"  damaged: {UNET_WEIGHTS} (its sha256 differs from the one in {MANIFEST})" in result.stderr.splitlines()
    assert result.stdout.splitlines() == ["bundle NOT OK: 1 damaged file(s)" + NOT_OK_TAIL]


def test_every_damaged_and_missing_file_is_named_and_their_models_not_run(bundle):
    flip_a_byte_keeping_size_and_mtime(bundle / UNET_WEIGHTS)
    flip_a_byte_keeping_size_and_mtime(bundle / "VAEDecoder.mlpackage/Data/com.apple.CoreML/weights/weight.bin")
    (bundle / "merges.txt").unlink()
    (bundle / "VAEEncoder.mlpackage/Manifest.json").unlink()
    result = check(str(bundle), "--backend", "mil")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    for line in (f"  damaged: {UNET_WEIGHTS} (its sha256 differs from the one in {MANIFEST})",
                 f"  damaged: VAEDecoder.mlpackage/Data/com.apple.CoreML/weights/weight.bin (its sha256 differs from the one "
                 f"in {MANIFEST})",
                 "  missing: merges.txt", "  missing: VAEEncoder.mlpackage/Manifest.json",
                 "Unet: not run, its files are damaged or missing", "VAEDecoder: not run, its files are damaged or missing",
                 "VAEEncoder: not run, its files are damaged or missing"):
        assert line in lines, result.stderr
    assert "TextEncoder: running once on probe inputs (mil backend)" in lines  # the sound one still runs
    assert result.stdout.splitlines() == ["bundle NOT OK: 2 damaged file(s), 2 missing file(s)" + NOT_OK_TAIL]


def save_program(prog, path: Path) -> Path:
    """A MIL program saved as a package, converted as `coreml-sd convert` converts (an ML program
    for macOS 13, float16 compute)."""
    import coremltools as ct

    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.macOS13,
               compute_precision=ct.precision.FLOAT16, skip_model_load=True).save(str(path))
    return path


def test_a_model_whose_output_overflows_is_named(bundle):
    """The VAE decoder swapped for a real package computing exp(|z| + 12) >= 162755, beyond
    float16's 65504: inf whatever the input. Its hashes are recorded, so only the run can tell."""
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec((1, 4, 8, 8))])
    def prog(z):
        return mb.exp(x=mb.add(x=mb.abs(x=z), y=12.0), name="image")

    shutil.rmtree(bundle / "VAEDecoder.mlpackage")
    save_program(prog, bundle / "VAEDecoder.mlpackage")
    manifest = json.loads((bundle / MANIFEST).read_text())
    files = {rel: h for rel, h in manifest["files"].items() if not rel.startswith("VAEDecoder.mlpackage/")}
    manifest["files"] = {**files, **hash_tree(bundle, "VAEDecoder.mlpackage")}
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    assert check(str(bundle), "--no-run").exit_code == 0  # every hash matches

    result = check(str(bundle), "--backend", "mil")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    at = lines.index("VAEDecoder: running once on probe inputs (mil backend)")
    assert lines[at + 1] == "  not finite: output image holds inf or NaN; the first op to produce inf/NaN is exp image_cast_fp16"
    assert lines.count("  outputs finite") == 3
    assert result.stdout.splitlines() == ["bundle NOT OK: 1 model(s) with non-finite outputs" + NOT_OK_TAIL]


def test_an_apple_layout_has_no_hashes_but_its_models_run(tiny_bundle, tmp_path):
    ours, packages = tiny_bundle("sd1", "split-einsum"), tmp_path / "packages"
    packages.mkdir()
    for name, sub in (("TextEncoder", "text_encoder"), ("Unet", "unet"), ("VAEDecoder", "vae_decoder")):
        shutil.copytree(ours / f"{name}.mlpackage", packages / f"Stable_Diffusion_version_tiny_{sub}.mlpackage")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ours / name, packages / name)
    result = check(str(packages), "--backend", "mil")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == (
        f"apple-packages layout: no {MANIFEST}, so there are no hashes to check; running its models only")
    assert result.stdout.splitlines() == ["bundle OK: no hashes to check; 3 models ran with finite outputs (mil backend)"]
    hashes_only = check(str(packages), "--no-run")
    assert hashes_only.exit_code == 1 and hashes_only.output.splitlines() == [
        f"Error: {packages}: no {MANIFEST}, so there are no hashes to check; drop --no-run to run its models"]


def test_not_a_bundle_is_one_line(tmp_path):
    result = check(str(tmp_path / "nope"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines() == [
        f"Error: {tmp_path / 'nope'}: no such bundle directory; give the folder 'coreml-sd convert' wrote"]


@pytest.mark.skipif(sys.platform == "darwin", reason="the coreml backend exists on macOS")
def test_the_coreml_backend_off_macos_is_refused_before_hashing(bundle):
    result = check(str(bundle), "--backend", "coreml")
    assert result.exit_code == 1 and "hashing" not in result.output
    assert result.output.splitlines() == ["Error: the coreml backend needs macOS (Core ML); use --backend mil on this system"]


@pytest.mark.macos
def test_a_sound_bundle_passes_under_core_ml(bundle):
    result = check(str(bundle), "--backend", "coreml")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"bundle OK: {files_listed(bundle)} files match {MANIFEST}; 4 models ran with finite outputs (coreml backend)"]
