"""Where a Stable Diffusion checkpoint comes from, and loading its components one at a time.

``open_source`` accepts three kinds of SOURCE and returns a :class:`Source`:

* ``folder``: a local diffusers pipeline folder (the one holding ``model_index.json``);
* ``hub``: a Hugging Face repo id ``org/name``, read as a diffusers folder whose weights are
  downloaded on demand, pinned to the commit its configs resolved to (``diffusers_folder``);
* ``single-file``: an original-layout (LDM / CompVis) checkpoint in one ``.safetensors`` file.
  It holds weights only, so architecture configs, tokenizer and scheduler come from ``config``
  (a diffusers folder or hub id) or, without it, from the repo diffusers associates with the
  checkpoint's type (SD 1.5 for an SD 1.x file, SD 2.1 for SD 2.x). The prediction type comes
  from that scheduler config too: the weights do not say (SD 2 base is epsilon, SD 2.1 is v).
  Pickled checkpoints (``.ckpt`` ...) can run code when read and need ``allow_pickle``.

This module tells them apart and checks the pipeline is one coreml-sd converts (``support``);
a diffusers layout is read by ``diffusers_folder``, a single file here. Opening is cheap:
configs are small JSON files, and a single file's tensor names and shapes come from its header.
``check_weights`` makes sure a component's weight files are there and readable without loading
them, so a converter can refuse a broken source before any work. ``load`` reads one component's
weights only, in float32, and requires them to fit the config exactly (no tensor left at its
random initial value), so a converter can free one component before loading the next.

Every failure a user can fix raises :class:`SourceError`, one line naming the problem and the
fix. Checkpoints of other families (SDXL, inpainting, SD3, Flux, ...) are recognised and refused.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .diffusers_folder import DiffusersFolder, HubFailure, file_identities, is_repo_id, safetensors_shapes
from .support import (
    COMPONENTS,
    CONFIG_FIX,
    PICKLE_SUFFIXES,
    SUPPORTED,
    SourceError,
    check_in_channels,
    check_pipeline,
    check_unet,
    detect_family,
    pickle_refused,
    unsupported,
)

__all__ = ["COMPONENTS", "Source", "SourceError", "detect_family", "open_source"]

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


def _read_checkpoint(path: Path, allow_pickle: bool) -> dict[str, torch.Size]:
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


def _config_folder(path: Path, shapes: dict[str, torch.Size], config: str | None, allow_pickle: bool) -> DiffusersFolder:
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
class _SingleFile:
    """An original-layout checkpoint file, with a diffusers layout that supplies its configs."""

    path: Path
    configs: DiffusersFolder
    shapes: dict[str, torch.Size]  # every tensor's name and shape, from _read_checkpoint

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


# -- the public object ------------------------------------------------------------------------


@dataclass
class Source:
    """A checkpoint of known family whose components load one at a time."""

    kind: str  # "hub" | "folder" | "single-file"
    id: str  # hub repo id, or absolute path
    revision: str | None  # resolved hub commit hash when known
    family: str  # "sd1" | "sd2"
    prediction_type: str  # from the scheduler config
    _files: DiffusersFolder | _SingleFile = field(repr=False, compare=False)  # the components' weights
    _layout: DiffusersFolder = field(repr=False, compare=False)  # configs, tokenizer, scheduler

    def has_config(self, component: str) -> bool:
        """Whether the pipeline has ``component`` (``unet``, ``vae``, ``text_encoder``) at all."""
        return self._layout.has_config(component)

    def check_weights(self, component: str) -> None:
        """Raise ``SourceError`` unless ``component``'s weights are present and readable; cheap
        (file headers only; a hub repo's weights are downloaded here)."""
        self._files.check_weights(component)

    def config(self, part: str) -> dict[str, Any]:
        """The ``config.json`` of ``part`` (``unet``, ``vae``, ``text_encoder``) as the file says it."""
        return self._files.config(part)

    def load(self, part: str) -> torch.nn.Module:
        """The weights of ``part`` in float32, eval mode: a ``diffusers.UNet2DConditionModel`` or
        ``AutoencoderKL``, or a ``transformers.CLIPTextModel``."""
        return self._files.load(part).eval()

    def scheduler_config(self) -> dict[str, Any]:
        return self._layout.scheduler_config()

    def tokenizer_files(self) -> tuple[Path, Path, str]:
        """``vocab.json``, ``merges.txt`` and the pad token string of the CLIP tokenizer."""
        return self._layout.tokenizer_files(self.family)

    def fingerprint(self, component: str) -> str:
        """A cheap identity of one component's weights and config; it changes when they change.

        Components: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``. For the hub
        the commit; for local files the contents of configs and tokenizer files, and the sizes and
        modification times of weight files (hashing gigabytes would not be cheap).
        """
        if component in COMPONENTS:
            parts = self._files.identity(component)
        elif component in ("tokenizer", "scheduler"):
            parts = self._layout.identity(component)
        else:
            raise ValueError(f"unknown component {component!r}")
        digest = hashlib.sha256(f"{self.kind}:{self.family}:{component}".encode())
        for part in parts:
            digest.update(b"\0" + part.encode())
        return digest.hexdigest()


def _describe(layout: DiffusersFolder) -> tuple[str, str]:
    """Check a diffusers layout holds an SD 1.x/2.x pipeline; return its family and prediction type."""
    check_pipeline(layout.model_index(), layout.where)
    unet = layout.config("unet")
    check_unet(unet, layout.where)
    scheduler = layout.scheduler_config()
    text_encoder = layout.config("text_encoder") if layout.has_config("text_encoder") else None
    return detect_family(unet, text_encoder), scheduler.get("prediction_type", "epsilon")  # diffusers' default


def _open_layout(layout: DiffusersFolder, kind: str, id: str) -> Source:
    family, prediction_type = _describe(layout)
    return Source(kind, id, layout.commit, family, prediction_type, _files=layout, _layout=layout)


def _open_single_file(path: Path, allow_pickle: bool, config: str | None) -> Source:
    shapes = _read_checkpoint(path, allow_pickle)
    layout = _config_folder(path, shapes, config, allow_pickle)
    family, prediction_type = _describe(layout)
    files = _SingleFile(path, layout, shapes)
    files.check_against_config(family)
    return Source("single-file", str(path), None, family, prediction_type, _files=files, _layout=layout)


def open_source(
    source: str, *, revision: str | None = None, allow_pickle: bool = False, config: str | None = None
) -> Source:
    """Open SOURCE: a diffusers folder, a single-file checkpoint, or a hub repo id ``org/name``.

    ``revision`` (branch, tag or commit) applies to hub repos; ``config`` (diffusers folder or hub
    id with the architecture configs, tokenizer and scheduler) to single files; ``allow_pickle``
    permits pickled weights. Raises :class:`SourceError`.
    """
    path = Path(source).expanduser()
    if path.exists() and revision is not None:
        raise SourceError(f"--revision applies to hub repo ids, and {source} is a local path: drop --revision")
    if config is not None and (path.is_dir() or (not path.exists() and is_repo_id(source))):
        raise SourceError(f"--config applies to single-file checkpoints, not to {source}: drop --config")
    if path.is_dir():
        layout = DiffusersFolder.local(path, allow_pickle)
        return _open_layout(layout, "folder", str(layout.root))
    if path.is_file():
        return _open_single_file(path.resolve(), allow_pickle, config)
    if path.exists():
        raise SourceError(f"{source} is neither a file nor a folder: pass a checkpoint or a diffusers folder")
    if is_repo_id(source) and not source.endswith((".safetensors", *PICKLE_SUFFIXES)):
        return _open_layout(DiffusersFolder.from_hub(source, revision, allow_pickle), "hub", source)
    raise SourceError(
        f"{source} does not exist and is not a hub repo id (org/name): check the path, or pass a diffusers"
        " folder, a .safetensors checkpoint or a hub repo id"
    )
