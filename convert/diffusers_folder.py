"""Reading a diffusers pipeline layout: a local folder, or a Hugging Face hub snapshot.

A :class:`DiffusersFolder` is the folder holding ``model_index.json``, one subfolder per part
(``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``). For a hub repo id
``org/name`` (:meth:`DiffusersFolder.from_hub`), configs, tokenizer and scheduler are fetched at
open time and the commit they resolve to is recorded; it pins the download of each part's
weights, which happens when they are first checked or loaded. Every hub failure becomes one
:class:`~coreml_sd.convert.support.SourceError` line naming the fix.

``check_weights`` makes sure a part's weight files are there and readable (safetensors headers)
without loading them. ``load`` reads one part through diffusers / transformers, in float32 unless
told otherwise, and requires the weights to fit the config exactly. Pickled weights (``.bin``)
need ``allow_pickle``.

Also here, for the single-file reader: the small file helpers both kinds of source use.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .support import COMPONENTS, SourceError, pickle_refused

__all__ = ["DiffusersFolder", "HubFailure", "file_identities", "is_repo_id", "read_json", "safetensors_shapes"]

# What a hub repo gives at open time: everything but weights.
CONFIG_PATTERNS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "tokenizer_2/*",
    *(f"{component}/config.json" for component in COMPONENTS),
]
# Weight file stems (diffusers' models, transformers' text encoder) per format.
_STEMS = {
    fmt: {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": text_encoder,
          "text_encoder_2": text_encoder}
    for fmt, text_encoder in (("safetensors", "model"), ("bin", "pytorch_model"))
}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a hub repo id, ``org/name``."""
    return _REPO_ID.fullmatch(text) is not None


class HubFailure(SourceError):
    """A failed hub download; ``problem`` is the message without its fix, for wrapping."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}: {fix}")
        self.problem = problem


# -- small file helpers -----------------------------------------------------------------------


def read_json(path: Path, missing: str) -> dict[str, Any]:
    """Parse a JSON file; ``missing`` says what its absence means and how to fix it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path} does not exist: {missing}") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read {path} ({type(e).__name__}: {e}): repair or re-download it") from None


def safetensors_shapes(path: Path) -> dict[str, torch.Size]:
    """Every tensor's name and shape in a ``.safetensors`` file, from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise SourceError(f"cannot read {path} as safetensors ({type(e).__name__}): re-download it") from None


# Bytes read through one opening of a safetensors file by ``read_safetensors``.
_READ_GROUP_BYTES = 512 * 2**20


def read_safetensors(paths: Iterable[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the ``.safetensors`` files ``paths``, floating-point ones in ``dtype``.

    safetensors maps a whole file into memory, and the pages read stay resident, counted as this
    process's memory, until the file is closed: diffusers, which keeps a UNet's file open through
    its load, peaks at 14.7 GiB reading SDXL's 10 GB of float32 weights for a 4.8 GB float16
    copy. Opened anew for every ~512 MiB read here, the file adds at most that to the copy.
    """
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        groups: list[list[str]] = [[]]
        size = 0
        for key, shape in safetensors_shapes(path).items():
            size += 4 * shape.numel()  # bytes of float32: about, for grouping
            if size > _READ_GROUP_BYTES and groups[-1]:
                groups.append([])
                size = 4 * shape.numel()
            groups[-1].append(key)
        for group in groups:
            with safe_open(path, framework="pt") as f:
                for key in group:
                    tensor = f.get_tensor(key)
                    tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return tensors


def file_identities(paths: Iterable[Path]) -> Iterator[str]:
    """Cheap identities of files: JSON and text by content, weights by size and mtime."""
    for path in sorted(p for p in paths if p.is_file()):
        if path.suffix in (".json", ".txt"):
            yield f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}"
        else:
            stat = path.stat()
            yield f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def _weight_format(folder: Path, component: str) -> str | None:
    """``"safetensors"`` or ``"bin"`` (pickle) for the weights in ``folder/component``, or None."""
    for fmt, stems in _STEMS.items():
        name = f"{stems[component]}.{fmt}"
        if (folder / component / name).is_file() or (folder / component / f"{name}.index.json").is_file():
            return fmt
    return None


def _weight_patterns(component: str, fmt: str) -> list[str]:
    """Hub file patterns of one component's weights: whole file or shards, never variants."""
    stem = f"{component}/{_STEMS[fmt][component]}"
    return [f"{stem}.{fmt}", f"{stem}.{fmt}.index.json", f"{stem}-*-of-*.{fmt}"]


def _weight_files(folder: Path, stem: str, fmt: str) -> list[Path]:
    """The files holding one component's weights: the whole file, else the shards its index names."""
    whole = folder / f"{stem}.{fmt}"
    index = folder / f"{stem}.{fmt}.index.json"
    if whole.is_file() or not index.is_file():
        return [whole]
    weight_map = read_json(index, "").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index} names no weight files: repair or re-download it")
    return [folder / name for name in sorted(set(weight_map.values()))]


def _summary(exc: BaseException, limit: int = 240) -> str:
    """``Type: message`` of a library exception, cut to its first informative line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Only errors from diffusers' and transformers' loggers while a component loads."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def _pad_token(folder: Path, family: str) -> str:
    """The pad token named by the tokenizer's JSON files, else the family's."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            pad = read_json(folder / name, "").get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad  # a serialised AddedToken
            if isinstance(pad, str):
                return pad
    return "!" if family in ("sd2", "sdxl-refiner") else "<|endoftext|>"


# -- the hub ----------------------------------------------------------------------------------


def _hub_problem(exc: Exception, repo_id: str, revision: str | None) -> tuple[str, str]:
    """Translate a huggingface_hub exception into (problem, fix), without traceback text."""
    from huggingface_hub import constants, errors

    rev = revision or "main"
    if isinstance(exc, errors.GatedRepoError):
        fix = f"accept its terms on https://huggingface.co/{repo_id} and log in with `hf auth login`"
        return f"hub repo {repo_id} is gated", fix
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"hub repo {repo_id} was not found", "check the id, or log in with `hf auth login` if private"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"revision {rev!r} does not exist in hub repo {repo_id}", "pass an existing branch, tag, commit"
    if isinstance(exc, errors.IncompleteSnapshotError):
        problem = f"the cached copy of {repo_id} (revision {rev}) is incomplete and the hub is unreachable"
        return problem, "connect to the network and retry"
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError)):
        if constants.is_offline_mode():
            problem = f"hub repo {repo_id} (revision {rev}) is not in the local cache and HF_HUB_OFFLINE is set"
            return problem, "unset HF_HUB_OFFLINE to download it, or pass a local diffusers folder"
        problem = f"the hub is unreachable and {repo_id} (revision {rev}) is not in the local Hugging Face cache"
        return problem, "check the network connection, or pass a local diffusers folder"
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(exc.response, "status_code", "?")
        return f"the Hugging Face hub answered HTTP {status} for {repo_id}", "retry later"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"could not fetch hub repo {repo_id} ({type(exc).__name__}: {first_line})", "retry"


def _hub_snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """Fetch (or find in the cache) the files of ``repo_id`` matching ``patterns``.

    Returns the snapshot folder; its name is the resolved commit hash.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # every hub failure becomes one actionable line
        raise HubFailure(*_hub_problem(e, repo_id, revision)) from None


# -- the layout -------------------------------------------------------------------------------


@dataclass
class DiffusersFolder:
    """A diffusers pipeline layout on disk; for the hub, a snapshot that fetches weights lazily."""

    root: Path
    where: str  # how messages name it
    allow_pickle: bool
    repo: tuple[str, str] | None = None  # (repo id, commit) of a hub snapshot

    @classmethod
    def local(cls, path: Path, allow_pickle: bool) -> DiffusersFolder:
        """A folder on disk, named in messages by its absolute path."""
        root = path.resolve()
        return cls(root, str(root), allow_pickle)

    @classmethod
    def from_hub(cls, repo_id: str, revision: str | None, allow_pickle: bool) -> DiffusersFolder:
        """Fetch a hub repo's configs (no weights); the snapshot's name is the resolved commit.

        Raises :class:`HubFailure` when the hub or the cache cannot give them.
        """
        root = _hub_snapshot(repo_id, revision, CONFIG_PATTERNS)
        return cls(root, f"hub repo {repo_id}", allow_pickle, repo=(repo_id, root.name))

    @property
    def commit(self) -> str | None:
        """The resolved hub commit of a snapshot; None for a local folder."""
        return self.repo[1] if self.repo else None

    def model_index(self) -> dict[str, Any]:
        missing = f"{self.where} is not a diffusers pipeline; pass the folder holding model_index.json"
        return read_json(self.root / "model_index.json", missing)

    def has_config(self, component: str) -> bool:
        return (self.root / component / "config.json").is_file()

    def config(self, component: str) -> dict[str, Any]:
        missing = f"{self.where} has no {component}; pass a full pipeline"
        return read_json(self.root / component / "config.json", missing)

    def scheduler_config(self) -> dict[str, Any]:
        path = self.root / "scheduler" / "scheduler_config.json"
        return read_json(path, f"{self.where} has no scheduler; pass a full pipeline")

    def tokenizer_files(self, family: str) -> tuple[Path, Path, str]:
        """``vocab.json``, ``merges.txt`` and the pad token string (else ``family``'s) of the tokenizer
        of the first text encoder: ``tokenizer_2`` for SDXL's refiner, which has only the second.
        (SDXL's two tokenizers share one vocabulary and differ in their pad token, which the
        runtime takes from the family for the second, as Apple's Swift pipeline does.)"""
        part = "tokenizer_2" if family == "sdxl-refiner" else "tokenizer"
        folder = self.root / part
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise SourceError(f"{self.where} has no {part}/{name}: pass a full pipeline")
        return folder / "vocab.json", folder / "merges.txt", _pad_token(folder, family)

    def _weights(self, component: str) -> str:
        """Make one component's weights present (hub: download them); return their format."""
        if self.repo and _weight_format(self.root, component) is None:
            for fmt in ("safetensors", "bin") if self.allow_pickle else ("safetensors",):
                if _weight_format(self.root, component) is None:
                    _hub_snapshot(*self.repo, _weight_patterns(component, fmt))
        fmt = _weight_format(self.root, component)
        if fmt is None:
            hint = ", or --allow-pickle if it has only trusted .bin weights" if self.repo else ""
            expected = f"{component}/{_STEMS['safetensors'][component]}.safetensors"
            raise SourceError(f"{self.where} has no {component} weights ({expected}): pass a full pipeline" + hint)
        if fmt == "bin" and not self.allow_pickle:
            raise pickle_refused(f"{self.where}: {component}/{_STEMS['bin'][component]}.bin")
        return fmt

    def check_weights(self, component: str) -> None:
        """Fail now if one component's weight files are missing or unreadable (not loading them)."""
        self.config(component)  # a missing component fails here, with the clearest message
        fmt = self._weights(component)
        for path in _weight_files(self.root / component, _STEMS[fmt][component], fmt):
            rel = path.relative_to(self.root).as_posix()
            if not path.is_file():
                raise SourceError(f"{self.where} lacks {rel}, a file of its {component} weights: re-download it")
            if fmt == "safetensors":
                safetensors_shapes(path)  # the header: a truncated file fails here, not after other work

    def load(self, component: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """One component through diffusers / transformers, in ``dtype``, refused unless it fits its
        config exactly."""
        self.config(component)  # a missing component fails here, with the clearest message
        safetensors = self._weights(component) == "safetensors"
        try:
            with _quiet_loading():  # their warnings would repeat, in many lines, what is raised below
                if component == "unet" and safetensors and dtype != torch.float32:
                    model, info = self._unet_in(dtype)
                else:
                    model, info = self._from_pretrained(component, safetensors, dtype)
        except (MemoryError, SourceError):
            raise
        except Exception as e:  # diffusers / transformers: size mismatches, damaged files, ...
            raise SourceError(
                f"cannot load the {component} of {self.where} ({_summary(e)}): re-download it, or fix"
                f" {component}/config.json if it does not describe these weights"
            ) from None
        # Both libraries load leniently: a tensor the files lack keeps its random initial value,
        # one they have in excess is dropped; either way the result is not the checkpoint.
        reported = {"missing": "missing_keys", "unexpected": "unexpected_keys", "mismatched": "mismatched_keys"}
        problems = {kind: sorted(map(str, info.get(key) or ())) for kind, key in reported.items()}
        if any(problems.values()):
            counts = ", ".join(f"{len(keys)} {kind}" for kind, keys in problems.items() if keys)
            example = next(keys[0] for keys in problems.values() if keys)
            raise SourceError(
                f"the {component} weights of {self.where} do not match {component}/config.json ({counts} tensors,"
                f" e.g. {example}): re-download them, or fix the config if it does not describe them"
            )
        return model

    def _unet_in(self, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The UNet in ``dtype`` and its loading report, as ``_from_pretrained`` gives them, with one
        copy of the weights in memory: most of a pipeline's weights are the UNet's, published in
        float32 (SDXL's: 10 GB), and diffusers' float16 load holds the file's pages besides the copy
        (``read_safetensors``). The other parts load through their libraries, whose overhead is a
        few hundred MB (and diffusers renames an old VAE's attention weights on the way)."""
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(self.config("unet"))
        state = read_safetensors(_weight_files(self.root / "unet", _STEMS["safetensors"]["unet"], "safetensors"), dtype)
        expected = model.state_dict()
        info = {
            "missing_keys": sorted(expected.keys() - state.keys()),
            "unexpected_keys": sorted(state.keys() - expected.keys()),
            "mismatched_keys": sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape),
        }
        if not any(info.values()):
            model.load_state_dict(state, strict=True, assign=True)
        return model, info

    def _from_pretrained(
        self, component: str, safetensors: bool, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The diffusers / transformers module and its loading report (missing keys, ...)."""
        if component.startswith("text_encoder"):
            from transformers import CLIPTextModel, CLIPTextModelWithProjection

            # SDXL's second encoder adds the projection of its pooled output (text_embeds).
            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            return cls.from_pretrained(
                self.root / component,
                dtype=dtype,
                use_safetensors=safetensors,
                local_files_only=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported in the loading info, refused by load()
            )
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.utils import is_accelerate_available

        cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
        return cls.from_pretrained(
            self.root,
            subfolder=component,
            torch_dtype=dtype,
            use_safetensors=safetensors,
            # diffusers defaults to True, then warns on every load that accelerate is missing.
            low_cpu_mem_usage=is_accelerate_available(),
            output_loading_info=True,
        )

    def identity(self, component: str) -> Iterator[str]:
        """What ``Source.fingerprint`` hashes for one part: the hub commit, else its files."""
        if self.repo:  # a commit pins every file
            yield f"hub:{self.repo[0]}@{self.repo[1]}"
        else:
            yield from file_identities((self.root / component).glob("*"))
