"""Reading an original-layout (LDM / CompVis / SGM) Stable Diffusion checkpoint held in one file.

Such a file holds weights only, so architecture configs, tokenizer and scheduler come from a
:class:`~coreml_sd.convert.diffusers_folder.DiffusersFolder`: the one given with ``--config`` (a
diffusers folder, a hub id, or the name of a built-in architecture) or, without it, the built-in
architecture (``architectures``) that every tensor of the file fits, by name and shape. The
prediction type comes from that scheduler config too, as the weights do not say: an SD 2.x file
fits both SD 2.x architectures, and is taken for the 768-pixel v-prediction one (diffusers' choice
for every SD 2.x file) unless its metadata says epsilon (``prediction_hint``).

:func:`read_checkpoint` reads the tensor names and shapes (a ``.safetensors`` file's header
alone) and refuses what is no SD 1.x / 2.x / XL checkpoint, judged by diffusers' own detector.
Pickled checkpoints (``.ckpt`` ...) can run code when read and need ``allow_pickle``.
:class:`SingleFile` maps one part's tensors to diffusers' names with diffusers' ``single_file_utils``
converters and requires them to fit the config exactly: on the meta device when opening (shapes
only, cheap), and again when loading the part's weights, one part at a time.

Where each part sits in a file (SDXL's ``conditioner.embedders`` keep SGM's numbering):

=================  ==========================  ==========================  ==========================
part               SD 1.x                      SD 2.x                      SDXL base / refiner
=================  ==========================  ==========================  ==========================
unet               model.diffusion_model.      model.diffusion_model.      model.diffusion_model.
vae                first_stage_model.          first_stage_model.          first_stage_model.
text_encoder       cond_stage_model.           cond_stage_model.model.     conditioner.embedders.0.
                   transformer. (HF CLIP)      (OpenCLIP)                  transformer. / (none)
text_encoder_2     (none)                      (none)                      conditioner.embedders.1.
                                                                           model. / .0.model.
=================  ==========================  ==========================  ==========================
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .architectures import ARCHITECTURES, shipped
from .diffusers_folder import DiffusersFolder, _summary, file_identities, is_repo_id, safetensors_shapes
from .support import COMPONENTS, CONFIG_FIX, PICKLE_SUFFIXES, SourceError, check_in_channels, pickle_refused, unsupported

__all__ = ["SingleFile", "config_folder", "infer_architecture", "prediction_hint", "read_checkpoint", "text_layout"]

_UNET, _VAES = "model.diffusion_model.", ("first_stage_model.", "vae.")  # "vae." in a few merges
# A text encoder's tensors: transformers' CLIP layout under ``transformer.``, OpenCLIP's under ``model.``.
_TEXT = re.compile(r"(cond_stage_model\.|conditioner\.embedders\.\d+\.)(transformer|model)\.")
# What messages name when a file lacks a part.
_EXPECTED = {"unet": _UNET, "vae": _VAES[0], "text_encoder": "cond_stage_model.",
             "text_encoder_2": "conditioner.embedders.1.model."}
# The built-in architectures a text encoder layout allows; SD 2.x's first is diffusers' choice.
_CANDIDATES = {"sd1": ("sd15",), "sd2": ("sd2-768-v", "sd2-512"), "sdxl": ("sdxl-base",),
               "sdxl-refiner": ("sdxl-refiner",)}


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
    """Text-encoder tensors of a checkpoint that a model without a place for them may leave out."""
    match = re.match(r"(?:text_model\.)?encoder\.layers\.(\d+)\.", key)
    # SD 2.x conditions on OpenCLIP's penultimate layer: the checkpoint's last layer is unused,
    # as is its text projection (SDXL's second encoder has a place for its own); SD 1.x files
    # carry a position-id buffer transformers rebuilds.
    beyond = match is not None and int(match.group(1)) >= num_layers
    return beyond or key.endswith("position_ids") or key.startswith("text_projection")


def file_parts(shapes: dict[str, torch.Size]) -> dict[str, str]:
    """The parts (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) a checkpoint holds, each
    with the key prefix of its tensors. SDXL's OpenCLIP encoder (under ``model.``) is its second."""
    parts: dict[str, str] = {}
    for key in shapes:
        if key.startswith(_UNET):
            parts.setdefault("unet", _UNET)
        elif key.startswith(_VAES):
            parts.setdefault("vae", next(p for p in _VAES if key.startswith(p)))
        elif match := _TEXT.match(key):
            second = match[1].startswith("conditioner.") and match[2] == "model"
            parts.setdefault("text_encoder_2" if second else "text_encoder", match[0])
    return {part: parts[part] for part in COMPONENTS if part in parts}  # the UNet first: it tells most


def text_layout(shapes: dict[str, torch.Size]) -> str | None:
    """The family the text encoders of a checkpoint belong to (``sd1``, ``sd2``, ``sdxl``,
    ``sdxl-refiner``; as diffusers' detector tells SDXL's base from its refiner: by the embedder
    OpenCLIP sits in), or None for a file without text encoder."""
    parts = file_parts(shapes)
    if "text_encoder_2" in parts:
        return "sdxl-refiner" if parts["text_encoder_2"].startswith("conditioner.embedders.0.") else "sdxl"
    prefix = parts.get("text_encoder")
    if prefix is None:
        return None
    return "sdxl" if prefix.startswith("conditioner.") else "sd2" if prefix.endswith(".model.") else "sd1"


# -- opening: what the file is, and where its configs come from ------------------------------


def read_checkpoint(path: Path, allow_pickle: bool) -> dict[str, torch.Size]:
    """Every tensor's name and shape in the checkpoint at ``path``, once it is known to be an
    SD 1.x / 2.x / XL original-layout checkpoint of a type coreml-sd reads; else ``SourceError``."""
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


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` header (empty for pickles and files without)."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def _check_checkpoint(shapes: dict[str, torch.Size], where: str) -> None:
    """Refuse files that are not SD 1.x / 2.x / XL original-layout checkpoints (diffusers' detector)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not file_parts(shapes):
        raise SourceError(
            f"{where} has no Stable Diffusion tensors (model.diffusion_model.*, first_stage_model.*,"
            " cond_stage_model.*, conditioner.embedders.*), so it is no full original-layout checkpoint"
            " (a LoRA? an embedding?): pass a full SD checkpoint or a diffusers folder"
        )
    try:
        model_type = infer_diffusers_model_type(_meta(shapes))
    except Exception:  # a detector branch that needs values, not shapes: no SD checkpoint anyway
        model_type = "unknown"
    if "inpaint" in model_type:
        raise unsupported(where, "an inpainting checkpoint")
    # diffusers calls whatever it does not recognise "v1": the shapes decide later whether it is.
    if model_type not in ("v1", "v2", "xl_base", "xl_refiner"):
        raise unsupported(where, f"a checkpoint of another model ({model_type}, as diffusers calls it)")
    conv_in = shapes.get(_UNET + "input_blocks.0.0.weight")
    if conv_in is not None:
        check_in_channels(conv_in[1], where)


def config_folder(config: str, allow_pickle: bool) -> DiffusersFolder:
    """The diffusers layout ``--config`` names: a folder, a built-in architecture, or a hub repo id."""
    folder = Path(config).expanduser()
    if folder.is_dir():
        return DiffusersFolder.local(folder, allow_pickle)
    if config in ARCHITECTURES:
        return shipped(config, allow_pickle)
    if not is_repo_id(config):
        raise SourceError(
            f"--config {config} is neither a folder, a hub repo id (org/name) nor a built-in architecture"
            f" ({', '.join(ARCHITECTURES)}): {CONFIG_FIX}"
        )
    return DiffusersFolder.from_hub(config, None, allow_pickle)  # a hub failure names its fix


def prediction_hint(shapes: dict[str, torch.Size], metadata: dict[str, str]) -> str | None:
    """What a checkpoint says it predicts, ``"v"`` or ``"epsilon"``, if it says: Stability's
    ModelSpec metadata (``modelspec.architecture``, ``modelspec.prediction_type``, written by
    Stability's releases and kohya's trainers) or an empty ``v_pred`` tensor (ComfyUI's marker)."""
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.startswith("stable-diffusion-v2-"):
        return "v" if architecture.endswith("-v") else "epsilon"
    declared = metadata.get("modelspec.prediction_type", "").lower().replace("-", "_")
    if declared in ("v", "v_prediction"):
        return "v"
    if declared == "epsilon":
        return "epsilon"
    return "v" if "v_pred" in shapes else None


def infer_architecture(
    path: Path, shapes: dict[str, torch.Size], metadata: dict[str, str], allow_pickle: bool = False
) -> SingleFile:
    """``path`` with the built-in architecture its tensors fit, by name and shape; without one, a
    ``SourceError`` naming ``--config``."""
    layout = text_layout(shapes)
    if layout is None and "unet" not in file_parts(shapes):
        raise SourceError(f"{path} holds neither UNet nor text encoder, whose shapes tell an architecture: {CONFIG_FIX}")
    fitting, closest = [], None
    for name in _CANDIDATES.get(layout, tuple(ARCHITECTURES)):
        files = SingleFile(path, shipped(name, allow_pickle), shapes)
        problem = next(((part, p) for part in files.parts if (p := files.problem(part))), None)
        if problem is None:
            fitting.append(files)
        elif closest is None:
            closest = (name, *problem)
    if not fitting:
        name, part, problem = closest
        raise SourceError(
            f"{path} fits no architecture coreml-sd knows without --config (its {part} differs from"
            f" {ARCHITECTURES[name].label}'s: {problem}): {CONFIG_FIX} with its architecture"
        )
    hint = prediction_hint(shapes, metadata)
    names = [f.configs.root.name for f in fitting]  # both SD 2.x ones, or one
    files = fitting[names.index("sd2-512")] if hint == "epsilon" and "sd2-512" in names else fitting[0]
    predicts = files.configs.scheduler_config().get("prediction_type", "epsilon")
    if hint == "v" and predicts != "v_prediction":
        label = ARCHITECTURES[files.configs.root.name].label
        raise SourceError(
            f"{path} has {label}'s architecture but says it predicts v, and coreml-sd's built-in {label}"
            f" config predicts epsilon: {CONFIG_FIX} whose scheduler config has prediction_type v_prediction"
        )
    return files


# -- the file ---------------------------------------------------------------------------------


@dataclass
class SingleFile:
    """An original-layout checkpoint file, with a diffusers layout that supplies its configs."""

    path: Path
    configs: DiffusersFolder
    shapes: dict[str, torch.Size]  # every tensor's name and shape, from read_checkpoint
    parts: dict[str, str] = field(init=False)  # the parts the file holds, each with its key prefix

    def __post_init__(self) -> None:
        self.parts = file_parts(self.shapes)

    def check_against_config(self, family: str) -> None:
        """Check every part the file holds fits the config, by shapes alone (no tensor is read).

        Cheap checks with the clearest messages first: the UNet's text width, the text encoders' family.
        """
        where, config_where = str(self.path), self.configs.where
        to_k = sorted(k for k in self.shapes if k.startswith(_UNET) and k.endswith("attn2.to_k.weight"))
        width = self.config("unet").get("cross_attention_dim")
        if to_k and self.shapes[to_k[0]][1] != width:
            raise SourceError(
                f"{where} cross-attends to {self.shapes[to_k[0]][1]}-wide text embeddings, the config of"
                f" {config_where} to {width}-wide ones: {CONFIG_FIX} matching the checkpoint"
            )
        layout = text_layout(self.shapes)
        if layout and layout != family:
            raise SourceError(
                f"{where} has the text encoders of an {layout} checkpoint, the config of {config_where} is"
                f" {family}: {CONFIG_FIX} matching the checkpoint"
            )
        for part in self.parts:
            if self.configs.has_config(part) and (problem := self.problem(part)):
                raise self._mismatch(part, problem)

    def config(self, component: str) -> dict[str, Any]:
        return self.configs.config(component)

    def _tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Read the tensors under ``prefix`` only (one part), keeping peak memory low."""
        if self.path.suffix != ".safetensors":
            return {k: v for k, v in _load_pickle(self.path).items() if k.startswith(prefix)}
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}

    def check_weights(self, component: str) -> None:
        """Fail now if the file lacks one part's tensors (the header says; nothing is read)."""
        self.config(component)
        if component not in self.parts:
            raise SourceError(
                f"{self.path} has no {component} weights ({_EXPECTED[component]}*): convert a checkpoint that has them"
            )

    def _model(self, component: str, device: str = "meta") -> torch.nn.Module:
        """The diffusers / transformers module of ``component``, empty. The UNet and VAE are built
        on the meta device, to be filled by assignment (one copy of the weights in memory); a text
        encoder to be loaded is built on the CPU: CLIP has a non-persistent buffer assignment would miss."""
        if component.startswith("text_encoder"):
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            # SDXL's second encoder adds the projection of its pooled output (text_embeds).
            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            with torch.device(device):
                return cls(CLIPTextConfig.from_pretrained(self.configs.root / component))
        from diffusers import AutoencoderKL, UNet2DConditionModel

        cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
        with torch.device("meta"):
            return cls.from_config(self.config(component))

    def _state(self, component: str, model: torch.nn.Module, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors of ``component`` under ``model``'s names (diffusers' converters)."""
        from diffusers.loaders import single_file_utils as sfu

        prefix = self.parts[component]
        if component == "unet":
            return sfu.convert_ldm_unet_checkpoint(checkpoint, self.config(component))
        if component == "vae":
            return sfu.convert_ldm_vae_checkpoint(checkpoint, self.config(component))
        if prefix.endswith(".transformer."):  # transformers' own layout under a prefix
            state = sfu.convert_ldm_clip_checkpoint(checkpoint, remove_prefix=prefix)
        else:  # OpenCLIP's, with fused q/k/v and a transposed projection
            state = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
        # transformers >= 5.6 flattened CLIPTextModel; diffusers' converters still emit `text_model.*`.
        if not hasattr(model, "text_model"):
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        expected, layers = model.state_dict(), model.config.num_hidden_layers
        return {k: v for k, v in state.items() if k in expected or not _ignorable(k, layers)}

    def _mapped(
        self, component: str, model: torch.nn.Module, checkpoint: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        """``_state``, and what keeps it from fitting ``model`` exactly (None when it fits)."""
        try:
            state = self._state(component, model, checkpoint)
        except (KeyError, IndexError, ValueError, RuntimeError, AttributeError, TypeError) as e:  # other shapes
            return None, f"its tensors do not map onto it, {_summary(e)}"
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
        if not (missing or unexpected or wrong):
            return state, None
        example = (wrong or missing or unexpected)[0]
        counts = f"{len(wrong)} shapes differ, {len(missing)} tensors missing, {len(unexpected)} unexpected"
        return state, f"{counts}, e.g. {example}"

    def problem(self, component: str) -> str | None:
        """Why the file's ``component`` does not fit the config exactly, judged by shapes alone."""
        if not self.configs.has_config(component):
            return f"{self.configs.where} has no {component}"
        prefix = self.parts[component]
        checkpoint = _meta({k: s for k, s in self.shapes.items() if k.startswith(prefix)})
        return self._mapped(component, self._model(component), checkpoint)[1]

    def _mismatch(self, component: str, problem: str) -> SourceError:
        return SourceError(
            f"{self.path}: its {component} does not match the config of {self.configs.where} ({problem}):"
            f" {CONFIG_FIX} of the same architecture"
        )

    def load(self, component: str) -> torch.nn.Module:
        """Map the part's tensors with diffusers' single-file converters; load them exactly.

        diffusers' own single-file loaders load non-strictly, which would leave a truncated or
        mismatched checkpoint's missing tensors at their random initial values.
        """
        self.check_weights(component)
        model = self._model(component, device="cpu")
        state, problem = self._mapped(component, model, self._tensors(self.parts[component]))
        if problem:
            raise self._mismatch(component, problem)
        state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=not component.startswith("text_encoder"))
        return model

    def identity(self, component: str) -> Iterator[str]:
        """What ``Source.fingerprint`` hashes for one part: the file, and the part's config."""
        stat = self.path.stat()
        yield f"{self.path}:{stat.st_size}:{stat.st_mtime_ns}"
        # The config only: weights that may sit beside it in the config source are not these.
        yield from file_identities([self.configs.root / component / "config.json"])

