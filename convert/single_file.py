"""Reading an original-layout (LDM / CompVis) Stable Diffusion checkpoint held in one file.

Such a file holds weights only, so architecture configs, tokenizer and scheduler come from a
:class:`~coreml_sd.convert.diffusers_folder.DiffusersFolder`: the one given with ``--config`` (a
diffusers folder or hub id) or, without it, the hub repo diffusers associates with the
checkpoint's type (SD 1.5 for an SD 1.x file, SD 2.1 for SD 2.x). The prediction type comes from
that scheduler config too: the weights do not say (SD 2 base is epsilon, SD 2.1 is v).

:func:`read_checkpoint` reads the tensor names and shapes (a ``.safetensors`` file's header
alone) and refuses what is no SD 1.x / 2.x checkpoint, judged by diffusers' own detector.
Pickled checkpoints (``.ckpt`` ...) can run code when read and need ``allow_pickle``.
:class:`SingleFile` loads one component at a time: its tensors only, mapped to diffusers' names
by diffusers' ``single_file_utils`` converters, then required to fit the config exactly.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .diffusers_folder import DiffusersFolder, HubFailure, file_identities, is_repo_id, safetensors_shapes
from .support import CONFIG_FIX, PICKLE_SUFFIXES, SUPPORTED, SourceError, check_in_channels, pickle_refused, unsupported

__all__ = ["SingleFile", "config_folder", "read_checkpoint"]

# Key prefixes of each component in an original-layout checkpoint ("vae." in a few merges).
_LDM_PREFIXES = {
    "unet": ("model.diffusion_model.",),
    "vae": ("first_stage_model.", "vae."),
    "text_encoder": ("cond_stage_model.",),
}
_LDM_CLIP_KEY = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
_LDM_OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Unpickle a checkpoint the user allowed; torch's restricted unpickler first."""
    mmap = zipfile.is_zipfile(path)  # torch memory-maps only its zip format
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            # Training checkpoints also pickle objects (callbacks, optimiser state); the user
            # vouched for the file, so the unrestricted unpickler may read them.
            data = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:
        raise SourceError(f"cannot unpickle {path} ({type(e).__name__}): convert it to .safetensors") from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _meta(shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins for a checkpoint's tensors, for diffusers' key-and-shape detectors."""
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def _ignorable(key: str, num_layers: int) -> bool:
    """Text-encoder tensors of a checkpoint that ``CLIPTextModel`` legitimately has no place for."""
    match = re.match(r"(?:text_model\.)?encoder\.layers\.(\d+)\.", key)
    # SD 2.x conditions on OpenCLIP's penultimate layer: the checkpoint's last layer is unused,
    # as is its text projection; SD 1.x files carry a position-id buffer transformers rebuilds.
    beyond = match is not None and int(match.group(1)) >= num_layers
    return beyond or key.endswith("position_ids") or key.startswith("text_projection")


# -- opening: what the file is, and where its configs come from ------------------------------


def read_checkpoint(path: Path, allow_pickle: bool) -> dict[str, torch.Size]:
    """Every tensor's name and shape in the checkpoint at ``path``, once it is known to be an
    SD 1.x / 2.x original-layout checkpoint of a type coreml-sd reads; else ``SourceError``."""
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise pickle_refused(str(path))
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise SourceError(
            f"{path} is not a checkpoint type coreml-sd reads (.safetensors; with --allow-pickle also"
            f" {', '.join(PICKLE_SUFFIXES)}): pass a .safetensors file or a diffusers folder"
        )
    if path.suffix == ".safetensors":
        shapes = safetensors_shapes(path)
    else:
        shapes = {k: v.shape for k, v in _load_pickle(path).items()}
    _check_checkpoint(shapes, str(path))
    return shapes


def _check_checkpoint(shapes: dict[str, torch.Size], where: str) -> None:
    """Refuse files that are not SD 1.x/2.x original-layout checkpoints (diffusers' detector)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not any(k.startswith(p) for prefixes in _LDM_PREFIXES.values() for p in prefixes for k in shapes):
        raise SourceError(
            f"{where} has no Stable Diffusion tensors (model.diffusion_model.*, first_stage_model.*,"
            " cond_stage_model.*), so it is no full original-layout checkpoint (a LoRA? an embedding?):"
            " pass a full SD checkpoint or a diffusers folder"
        )
    try:
        model_type = infer_diffusers_model_type(_meta(shapes))
    except Exception:  # a detector branch that needs values, not shapes: not SD 1.x/2.x anyway
        model_type = "unknown"
    if model_type.startswith("inpainting"):
        raise unsupported(where, "an inpainting checkpoint")
    if model_type.startswith(("xl", "playground")):
        raise unsupported(where, "a Stable Diffusion XL checkpoint")
    if model_type not in ("v1", "v2"):
        raise unsupported(where, f"a {model_type} checkpoint")
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None:
        check_in_channels(conv_in[1], where)


def config_folder(path: Path, shapes: dict[str, torch.Size], config: str | None, allow_pickle: bool) -> DiffusersFolder:
    """The diffusers layout that supplies the configs of the checkpoint at ``path``: ``config``
    (a folder or hub repo id) when given, else diffusers' config repo for the checkpoint's type."""
    if config is not None:
        folder = Path(config).expanduser()
        if folder.is_dir():
            return DiffusersFolder.local(folder, allow_pickle)
        if not is_repo_id(config):
            raise SourceError(f"--config {config} is neither a folder nor a hub repo id (org/name): {CONFIG_FIX}")
        return DiffusersFolder.from_hub(config, None, allow_pickle)
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    default = fetch_diffusers_config(_meta(shapes))["pretrained_model_name_or_path"]
    try:
        return DiffusersFolder.from_hub(default, None, allow_pickle)
    except HubFailure as e:
        raise SourceError(
            f"{path} holds weights only, and {default}, diffusers' config repo for its type, cannot be"
            f" read ({e.problem}): {CONFIG_FIX}"
        ) from None


# -- the file ---------------------------------------------------------------------------------


@dataclass
class SingleFile:
    """An original-layout checkpoint file, with a diffusers layout that supplies its configs."""

    path: Path
    configs: DiffusersFolder
    shapes: dict[str, torch.Size]  # every tensor's name and shape, from read_checkpoint

    def check_against_config(self, family: str) -> None:
        """Cheap early check that the checkpoint has the config's text width and encoder ``family``."""
        where, config_where = str(self.path), self.configs.where
        unet_keys = (k for k in self.shapes if k.startswith("model.diffusion_model."))
        to_k = sorted(k for k in unet_keys if k.endswith("attn2.to_k.weight"))  # cross-attention keys
        width = self.config("unet").get("cross_attention_dim")
        if to_k and self.shapes[to_k[0]][1] != width:
            raise SourceError(
                f"{where} cross-attends to {self.shapes[to_k[0]][1]}-wide text embeddings, the config of"
                f" {config_where} to {width}-wide ones: {CONFIG_FIX} matching the checkpoint"
            )
        layout = "sd2" if _LDM_OPEN_CLIP_KEY in self.shapes else "sd1" if _LDM_CLIP_KEY in self.shapes else None
        if layout and layout != family:
            raise SourceError(
                f"{where} has an {layout} text encoder, the config of {config_where} is {family}:"
                f" {CONFIG_FIX} matching the checkpoint"
            )

    def config(self, component: str) -> dict[str, Any]:
        return self.configs.config(component)

    def _tensors(self, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Read the tensors under ``prefixes`` only (one component), keeping peak memory low."""
        if self.path.suffix != ".safetensors":
            return {k: v for k, v in _load_pickle(self.path).items() if k.startswith(prefixes)}
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}

    def check_weights(self, component: str) -> None:
        """Fail now if the file lacks one component's tensors (the header says; nothing is read)."""
        self.config(component)
        prefixes = _LDM_PREFIXES[component]
        if not any(k.startswith(prefixes) for k in self.shapes):
            raise SourceError(
                f"{self.path} has no {component} weights ({prefixes[0]}*): convert a checkpoint that has them"
            )

    def load(self, component: str) -> torch.nn.Module:
        """Map the component's tensors with diffusers' single-file converters; load exactly."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.loaders import single_file_utils as sfu

        config = self.config(component)
        self.check_weights(component)
        prefixes = _LDM_PREFIXES[component]
        checkpoint = self._tensors(prefixes)
        if component == "text_encoder":
            return self._load_text_encoder(checkpoint)
        if component == "unet":
            cls, state = UNet2DConditionModel, sfu.convert_ldm_unet_checkpoint(checkpoint, config)
        else:
            cls, state = AutoencoderKL, sfu.convert_ldm_vae_checkpoint(checkpoint, config)
        del checkpoint
        # Built on the meta device and filled by assignment: one copy of the weights in memory.
        with torch.device("meta"):
            model = cls.from_config(config)
        return self._fill(model, state, component, assign=True)

    def _load_text_encoder(self, checkpoint: dict[str, torch.Tensor]) -> torch.nn.Module:
        from diffusers.loaders import single_file_utils as sfu
        from transformers import CLIPTextConfig, CLIPTextModel

        # Built on the CPU, not meta: CLIP has a non-persistent buffer that assignment would miss.
        model = CLIPTextModel(CLIPTextConfig.from_pretrained(self.configs.root / "text_encoder"))
        if _LDM_CLIP_KEY in checkpoint:  # SD 1.x: transformers' own layout under a prefix
            state = sfu.convert_ldm_clip_checkpoint(checkpoint)
        elif _LDM_OPEN_CLIP_KEY in checkpoint:  # SD 2.x: OpenCLIP's layout with fused q/k/v
            state = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix="cond_stage_model.model.")
        else:
            raise SourceError(f"{self.path} has a text encoder neither OpenAI CLIP nor OpenCLIP: {SUPPORTED}")
        del checkpoint
        # transformers >= 5.6 flattened CLIPTextModel; diffusers' converters still emit `text_model.*`.
        if not hasattr(model, "text_model"):
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        layers = model.config.num_hidden_layers
        state = {k: v for k, v in state.items() if not _ignorable(k, layers)}
        return self._fill(model, state, "text_encoder", assign=False)

    def _fill(self, model: torch.nn.Module, state: dict[str, torch.Tensor], component: str, assign: bool):
        """Load ``state`` into ``model``, requiring exactly its names and shapes.

        diffusers' own single-file loaders load non-strictly, which would leave a truncated or
        mismatched checkpoint's missing tensors at their random initial values.
        """
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            example = (wrong or missing or unexpected)[0]
            raise SourceError(
                f"{self.path}: its {component} does not match the config of {self.configs.where}"
                f" ({len(wrong)} shapes differ, {len(missing)} tensors missing, {len(unexpected)} unexpected,"
                f" e.g. {example}): {CONFIG_FIX} of the same architecture"
            )
        state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=assign)
        return model

    def identity(self, component: str) -> Iterator[str]:
        """What ``Source.fingerprint`` hashes for one part: the file, and the part's config."""
        stat = self.path.stat()
        yield f"{self.path}:{stat.st_size}:{stat.st_mtime_ns}"
        # The config only: weights that may sit beside it in the config source are not these.
        yield from file_identities([self.configs.root / component / "config.json"])
