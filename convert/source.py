"""Where a Stable Diffusion checkpoint comes from, and loading its components one at a time.

``open_source`` accepts three kinds of SOURCE and returns a :class:`Source`:

* ``folder``: a local diffusers pipeline folder (the one holding ``model_index.json``);
* ``hub``: a Hugging Face repo id ``org/name``. Configs, tokenizer and scheduler are fetched at
  open time and the commit they resolve to is recorded; it pins the download of each
  component's weights, which happens when they are first checked or loaded;
* ``single-file``: an original-layout (LDM / CompVis) checkpoint in one ``.safetensors`` file.
  It holds weights only, so architecture configs, tokenizer and scheduler come from ``config``
  (a diffusers folder or hub id) or, without it, from the repo diffusers associates with the
  checkpoint's type (SD 1.5 for an SD 1.x file, SD 2.1 for SD 2.x). The prediction type comes
  from that scheduler config too: the weights do not say (SD 2 base is epsilon, SD 2.1 is v).
  Pickled checkpoints (``.ckpt`` ...) can run code when read and need ``allow_pickle``.

Opening is cheap: configs are small JSON files, and a single file's tensor names and shapes come
from its header. ``check_weights`` makes sure a component's weight files are there and readable
(safetensors headers) without loading them, so a converter can refuse a broken source before any
work. Each ``load_*`` reads one component's weights only, in float32, and requires them to fit
the config exactly (no tensor left at its random initial value), so a converter can free one
component before loading the next.

Every failure a user can fix raises :class:`SourceError`, one line naming the problem and the
fix. Checkpoints of other families (SDXL, inpainting, SD3, Flux, ...) are recognised and refused.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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

# What a hub repo gives at open time: everything but weights.
CONFIG_PATTERNS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    *(f"{component}/config.json" for component in COMPONENTS),
]
# Weight file stems (diffusers' models, transformers' text encoder) per format.
_STEMS = {
    fmt: {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": text_encoder}
    for fmt, text_encoder in (("safetensors", "model"), ("bin", "pytorch_model"))
}
# Key prefixes of each component in an original-layout checkpoint ("vae." in a few merges).
_LDM_PREFIXES = {
    "unet": ("model.diffusion_model.",),
    "vae": ("first_stage_model.", "vae."),
    "text_encoder": ("cond_stage_model.",),
}
_LDM_CLIP_KEY = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
_LDM_OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class _HubFailure(SourceError):
    """A failed hub download; ``problem`` is the message without its fix, for wrapping."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}: {fix}")
        self.problem = problem


# -- small file helpers -----------------------------------------------------------------------


def _read_json(path: Path, missing: str) -> dict[str, Any]:
    """Parse a JSON file; ``missing`` says what its absence means and how to fix it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path} does not exist: {missing}") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read {path} ({type(e).__name__}: {e}): repair or re-download it") from None


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
    weight_map = _read_json(index, "").get("weight_map")
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


def _file_identities(paths: Iterable[Path]) -> Iterator[str]:
    """Cheap identities of files: JSON and text by content, weights by size and mtime."""
    for path in sorted(p for p in paths if p.is_file()):
        if path.suffix in (".json", ".txt"):
            yield f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}"
        else:
            stat = path.stat()
            yield f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


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
        raise _HubFailure(*_hub_problem(e, repo_id, revision)) from None


# -- reading checkpoint files -----------------------------------------------------------------


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


def _read_shapes(path: Path) -> dict[str, torch.Size]:
    """Every tensor's name and shape; for safetensors from the header alone."""
    if path.suffix != ".safetensors":
        return {k: v.shape for k, v in _load_pickle(path).items()}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise SourceError(f"cannot read {path} as safetensors ({type(e).__name__}): re-download it") from None


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


# -- where a pipeline's files are: a diffusers layout, or one checkpoint file ------------------


@dataclass
class _Folder:
    """A diffusers pipeline layout on disk; for the hub, a snapshot that fetches weights lazily."""

    root: Path
    where: str  # how messages name it
    allow_pickle: bool
    repo: tuple[str, str] | None = None  # (repo id, commit) of a hub snapshot

    def config(self, component: str) -> dict[str, Any]:
        missing = f"{self.where} has no {component}; pass a full pipeline"
        return _read_json(self.root / component / "config.json", missing)

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
                _read_shapes(path)  # the header: a truncated file fails here, not after other work

    def load(self, component: str) -> torch.nn.Module:
        self.config(component)  # a missing component fails here, with the clearest message
        safetensors = self._weights(component) == "safetensors"
        try:
            with _quiet_loading():  # their warnings would repeat, in many lines, what is raised below
                model, info = self._from_pretrained(component, safetensors)
        except (MemoryError, SourceError):
            raise
        except Exception as e:  # diffusers / transformers: size mismatches, damaged files, ...
            raise SourceError(
                f"cannot load the {component} of {self.where} ({_summary(e)}): re-download it, or fix"
                f" {component}/config.json if it does not describe these weights"
            ) from None
        # Both libraries load leniently: a tensor the files lack keeps its random initial value,
        # one they have in excess is dropped; either way the result is not the checkpoint.
        problems = {kind: sorted(map(str, info.get(f"{kind}_keys") or ())) for kind in ("missing", "unexpected", "mismatched")}
        if any(problems.values()):
            counts = ", ".join(f"{len(keys)} {kind}" for kind, keys in problems.items() if keys)
            example = next(keys[0] for keys in problems.values() if keys)
            raise SourceError(
                f"the {component} weights of {self.where} do not match {component}/config.json ({counts} tensors,"
                f" e.g. {example}): re-download them, or fix the config if it does not describe them"
            )
        return model

    def _from_pretrained(self, component: str, safetensors: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The diffusers / transformers module and its loading report (missing keys, ...)."""
        if component == "text_encoder":
            from transformers import CLIPTextModel

            return CLIPTextModel.from_pretrained(
                self.root / component,
                dtype=torch.float32,
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
            torch_dtype=torch.float32,
            use_safetensors=safetensors,
            # diffusers defaults to True, then warns on every load that accelerate is missing.
            low_cpu_mem_usage=is_accelerate_available(),
            output_loading_info=True,
        )

    def identity(self, component: str) -> Iterator[str]:
        if self.repo:  # a commit pins every file
            yield f"hub:{self.repo[0]}@{self.repo[1]}"
        else:
            yield from _file_identities((self.root / component).glob("*"))


@dataclass
class _SingleFile:
    """An original-layout checkpoint file, with a diffusers layout that supplies its configs."""

    path: Path
    configs: _Folder
    shapes: dict[str, torch.Size]  # every tensor's name and shape, from the header

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
        stat = self.path.stat()
        yield f"{self.path}:{stat.st_size}:{stat.st_mtime_ns}"
        # The config only: weights that may sit beside it in the config source are not these.
        yield from _file_identities([self.configs.root / component / "config.json"])


# -- the public object ------------------------------------------------------------------------


@dataclass
class Source:
    """A checkpoint of known family whose components load one at a time."""

    kind: str  # "hub" | "folder" | "single-file"
    id: str  # hub repo id, or absolute path
    revision: str | None  # resolved hub commit hash when known
    family: str  # "sd1" | "sd2"
    prediction_type: str  # from the scheduler config
    _files: _Folder | _SingleFile = field(repr=False, compare=False)

    def has_config(self, component: str) -> bool:
        """Whether the pipeline has ``component`` (``unet``, ``vae``, ``text_encoder``) at all."""
        layout = self._layout()
        return (layout.root / component / "config.json").is_file()

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

    def _layout(self) -> _Folder:
        """The diffusers layout holding tokenizer and scheduler (for a single file: its config)."""
        return self._files.configs if isinstance(self._files, _SingleFile) else self._files

    def scheduler_config(self) -> dict[str, Any]:
        layout = self._layout()
        path = layout.root / "scheduler" / "scheduler_config.json"
        return _read_json(path, f"{layout.where} has no scheduler; pass a full pipeline")

    def tokenizer_files(self) -> tuple[Path, Path, str]:
        """``vocab.json``, ``merges.txt`` and the pad token string of the CLIP tokenizer."""
        layout = self._layout()
        folder = layout.root / "tokenizer"
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise SourceError(f"{layout.where} has no tokenizer/{name}: pass a full pipeline")
        return folder / "vocab.json", folder / "merges.txt", _pad_token(folder, self.family)

    def fingerprint(self, component: str) -> str:
        """A cheap identity of one component's weights and config; it changes when they change.

        Components: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``. For the hub
        the commit; for local files the contents of configs and tokenizer files, and the sizes and
        modification times of weight files (hashing gigabytes would not be cheap).
        """
        if component in COMPONENTS:
            parts = self._files.identity(component)
        elif component in ("tokenizer", "scheduler"):
            parts = self._layout().identity(component)
        else:
            raise ValueError(f"unknown component {component!r}")
        digest = hashlib.sha256(f"{self.kind}:{self.family}:{component}".encode())
        for part in parts:
            digest.update(b"\0" + part.encode())
        return digest.hexdigest()


def _pad_token(folder: Path, family: str) -> str:
    """The pad token named by the tokenizer's JSON files, else the family's."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            pad = _read_json(folder / name, "").get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad  # a serialised AddedToken
            if isinstance(pad, str):
                return pad
    return "!" if family == "sd2" else "<|endoftext|>"


# -- opening ----------------------------------------------------------------------------------


def _open_layout(layout: _Folder, kind: str, id: str) -> Source:
    """Check a diffusers layout holds an SD 1.x/2.x pipeline; read family and prediction type."""
    index = _read_json(
        layout.root / "model_index.json",
        f"{layout.where} is not a diffusers pipeline; pass the folder holding model_index.json",
    )
    check_pipeline(index, layout.where)
    unet = layout.config("unet")
    check_unet(unet, layout.where)
    text_encoder = layout.root / "text_encoder" / "config.json"
    scheduler_path = layout.root / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_path, f"{layout.where} has no scheduler; pass a full pipeline")
    return Source(
        kind=kind,
        id=id,
        revision=layout.repo[1] if layout.repo else None,
        family=detect_family(unet, _read_json(text_encoder, "") if text_encoder.is_file() else None),
        prediction_type=scheduler.get("prediction_type", "epsilon"),  # diffusers' default
        _files=layout,
    )


def _open_hub(repo_id: str, revision: str | None, allow_pickle: bool) -> _Folder:
    """Fetch a hub repo's configs (no weights); the snapshot's name is the resolved commit."""
    root = _hub_snapshot(repo_id, revision, CONFIG_PATTERNS)
    return _Folder(root, f"hub repo {repo_id}", allow_pickle, repo=(repo_id, root.name))


def _config_layout(config: str, allow_pickle: bool) -> _Folder:
    """The diffusers folder or hub repo that supplies a single file's configs."""
    path = Path(config).expanduser()
    if path.is_dir():
        return _Folder(path.resolve(), str(path.resolve()), allow_pickle)
    if not _REPO_ID.fullmatch(config):
        raise SourceError(f"--config {config} is neither a folder nor a hub repo id (org/name): {CONFIG_FIX}")
    return _open_hub(config, None, allow_pickle)


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


def _check_against_config(shapes: dict[str, torch.Size], source: Source) -> None:
    """Cheap early check that the checkpoint has the config's text width and encoder family."""
    where, config_where = source.id, source._layout().where
    unet_keys = (k for k in shapes if k.startswith("model.diffusion_model."))
    to_k = sorted(k for k in unet_keys if k.endswith("attn2.to_k.weight"))  # cross-attention keys
    width = source.config("unet").get("cross_attention_dim")
    if to_k and shapes[to_k[0]][1] != width:
        raise SourceError(
            f"{where} cross-attends to {shapes[to_k[0]][1]}-wide text embeddings, the config of {config_where}"
            f" to {width}-wide ones: {CONFIG_FIX} matching the checkpoint"
        )
    layout = "sd2" if _LDM_OPEN_CLIP_KEY in shapes else "sd1" if _LDM_CLIP_KEY in shapes else None
    if layout and layout != source.family:
        raise SourceError(
            f"{where} has an {layout} text encoder, the config of {config_where} is {source.family}:"
            f" {CONFIG_FIX} matching the checkpoint"
        )


def _open_single_file(path: Path, allow_pickle: bool, config: str | None) -> Source:
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise pickle_refused(str(path))
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise SourceError(
            f"{path} is not a checkpoint type coreml-sd reads (.safetensors; with --allow-pickle also"
            f" {', '.join(PICKLE_SUFFIXES)}): pass a .safetensors file or a diffusers folder"
        )
    shapes = _read_shapes(path)
    _check_checkpoint(shapes, str(path))
    if config is not None:
        layout = _config_layout(config, allow_pickle)
    else:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config

        default = fetch_diffusers_config(_meta(shapes))["pretrained_model_name_or_path"]
        try:
            layout = _open_hub(default, None, allow_pickle)
        except _HubFailure as e:
            raise SourceError(
                f"{path} holds weights only, and {default}, diffusers' config repo for its type, cannot be"
                f" read ({e.problem}): {CONFIG_FIX}"
            ) from None
    configs = _open_layout(layout, "single-file", str(path))
    source = Source(
        kind="single-file",
        id=str(path),
        revision=None,
        family=configs.family,
        prediction_type=configs.prediction_type,
        _files=_SingleFile(path, layout, shapes),
    )
    _check_against_config(shapes, source)
    return source


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
    if config is not None and (path.is_dir() or (not path.exists() and _REPO_ID.fullmatch(source))):
        raise SourceError(f"--config applies to single-file checkpoints, not to {source}: drop --config")
    if path.is_dir():
        root = path.resolve()
        return _open_layout(_Folder(root, str(root), allow_pickle), "folder", str(root))
    if path.is_file():
        return _open_single_file(path.resolve(), allow_pickle, config)
    if path.exists():
        raise SourceError(f"{source} is neither a file nor a folder: pass a checkpoint or a diffusers folder")
    if _REPO_ID.fullmatch(source) and not source.endswith((".safetensors", *PICKLE_SUFFIXES)):
        return _open_layout(_open_hub(source, revision, allow_pickle), "hub", source)
    raise SourceError(
        f"{source} does not exist and is not a hub repo id (org/name): check the path, or pass a diffusers"
        " folder, a .safetensors checkpoint or a hub repo id"
    )
