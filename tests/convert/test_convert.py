"""`coreml-sd convert` on tiny SD 1.x and SD 2.x (v-prediction) models, every attention kind.

The bundle is checked against the contract written out here (Apple's Swift package's names,
shapes and dtypes; the manifest fields), not against the converter's own tables: packages
reload through coremltools, hashes match the disk, tokenizer and scheduler files match the source.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from click.testing import CliRunner
from coremltools.converters.mil.frontend.milproto import load as mil_load
from coremltools.converters.mil.mil import types
from coremltools.proto import FeatureTypes_pb2 as ft

import coreml_sd
from coreml_sd.cli import main
from coreml_sd.contract import hash_tree, verify_files
from helpers import FAMILIES, coreml_sd_command, one_line_error

ATTENTIONS = ("original", "split-einsum", "split-einsum-v2")
TEXT_DIM = {"sd1": 32, "sd2": 64}  # the tiny models' text widths (768 / 1024 in real SD 1.x / 2.x)
DTYPE = {ft.ArrayFeatureType.FLOAT16: "float16", ft.ArrayFeatureType.FLOAT32: "float32"}


def contract(family: str, batch: int = 2) -> dict[str, tuple[dict, dict]]:
    """What each package must declare: {model: ({input: (shape, dtype)}, {output: (shape, dtype)})}.

    Every dtype is float32 by choice (Apple's Swift package hands Core ML float32 arrays; Apple's
    converter declares the UNet's and VAE's inputs float16); the programs cast to float16 inside."""
    c = TEXT_DIM[family]
    return {
        "TextEncoder": (
            {"input_ids": ((1, 77), "float32")},
            {"last_hidden_state": ((1, 77, c), "float32"), "pooled_outputs": ((1, c), "float32")},
        ),
        "Unet": (
            {
                "sample": ((batch, 4, 8, 8), "float32"),
                "timestep": ((batch,), "float32"),
                "encoder_hidden_states": ((batch, c, 1, 77), "float32"),
            },
            {"noise_pred": ((batch, 4, 8, 8), "float32")},
        ),
        "VAEDecoder": ({"z": ((1, 4, 8, 8), "float32")}, {"image": ((1, 3, 64, 64), "float32")}),
        "VAEEncoder": ({"x": ((1, 3, 64, 64), "float32")}, {"latent": ((1, 8, 8, 8), "float32")}),
    }


def _op_inputs(op):
    """Every variable an MIL op reads."""
    return [v for value in op.inputs.values() for v in (value if isinstance(value, (list, tuple)) else (value,))]


def described(features) -> dict[str, tuple[tuple[int, ...], str]]:
    return {f.name: (tuple(f.type.multiArrayType.shape), DTYPE[f.type.multiArrayType.dataType]) for f in features}


def run(*args: str):
    return CliRunner().invoke(main, ["convert", *args])


@pytest.fixture(scope="module")
def decoder_bundle(tiny_sd1_dir, tmp_path_factory) -> Path:
    """``convert --components vae-decoder`` of the tiny SD 1.x folder, made once per module
    and worker. Read-only: copy it before changing anything."""
    out = tmp_path_factory.mktemp("decoder") / "b"
    result = run(str(tiny_sd1_dir), "-o", str(out), "--components", "vae-decoder")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(params=[(f, a) for f in FAMILIES for a in ATTENTIONS], ids=lambda p: f"{p[0]}-{p[1]}")
def converted(request, tiny_bundle):
    family, attention = request.param
    return family, attention, tiny_bundle(family, attention)


def test_bundle_contract(converted, request):
    family, attention, bundle = converted
    source = request.getfixturevalue(f"tiny_{family}_dir")
    manifest = json.loads((bundle / "manifest.json").read_text())

    assert manifest["format_version"] == 1
    assert manifest["source"] == {"kind": "folder", "id": str(source), "revision": None}
    assert manifest["family"] == family
    assert manifest["prediction_type"] == {"sd1": "epsilon", "sd2": "v_prediction"}[family]
    assert manifest["image_size"] == [64, 64] and manifest["latent_size"] == [8, 8]
    assert manifest["attention"] == attention
    assert manifest["unet_batch"] == 2
    assert manifest["tokenizer"] == {"pad_token": {"sd1": "<|endoftext|>", "sd2": "!"}[family], "max_length": 77}
    assert manifest["vae"] == {"scaling_factor": 0.18215}
    assert manifest["tools"]["coreml-sd"] == coreml_sd.__version__
    assert manifest["tools"]["coremltools"] == ct.__version__

    # Every file on disk is hashed in the manifest, and every hash is right.
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    verify_files(bundle, manifest["files"])

    # Tokenizer and scheduler come from the source unchanged.
    assert (bundle / "vocab.json").read_bytes() == (source / "tokenizer" / "vocab.json").read_bytes()
    assert (bundle / "merges.txt").read_bytes() == (source / "tokenizer" / "merges.txt").read_bytes()
    assert json.loads((bundle / "scheduler_config.json").read_text()) == json.loads(
        (source / "scheduler" / "scheduler_config.json").read_text()
    )

    for name, (inputs, outputs) in contract(family).items():
        entry = manifest["components"][name]
        assert entry["package"] == f"{name}.mlpackage" and entry["precision"] == "float16"
        model = ct.models.MLModel(str(bundle / entry["package"]), skip_model_load=True)
        spec = model.get_spec()
        assert described(spec.description.input) == inputs
        assert described(spec.description.output) == outputs
        features = [*spec.description.input, *spec.description.output]
        assert {f.type.multiArrayType.dataType for f in features} == {ft.ArrayFeatureType.FLOAT32}
        assert spec.WhichOneof("Type") == "mlProgram"
        assert model.user_defined_metadata["coreml-sd.attention"] == attention
        # The ML program itself reads back: the MIL backend will execute exactly this.
        program = mil_load.load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
        main = program.functions["main"]
        ops = [op.op_type for op in main.operations]
        assert "einsum" in ops or "matmul" in ops
        # Declared float32, computed in float16: each activation input is cast to fp16 first; token
        # ids become integers for the embedding lookup; timestep features stay fp32 (see export.py).
        for name in inputs:
            readers = [op for op in main.operations if any(v is main.inputs[name] for v in _op_inputs(op))]
            first = [(op.op_type, types.builtin_to_string(op.outputs[0].dtype)) for op in readers]
            if name == "timestep":
                assert first and all(dtype == "fp32" for _, dtype in first), first
            else:
                assert first == [("cast", "int32" if name == "input_ids" else "fp16")], (name, first)


def test_v2_bundle_really_chunks(tiny_bundle):
    """Chunked attention leaves more attention products in the program than unchunked."""

    def einsums(bundle: Path) -> int:
        model = ct.models.MLModel(str(bundle / "Unet.mlpackage"), skip_model_load=True)
        spec = model.get_spec()
        program = mil_load.load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
        return sum(op.op_type == "einsum" for op in program.functions["main"].operations)

    assert einsums(tiny_bundle("sd1", "split-einsum-v2")) > einsums(tiny_bundle("sd1", "split-einsum"))


def test_cli_converts_with_progress(tiny_sd1_dir, tmp_path):
    out = tmp_path / "b"
    result = run(str(tiny_sd1_dir), "-o", str(out), "--components", "text-encoder,vae-decoder", "--attention", "original")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    for stage in ("load", "trace", "convert", "save"):
        assert f"[text-encoder] {stage} done in" in result.stderr
        assert f"[vae-decoder] {stage} done in" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["components"]) == ["TextEncoder", "VAEDecoder"]
    assert not (tmp_path / ".b.partial").exists()


# What the libraries print during a conversion of the text encoder: coremltools' bars (two kinds)
# and its two expected warnings, transformers' bar while it loads the weights.
LIBRARY_OUTPUT = ("Converting PyTorch Frontend", "Running MIL", "Tuple detected at graph output",
                  "Saving value type of int64", "Loading weights")


@pytest.mark.parametrize("verbose", [False, True])
def test_library_output_only_with_verbose(tiny_sd1_dir, tmp_path, verbose):
    """Our progress lines, and the libraries' bars and warnings only with --verbose (a process of
    its own: logging and tqdm behave as for a user, not as under pytest's capture)."""
    out = tmp_path / "b"
    args = [str(tiny_sd1_dir), "-o", str(out), "--components", "text-encoder", *(["--verbose"] if verbose else [])]
    result = subprocess.run([*coreml_sd_command(), "convert", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[text-encoder] convert done in" in result.stderr
    shown = [text for text in LIBRARY_OUTPUT if text in result.stderr]
    assert shown == (list(LIBRARY_OUTPUT) if verbose else []), result.stderr
    if not verbose:
        assert "%|" not in result.stderr and "warning" not in result.stderr.lower()


def test_unet_batch_one(tiny_bundle):
    bundle = tiny_bundle("sd1", "split-einsum", unet_batch=1, components=("unet",))
    spec = ct.models.MLModel(str(bundle / "Unet.mlpackage"), skip_model_load=True).get_spec()
    assert described(spec.description.input) == contract("sd1", batch=1)["Unet"][0]
    assert json.loads((bundle / "manifest.json").read_text())["unet_batch"] == 1


def test_single_file_gives_the_same_weights(tiny_sd1_single_file, tiny_sd1_dir, tiny_bundle, tmp_path):
    """A .safetensors checkpoint converts to byte-identical weights as its diffusers folder."""
    out = tmp_path / "b"
    result = run(str(tiny_sd1_single_file), "--config", str(tiny_sd1_dir), "-o", str(out), "--components", "unet")
    assert result.exit_code == 0, result.output
    folder = tiny_bundle("sd1", "split-einsum")
    weights = "Unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    assert hash_tree(out, weights) == hash_tree(folder, weights)
    assert json.loads((out / "manifest.json").read_text())["source"]["kind"] == "single-file"


# ------------------------------------------------------------------ atomicity and reuse


def test_interrupted_run_leaves_no_bundle_and_resumes(tiny_sd1_dir, tmp_path, monkeypatch):
    from coreml_sd.convert import converter

    out = tmp_path / "b"
    real = converter.to_program

    def fail_on_decoder(traced, inputs, *args):
        if inputs[0].name == "z":
            raise KeyboardInterrupt
        return real(traced, inputs, *args)

    monkeypatch.setattr(converter, "to_program", fail_on_decoder)
    result = run(str(tiny_sd1_dir), "-o", str(out), "--components", "text-encoder,vae-decoder")
    assert result.exit_code == 130
    assert f"interrupted: finished components are kept in {tmp_path / '.b.partial'}" in result.stderr
    assert not out.exists()  # no half bundle at the target
    assert (tmp_path / ".b.partial" / "TextEncoder.mlpackage").is_dir()

    monkeypatch.setattr(converter, "to_program", real)
    result = run(str(tiny_sd1_dir), "-o", str(out), "--components", "text-encoder,vae-decoder")
    assert result.exit_code == 0, result.output
    assert "[text-encoder] unchanged: reused from the interrupted run" in result.stderr
    assert "[vae-decoder] convert done" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    verify_files(out, manifest["files"])
    assert not (tmp_path / ".b.partial").exists()


def bundle_is_complete(out: Path, components: set[str]) -> None:
    """The manifest lists exactly ``components`` and exactly the files on disk, all hashes right."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["components"]) == components
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {rel.split("/")[0] for rel in on_disk if ".ml" in rel} == {f"{c}.mlpackage" for c in components}
    verify_files(out, manifest["files"])


def test_interrupted_between_save_and_record(tiny_sd1_dir, decoder_bundle, tmp_path, monkeypatch):
    """Ctrl-C while a saved package is being hashed leaves it in staging, unrecorded; a re-run
    must replace it (not crash on the rename), and one that does not ask for it must drop it."""
    from coreml_sd.convert import bundle as bundle_module

    out = tmp_path / "b"
    real = bundle_module.hash_tree

    def interrupt_on_decoder(root, rel):
        if rel == "VAEDecoder.mlpackage":
            raise KeyboardInterrupt
        return real(root, rel)

    monkeypatch.setattr(bundle_module, "hash_tree", interrupt_on_decoder)
    args = [str(tiny_sd1_dir), "-o", str(out), "--components", "text-encoder,vae-decoder"]
    assert run(*args).exit_code == 130
    staging = tmp_path / ".b.partial"
    assert (staging / "VAEDecoder.mlpackage").is_dir()  # saved, never recorded
    assert "VAEDecoder" not in json.loads((staging / ".components.json").read_text())
    stale = staging / "VAEDecoder.mlpackage" / "stale-marker"
    stale.write_text("left by the interrupted run")

    monkeypatch.setattr(bundle_module, "hash_tree", real)
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "[text-encoder] unchanged: reused from the interrupted run" in result.stderr
    assert "[vae-decoder] convert done" in result.stderr
    bundle_is_complete(out, {"TextEncoder", "VAEDecoder"})
    assert not (out / "VAEDecoder.mlpackage" / "stale-marker").exists()
    # The re-converted decoder is the one a clean run makes.
    weights = "VAEDecoder.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    assert hash_tree(out, weights) == hash_tree(decoder_bundle, weights)


def test_stale_package_of_an_unrequested_component_is_dropped(tiny_sd1_dir, tmp_path, monkeypatch):
    """A failed compile leaves the saved package unrecorded; a later run for other components
    must not carry it into the bundle unlisted."""
    from coreml_sd.convert import converter
    from coreml_sd.convert.export import CompileError

    def failing_compile(package, destination):
        raise CompileError(f"compiling {package.name} failed: simulated")

    real = converter.can_compile, converter.compile_package
    monkeypatch.setattr(converter, "can_compile", lambda: True)
    monkeypatch.setattr(converter, "compile_package", failing_compile)
    out = tmp_path / "b"
    one_line_error(run(str(tiny_sd1_dir), "-o", str(out), "--components", "vae-decoder", "--compile"), "simulated")
    assert (tmp_path / ".b.partial" / "VAEDecoder.mlpackage").is_dir()

    monkeypatch.setattr(converter, "can_compile", real[0])
    monkeypatch.setattr(converter, "compile_package", real[1])
    result = run(str(tiny_sd1_dir), "-o", str(out), "--components", "text-encoder")
    assert result.exit_code == 0, result.output
    bundle_is_complete(out, {"TextEncoder"})


def test_interrupted_before_staging_names_no_folder(tiny_sd1_dir, tmp_path, monkeypatch):
    from coreml_sd.convert import source

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(source, "open_source", interrupt)
    result = run(str(tiny_sd1_dir), "-o", str(tmp_path / "b"))
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == "interrupted before anything was written"
    assert ".partial" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_overwrite_reuses_matching_components(tiny_sd1_dir, tmp_path):
    out = tmp_path / "b"
    args = [str(tiny_sd1_dir), "-o", str(out), "--components", "text-encoder,vae-decoder"]
    assert run(*args).exit_code == 0
    before = json.loads((out / "manifest.json").read_text())["files"]

    again = run(*args, "--overwrite")
    assert again.exit_code == 0, again.output
    assert "[text-encoder] unchanged: reused from the existing bundle" in again.stderr
    assert "[vae-decoder] unchanged: reused from the existing bundle" in again.stderr
    assert json.loads((out / "manifest.json").read_text())["files"] == before

    # A changed setting reconverts what it affects.
    changed = run(*args, "--overwrite", "--attention", "original")
    assert changed.exit_code == 0
    assert "[text-encoder] convert done" in changed.stderr


def test_tampered_component_is_reconverted(tiny_sd1_dir, decoder_bundle, tmp_path):
    out = tmp_path / "b"
    args = [str(tiny_sd1_dir), "-o", str(out), "--components", "vae-decoder"]
    shutil.copytree(decoder_bundle, out)
    weights = out / "VAEDecoder.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    weights.write_bytes(b"\0" * weights.stat().st_size)
    again = run(*args, "--overwrite")
    assert again.exit_code == 0
    assert "[vae-decoder] convert done" in again.stderr
    verify_files(out, json.loads((out / "manifest.json").read_text())["files"])


@pytest.mark.parametrize("damage", [
    lambda m: m["components"]["VAEDecoder"].pop("paths"),
    lambda m: m["components"].update(VAEDecoder="?"),
    lambda m: m.update(files=None),
])
def test_a_damaged_manifest_entry_is_reconverted_not_a_crash(tiny_sd1_dir, decoder_bundle, tmp_path, damage):
    """--overwrite over a bundle whose manifest entry is damaged: that component is converted
    again (nothing reusable can be trusted), and the bundle comes out whole."""
    out = tmp_path / "b"
    args = [str(tiny_sd1_dir), "-o", str(out), "--components", "vae-decoder"]
    shutil.copytree(decoder_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    damage(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = run(*args, "--overwrite")
    assert again.exit_code == 0, again.output
    assert "[vae-decoder] convert done" in again.stderr
    verify_files(out, json.loads((out / "manifest.json").read_text())["files"])


def test_a_second_conversion_of_the_same_bundle_is_refused(tiny_sd1_dir, tmp_path):
    """Two runs into one target used to share the staging folder: the second swept the first's files
    and both could finish with a bundle failing its own hashes. Now the second is refused in one
    line, the first finishes a sound bundle, and no lock file is left beside it."""
    out = tmp_path / "b"
    args = [str(tiny_sd1_dir), "-o", str(out), "--components", "text-encoder,vae-decoder"]
    first = subprocess.Popen([*coreml_sd_command(), "convert", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stderr:  # the first run holds the target once it works on a component
            if line.startswith("[text-encoder] load"):
                break
        second = run(*args)
        rest = first.communicate(timeout=300)
    finally:
        first.kill()
    one_line_error(second, f"another conversion is writing {out} (it holds {tmp_path / '.b.lock'})", "wait for it to finish")
    assert first.returncode == 0, rest[1]
    bundle_is_complete(out, {"TextEncoder", "VAEDecoder"})
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_temporaries_stay_inside_staging(tiny_sd1_dir, tmp_path, monkeypatch):
    """coremltools converts into a temporary package that it deletes only at interpreter exit: a
    killed run left it (gigabytes at full size) in the system's temporary folder. It is made inside
    the staging folder now, gone after the run, and a killed run's is swept by the next run."""
    from coreml_sd.convert import converter

    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    staging = tmp_path / ".b.partial"
    killed = staging / ".tmp" / "tmpk1ll3d.mlpackage"  # as a SIGKILLed run leaves it
    killed.mkdir(parents=True)
    (killed / "weight.bin").write_bytes(bytes(1000))
    packages = []
    real = converter.finish

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        packages.append(Path(model.package_path))
        return model

    monkeypatch.setattr(converter, "finish", spy)
    out = tmp_path / "b"
    result = run(str(tiny_sd1_dir), "-o", str(out), "--components", "text-encoder")
    assert result.exit_code == 0, result.output
    assert [p.parent for p in packages] == [staging / ".tmp"]
    assert not packages[0].exists()  # removed after the save, not at exit
    assert not list(system_tmp.glob("tmp*"))
    assert tempfile.gettempdir() == str(system_tmp) and os.environ["TMPDIR"] == str(system_tmp)  # restored
    bundle_is_complete(out, {"TextEncoder"})
    assert not staging.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_bundle_files_follow_the_umask(tiny_sd1_dir, tmp_path, umask):
    """coremltools writes a package's model.mlmodel 0600 and weights/ 0700 (mkstemp, mkdtemp):
    another account could not use a shared bundle. Every file and folder follows the umask."""
    out = tmp_path / "b"
    old = os.umask(umask)
    try:
        result = run(str(tiny_sd1_dir), "-o", str(out), "--components", "text-encoder")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    want = {rel: (0o777 if (out / rel).is_dir() else 0o666) & ~umask for rel in modes}
    assert modes == want
    assert modes["TextEncoder.mlpackage/Data/com.apple.CoreML/model.mlmodel"] == 0o666 & ~umask


# ------------------------------------------------------------------ refusals


def test_unknown_source(tmp_path):
    one_line_error(run(str(tmp_path / "nope"), "-o", str(tmp_path / "b")), "nope")
    assert not (tmp_path / "b").exists()


def test_output_exists_without_overwrite(tiny_sd1_dir, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(run(str(tiny_sd1_dir), "-o", str(out)), "already exists", "--overwrite")
    one_line_error(run(str(tiny_sd1_dir), "-o", str(out), "--overwrite"), "not a coreml-sd bundle")
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--height", "60", "multiple of 8"),
        ("--width", "72", "latent side 9"),
        ("--height", "0", "positive"),
        ("--width", "0", "positive"),
    ],
)
def test_bad_sizes(tiny_sd1_dir, tmp_path, flag, value, fragment):
    one_line_error(run(str(tiny_sd1_dir), "-o", str(tmp_path / "b"), flag, value), fragment)
    assert not (tmp_path / "b").exists() and not (tmp_path / ".b.partial").exists()


@pytest.mark.parametrize(("sample_size", "image_size"), [([8, 16], [64, 128]), ("8", None), ([8], None)])
def test_sample_size_as_height_and_width(tiny_sd1_dir, tmp_path, sample_size, image_size):
    """diffusers also allows a UNet's sample_size as (height, width); anything else is one line."""
    src = tmp_path / "src"
    shutil.copytree(tiny_sd1_dir, src)
    cfg = json.loads((src / "unet" / "config.json").read_text())
    cfg["sample_size"] = sample_size
    (src / "unet" / "config.json").write_text(json.dumps(cfg))
    result = run(str(src), "-o", str(tmp_path / "b"), "--components", "text-encoder")
    if image_size is None:
        one_line_error(result, "sample_size", "neither a latent side nor (height, width)")
    else:
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "b" / "manifest.json").read_text())["image_size"] == image_size


def test_unsupported_family(tiny_sd1_dir, tmp_path):
    src = tmp_path / "kandinsky"
    shutil.copytree(tiny_sd1_dir, src)
    cfg = json.loads((src / "unet" / "config.json").read_text())
    cfg["addition_embed_type"] = "image"
    (src / "unet" / "config.json").write_text(json.dumps(cfg))
    one_line_error(run(str(src), "-o", str(tmp_path / "b")), "'image' embeddings", "1.x, 2.x and XL")


def test_missing_component(tiny_sd1_dir, tmp_path):
    src = tmp_path / "novae"
    shutil.copytree(tiny_sd1_dir, src)
    shutil.rmtree(src / "vae")
    one_line_error(run(str(src), "-o", str(tmp_path / "b"), "--components", "text-encoder,vae-decoder"), "has no vae")
    assert not (tmp_path / ".b.partial").exists()


def test_components_need_only_their_own_parts(tiny_sd1_dir, tmp_path):
    """A text encoder converts from a pipeline without a VAE: only the VAE models need one."""
    src = tmp_path / "novae"
    shutil.copytree(tiny_sd1_dir, src)
    shutil.rmtree(src / "vae")
    out = tmp_path / "b"
    result = run(str(src), "-o", str(out), "--components", "text-encoder")
    assert result.exit_code == 0, result.output
    bundle_is_complete(out, {"TextEncoder"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_size"] == [64, 64]  # the tiny UNet's 8x8 latents
    assert manifest["vae"] == {"scaling_factor": 0.18215}  # diffusers' default: no VAE to say otherwise


def edited_copy(src: Path, dst: Path, part: str, **changes) -> Path:
    """A copy of the pipeline ``src`` with fields of ``part``'s config.json changed."""
    shutil.copytree(src, dst)
    path = dst / part / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return dst


def refused_before_any_work(result, tmp_path, *fragments: str) -> None:
    one_line_error(result, *fragments)
    assert "] load" not in result.stderr  # no component was started
    assert not (tmp_path / "b").exists() and not (tmp_path / ".b.partial").exists()


@pytest.mark.parametrize(
    ("part", "changes", "component", "fragment"),
    [
        ("unet", {"time_cond_proj_dim": 256}, "unet", "time_cond_proj_dim=256"),  # an LCM-distilled UNet
        ("vae", {"shift_factor": 0.1159}, "vae-decoder", "shift_factor=0.1159"),  # an SD3-style VAE
        ("unet", {"block_out_channels": [32, 64, 64]}, "unet", "3 block_out_channels for 2 down and 2 up blocks"),
        (
            "vae",
            {
                "block_out_channels": [16, 32, 32],
                "down_block_types": ["DownEncoderBlock2D"] * 3,
                "up_block_types": ["UpDecoderBlock2D"] * 3,
            },
            "vae-encoder",
            "scales images by 4",
        ),
        ("text_encoder", {"hidden_act": "relu"}, "text-encoder", "hidden_act='relu'"),
    ],
)
def test_unsupported_architecture_is_refused_first(tiny_sd1_dir, tmp_path, part, changes, component, fragment):
    """Refused before the text encoder (first in order) is converted, whichever part it concerns."""
    src = edited_copy(tiny_sd1_dir, tmp_path / "src", part, **changes)
    result = run(str(src), "-o", str(tmp_path / "b"), "--components", f"text-encoder,{component}")
    refused_before_any_work(result, tmp_path, fragment, "1.x, 2.x and XL")


@pytest.mark.parametrize("damage", ["truncated", "missing", "missing-shard"])
def test_broken_weight_files_are_refused_first(tiny_sd1_dir, tmp_path, damage):
    src = tmp_path / "src"
    shutil.copytree(tiny_sd1_dir, src)
    weights = src / "vae" / "diffusion_pytorch_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        fragment = "re-download"
    elif damage == "missing":
        weights.unlink()
        fragment = "no vae weights"
    else:  # a sharded checkpoint whose index names a file that is not there
        index = {"metadata": {}, "weight_map": {"encoder.conv_in.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
        (src / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        weights.unlink()
        fragment = "diffusion_pytorch_model-00001-of-00002.safetensors"
    result = run(str(src), "-o", str(tmp_path / "b"), "--components", "text-encoder,vae-decoder")
    refused_before_any_work(result, tmp_path, fragment)


@pytest.mark.parametrize(
    ("part", "changes", "component", "fragments"),
    [
        (
            "vae",
            {"block_out_channels": [16, 16, 32, 48]},
            "vae-decoder",
            ("cannot load the vae", "size mismatch", "vae/config.json"),
        ),
        ("text_encoder", {"intermediate_size": 48}, "text-encoder", ("mismatched tensors", "text_encoder/config.json")),
    ],
)
def test_weights_that_do_not_fit_the_config(tiny_sd1_dir, tmp_path, part, changes, component, fragments):
    """diffusers' size-mismatch error, transformers' mismatch report: one line, nothing written."""
    src = edited_copy(tiny_sd1_dir, tmp_path / "src", part, **changes)
    result = run(str(src), "-o", str(tmp_path / "b"), "--components", component)
    one_line_error(result, *fragments)
    assert "LOAD REPORT" not in result.output and "Some weights" not in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("component", ["vae-decoder", "text-encoder"])
def test_weights_missing_a_tensor(tiny_sd1_dir, tmp_path, component):
    """diffusers and transformers would leave the tensor at a random value, and warn only."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_sd1_dir, src)
    part, name = {"vae-decoder": ("vae", "diffusion_pytorch_model"), "text-encoder": ("text_encoder", "model")}[component]
    path = src / part / f"{name}.safetensors"
    tensors = load_file(path)
    dropped = next(k for k in sorted(tensors) if "layer_norm1.weight" in k or "decoder.conv_in.weight" in k)
    del tensors[dropped]
    save_file(tensors, path, metadata={"format": "pt"})
    result = run(str(src), "-o", str(tmp_path / "b"), "--components", component)
    one_line_error(result, f"the {part} weights", "1 missing", "do not match")
    assert not (tmp_path / "b").exists()


def test_pickle_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    one_line_error(run(str(ckpt), "-o", str(tmp_path / "b")), "--allow-pickle")


def test_unknown_component(tiny_sd1_dir, tmp_path):
    result = run(str(tiny_sd1_dir), "-o", str(tmp_path / "b"), "--components", "unet,safety-checker")
    assert result.exit_code == 2 and "safety-checker" in result.output


@pytest.mark.macos
def test_compiles_on_macos(tiny_sd1_dir, tmp_path):
    out = tmp_path / "b"
    result = run(str(tiny_sd1_dir), "-o", str(out), "--components", "text-encoder")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["TextEncoder"]["compiled"] == "TextEncoder.mlmodelc"
    assert (out / "TextEncoder.mlmodelc" / "coremldata.bin").is_file()
    model = ct.models.CompiledMLModel(str(out / "TextEncoder.mlmodelc"))
    ids = np.zeros((1, 77), np.float32)
    assert model.predict({"input_ids": ids})["last_hidden_state"].shape == (1, 77, 32)
