"""Checkpoint sources: the tiny pipelines, the three kinds of SOURCE, and every refusal.

References are diffusers and transformers themselves: a tiny folder must load through
``StableDiffusionPipeline.from_pretrained``, our original-layout writer must round-trip through
diffusers' own single-file loaders, and each component ``open_source`` loads must hold exactly
the tensors saved in the folder, whichever kind of SOURCE it came through.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from coreml_sd.convert.source import Source, SourceError, detect_family, open_source
from coreml_sd.testing import tiny_pipelines as tiny
from helpers import FAMILIES

from .ldm_checkpoint import unet_to_ldm, vae_to_ldm, write_ldm_checkpoint

PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction"}
WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_dir(family: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{family}_dir")


@pytest.fixture
def single_file(family: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{family}_single_file")


def saved_weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    """The tensors of one component as saved, under the names the loaded module uses."""
    return {k.removeprefix("text_model."): v for k, v in load_file(folder / WEIGHT_FILES[component]).items()}


def assert_same_tensors(module: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert sorted(state) == sorted(reference)
    different = [k for k in state if not torch.equal(state[k], reference[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


def load(source: Source, component: str) -> torch.nn.Module:
    return source.load(component)


def copy_pipeline(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def source_error(*args, **kwargs) -> str:
    """The message of the SourceError ``open_source(*args, **kwargs)`` raises; checks it is one line."""
    with pytest.raises(SourceError) as info:
        open_source(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# -- the tiny pipelines -----------------------------------------------------------------------


def test_tiny_folder_runs_in_diffusers(tiny_dir: Path, family: str) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    assert pipe.safety_checker is None and not pipe.config.requires_safety_checker
    assert type(pipe.scheduler).__name__ == ("PNDMScheduler" if family == "sd1" else "DDIMScheduler")
    assert pipe.tokenizer.pad_token == tiny.PAD_TOKENS[family]
    assert pipe.tokenizer.pad_token_id == {"sd1": 49407, "sd2": 0}[family]
    assert isinstance(pipe.unet.config.attention_head_dim, int if family == "sd1" else list)
    assert pipe.unet.config.use_linear_projection == (family == "sd2")
    assert pipe.text_encoder.config.hidden_act == ("quick_gelu" if family == "sd1" else "gelu")
    generator = torch.Generator().manual_seed(0)
    image = pipe("a cat", num_inference_steps=2, generator=generator, output_type="np").images
    assert image.shape == (1, 64, 64, 3)  # image side = 8 x latent side
    assert 0.05 < image.std() and torch.isfinite(torch.from_numpy(image)).all()


def test_build_is_deterministic(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    again = tiny.build_tiny_pipeline(tmp_path / "again", "sd1", seed=0)
    files = sorted(p.relative_to(tiny_sd1_dir) for p in tiny_sd1_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (again / name).read_bytes() == (tiny_sd1_dir / name).read_bytes(), name
    other = tiny.build_tiny_pipeline(tmp_path / "other", "sd1", seed=1)
    assert (other / WEIGHT_FILES["unet"]).read_bytes() != (again / WEIGHT_FILES["unet"]).read_bytes()


def test_sample_size_sets_latent_and_image_sides(tmp_path: Path) -> None:
    assert tiny.tiny_unet_config("sd2", sample_size=12)["sample_size"] == 12
    assert tiny.tiny_vae_config("sd2", sample_size=12)["sample_size"] == 96
    with pytest.raises(ValueError, match="family"):
        tiny.tiny_unet_config("sdxl")


def test_no_norm_is_the_identity(family: str) -> None:
    for module in (tiny.tiny_unet(family), tiny.tiny_vae(family), tiny.tiny_text_encoder(family)):
        norms = [m for m in module.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
        assert norms
        for norm in norms:
            assert not torch.all(norm.weight == 1) and not torch.all(norm.bias == 0)


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


@torch.no_grad()
def test_tiny_outputs_depend_on_every_input(family: str) -> None:
    g = torch.Generator().manual_seed(0)
    unet = tiny.tiny_unet(family)
    width = unet.config.cross_attention_dim
    x, text, other_text = (torch.randn(s, generator=g) for s in [(1, 4, 8, 8), (1, 77, width), (1, 77, width)])
    out = unet(x, 500, text).sample
    assert out.shape == x.shape and 0.1 < out.std() < 10
    assert relative_change(out, unet(x, 500, other_text).sample) > 0.05  # cross-attention matters
    assert relative_change(out, unet(x, 20, text).sample) > 0.05  # so does the timestep
    assert relative_change(out, unet(x.flip(-1), 500, text).sample) > 0.05

    vae = tiny.tiny_vae(family)
    image = vae.decode(x).sample
    assert image.shape == (1, 3, 64, 64)
    assert relative_change(image, vae.decode(x.flip(-1)).sample) > 0.05
    assert vae.encode(image).latent_dist.mean.shape == x.shape

    encoder = tiny.tiny_text_encoder(family)
    ids = torch.tensor([[49406, 320, 2368, 49407] + [tiny.PAD_IDS[family]] * 73])
    other = ids.clone()
    other[0, 2] = 1929
    hidden, hidden_other = encoder(ids).last_hidden_state, encoder(other).last_hidden_state
    assert torch.equal(hidden[:, :2], hidden_other[:, :2])  # causal: earlier tokens unaffected
    assert relative_change(hidden[:, 2:], hidden_other[:, 2:]) > 0.05


# -- folders ----------------------------------------------------------------------------------


def test_open_folder(tiny_dir: Path, family: str) -> None:
    source = open_source(str(tiny_dir))
    assert (source.kind, source.id, source.revision) == ("folder", str(tiny_dir.resolve()), None)
    assert (source.family, source.prediction_type) == (family, PREDICTION[family])
    for component in ("unet", "vae", "text_encoder"):
        expected = json.loads((tiny_dir / component / "config.json").read_text())
        assert source.config(component) == expected
    assert source.scheduler_config() == tiny.tiny_scheduler_config(family)
    vocab, merges, pad = source.tokenizer_files()
    assert (vocab, merges) == (tiny_dir / "tokenizer" / "vocab.json", tiny_dir / "tokenizer" / "merges.txt")
    assert pad == tiny.PAD_TOKENS[family]


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_folder_components_hold_the_saved_weights(tiny_dir: Path, family: str, component: str) -> None:
    module = load(open_source(str(tiny_dir)), component)
    assert not module.training and next(module.parameters()).dtype == torch.float32
    assert_same_tensors(module, saved_weights(tiny_dir, component))


def test_family_rule() -> None:
    sd1_unet = {"cross_attention_dim": 768, "attention_head_dim": 8}
    sd2_unet = {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20], "use_linear_projection": True}
    assert detect_family(sd1_unet, {"hidden_act": "quick_gelu", "hidden_size": 768}) == "sd1"
    assert detect_family(sd2_unet, {"hidden_act": "gelu", "hidden_size": 1024}) == "sd2"
    assert (detect_family(sd1_unet), detect_family(sd2_unet)) == ("sd1", "sd2")  # UNet only
    for family in FAMILIES:  # tiny widths (32, 64) say nothing; structure does
        unet, encoder = tiny.tiny_unet_config(family), tiny.tiny_text_encoder_config(family)
        assert detect_family(unet, encoder) == detect_family(unet) == family


def test_bin_weights_need_allow_pickle(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    folder = copy_pipeline(tiny_sd1_dir, tmp_path / "pipe")
    weights = folder / WEIGHT_FILES["vae"]
    torch.save(load_file(weights), folder / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(SourceError, match=r"pickle.*execute.*\.safetensors.*--allow-pickle") as info:
        open_source(str(folder)).load("vae")
    assert "\n" not in str(info.value)
    vae = open_source(str(folder), allow_pickle=True).load("vae")
    assert_same_tensors(vae, saved_weights(tiny_sd1_dir, "vae"))


# -- single files -----------------------------------------------------------------------------


def test_ldm_checkpoint_round_trips_through_diffusers(tiny_dir: Path, single_file: Path) -> None:
    """The test writer is the exact inverse of diffusers' own single-file loaders."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    options = dict(config=str(tiny_dir), local_files_only=True)
    unet = UNet2DConditionModel.from_single_file(str(single_file), subfolder="unet", **options)
    vae = AutoencoderKL.from_single_file(str(single_file), subfolder="vae", **options)
    encoder = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, load_file(single_file), subfolder="text_encoder", **options
    )
    for component, module in [("unet", unet), ("vae", vae), ("text_encoder", encoder)]:
        assert_same_tensors(module, saved_weights(tiny_dir, component))


@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_ldm_mapping_for_any_block_layout(layers_per_block: int) -> None:
    """Plain (attention-free) levels and deeper levels map too, as in full-size SD."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet_config = tiny.tiny_unet_config("sd1") | {
        "layers_per_block": layers_per_block,
        "block_out_channels": [16, 16, 32],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }
    vae_config = tiny.tiny_vae_config("sd1") | {"layers_per_block": layers_per_block}
    for cls, config, to_ldm, prefix, convert in [
        (UNet2DConditionModel, unet_config, unet_to_ldm, "model.diffusion_model.", convert_ldm_unet_checkpoint),
        (AutoencoderKL, vae_config, vae_to_ldm, "first_stage_model.", convert_ldm_vae_checkpoint),
    ]:
        state = cls.from_config(config).state_dict()
        ldm = {prefix + k: v for k, v in to_ldm(state, config).items()}
        back = convert(ldm, config)
        assert sorted(back) == sorted(state)
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_open_single_file(tiny_dir: Path, single_file: Path, family: str) -> None:
    source = open_source(str(single_file), config=str(tiny_dir))
    assert (source.kind, source.id, source.revision) == ("single-file", str(single_file.resolve()), None)
    assert (source.family, source.prediction_type) == (family, PREDICTION[family])
    assert source.config("unet") == json.loads((tiny_dir / "unet" / "config.json").read_text())
    assert source.tokenizer_files()[2] == tiny.PAD_TOKENS[family]
    assert source.scheduler_config() == tiny.tiny_scheduler_config(family)
    for component in ("unet", "vae", "text_encoder"):
        module = load(source, component)
        assert not module.training
        assert_same_tensors(module, saved_weights(tiny_dir, component))


def test_half_precision_single_file_loads_as_float32(tiny_sd1_dir: Path, tiny_sd1_single_file: Path, tmp_path):
    half = tmp_path / "half.safetensors"
    tensors = load_file(tiny_sd1_single_file)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, half)
    unet = open_source(str(half), config=str(tiny_sd1_dir)).load("unet")
    expected = {k: v.half().float() for k, v in saved_weights(tiny_sd1_dir, "unet").items()}
    assert_same_tensors(unet, expected)


def test_ckpt_needs_allow_pickle(tiny_sd1_dir: Path, tiny_sd1_single_file: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(tiny_sd1_single_file), "global_step": 1}, ckpt)
    message = source_error(str(ckpt), config=str(tiny_sd1_dir))
    assert all(part in message for part in ("pickle", "execute", ".safetensors", "--allow-pickle"))
    source = open_source(str(ckpt), config=str(tiny_sd1_dir), allow_pickle=True)
    assert source.family == "sd1"
    assert_same_tensors(source.load("text_encoder"), saved_weights(tiny_sd1_dir, "text_encoder"))


def test_single_file_lacking_a_component(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    path = write_ldm_checkpoint(tiny_sd1_dir, tmp_path / "unet_only.safetensors", components=["unet"])
    source = open_source(str(path), config=str(tiny_sd1_dir))
    assert_same_tensors(source.load("unet"), saved_weights(tiny_sd1_dir, "unet"))
    with pytest.raises(SourceError, match=r"no vae weights \(first_stage_model\.\*\)"):
        source.load("vae")
    source.check_weights("unet")
    with pytest.raises(SourceError, match=r"no vae weights \(first_stage_model\.\*\)"):
        source.check_weights("vae")  # from the header, before any tensor is read


def test_single_file_without_config_names_the_fix(tiny_sd1_single_file: Path) -> None:
    # The tiny shapes fit none of the built-in architectures (no hub is asked: conftest is offline).
    message = source_error(str(tiny_sd1_single_file))
    assert "fits no architecture coreml-sd knows without --config" in message and "SD 1.5's" in message


def test_single_file_with_the_wrong_config(tiny_sd1_dir, tiny_sd2_single_file: Path) -> None:
    message = source_error(str(tiny_sd2_single_file), config=str(tiny_sd1_dir))
    assert "64-wide" in message and "32-wide" in message and "--config" in message


def test_single_file_truncated(tiny_sd1_dir: Path, tiny_sd1_single_file: Path, tmp_path: Path) -> None:
    """diffusers' single-file loaders would leave a missing tensor random; ours refuse."""
    tensors = load_file(tiny_sd1_single_file)
    del tensors["model.diffusion_model.out.2.weight"]
    path = tmp_path / "truncated.safetensors"
    save_file(tensors, path)
    with pytest.raises(SourceError, match=r"1 tensors missing, .*conv_out.weight.*--config") as info:
        open_source(str(path), config=str(tiny_sd1_dir)).load("unet")
    assert "\n" not in str(info.value)


# -- the hub, through an offline cache ---------------------------------------------------------


def cache_repo(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Lay ``folder`` out as huggingface_hub's cache does for ``repo_id`` at ``commit`` (main)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hub_repo_from_the_cache(offline_hub: Path, tiny_sd2_dir: Path) -> None:
    cache_repo(offline_hub, "tiny/sd2", tiny_sd2_dir)
    for revision in (None, "main", COMMIT):
        source = open_source("tiny/sd2", revision=revision)
        assert (source.kind, source.id, source.revision) == ("hub", "tiny/sd2", COMMIT)
        assert (source.family, source.prediction_type) == ("sd2", "v_prediction")
    assert source.tokenizer_files()[2] == "!"
    assert_same_tensors(source.load("vae"), saved_weights(tiny_sd2_dir, "vae"))


def test_hub_config_for_a_single_file(offline_hub: Path, tiny_sd1_dir, tiny_sd1_single_file: Path) -> None:
    cache_repo(offline_hub, "tiny/sd1", tiny_sd1_dir)
    source = open_source(str(tiny_sd1_single_file), config="tiny/sd1")
    assert source.kind == "single-file" and source.family == "sd1"
    assert_same_tensors(source.load("unet"), saved_weights(tiny_sd1_dir, "unet"))
    local = open_source(str(tiny_sd1_single_file), config=str(tiny_sd1_dir))
    assert local.fingerprint("unet") == source.fingerprint("unet")  # the same file and unet config
    assert "tiny/absent (revision main) is not in the local cache" in source_error(
        str(tiny_sd1_single_file), config="tiny/absent")
    assert "neither a folder, a hub repo id (org/name) nor a built-in architecture (sd15, sd2-512" in source_error(
        str(tiny_sd1_single_file), config="not-a-config")


def test_hub_repo_missing_weights(offline_hub: Path, tiny_sd1_dir: Path) -> None:
    snapshot = cache_repo(offline_hub, "tiny/sd1", tiny_sd1_dir)
    (snapshot / WEIGHT_FILES["unet"]).unlink()
    with pytest.raises(SourceError, match=r"hub repo tiny/sd1 has no unet weights.*--allow-pickle"):
        open_source("tiny/sd1").load("unet")


@pytest.mark.parametrize(
    ("repo", "revision", "expected"),
    [
        ("tiny/absent", None, "tiny/absent (revision main) is not in the local cache and HF_HUB_OFFLINE is"),
        ("tiny/sd1", "v2.0", "tiny/sd1 (revision v2.0) is not in the local cache"),
        ("tiny/sd1", "f" * 40, f"(revision {'f' * 40}) is not in the local cache"),
    ],
)
def test_hub_offline_misses(offline_hub: Path, tiny_sd1_dir: Path, repo, revision, expected) -> None:
    cache_repo(offline_hub, "tiny/sd1", tiny_sd1_dir)
    assert expected in source_error(repo, revision=revision)


def _http_error(cls, status: int):
    import httpx2

    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/name")
    return cls(f"{status} Client Error\nmore detail", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("RepositoryNotFoundError", "hub repo org/name was not found: check the id"),
        ("GatedRepoError", "hub repo org/name is gated: accept its terms"),
        ("RevisionNotFoundError", "revision 'v9' does not exist in hub repo org/name"),
        ("HfHubHTTPError", "answered HTTP 500 for org/name: retry later"),
        ("connection", "the hub is unreachable and org/name (revision v9) is not in the local Hugging Face"),
    ],
)
def test_hub_errors_are_translated(monkeypatch: pytest.MonkeyPatch, error: str, expected: str) -> None:
    """Online failures, raised as huggingface_hub raises them, become one line naming the fix."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    if error == "connection":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        exc = errors.LocalEntryNotFoundError("Got: ConnectError\nAn error happened")
    else:
        exc = _http_error(getattr(errors, error), 500 if error == "HfHubHTTPError" else 404)

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    assert expected in source_error("org/name", revision="v9")


# -- refusals ---------------------------------------------------------------------------------


def test_path_that_does_not_exist(tmp_path: Path) -> None:
    for source in (str(tmp_path / "missing"), "./model.safetensors", "not a repo", "a/b/c"):
        assert "does not exist and is not a hub repo id" in source_error(source)


def test_options_that_do_not_apply(tiny_sd1_dir: Path, tiny_sd1_single_file: Path) -> None:
    assert "drop --revision" in source_error(str(tiny_sd1_dir), revision="main")
    assert "drop --revision" in source_error(str(tiny_sd1_single_file), revision="main")
    assert "drop --config" in source_error(str(tiny_sd1_dir), config=str(tiny_sd1_dir))
    assert "drop --config" in source_error("org/name", config=str(tiny_sd1_dir))


def test_folder_without_model_index(tiny_sd1_dir: Path) -> None:
    message = source_error(str(tiny_sd1_dir / "unet"))
    assert "model_index.json" in message and "not a diffusers pipeline" in message


@pytest.mark.parametrize("missing", ["unet", "scheduler"])
def test_folder_without_a_needed_subfolder(tiny_sd1_dir: Path, tmp_path: Path, missing: str) -> None:
    folder = copy_pipeline(tiny_sd1_dir, tmp_path / "pipe")
    shutil.rmtree(folder / missing)
    assert f"has no {missing}; pass a full pipeline" in source_error(str(folder))


@pytest.mark.parametrize("missing", ["vae", "text_encoder", "tokenizer"])
def test_missing_component_fails_when_requested(tiny_sd1_dir: Path, tmp_path: Path, missing: str) -> None:
    folder = copy_pipeline(tiny_sd1_dir, tmp_path / "pipe")
    shutil.rmtree(folder / missing)
    source = open_source(str(folder))
    source.load("unet")  # the rest still loads
    with pytest.raises(SourceError, match=f"has no {missing}"):
        source.tokenizer_files() if missing == "tokenizer" else source.load(missing)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("unet/config.json", {"addition_embed_type": "image"}), "'image' embeddings"),  # Kandinsky-style
        (("unet/config.json", {"in_channels": 9}), "inpainting"),
        (("model_index.json", {"_class_name": "StableDiffusionInpaintPipeline"}), "inpainting"),
        (("unet/config.json", {"in_channels": 8}), "8 channels"),
        (("model_index.json", {"_class_name": "StableDiffusion3Pipeline"}), "StableDiffusion3Pipeline"),
        (("model_index.json", {"_class_name": "FluxPipeline"}), "FluxPipeline"),
    ],
)
def test_unsupported_families(tiny_sd1_dir: Path, tmp_path: Path, edit, expected: str) -> None:
    folder = copy_pipeline(tiny_sd1_dir, tmp_path / "pipe")
    edit_json(folder / edit[0], **edit[1])
    message = source_error(str(folder))
    assert expected in message and "Stable Diffusion 1.x, 2.x and XL" in message


def test_unsupported_single_files(tiny_sd1_dir: Path, tiny_sd1_single_file: Path, tmp_path: Path) -> None:
    tensors = load_file(tiny_sd1_single_file)
    inpainting = dict(tensors)
    conv_in = inpainting["model.diffusion_model.input_blocks.0.0.weight"]
    inpainting["model.diffusion_model.input_blocks.0.0.weight"] = conv_in.repeat(1, 3, 1, 1)[:, :9].contiguous()
    # SDXL files are read (test_single_file_sdxl); SD 3.5 and Flux are named by their own keys.
    sd35 = tensors | {"model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight": torch.zeros(1)}
    flux = {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(1)}
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    for name, content, expected in [
        ("inpainting", inpainting, "inpainting"),
        ("sd35", sd35, "another model (sd35_large"),
        ("flux", flux, "another model (flux"),
        ("lora", lora, "no Stable Diffusion tensors"),
    ]:
        path = tmp_path / f"{name}.safetensors"
        save_file(content, path)
        assert expected in source_error(str(path), config=str(tiny_sd1_dir))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert "not a checkpoint type coreml-sd reads" in source_error(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    assert "cannot read" in source_error(str(tmp_path / "broken.safetensors"))


# -- fingerprints -----------------------------------------------------------------------------


def test_fingerprint_follows_the_weights(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    folder = copy_pipeline(tiny_sd1_dir, tmp_path / "pipe")
    names = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    before = {c: open_source(str(folder)).fingerprint(c) for c in names}
    assert before == {c: open_source(str(folder)).fingerprint(c) for c in names}  # stable
    assert len(set(before.values())) == len(names)

    weights = load_file(folder / WEIGHT_FILES["unet"])
    weights["conv_out.bias"] = weights["conv_out.bias"] + 1
    save_file(weights, folder / WEIGHT_FILES["unet"], metadata={"format": "pt"})
    after = {c: open_source(str(folder)).fingerprint(c) for c in names}
    assert after["unet"] != before["unet"]
    assert {c: after[c] for c in names[1:]} == {c: before[c] for c in names[1:]}

    edit_json(folder / "vae" / "config.json", scaling_factor=0.13025)
    assert open_source(str(folder)).fingerprint("vae") != before["vae"]
    with pytest.raises(ValueError, match="unknown component"):
        open_source(str(folder)).fingerprint("safety_checker")


def test_fingerprint_of_single_files_and_hub(offline_hub, tiny_sd1_dir, tiny_sd1_single_file, tmp_path) -> None:
    path = Path(shutil.copy(tiny_sd1_single_file, tmp_path / "model.safetensors"))
    first = open_source(str(path), config=str(tiny_sd1_dir)).fingerprint("unet")
    assert first == open_source(str(path), config=str(tiny_sd1_dir)).fingerprint("unet")
    tensors = load_file(path)
    tensors["model.diffusion_model.out.2.bias"] += 1
    save_file(tensors, path)
    assert open_source(str(path), config=str(tiny_sd1_dir)).fingerprint("unet") != first

    cache_repo(offline_hub, "tiny/sd1", tiny_sd1_dir)
    hub = open_source("tiny/sd1").fingerprint("unet")
    assert hub == open_source("tiny/sd1", revision=COMMIT).fingerprint("unet")
    assert hub not in (first, open_source(str(tiny_sd1_dir)).fingerprint("unet"))
