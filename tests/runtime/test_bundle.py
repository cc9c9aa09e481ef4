"""Opening bundles: a damaged manifest of ours, and Apple's compiled ``Resources`` layout read on
any OS from the ``metadata.json`` the Core ML compiler writes into each ``.mlmodelc``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from coreml_sd.cli import main
from coreml_sd.runtime.bundle import BundleError, open_bundle
from coreml_sd.runtime.pipeline import GenerationError, Pipeline

# ------------------------------------------------------------------ Apple's compiled layout


def _feature(name: str, shape: list[int], dtype: str = "Float32") -> dict:
    """One ``inputSchema``/``outputSchema`` entry as coremlcompiler writes it: every value a
    string, the shape as text, the type spelled out with multiplication signs."""
    return {
        "hasShapeFlexibility": "0",
        "isOptional": "0",
        "dataType": dtype,
        "formattedType": f"MultiArray ({dtype} {' × '.join(map(str, shape))})",
        "shortDescription": "",
        "shape": json.dumps(shape),  # "[2, 4, 64, 64]"
        "name": name,
        "type": "MultiArray",
    }


def _metadata(class_name: str, inputs: list[dict], outputs: list[dict], histogram: dict[str, int]) -> list[dict]:
    """A ``metadata.json`` document: a list holding one object, with the keys Xcode's compiler
    (and ``coremlcompiler``) writes for an ML program converted by coremltools."""
    return [
        {
            "metadataOutputVersion": "3.0",
            "storagePrecision": "Float16",
            "outputSchema": outputs,
            "modelParameters": [],
            "specificationVersion": 7,
            "mlProgramOperationTypeHistogram": histogram,
            "computePrecision": "Mixed (Float16, Float32, Int32)",
            "isUpdatable": "0",
            "availability": {
                "macOS": "13.0", "tvOS": "16.0", "visionOS": "1.0", "watchOS": "9.0", "iOS": "16.0", "macCatalyst": "16.0"
            },
            "modelType": {"name": "MLModelType_mlProgram"},
            "userDefinedMetadata": {
                "com.github.apple.coremltools.source_dialect": "TorchScript",
                "com.github.apple.coremltools.source": "torch==1.13.1",
                "com.github.apple.coremltools.version": "6.2",
            },
            "inputSchema": inputs,
            "generatedClassName": class_name,
            "method": "predict",
        }
    ]


def write_compiled_resources(root: Path, vocab_dir: Path, *, hidden: int = 768, latent: int = 64, batch: int = 2,
                             model: str = "runwayml_stable_diffusion_v1_5", chunked: bool = False,
                             whole_unet: bool = True) -> Path:
    """A ``Resources`` folder shaped like the ``compiled/`` folders of Apple's published Core ML
    Stable Diffusion repositories: ``TextEncoder``, ``Unet`` (and/or ``UnetChunk1``/``UnetChunk2``)
    and ``VAEDecoder`` as ``.mlmodelc`` folders, with CLIP's ``vocab.json`` and ``merges.txt``.

    Test data for the layout detection and the ``metadata.json`` parser only: the models' other
    files are placeholders holding no program or weights, so nothing here pretends to be a
    Core ML result (Core ML runs compiled models only on macOS; see the ``macos`` tests)."""
    root.mkdir(parents=True)
    prefix = f"Stable_Diffusion_version_{model}"
    unet_in = [_feature("sample", [batch, 4, latent, latent]), _feature("timestep", [batch]),
               _feature("encoder_hidden_states", [batch, hidden, 1, 77])]
    noise = _feature("noise_pred", [batch, 4, latent, latent])
    models = {
        "TextEncoder": _metadata(f"{prefix}_text_encoder", [_feature("input_ids", [1, 77])],
                                 [_feature("last_hidden_state", [1, 77, hidden]), _feature("pooled_outputs", [1, hidden])],
                                 {"Ios16.layerNorm": 25, "Ios16.linear": 72, "Ios16.softmax": 12, "Ios16.gather": 2}),
        "VAEDecoder": _metadata(f"{prefix}_vae_decoder", [_feature("z", [1, 4, latent, latent])],
                                [_feature("image", [1, 3, latent * 8, latent * 8])],
                                {"Ios16.conv": 36, "Ios16.silu": 29, "UpsampleNearestNeighbor": 3}),
    }
    if whole_unet:
        models["Unet"] = _metadata(f"{prefix}_unet", unet_in, [noise], {"Ios16.einsum": 64, "Ios16.conv": 98, "Split": 16})
    if chunked:  # Apple's split: chunk 2 reads the original inputs it needs and chunk 1's outputs
        middle = [_feature(f"input_{i}_cast_fp16", [batch, 1280, latent // 8, latent // 8], "Float16") for i in (210, 212)]
        models["UnetChunk1"] = _metadata(f"{prefix}_unet_chunk1", unet_in, middle, {"Ios16.einsum": 40, "Ios16.conv": 50})
        models["UnetChunk2"] = _metadata(f"{prefix}_unet_chunk2", [*middle, unet_in[2]], [noise],
                                         {"Ios16.einsum": 24, "Ios16.conv": 48})
    for name, metadata in models.items():
        folder = root / f"{name}.mlmodelc"
        (folder / "weights").mkdir(parents=True)
        (folder / "analytics").mkdir()
        (folder / "metadata.json").write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
        for placeholder in ("coremldata.bin", "model.mil", "weights/weight.bin", "analytics/coremldata.bin"):
            (folder / placeholder).write_bytes(b"placeholder: not a compiled model\n")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_dir / name, root / name)
    return root


def test_compiled_sd1_layout(tmp_path, clip_vocab_dir):
    bundle = open_bundle(write_compiled_resources(tmp_path / "Resources", clip_vocab_dir))
    assert bundle.layout == "apple-compiled" and bundle.family == "sd1"
    assert bundle.image_size == (512, 512) and bundle.latent_size == (64, 64) and bundle.unet_batch == 2
    assert bundle.pad_token == "<|endoftext|>" and bundle.prediction_type == "epsilon"
    assert bundle.name == "runwayml_stable_diffusion_v1_5"  # the compiler's generatedClassName
    assert [p.name for p in bundle.models["Unet"].compiled] == ["Unet.mlmodelc"]
    assert not bundle.models["Unet"].packages and not bundle.has("VAEEncoder")


def test_compiled_sd2_768_batch_one(tmp_path, clip_vocab_dir):
    resources = write_compiled_resources(tmp_path / "Resources", clip_vocab_dir, hidden=1024, latent=96, batch=1,
                                         model="stabilityai_stable_diffusion_2_1")
    bundle = open_bundle(resources)
    assert bundle.family == "sd2" and bundle.pad_token == "!"  # as diffusers pads SD 2.x prompts
    assert bundle.image_size == (768, 768) and bundle.unet_batch == 1
    assert bundle.name == "stabilityai_stable_diffusion_2_1"


def test_compiled_chunked_unet_is_preferred(tmp_path, clip_vocab_dir):
    resources = write_compiled_resources(tmp_path / "Resources", clip_vocab_dir, chunked=True, latent=48)
    bundle = open_bundle(resources)
    assert [p.name for p in bundle.models["Unet"].compiled] == ["UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc"]
    assert bundle.image_size == (384, 384) and bundle.name == "runwayml_stable_diffusion_v1_5"
    # Chunks alone (Apple's iOS-sized repositories ship no whole UNet) are enough.
    only = write_compiled_resources(tmp_path / "chunks-only", clip_vocab_dir, chunked=True, whole_unet=False)
    assert len(open_bundle(only).models["Unet"].compiled) == 2


def test_compiled_layout_opened_as_dot_gets_a_name(tmp_path, clip_vocab_dir, monkeypatch):
    resources = write_compiled_resources(tmp_path / "my-model" / "split_einsum" / "compiled", clip_vocab_dir)
    for name in ("TextEncoder", "Unet", "VAEDecoder"):  # a compiler that records no class name
        meta = resources / f"{name}.mlmodelc" / "metadata.json"
        doc = json.loads(meta.read_text())
        del doc[0]["generatedClassName"]
        meta.write_text(json.dumps(doc))
    monkeypatch.chdir(resources)
    bundle = open_bundle(".")
    assert bundle.layout == "apple-compiled" and bundle.name == "my-model"  # not "", nor "compiled"


def test_compiled_metadata_errors_are_bundle_errors(tmp_path, clip_vocab_dir):
    resources = write_compiled_resources(tmp_path / "Resources", clip_vocab_dir)
    (resources / "Unet.mlmodelc" / "metadata.json").write_text('[{"inputSchema": [{"name": "sample", "shape": "[2, 4,"}]}]')
    with pytest.raises(BundleError, match="Unet.mlmodelc: unreadable metadata.json"):
        open_bundle(resources)


def test_mil_backend_refuses_compiled_models_before_loading(tmp_path, clip_vocab_dir):
    resources = write_compiled_resources(tmp_path / "Resources", clip_vocab_dir)
    with pytest.raises(GenerationError, match=r"exist only as compiled \.mlmodelc, which only the coreml backend \(macOS\) runs"):
        Pipeline(open_bundle(resources), backend="mil")
    result = CliRunner().invoke(main, ["generate", "a cat", "--bundle", str(resources), "--backend", "mil",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "only the coreml backend" in line and "mil backend" in line


# ------------------------------------------------------------------ our manifest


@pytest.fixture
def damaged(tiny_bundle, tmp_path):
    """Factory: a copy of the tiny SD 1.x bundle with ``edit(manifest)`` applied to its manifest."""

    def make(edit) -> Path:
        bundle = tmp_path / "bundle"
        shutil.copytree(tiny_bundle("sd1", "split-einsum"), bundle)
        manifest = json.loads((bundle / "manifest.json").read_text())
        edit(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        return bundle

    return make


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.pop("vae"), "vae"),
        (lambda m: m["vae"].pop("scaling_factor"), "vae.scaling_factor"),
        (lambda m: m.update(vae="0.18"), "vae"),  # not a table
        (lambda m: m.pop("image_size"), "image_size"),
        (lambda m: m.update(image_size=[64]), "image_size"),
        (lambda m: m.update(unet_batch=3), "unet_batch"),
        (lambda m: m["tokenizer"].pop("pad_token"), "tokenizer.pad_token"),
        (lambda m: m.update(family=None), "family"),
        (lambda m: m.pop("components"), "components"),
        (lambda m: m["components"]["Unet"].update(package="../../elsewhere.mlpackage"), "components.Unet.package"),
        (lambda m: m.update(files=["Unet.mlpackage"]), "files"),
    ],
)
def test_damaged_manifest_names_the_field(damaged, edit, field):
    bundle = damaged(edit)
    with pytest.raises(BundleError) as caught:
        open_bundle(bundle)
    message = str(caught.value)
    assert f"'{field}'" in message and "re-convert" in message and "\n" not in message


def test_damaged_manifest_is_a_one_line_cli_error(damaged, tmp_path):
    bundle = damaged(lambda m: m.pop("vae"))
    result = CliRunner().invoke(main, ["generate", "a cat", "--bundle", str(bundle), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "'vae'" in line and "re-convert" in line


# ------------------------------------------------------------------ what a wrong --bundle is told


def _cli_error(bundle: Path, tmp_path: Path) -> str:
    """The one line ``coreml-sd generate --bundle bundle`` fails with (exit 1, no traceback)."""
    result = CliRunner().invoke(main, ["generate", "a cat", "--bundle", str(bundle), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: ")
    return line.removeprefix("Error: ")


def _our_models_without_manifest(root: Path) -> Path:
    for name in ("TextEncoder", "Unet", "VAEDecoder"):
        (root / f"{name}.mlpackage" / "Data").mkdir(parents=True)
    (root / "vocab.json").write_text("{}")
    return root


def test_a_file_is_not_called_missing(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    message = _cli_error(tmp_path / "manifest.json", tmp_path)
    assert message == (f"{tmp_path / 'manifest.json'} is a file, not a bundle; "
                       "pass the bundle's folder (the one 'coreml-sd convert' wrote)")


def test_staging_folder_is_an_unfinished_conversion(tmp_path, monkeypatch):
    staging = _our_models_without_manifest(tmp_path / ".sd15.partial")
    expected = ("is an unfinished conversion (the staging folder of 'sd15'); finish it by running the same "
                "'coreml-sd convert' command again")
    assert _cli_error(staging, tmp_path) == f"{staging} {expected}"
    monkeypatch.chdir(staging)
    with pytest.raises(BundleError, match=r"^\. is an unfinished conversion \(the staging folder of 'sd15'\)"):
        open_bundle(".")


def test_our_models_without_manifest_are_not_called_missing(tmp_path):
    bundle = _our_models_without_manifest(tmp_path / "bundle")
    assert _cli_error(bundle, tmp_path) == (
        f"{bundle} has coreml-sd models (TextEncoder.mlpackage, Unet.mlpackage, VAEDecoder.mlpackage) but no manifest.json: "
        "it is damaged or incomplete; re-run 'coreml-sd convert'"
    )


@pytest.mark.parametrize(
    ("file", "content", "reason"),
    [
        ("vocab.json", b'{"a": 1', "vocab.json is not JSON: Expecting ',' delimiter at line 1"),
        ("vocab.json", b'{"a": 1}', "start token '<|startoftext|>' is not in the vocabulary"),
        ("merges.txt", b"#version: 0.2\n\xff\xfe\n", "'utf-8' codec can't decode byte 0xff"),
        ("merges.txt", b"#version: 0.2\nnospace\n", "malformed merge rule 'nospace'"),
    ],
    ids=["vocab-not-json", "vocab-foreign", "merges-not-utf8", "merges-malformed"],
)
def test_unreadable_tokenizer_files_are_one_line_errors(tmp_path, clip_vocab_dir, file, content, reason):
    """Apple's layouts have no manifest hashes, so a damaged tokenizer file used to surface as a
    traceback when the pipeline loaded it."""
    resources = write_compiled_resources(tmp_path / "Resources", clip_vocab_dir)
    (resources / file).write_bytes(content)
    with pytest.raises(BundleError, match="unreadable CLIP tokenizer files") as caught:
        open_bundle(resources)
    assert reason in str(caught.value)
    message = _cli_error(resources, tmp_path)
    assert message.startswith(f"{resources}: unreadable CLIP tokenizer files (") and reason in message
    assert message.endswith("copy vocab.json and merges.txt again from the model's repository (its compiled/ folder)")


def test_symlinked_packages_find_the_compiled_folder_beside_the_link(tiny_bundle, tmp_path):
    """Apple's repositories keep the tokenizer files in compiled/, beside packages/; a packages/
    that is a symlink (into a download cache, say) looks beside itself before its target."""
    ours = tiny_bundle("sd1", "split-einsum")
    store = tmp_path / "cache" / "packages"  # where the link points: no compiled/ beside it
    store.mkdir(parents=True)
    for name, sub in (("TextEncoder", "text_encoder"), ("Unet", "unet"), ("VAEDecoder", "vae_decoder")):
        shutil.copytree(ours / f"{name}.mlpackage", store / f"Stable_Diffusion_version_tiny_sd1_{sub}.mlpackage")
    repo = tmp_path / "repo"
    (repo / "compiled").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ours / name, repo / "compiled" / name)
    (repo / "packages").symlink_to(store, target_is_directory=True)
    bundle = open_bundle(repo / "packages")
    assert bundle.layout == "apple-packages" and bundle.vocab == repo / "compiled" / "vocab.json"
    # The target's neighbourhood still counts when the link's has none.
    shutil.rmtree(repo / "compiled")
    (store.parent / "compiled").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ours / name, store.parent / "compiled" / name)
    assert open_bundle(repo / "packages").vocab == store.parent / "compiled" / "vocab.json"
