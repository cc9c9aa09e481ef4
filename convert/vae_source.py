"""A replacement VAE (``convert --vae SOURCE``): the pipeline's other parts stay the checkpoint's.

SDXL's stock VAE overflows float16 and is commonly swapped for a fine-tune that does not (the
"fp16-fix" VAE), shared in three forms, all accepted here:

* a folder: a bare ``AutoencoderKL`` (``config.json`` + weights), or a pipeline folder's ``vae/``;
* a hub repo id ``org/name`` holding either of those layouts (configs first, weights on demand,
  pinned to the commit, as for a pipeline: ``diffusers_folder``);
* one ``.safetensors`` file, in the original (LDM) layout (``encoder.down.0...``, optionally under
  ``first_stage_model.``) or in diffusers' own; its architecture is taken to be the checkpoint's
  VAE config, and the weights must fit it exactly.

Loading goes through diffusers (``AutoencoderKL.from_pretrained`` and its single-file key
converter), then every tensor is required to be accounted for, as for the other parts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .diffusers_folder import (
    _hub_snapshot,
    _quiet_loading,
    _summary,
    file_identities,
    is_repo_id,
    read_json,
    safetensors_shapes,
)
from .support import PICKLE_SUFFIXES, SourceError, pickle_refused

_WEIGHTS = "diffusion_pytorch_model"
_LDM_PREFIXES = ("first_stage_model.", "vae.")


def _layout(root: Path) -> Path | None:
    """The folder holding the VAE's config.json inside ``root``: itself or its ``vae/``."""
    for folder in (root, root / "vae"):
        config = folder / "config.json"
        if config.is_file() and "AutoencoderKL" in str(read_json(config, "").get("_class_name")):
            return folder
    return None


@dataclass
class VaeSource:
    """A VAE given apart from the checkpoint; it answers for the part ``vae`` (see ``Source``)."""

    where: str  # how messages name it
    folder: Path | None  # a diffusers AutoencoderKL folder, or None for a single file
    file: Path | None  # a single-file checkpoint
    fallback_config: dict[str, Any]  # the checkpoint's VAE config: a single file's architecture
    allow_pickle: bool
    repo: tuple[str, str, str] | None = None  # (repo id, commit, subfolder) of a hub snapshot

    def config(self) -> dict[str, Any]:
        if self.folder is not None:
            return read_json(self.folder / "config.json", f"{self.where} has no config.json: pass a VAE folder")
        return dict(self.fallback_config)

    def _weights(self) -> Path:
        """The weight file of a folder (downloaded from the hub first if need be)."""
        assert self.folder is not None
        candidates = [f"{_WEIGHTS}.safetensors", *([f"{_WEIGHTS}.bin"] if self.allow_pickle else [])]
        if self.repo and not any((self.folder / c).is_file() for c in candidates):
            repo_id, commit, sub = self.repo
            _hub_snapshot(repo_id, commit, [f"{sub}{c}" for c in candidates])
        for name in candidates:
            if (self.folder / name).is_file():
                return self.folder / name
        if (self.folder / f"{_WEIGHTS}.bin").is_file():
            raise pickle_refused(f"{self.where}: {_WEIGHTS}.bin")
        raise SourceError(f"{self.where} has no VAE weights ({_WEIGHTS}.safetensors): pass a complete VAE")

    def check_weights(self) -> None:
        path = self._weights() if self.folder is not None else self.file
        if path is not None and path.suffix == ".safetensors":
            safetensors_shapes(path)  # a truncated file fails here, before any work

    def load(self) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        if self.folder is not None:
            weights = self._weights()
            try:
                with _quiet_loading():
                    model, info = AutoencoderKL.from_pretrained(
                        self.folder, torch_dtype=torch.float32, use_safetensors=weights.suffix == ".safetensors",
                        output_loading_info=True,
                    )
            except Exception as e:  # diffusers: size mismatches, damaged files, ...
                raise SourceError(f"cannot load the VAE {self.where} ({_summary(e)}): re-download it") from None
            problems = sum(len(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
            if problems:
                raise SourceError(f"the weights of the VAE {self.where} do not match its config.json: re-download them")
            return model.float().eval()
        return self._load_file()

    def _load_file(self) -> torch.nn.Module:
        from diffusers import AutoencoderKL
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        assert self.file is not None
        if self.file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(self.file)
        else:
            tensors = torch.load(self.file, map_location="cpu", weights_only=True)
            tensors = tensors.get("state_dict", tensors)
        tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        config = self.config()
        with torch.device("meta"):
            model = AutoencoderKL.from_config(config)
        expected = model.state_dict()
        # diffusers' own layout as is; the original layout through diffusers' key converter.
        state = tensors if set(tensors) >= set(expected) else convert_ldm_vae_checkpoint(tensors, config)
        missing = sorted(set(expected) - set(state))
        wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
        if missing or wrong:
            example = (wrong or missing)[0]
            raise SourceError(
                f"{self.file} is no VAE of the checkpoint's architecture ({len(wrong)} shapes differ, {len(missing)} tensors"
                f" missing, e.g. {example}): pass a VAE made for this model"
            )
        state = {k: state[k].float().contiguous() for k in expected}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def identity(self) -> Iterator[str]:
        if self.repo:
            yield f"hub:{self.repo[0]}@{self.repo[1]}/{self.repo[2]}"
        elif self.folder is not None:
            yield from file_identities(self.folder.glob("*"))
        else:
            assert self.file is not None
            stat = self.file.stat()
            yield f"{self.file}:{stat.st_size}:{stat.st_mtime_ns}"


def open_vae(spec: str, checkpoint_config: dict[str, Any], allow_pickle: bool = False) -> VaeSource:
    """Open ``--vae SPEC``: a folder, a hub repo id, or one weights file. ``checkpoint_config``
    (the checkpoint's own VAE config) is a single file's architecture. Raises ``SourceError``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = _layout(path.resolve())
        if folder is None:
            raise SourceError(f"--vae {spec}: no AutoencoderKL config.json in it or in its vae/: pass a VAE folder or file")
        return VaeSource(str(folder), folder, None, checkpoint_config, allow_pickle)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise pickle_refused(f"--vae {path}")
        if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
            raise SourceError(f"--vae {spec} is not a .safetensors file: pass a VAE folder, hub id or .safetensors file")
        if path.suffix == ".safetensors":
            keys = safetensors_shapes(path)
            if not any(k.startswith(("encoder.", "decoder.", *_LDM_PREFIXES)) for k in keys):
                raise SourceError(f"--vae {spec} holds no VAE tensors (encoder.*, decoder.*): pass a VAE file")
        return VaeSource(str(path.resolve()), None, path.resolve(), checkpoint_config, allow_pickle)
    if is_repo_id(spec):
        root = _hub_snapshot(spec, None, ["config.json", "vae/config.json"])
        folder = _layout(root)
        if folder is None:
            raise SourceError(f"--vae {spec}: the hub repo has no AutoencoderKL config.json: pass a VAE repo")
        sub = "" if folder == root else "vae/"
        return VaeSource(f"hub repo {spec}", folder, None, checkpoint_config, allow_pickle, repo=(spec, root.name, sub))
    raise SourceError(f"--vae {spec} does not exist and is not a hub repo id (org/name): check the path")
