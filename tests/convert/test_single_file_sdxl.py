"""Single-file checkpoints of SDXL base and refiner, and the architectures that need no --config.

References, none of them the code under test: the tiny SDXL folders loaded by diffusers and
transformers (a single file written from a folder must load to the very same tensors, and convert
to the same packages), diffusers' own single-file loaders (the test writer must be their inverse),
the published parameter counts of each architecture, and CLIP's published token ids.

No full-size weights exist here, so the inference of an architecture is checked on full-size
*shapes*: a ``.safetensors`` header describing every tensor of the architecture, followed by a
sparse hole (a 6.6 GB SDXL file takes a few hundred KB of disk and is never read).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from coreml_sd.cli import main
from coreml_sd.contract import SD15_SCHEDULER_CONFIG, hash_tree
from coreml_sd.convert.architectures import ARCHITECTURES, CLIP_MERGES, CLIP_VOCAB, CONFIGS
from coreml_sd.convert.converter import plan
from coreml_sd.convert.source import SourceError, detect_family, open_source
from coreml_sd.testing import tiny_pipelines as tiny

from .ldm_checkpoint import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm, write_ldm_checkpoint

FOLDERS = {"sdxl": "tiny_sdxl_dir", "sdxl-refiner": "tiny_sdxl_refiner_dir"}
PARTS = {"sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"), "sdxl-refiner": ("unet", "vae", "text_encoder_2")}


@pytest.fixture(scope="session")
def sdxl_files(tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``sdxl_files(family, folder)`` -> the folder as one original-layout file (once)."""
    written: dict[str, Path] = {}

    def get(family: str, folder: Path) -> Path:
        if family not in written:
            written[family] = write_ldm_checkpoint(folder, tmp_path_factory.mktemp("sdxl") / f"{family}.safetensors")
        return written[family]

    return get


@pytest.fixture(params=list(FOLDERS))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def folder(family: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(FOLDERS[family])


@pytest.fixture
def single_file(family: str, folder: Path, sdxl_files) -> Path:
    return sdxl_files(family, folder)


def source_error(*args, **kwargs) -> str:
    """The one-line message of the SourceError ``open_source(*args, **kwargs)`` raises."""
    with pytest.raises(SourceError) as info:
        open_source(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- SDXL files with --config -----------------------------------------------------------------


def test_sdxl_single_file_loads_the_folders_tensors(family: str, folder: Path, single_file: Path) -> None:
    source = open_source(str(single_file), config=str(folder))
    assert (source.kind, source.family, source.prediction_type) == ("single-file", family, "epsilon")
    assert source.tokenizer_files()[2] == ("!" if family == "sdxl-refiner" else "<|endoftext|>")
    assert source.pipeline_options() == {"force_zeros_for_empty_prompt": family == "sdxl"}
    reference = open_source(str(folder))  # the folder through diffusers' / transformers' from_pretrained
    for part in PARTS[family]:
        ours, theirs = source.load(part), reference.load(part)
        assert type(ours) is type(theirs) and not ours.training
        ours, theirs = ours.state_dict(), theirs.state_dict()
        assert sorted(ours) == sorted(theirs), part
        different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
        assert not different, f"{part}: {len(different)} tensors differ, e.g. {different[0]}"
    assert "text_projection.weight" in ours  # SDXL's second encoder keeps its projection


def test_sdxl_writer_is_the_inverse_of_diffusers_loaders(family: str, folder: Path, single_file: Path) -> None:
    """The test files have the layout diffusers' own single-file loaders expect (key detection and all)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModelWithProjection

    options = dict(config=str(folder), local_files_only=True)
    unet = UNet2DConditionModel.from_single_file(str(single_file), subfolder="unet", **options)
    tensors = load_file(single_file)
    # The tiny encoders are both 32 wide, which diffusers' detector would take for CLIP ViT-L's
    # layout: it is shown the OpenCLIP encoder alone (real widths, 768 and 1280, differ).
    openclip = {k: v for k, v in tensors.items() if ".model." in k}
    encoder = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, openclip, subfolder="text_encoder_2",
                                                   **options)
    reference = open_source(str(folder))
    for part, module in [("unet", unet), ("text_encoder_2", encoder)]:
        expected = reference.load(part).state_dict()
        assert all(torch.equal(module.state_dict()[k], v) for k, v in expected.items()), part


def test_sdxl_single_file_refusals(tiny_sdxl_dir, tiny_sdxl_refiner_dir, tiny_sd1_dir, sdxl_files, tmp_path: Path) -> None:
    base, refiner = sdxl_files("sdxl", tiny_sdxl_dir), sdxl_files("sdxl-refiner", tiny_sdxl_refiner_dir)
    tensors = load_file(base)
    edits = {
        "missing": ({"conditioner.embedders.1.model.text_projection": None},
                    "1 tensors missing, 0 unexpected, e.g. text_projection"),
        "left over": ({"conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc3.weight": torch.zeros(2)},
                      "0 tensors missing, 1 unexpected"),
        "no label_emb": ({"model.diffusion_model.label_emb.0.0.weight": None}, "do not map onto it, KeyError"),
    }
    for name, (edit, expected) in edits.items():
        changed = {k: v for k, v in (tensors | edit).items() if v is not None}
        save_file(changed, tmp_path / f"{name}.safetensors")
        message = source_error(str(tmp_path / f"{name}.safetensors"), config=str(tiny_sdxl_dir))
        assert expected in message and "--config" in message, message
    message = source_error(str(base), config=str(tiny_sdxl_refiner_dir))
    assert "cross-attends to 64-wide" in message and "to 32-wide ones" in message and "--config" in message
    message = source_error(str(refiner), config=str(tiny_sd1_dir))  # both 32 wide: the encoders tell
    assert "text encoders of an sdxl-refiner checkpoint" in message and "is sd1" in message and "--config" in message
    message = source_error(str(base))  # tiny shapes: no built-in architecture fits
    assert "fits no architecture coreml-sd knows without --config" in message and "SDXL base 1.0" in message


def test_sdxl_turbo_scheduler_comes_with_config(tiny_sdxl_dir, tiny_sdxl_turbo_dir, sdxl_files) -> None:
    """A Turbo file has the base's architecture (so is this tiny base file); --config gives Turbo's scheduler."""
    path = sdxl_files("sdxl", tiny_sdxl_dir)
    turbo = open_source(str(path), config=str(tiny_sdxl_turbo_dir))
    assert turbo.family == "sdxl" and turbo.scheduler_config() == tiny.SDXL_TURBO_SCHEDULER_CONFIG


def test_sdxl_single_file_converts(family: str, folder: Path, single_file: Path, tiny_bundle, tmp_path: Path) -> None:
    """The text encoders from the file convert to the packages the folder converts to, byte for byte."""
    names = {"sdxl": ("TextEncoder", "TextEncoder2"), "sdxl-refiner": ("TextEncoder2",)}[family]
    components = ",".join({"TextEncoder": "text-encoder", "TextEncoder2": "text-encoder-2"}[n] for n in names)
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["convert", str(single_file), "--config", str(folder), "-o", str(out),
                                       "--components", components])
    assert result.exit_code == 0, result.output
    reference = tiny_bundle(family)
    for name in names:
        weights = f"{name}.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
        assert hash_tree(out, weights) == hash_tree(reference, weights), name
    manifest, expected = (json.loads((b / "manifest.json").read_text()) for b in (out, reference))
    assert manifest["source"]["kind"] == "single-file"
    assert {k: manifest[k] for k in ("family", "conditioning", "tokenizer")} == {
        k: expected[k] for k in ("family", "conditioning", "tokenizer")}


# -- the built-in architectures ---------------------------------------------------------------

# Exact parameter counts of the published models, per part, built here from the shipped configs.
# UNets: SD 1.5 859,520,964 and SDXL base 2,567,463,684 as the task brief gives them; SD 2.x
# 865,910,724; SDXL refiner 2,259,526,660. The brief's 2,318,916,484 for the refiner does not come
# out of the refiner's published architecture (SGM's sd_xl_refiner.yaml: 384 channels x [1, 2, 4, 4],
# attention at the two middle levels with depth 4, 64-wide heads, 1280-wide context, a 2560-wide
# label embedding), which gives 2,259,526,660, the count a public project also records for the
# downloaded stabilityai/stable-diffusion-xl-refiner-1.0 UNet config. Text encoders: CLIP ViT-L
# 123,060,480; OpenCLIP bigG with projection 694,659,840; OpenCLIP ViT-H 340,387,840 as diffusers
# configures it (23 of its 24 layers, no projection). VAE 83,653,863. Rounded, they are the figures
# the SDXL paper (Podell et al. 2023) compares: UNets of 860M (SD 1.x), 865M (SD 2.x) and 2.6B, and
# 817M (= 123M + 694M) for SDXL's two text encoders.
PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2-512": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd2-768-v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl-base": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    "sdxl-refiner": {"unet": 2_259_526_660, "vae": 83_653_863, "text_encoder_2": 694_659_840},
}
EXPECTED = {  # family, prediction type, default image side, VAE scaling factor
    "sd15": ("sd1", "epsilon", 512, 0.18215),
    "sd2-512": ("sd2", "epsilon", 512, 0.18215),
    "sd2-768-v": ("sd2", "v_prediction", 768, 0.18215),
    "sdxl-base": ("sdxl", "epsilon", 1024, 0.13025),
    "sdxl-refiner": ("sdxl-refiner", "epsilon", 1024, 0.13025),
}


def meta_models(name: str) -> dict[str, torch.nn.Module]:
    """Each part of a shipped architecture, built on the meta device by diffusers / transformers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root, models = CONFIGS / name, {}
    with torch.device("meta"):
        models["unet"] = UNet2DConditionModel.from_config(json.loads((root / "unet/config.json").read_text()))
        models["vae"] = AutoencoderKL.from_config(json.loads((root / "vae/config.json").read_text()))
        for part, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (root / part).is_dir():
                models[part] = cls(CLIPTextConfig.from_pretrained(root / part))
    return models


def test_shipped_configs_build_the_published_models() -> None:
    from coreml_sd.convert.components import BUILDERS

    assert set(PARAMETERS) == set(ARCHITECTURES) == {p.name for p in CONFIGS.iterdir() if p.name != "clip"}
    for name, counts in PARAMETERS.items():
        models = meta_models(name)
        assert {part: sum(p.numel() for p in m.parameters()) for part, m in models.items()} == counts, name
        configs = {part: json.loads((CONFIGS / name / part / "config.json").read_text()) for part in models}
        family, prediction, side, scaling = EXPECTED[name]
        assert detect_family(configs["unet"], configs.get("text_encoder"), configs.get("text_encoder_2")) == family
        assert 8 * configs["unet"]["sample_size"] == side and configs["vae"].get("scaling_factor", 0.18215) == scaling
        # As the original training configs (LDM's v1- / v2-inference.yaml, SGM's sd_xl_base.yaml and
        # sd_xl_refiner.yaml) have them, which parameter counts do not tell: SD 1.x has 8 heads at
        # every level and convolutional transformer projections, SD 2.x and SDXL heads 64 wide and
        # linear projections.
        unet = configs["unet"]
        if family == "sd1":
            assert unet["attention_head_dim"] == 8 and not unet.get("use_linear_projection")
        else:
            widths = [c / h for c, h in zip(unet["block_out_channels"], unet["attention_head_dim"])]
            assert set(widths) == {64} and unet["use_linear_projection"] is True
        scheduler = json.loads((CONFIGS / name / "scheduler/scheduler_config.json").read_text())
        assert scheduler.get("prediction_type", "epsilon") == prediction
        # coreml-sd's own modules take these configs (they refuse variants they do not implement).
        BUILDERS["unet"].architecture(models["unet"].config)
        BUILDERS["vae-decoder"].architecture(models["vae"].config)
        for part in ("text_encoder", "text_encoder_2"):
            if part in models:
                BUILDERS["text-encoder-projection-penultimate"].architecture(models[part].config.to_dict())
    # The published scheduler configs, as the rest of the project spells them.
    read = {n: json.loads((CONFIGS / n / "scheduler/scheduler_config.json").read_text()) for n in ARCHITECTURES}
    assert read["sd15"] == tiny.tiny_scheduler_config("sd1") and SD15_SCHEDULER_CONFIG.items() <= read["sd15"].items()
    assert read["sd2-768-v"] == tiny.tiny_scheduler_config("sd2")
    assert read["sd2-512"] == read["sd15"] | {"_diffusers_version": "0.8.0", "prediction_type": "epsilon"}
    assert read["sdxl-base"] == read["sdxl-refiner"] == tiny.SDXL_SCHEDULER_CONFIG


def test_shipped_clip_vocabulary(tmp_path: Path) -> None:
    """One vocabulary, OpenAI CLIP's: the files open_clip's BPE list derives to, giving CLIP's ids."""
    from transformers import CLIPTokenizer

    from coreml_sd.testing.clip_vocab import write_clip_vocab

    # Byte for byte what the test fixtures derive from open_clip's BPE file; its 862,328 and
    # 524,619 bytes are the sizes of the Hugging Face CLIP repositories' vocab.json and merges.txt.
    vocab, merges = write_clip_vocab(tmp_path)
    assert CLIP_VOCAB.read_bytes() == vocab.read_bytes() and CLIP_MERGES.read_bytes() == merges.read_bytes()
    assert (CLIP_VOCAB.stat().st_size, CLIP_MERGES.stat().st_size) == (862_328, 524_619)
    for name in ARCHITECTURES:
        source_family = EXPECTED[name][0]
        part = "tokenizer_2" if source_family == "sdxl-refiner" else "tokenizer"
        tokenizer = CLIPTokenizer(str(CLIP_VOCAB), str(CLIP_MERGES), **json.loads(
            (CONFIGS / name / part / "special_tokens_map.json").read_text()))
        ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
        assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids for the prompt
        assert ids[-1] == (0 if name.startswith("sd2") or part == "tokenizer_2" else 49407)  # "!" or end token


def ldm_shapes(name: str) -> dict[str, torch.Size]:
    """Every tensor name and shape of a full-size original-layout checkpoint of ``name``, mapped
    from the diffusers / transformers models by the test writer (not by the code under test)."""
    models, sdxl = meta_models(name), name.startswith("sdxl")
    unet, vae = models["unet"], models["vae"]
    tensors = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    tensors |= {"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    if "text_encoder" in models:
        encoder = models["text_encoder"]
        if encoder.config.hidden_act == "gelu":  # SD 2.x's OpenCLIP ViT-H, with its unused 24th layer
            ldm, prefix = open_clip_to_ldm(encoder.state_dict(), encoder.config.num_hidden_layers), "cond_stage_model.model."
        else:
            ldm = clip_to_ldm(encoder.state_dict())
            prefix = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
        tensors |= {prefix + k: v for k, v in ldm.items()}
    if "text_encoder_2" in models:
        encoder = models["text_encoder_2"]
        ldm = open_clip_to_ldm(encoder.state_dict(), encoder.config.num_hidden_layers, unused_layer=False)
        prefix = f"conditioner.embedders.{1 if 'text_encoder' in models else 0}.model."
        tensors |= {prefix + k: v for k, v in ldm.items()}
    return {k: v.shape for k, v in tensors.items()}


def sparse_safetensors(path: Path, shapes: dict[str, torch.Size], metadata: dict[str, str] | None = None) -> Path:
    """A valid float16 ``.safetensors`` file of these shapes whose data is a sparse hole (zeros)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * shape.numel()
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    return path


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Size]]:
    return {name: ldm_shapes(name) for name in ARCHITECTURES}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_inferred_offline(name: str, full_size, tmp_path: Path) -> None:
    """Without --config (and with the hub offline, conftest), a file of each architecture opens with
    the shipped configs and passes every check a conversion makes before converting."""
    path = sparse_safetensors(tmp_path / f"{name}.safetensors", full_size[name])
    source = open_source(str(path))
    expected_name = "sd2-768-v" if name == "sd2-512" else name  # the weights cannot tell; diffusers' choice
    family, prediction, side, _ = EXPECTED[expected_name]
    assert (source.kind, source.family, source.prediction_type) == ("single-file", family, prediction)
    assert source.config("unet") == json.loads((CONFIGS / expected_name / "unet/config.json").read_text())
    assert source.tokenizer_files()[:2] == (CLIP_VOCAB, CLIP_MERGES)
    checked = plan(source, tmp_path / "bundle")
    assert (checked.geometry.height, checked.geometry.width) == (side, side)
    if family == "sd2":  # --config overrides, by a built-in name too
        assert open_source(str(path), config="sd2-512").prediction_type == "epsilon"


def test_sd2_prediction_from_metadata(full_size, tmp_path: Path) -> None:
    shapes = full_size["sd2-512"]
    for metadata, expected in [
        ({"modelspec.architecture": "stable-diffusion-v2-512"}, "epsilon"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, "v_prediction"),
        ({"modelspec.prediction_type": "epsilon"}, "epsilon"),
        ({"modelspec.prediction_type": "v"}, "v_prediction"),
    ]:
        path = sparse_safetensors(tmp_path / "sd2.safetensors", shapes, metadata)
        assert open_source(str(path)).prediction_type == expected, metadata
    marked = sparse_safetensors(tmp_path / "marked.safetensors", shapes | {"v_pred": torch.Size([0])})
    assert open_source(str(marked)).prediction_type == "v_prediction"


def test_architectures_not_inferred(full_size, tmp_path: Path) -> None:
    shapes = dict(full_size["sd15"])
    shapes["model.diffusion_model.out.2.weight"] = torch.Size([4, 256, 3, 3])  # a conv_out no SD has
    message = source_error(str(sparse_safetensors(tmp_path / "odd.safetensors", shapes)))
    assert "fits no architecture coreml-sd knows without --config" in message
    assert "unet differs from SD 1.5's: 1 shapes differ" in message and "conv_out.weight" in message
    v_pred = sparse_safetensors(tmp_path / "vpred.safetensors", full_size["sdxl-base"] | {"v_pred": torch.Size([0])})
    message = source_error(str(v_pred))
    assert "predicts v" in message and "--config" in message and "v_prediction" in message
    vae_only = {k: v for k, v in full_size["sdxl-base"].items() if k.startswith("first_stage_model.")}
    message = source_error(str(sparse_safetensors(tmp_path / "vae.safetensors", vae_only)))
    assert "neither UNet nor text encoder" in message and "--config" in message
    unet_only = {k: v for k, v in full_size["sdxl-refiner"].items() if k.startswith("model.")}
    assert open_source(str(sparse_safetensors(tmp_path / "unet.safetensors", unet_only))).family == "sdxl-refiner"


def test_package_data_covers_the_configs() -> None:
    """pyproject.toml's package-data globs ship every file under convert/configs (a wheel built from
    a fresh clone holds them: checked by hand, 41 files)."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["coreml_sd.convert"]
    package = root / "convert"
    shipped = {p for pattern in globs for p in package.glob(pattern) if p.is_file()}
    assert shipped == {p for p in (package / "configs").rglob("*") if p.is_file()}
