"""Where a Stable Diffusion checkpoint comes from, and loading its components one at a time.

``open_source`` accepts three kinds of SOURCE and returns a :class:`Source`:

* ``folder``: a local diffusers pipeline folder (the one holding ``model_index.json``);
* ``hub``: a Hugging Face repo id ``org/name``, read as a diffusers folder whose weights are
  downloaded on demand, pinned to the commit its configs resolved to (``diffusers_folder``);
* ``single-file``: an original-layout (LDM / CompVis / SGM) checkpoint in one ``.safetensors``
  file, whose configs, tokenizer and scheduler come from ``config`` or, for the architectures
  the package ships configs of (SD 1.5, SD 2.x 512 / 768-v, SDXL base and refiner 1.0), from
  the one its tensors' names and shapes fit (``single_file``, ``architectures``); no hub needed.

This module tells them apart and checks the pipeline is one coreml-sd converts (``support``);
the reading itself is done by ``diffusers_folder`` and ``single_file``. Opening is cheap:
configs are small JSON files, and a single file's tensor names and shapes come from its header
(and are checked against the configs on torch's meta device, without reading a tensor).
``check_weights`` makes sure a component's weight files are there and readable without loading
them, so a converter can refuse a broken source before any work. ``load`` reads one component's
weights only, in float32 or the dtype asked for, and requires them to fit the config exactly (no
tensor left at its random initial value), so a converter can free one component before loading
the next.

Every failure a user can fix raises :class:`SourceError`, one line naming the problem and the
fix. Checkpoints of other families (inpainting, SD3, Flux, ...) are recognised and refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .diffusers_folder import DiffusersFolder, is_repo_id
from .single_file import SingleFile, config_folder, infer_architecture, read_checkpoint, read_metadata
from .support import COMPONENTS, PICKLE_SUFFIXES, SourceError, check_pipeline, check_unet, detect_family
from .vae_source import VaeSource, open_vae

__all__ = ["COMPONENTS", "Source", "SourceError", "detect_family", "open_source"]


@dataclass
class Source:
    """A checkpoint of known family whose components load one at a time."""

    kind: str  # "hub" | "folder" | "single-file"
    id: str  # hub repo id, or absolute path
    revision: str | None  # resolved hub commit hash when known
    family: str  # a name of coreml_sd.families.FAMILIES
    prediction_type: str  # from the scheduler config
    _files: DiffusersFolder | SingleFile = field(repr=False, compare=False)  # the components' weights
    _layout: DiffusersFolder = field(repr=False, compare=False)  # configs, tokenizer, scheduler
    vae: VaeSource | None = None  # a replacement VAE (--vae), answering for the part "vae"

    def with_vae(self, spec: str, allow_pickle: bool = False) -> Source:
        """This checkpoint with the VAE ``spec`` (folder, hub id or file: ``vae_source``) in place of its own."""
        own = self._files.config("vae") if self._layout.has_config("vae") else {}
        return replace(self, vae=open_vae(spec, own, allow_pickle))

    def has_config(self, component: str) -> bool:
        """Whether the pipeline has ``component`` (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) at all."""
        if component == "vae" and self.vae is not None:
            return True
        return self._layout.has_config(component)

    def check_weights(self, component: str) -> None:
        """Raise ``SourceError`` unless ``component``'s weights are present and readable; cheap
        (file headers only; a hub repo's weights are downloaded here)."""
        if component == "vae" and self.vae is not None:
            return self.vae.check_weights()
        self._files.check_weights(component)

    def config(self, part: str) -> dict[str, Any]:
        """The ``config.json`` of ``part`` (``unet``, ``vae``, ``text_encoder``) as the file says it."""
        if part == "vae" and self.vae is not None:
            return self.vae.config()
        return self._files.config(part)

    def load(self, part: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The weights of ``part`` in ``dtype``, eval mode: a ``diffusers.UNet2DConditionModel`` or
        ``AutoencoderKL``, or a ``transformers.CLIPTextModel``."""
        if part == "vae" and self.vae is not None:
            return self.vae.load().to(dtype)
        if isinstance(self._files, DiffusersFolder):
            return self._files.load(part, dtype).eval()
        return self._files.load(part).to(dtype).eval()  # a single file's tensors are read in float32

    def scheduler_config(self) -> dict[str, Any]:
        return self._layout.scheduler_config()

    def pipeline_options(self) -> dict[str, bool]:
        """The pipeline's own options that change its arithmetic (``model_index.json``): SDXL's
        ``force_zeros_for_empty_prompt`` (diffusers' default True for SDXL pipelines)."""
        index = self._layout.model_index()
        if not self.family.startswith("sdxl"):
            return {}
        return {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}

    def tokenizer_files(self) -> tuple[Path, Path, str]:
        """``vocab.json``, ``merges.txt`` and the pad token string of the CLIP tokenizer."""
        return self._layout.tokenizer_files(self.family)

    def fingerprint(self, component: str) -> str:
        """A cheap identity of one component's weights and config; it changes when they change.

        Components: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``. For the hub
        the commit; for local files the contents of configs and tokenizer files, and the sizes and
        modification times of weight files (hashing gigabytes would not be cheap).
        """
        if component == "vae" and self.vae is not None:
            parts = self.vae.identity()
        elif component in COMPONENTS:
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
    text_encoder_2 = layout.config("text_encoder_2") if layout.has_config("text_encoder_2") else None
    family = detect_family(unet, text_encoder, text_encoder_2)
    return family, scheduler.get("prediction_type", "epsilon")  # diffusers' default


def _open_layout(layout: DiffusersFolder, kind: str, id: str) -> Source:
    family, prediction_type = _describe(layout)
    return Source(kind, id, layout.commit, family, prediction_type, _files=layout, _layout=layout)


def _open_single_file(path: Path, allow_pickle: bool, config: str | None) -> Source:
    shapes = read_checkpoint(path, allow_pickle)
    if config is None:  # the built-in architecture every part of the file fits
        files = infer_architecture(path, shapes, read_metadata(path), allow_pickle)
        family, prediction_type = _describe(files.configs)
    else:
        files = SingleFile(path, config_folder(config, allow_pickle), shapes)
        family, prediction_type = _describe(files.configs)
        files.check_against_config(family)
    return Source("single-file", str(path), None, family, prediction_type, _files=files, _layout=files.configs)


def open_source(
    source: str, *, revision: str | None = None, allow_pickle: bool = False, config: str | None = None
) -> Source:
    """Open SOURCE: a diffusers folder, a single-file checkpoint, or a hub repo id ``org/name``.

    ``revision`` (branch, tag or commit) applies to hub repos; ``config`` (diffusers folder, hub id
    or built-in architecture name with the architecture configs, tokenizer and scheduler) to single
    files, whose architecture is otherwise inferred from their tensors; ``allow_pickle``
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
