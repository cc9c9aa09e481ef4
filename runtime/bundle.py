"""Opening a bundle for the runtime, whatever its layout: ours (``manifest.json``, see
``coreml_sd.contract``), or one of the Core ML layouts Apple publishes.

Imports neither torch nor coremltools at module level.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contract import (
    APPLE_PACKAGE_PREFIX,
    APPLE_SUBMODULES,
    MANIFEST,
    MERGES,
    SCHEDULER_CONFIG,
    SD15_SCHEDULER_CONFIG,
    VOCAB,
    BundleError,
    read_manifest,
    verify_files,
)
from ..families import FAMILIES, MODEL_NAMES, SD1, SD2, SDXL, SDXL_REFINER, Family

__all__ = ["Bundle", "BundleError", "ModelFiles", "describe_shapes", "open_bundle", "refiner_of", "verify_cached"]


# ------------------------------------------------------------------ opening a bundle for the runtime

# What a bundle without a scheduler config gets (Apple's layouts): SD 1.5's, noise prediction.
DEFAULT_SCHEDULER = {**SD15_SCHEDULER_CONFIG, "prediction_type": "epsilon"}
# An SDXL one: stabilityai/stable-diffusion-xl-base-1.0's (and its refiner's) scheduler_config.json,
# SD 1.5's noise schedule run by Euler over "leading" timesteps.
DEFAULT_XL_SCHEDULER = {**DEFAULT_SCHEDULER, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading",
                        "interpolation_type": "linear", "use_karras_sigmas": False}
# diffusers' ``force_zeros_for_empty_prompt`` where a bundle does not record it (Apple's layouts):
# what the published model_index.json files say, true for stabilityai's SDXL base, false for its
# refiner. SD 1.x / 2.x encode an empty negative prompt like any other.
FORCE_ZEROS = {SDXL.name: True, SDXL_REFINER.name: False}


@dataclass
class ModelFiles:
    """Where one component lives: a package, a compiled model, or both; several when chunked."""

    packages: list[Path] = field(default_factory=list)
    compiled: list[Path] = field(default_factory=list)
    precision: str | None = None  # "float16" | "float32" as the manifest records it; None: not recorded


@dataclass
class Bundle:
    """Everything the runtime needs from a bundle directory, whatever its layout."""

    path: Path
    layout: str  # "coreml-sd" | "apple-packages" | "apple-compiled"
    models: dict[str, ModelFiles]
    vocab: Path
    merges: Path
    scheduler_config: dict[str, Any]
    family: str
    prediction_type: str
    image_size: tuple[int, int]  # (height, width) pixels
    unet_batch: int
    pad_token: str
    vae_scaling: float
    name: str  # the model's name for image metadata
    manifest: dict[str, Any] | None = None
    # SDXL: no negative prompt conditions on zeros instead of an encoded "" (diffusers'
    # ``force_zeros_for_empty_prompt``).
    force_zeros: bool = False
    # Every size the UNet and VAE models take, (height, width) -> the function of their
    # multifunction packages that takes it (None: a package's only function), default first as
    # the manifest lists them; empty: one size, ``image_size`` (Apple's layouts, older bundles).
    size_functions: dict[tuple[int, int], str | None] = field(default_factory=dict)
    function: str | None = None  # the function of ``image_size`` (see ``at``)

    @property
    def spec(self) -> Family:
        """The family's description: components, conditioning, constants."""
        return FAMILIES[self.family]

    @property
    def unet(self) -> str:
        """The denoiser's model name: "Unet", or "UnetRefiner" for an SDXL refiner."""
        return self.spec.unet

    @property
    def latent_size(self) -> tuple[int, int]:
        scale = self.spec.vae_scale
        return self.image_size[0] // scale, self.image_size[1] // scale

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The (height, width) pixel sizes this bundle generates, its default (first) first."""
        return tuple(self.size_functions) or (self.image_size,)

    def at(self, height: int, width: int) -> Bundle:
        """This bundle at another of its sizes: a copy whose ``image_size`` is (height, width) and
        whose UNet and VAE models load with that size's function; ``BundleError`` (one line
        listing its sizes) for a size it was not converted for."""
        if (height, width) not in self.sizes:
            if len(self.sizes) == 1:
                h, w = self.sizes[0]
                raise BundleError(f"this bundle was converted for {w}x{h} images; re-convert with --width/--height "
                                  f"to generate {width}x{height}")
            have = ", ".join(f"{w}x{h}" for h, w in self.sizes)
            raise BundleError(f"this bundle has no {width}x{height} size: it has {have}; "
                              "re-convert with --sizes to add one")
        return dataclasses.replace(self, image_size=(height, width), function=self.size_functions.get((height, width)))

    def function_of(self, component: str) -> str | None:
        """The function ``component`` loads with at ``image_size``: the size's for the UNet and
        VAE models, None (their only one) for the text encoders, which take no image size."""
        return None if component in self.spec.conditioning.models else self.function

    def has(self, component: str) -> bool:
        files = self.models.get(component)
        return bool(files and (files.packages or files.compiled))


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle: ours (``manifest.json``), or one of Apple's published layouts (a
    ``packages/`` folder of long-named ``.mlpackage`` files, or a compiled ``Resources``-style
    folder of ``.mlmodelc`` with ``vocab.json`` and ``merges.txt``), detected automatically.
    ``verify`` checks every file of ours against its sha256 (cached per file size and mtime)."""
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise BundleError(f"{root} is a file, not a bundle; pass the bundle's folder (the one 'coreml-sd convert' wrote)")
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory; convert one with 'coreml-sd convert'")
    staging = re.fullmatch(r"\.(.+)\.partial", _absolute(root).name)  # convert's staging folder, see convert/bundle.py
    if staging:
        raise BundleError(f"{root} is an unfinished conversion (the staging folder of {staging.group(1)!r}); finish it by "
                          "running the same 'coreml-sd convert' command again")
    if (root / MANIFEST).exists():
        return _open_ours(root, verify)
    ours = sorted(name for name in _OUR_PACKAGES if (root / name).exists())
    if ours:  # Apple's packages have long names; bare-named packages are only ever ours
        raise BundleError(f"{root} has coreml-sd models ({', '.join(ours)}) but no {MANIFEST}: it is damaged or incomplete; "
                          "re-run 'coreml-sd convert'")
    if any(root.glob("*.mlmodelc")):
        return _open_apple(root, "apple-compiled")
    if any(root.glob("*.mlpackage")):
        return _open_apple(root, "apple-packages")
    raise BundleError(f"{root}: neither a coreml-sd bundle (manifest.json) nor a folder of Core ML models")


# The package names our bundles use ("Unet.mlpackage"); Apple's carry a long prefix.
_OUR_PACKAGES = {f"{name}.mlpackage" for name in MODEL_NAMES}


def _absolute(path: Path) -> Path:
    """``path`` made absolute without resolving symlinks, as the shell spells it ("." has a name)."""
    return Path(os.path.abspath(path))


def _open_ours(root: Path, verify: bool) -> Bundle:
    manifest = read_manifest(root)
    files = _field(root, manifest, "files", lambda v: isinstance(v, dict) and all(
        _relative(k) and isinstance(h, str) for k, h in v.items()), "a table of file -> sha256")
    if verify:
        verify_cached(root, files)
    components = _field(root, manifest, "components", lambda v: isinstance(v, dict), "a table of components")
    models = {}
    for name in components:
        files_of = ModelFiles()
        for key, into in (("package", files_of.packages), ("compiled", files_of.compiled)):
            rel = _field(root, manifest, f"components.{name}.{key}", lambda v: v is None or _relative(v),
                         "a path inside the bundle", required=False)
            if rel:
                into.append(root / rel)
        files_of.precision = _field(root, manifest, f"components.{name}.precision", lambda v: v in (None, "float16", "float32"),
                                    "float16 or float32", required=False)
        models[name] = files_of
    try:
        scheduler = json.loads((root / SCHEDULER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{root}: unreadable {SCHEDULER_CONFIG} ({exc}); re-run 'coreml-sd convert'") from None
    if not isinstance(scheduler, dict):
        raise BundleError(f"{root}: {SCHEDULER_CONFIG} is not a JSON object; re-run 'coreml-sd convert'")
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    source_id = source.get("id")
    if isinstance(source_id, str) and source_id:
        name = source_id if source.get("kind") == "hub" else Path(source_id).name
    else:
        name = root.resolve().name
    h, w = _field(root, manifest, "image_size",
                  lambda v: isinstance(v, list) and len(v) == 2 and all(_positive(d) and d % 8 == 0 for d in v),
                  "[height, width] in pixels, multiples of 8")
    family = _field(root, manifest, "family", lambda v: v in FAMILIES, " or ".join(FAMILIES))
    size_functions = _sizes(root, manifest, (h, w))
    force_zeros = _field(root, manifest, "conditioning.force_zeros_for_empty_prompt", lambda v: isinstance(v, bool),
                         "true or false", required=False)
    return Bundle(
        path=root,
        layout="coreml-sd",
        models=models,
        vocab=root / VOCAB,
        merges=root / MERGES,
        scheduler_config=scheduler,
        family=family,
        prediction_type=_field(root, manifest, "prediction_type", lambda v: v in ("epsilon", "v_prediction", "sample"),
                               "epsilon, v_prediction or sample"),
        image_size=(h, w),
        unet_batch=_field(root, manifest, "unet_batch", lambda v: v in (1, 2) and not isinstance(v, bool), "1 or 2"),
        pad_token=_field(root, manifest, "tokenizer.pad_token", lambda v: isinstance(v, str) and v != "", "a token"),
        vae_scaling=float(_field(root, manifest, "vae.scaling_factor", _positive_number, "a positive number")),
        name=name,
        manifest=manifest,
        force_zeros=FORCE_ZEROS.get(family, False) if force_zeros is None else force_zeros,
        size_functions=size_functions,
        function=size_functions.get((h, w)),
    )


def _sizes(root: Path, manifest: dict[str, Any], image_size: tuple[int, int]) -> dict[tuple[int, int], str | None]:
    """The manifest's ``sizes``, (height, width) -> function, first = ``image_size``; empty for
    one size without a function name, as ``Bundle.size_functions`` holds it (and for a manifest
    without sizes, converted before several sizes existed)."""
    def size(v: Any) -> bool:
        return (isinstance(v, dict) and all(_positive(v.get(k)) and v[k] % 8 == 0 for k in ("height", "width"))
                and (v.get("function") is None or isinstance(v["function"], str) and v["function"] != ""))

    sizes = _field(root, manifest, "sizes", lambda v: isinstance(v, list) and v and all(size(s) for s in v),
                   '[{"height", "width", "function"}, ...] in pixels, multiples of 8', required=False)
    if sizes is None:
        return {}
    table = {(s["height"], s["width"]): s.get("function") for s in sizes}
    functions = [f for f in table.values() if f is not None]
    if len(table) != len(sizes) or len(set(functions)) != len(functions) or next(iter(table)) != image_size \
            or (len(table) > 1 and len(functions) != len(table)):
        raise BundleError(f"{root}: {MANIFEST} field 'sizes' is {_show(sizes)}, expected distinct sizes, each with its "
                          f"own function, the first the image_size {list(image_size)}; {_RECONVERT}")
    return {} if table == {image_size: None} else table


def _field(root: Path, manifest: dict[str, Any], dotted: str, valid, expected: str, required: bool = True) -> Any:
    """``manifest[a][b]...`` for ``dotted`` = "a.b...", checked by ``valid``; a missing (if
    ``required``) or malformed field is a ``BundleError`` naming it."""
    value: Any = manifest
    keys = dotted.split(".")
    for depth, key in enumerate(keys):
        here = ".".join(keys[: depth + 1])
        if not isinstance(value, dict):
            parent = ".".join(keys[:depth])
            raise BundleError(f"{root}: {MANIFEST} field {parent!r} is {_show(value)}, expected a table; {_RECONVERT}")
        if key not in value:
            if not required:
                return None
            raise BundleError(f"{root}: {MANIFEST} has no field {here!r}; the bundle is damaged or not ours, {_RECONVERT}")
        value = value[key]
    try:
        ok = bool(valid(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise BundleError(f"{root}: {MANIFEST} field {dotted!r} is {_show(value)}, expected {expected}; {_RECONVERT}")
    return value


_RECONVERT = "re-convert the bundle with 'coreml-sd convert'"


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _relative(path: Any) -> bool:
    """A POSIX path that stays inside the bundle."""
    return isinstance(path, str) and path != "" and not path.startswith("/") and ".." not in path.split("/")


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _apple_models(root: Path, layout: str) -> dict[str, ModelFiles]:
    models: dict[str, ModelFiles] = {}
    for name, sub in APPLE_SUBMODULES.items():
        files = ModelFiles()
        if layout == "apple-compiled":
            chunks = [root / f"{name}Chunk{i}.mlmodelc" for i in (1, 2)]
            if all(c.is_dir() for c in chunks):  # the Swift package prefers chunks when both exist
                files.compiled = chunks
            elif (root / f"{name}.mlmodelc").is_dir():
                files.compiled = [root / f"{name}.mlmodelc"]
        else:
            chunks = [sorted(root.glob(f"*_{sub}_chunk{i}.mlpackage")) for i in (1, 2)]
            whole = sorted(root.glob(f"*_{sub}.mlpackage"))
            if all(len(c) == 1 for c in chunks):
                files.packages = [chunks[0][0], chunks[1][0]]
            elif len(whole) == 1:
                files.packages = whole
            elif len(whole) > 1:
                raise BundleError(f"{root}: several *_{sub}.mlpackage files; keep one model per folder")
        if files.packages or files.compiled:
            models[name] = files
    return models


def _open_apple(root: Path, layout: str) -> Bundle:
    models = _apple_models(root, layout)
    unet = "Unet" if "Unet" in models else "UnetRefiner"
    if unet not in models:
        raise BundleError(f"{root}: no Unet model in this {layout} folder; it is not a complete pipeline")
    # Tokenizer files sit beside compiled models; Apple's packages/ folders have none, so look in
    # the sibling compiled/ folder too: beside the folder as given first (a packages/ linked into
    # a model's folder), then beside the link's target.
    candidates = [d for here in dict.fromkeys((_absolute(root), root.resolve()))
                  for d in (here, here.parent / "compiled", here.parent)]
    tokenizer = next((d for d in candidates if (d / VOCAB).is_file() and (d / MERGES).is_file()), None)
    if tokenizer is None:
        raise BundleError(
            f"{root}: no {VOCAB} and {MERGES} here or in ../compiled; copy the CLIP tokenizer files beside the models"
        )
    inputs = _describe(models[unet])[0]
    sample = _sample_shape(root, inputs)
    family = _apple_family(root, models, inputs)
    if family is SDXL_REFINER and unet == "Unet":  # a refiner converted on its own: Apple names its UNet "Unet"
        models["UnetRefiner"] = models.pop("Unet")
    missing = [n for n in family.required if n not in models]
    if missing:
        raise BundleError(f"{root}: no {', '.join(missing)} model in this {layout} folder; "
                          f"it is not a complete {family.label} pipeline")
    _check_tokenizer(tokenizer, family.pad_token)
    return Bundle(
        path=root,
        layout=layout,
        models=models,
        vocab=tokenizer / VOCAB,
        merges=tokenizer / MERGES,
        scheduler_config=DEFAULT_XL_SCHEDULER if family.time_ids else DEFAULT_SCHEDULER,
        family=family.name,
        prediction_type="epsilon",  # Apple's Swift pipeline supports only noise prediction
        image_size=(sample[2] * family.vae_scale, sample[3] * family.vae_scale),
        unet_batch=sample[0],
        # diffusers pads SD 2.x prompts with "!" (Apple's Swift package pads all with the end token).
        pad_token=family.pad_token,
        vae_scaling=family.vae_scaling_factor,
        name=_apple_name(root, models[family.unet]),
        force_zeros=FORCE_ZEROS.get(family.name, False),
    )


def _sample_shape(root: Path, unet_inputs: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    sample = unet_inputs.get("sample")
    if sample is None or len(sample) != 4:
        raise BundleError(f"{root}: the UNet has no (batch, 4, height, width) 'sample' input; it is not a Stable Diffusion UNet")
    return sample


def _apple_family(root: Path, models: dict[str, ModelFiles], unet_inputs: dict[str, tuple[int, ...]]) -> Family:
    """The family of an Apple layout, told from its models as Apple's Swift package and Mochi
    Diffusion tell it: a UNet taking ``time_ids`` is SDXL's, its refiner's when they are 5 per
    batch item (``StableDiffusionXLPipeline.swift`` line 153; the base's are (2, 6), or (12,) in
    early conversions); without them, SD 2.x when the text encoder is 1024 wide, else SD 1.x."""
    time_ids = unet_inputs.get("time_ids")
    if time_ids is not None:
        return SDXL_REFINER if time_ids[-1] == 5 else SDXL
    if "TextEncoder" not in models:
        raise BundleError(f"{root}: no TextEncoder model in this folder; it is not a complete pipeline")
    hidden = _describe(models["TextEncoder"])[1].get("last_hidden_state")
    if hidden is None:
        raise BundleError(f"{root}: the text encoder has no last_hidden_state output and the UNet no time_ids input; "
                          "it is neither a Stable Diffusion 1.x/2.x nor an SDXL pipeline")
    return SD2 if hidden[-1] == 1024 else SD1


def refiner_of(bundle: Bundle) -> Bundle | None:
    """The SDXL refiner a bundle holds: the bundle itself (family sdxl-refiner), or, for an Apple
    folder holding a base and its refiner (``UnetRefiner`` beside ``Unet``), that refiner with the
    folder's ``TextEncoder2`` and VAE, as Apple's Swift pipeline runs it; None if it holds none."""
    if bundle.family == SDXL_REFINER.name:
        return bundle
    if bundle.family != SDXL.name or not bundle.has("UnetRefiner"):
        return None
    names = {c.name for c in SDXL_REFINER.components}
    models = {name: files for name, files in bundle.models.items() if name in names}
    sample = _sample_shape(bundle.path, _describe(models["UnetRefiner"])[0])
    scale = SDXL_REFINER.vae_scale
    return dataclasses.replace(
        bundle, family=SDXL_REFINER.name, models=models, image_size=(sample[2] * scale, sample[3] * scale),
        size_functions={}, function=None,
        unet_batch=sample[0], pad_token=SDXL_REFINER.pad_token, name=_apple_name(bundle.path, models["UnetRefiner"]),
        force_zeros=FORCE_ZEROS[SDXL_REFINER.name],
    )


def _check_tokenizer(folder: Path, pad_token: str) -> None:
    """Load the tokenizer files once, as the pipeline will: Apple's layouts have no manifest
    hashes to catch a damaged or foreign ``vocab.json`` or ``merges.txt`` before that."""
    from .tokenizer import CLIPTokenizer

    try:
        CLIPTokenizer.from_files(folder / VOCAB, folder / MERGES, pad_token=pad_token)
    except (OSError, ValueError, TypeError) as exc:
        if isinstance(exc, OSError) and exc.filename:
            reason = f"{Path(exc.filename).name}: {exc.strerror or exc}"
        elif isinstance(exc, json.JSONDecodeError):
            reason = f"{VOCAB} is not JSON: {exc.msg} at line {exc.lineno}"
        else:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"{folder}: unreadable CLIP tokenizer files ({reason}); copy {VOCAB} and {MERGES} again "
                          "from the model's repository (its compiled/ folder)") from None


# Folder names in Apple's repositories and app bundles that say nothing about the model.
_GENERIC_FOLDERS = {"compiled", "packages", "original", "split_einsum", "split_einsum_v2", "resources", "models"}


def _apple_name(root: Path, unet: ModelFiles) -> str:
    """The model's name for image metadata: from Apple's file names
    (``Stable_Diffusion_version_<model>_unet.mlpackage``), or the class name the Core ML
    compiler records for a compiled UNet (the same string), else the nearest folder name that is
    not one of the layout's own (``compiled``, ``split_einsum``, ``Resources``, ...)."""
    stem = unet.packages[0].stem if unet.packages else _generated_class_name(unet.compiled[0])
    if stem and stem.startswith(APPLE_PACKAGE_PREFIX):
        return re.sub(r"_(unet|refiner)(_chunk\d)?$", "", stem.removeprefix(APPLE_PACKAGE_PREFIX))
    folders = [root.resolve(), *root.resolve().parents]
    return next((f.name for f in folders if f.name and f.name.lower() not in _GENERIC_FOLDERS), "model")


def _generated_class_name(compiled: Path) -> str | None:
    """``generatedClassName`` from a compiled model's ``metadata.json`` (None if unreadable)."""
    from .backends import compiled_metadata

    try:
        name = compiled_metadata(compiled).get("generatedClassName")
    except (OSError, ValueError, IndexError):
        return None
    return name if isinstance(name, str) else None


def _describe(files: ModelFiles) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Input and output shapes of a model (first chunk's inputs, last chunk's outputs), read
    without loading it: from a package's spec, or a compiled model's metadata.json."""
    first = files.packages[0] if files.packages else files.compiled[0]
    last = files.packages[-1] if files.packages else files.compiled[-1]
    return describe_shapes(first)[0], describe_shapes(last)[1]


def describe_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    from .backends import BackendError, describe_model

    try:
        inputs, outputs = describe_model(path)
    except BackendError as exc:
        raise BundleError(str(exc)) from None
    return {n: d.shape for n, d in inputs.items()}, {n: d.shape for n, d in outputs.items()}


def _cache_file(root: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "coreml-sd" / "verified"
    return base / (hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32] + ".json")


def verify_cached(root: Path, files: dict[str, str]) -> None:
    """``verify_files``, skipping files whose size and mtime match a previous successful check
    (hashing a 1.6 GB UNet on every run would cost seconds)."""
    cache = _cache_file(root)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    checked: dict[str, list] = {}
    for rel, want in files.items():
        path = root / rel
        try:
            st = path.stat()
        except OSError:
            raise BundleError(f"{root}: missing file {rel}; the bundle is incomplete, re-run 'coreml-sd convert'") from None
        stamp = [want, st.st_size, st.st_mtime_ns]
        if known.get(rel) != stamp:
            verify_files(root, {rel: want})
        checked[rel] = stamp
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(checked))
    except OSError:
        pass  # a read-only home only costs the next run a full check
