"""A generation request checked against a bundle alone, before any model loads.

``coreml-sd generate`` calls ``check_setup`` and ``check_request`` ahead of ``Pipeline(...)``,
which loads models eagerly (unless ``reduce_memory``), so a bad option costs nothing;
``Pipeline.start`` calls the same functions.

SDXL's options follow diffusers' ``StableDiffusionXLPipeline``, with one difference of spelling:
an empty negative prompt ("", the default) means none was given, which diffusers spells
``negative_prompt=None``. So on a bundle whose manifest sets ``force_zeros_for_empty_prompt`` (the
SDXL base), no negative prompt conditions the negative branch on zeros, and a non-empty one on
its encoding; the empty text itself cannot be asked for.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .backends import default_backend
from .bundle import Bundle, BundleError, open_bundle, refiner_of
from .image import ImageError, fit_image
from .image import read_image as image_file
from .random import make_rng
from .schedulers import SCHEDULER_NAMES, SCHEDULERS, Scheduler, from_config


class GenerationError(Exception):
    """A request the bundle cannot serve (one-line message naming the fix)."""


# diffusers' StableDiffusionXLImg2ImgPipeline defaults, the published refiner's training values.
DEFAULT_AESTHETIC_SCORE, DEFAULT_NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5
DEFAULT_REFINER_START = 0.8  # diffusers' documented base/refiner split (denoising_end=0.8)


@dataclass(frozen=True)
class Request:
    """A generation request checked against a bundle (see ``check_request``); reusable: the
    same request gives the same images every time."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    scheduler: str | None  # None: the bundle's own
    seed: int
    num_images: int
    init_image: Image.Image | None  # already fitted to the image size
    strength: float | None  # img2img only
    rng: str
    # SDXL (see check_request): the second encoder's texts ("": the first's), the micro-conditioning
    # as (height, width) and (top, left) pixels, and the refiner's aesthetic scores.
    prompt_2: str = ""
    negative_prompt_2: str = ""
    original_size: tuple[int, int] | None = None  # None: the image size
    crop: tuple[int, int] = (0, 0)
    aesthetic_score: float = DEFAULT_AESTHETIC_SCORE
    negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE
    refiner: Bundle | None = None  # an SDXL refiner that finishes the base's generation
    refiner_start: float | None = None  # the fraction of the schedule the base denoises (with a refiner)
    image_size: tuple[int, int] | None = None  # (height, width), one of the bundle's sizes; None: its image_size

    @property
    def guided(self) -> bool:
        """Classifier-free guidance on; as in diffusers, a scale <= 1 runs the text branch only
        (and the negative prompt is not used)."""
        return self.guidance_scale > 1.0

    @property
    def texts(self) -> tuple[str, str]:
        """The prompt each text encoder reads, in the family's order (diffusers: ``prompt_2 or prompt``)."""
        return self.prompt, self.prompt_2 or self.prompt

    @property
    def negative_texts(self) -> tuple[str, str]:
        return self.negative_prompt, self.negative_prompt_2 or self.negative_prompt

    @property
    def negative_given(self) -> bool:
        """A negative prompt was given (diffusers: ``negative_prompt is not None``)."""
        return bool(self.negative_prompt or self.negative_prompt_2)


def check_request(
    bundle: Bundle,
    prompt: str,
    negative_prompt: str = "",
    steps: int = 20,
    guidance_scale: float = 7.5,
    scheduler: str | None = None,
    seed: int | None = None,
    num_images: int = 1,
    init_image: Image.Image | str | Path | None = None,
    strength: float = 0.75,
    rng: str = "torch",
    height: int | None = None,
    width: int | None = None,
    prompt_2: str = "",
    negative_prompt_2: str = "",
    original_size: tuple[int, int] | None = None,
    crop: tuple[int, int] | None = None,
    aesthetic_score: float | None = None,
    negative_aesthetic_score: float | None = None,
    refiner: Bundle | str | Path | None = None,
    refiner_start: float | None = None,
) -> Request:
    """Validate a request against ``bundle`` without loading any model: raises ``GenerationError``
    (one line naming the fix) for anything the bundle cannot serve. ``height`` and ``width`` pick
    one of the bundle's sizes (default: its ``image_size``, the first size of a bundle as
    opened). Reads the init image (and fits it to that size, see ``image.fit_image``); a missing
    seed becomes a random one.

    SDXL only: ``prompt_2`` and ``negative_prompt_2`` for the base's second encoder (default: the
    first's texts); ``original_size`` (height, width; default: the image size) and ``crop`` (top,
    left; default (0, 0)) pixels of the micro-conditioning; ``refiner``, an SDXL refiner bundle
    (or its path) that denoises the schedule from ``refiner_start`` (default 0.8) on, conditioned
    on ``aesthetic_score`` and ``negative_aesthetic_score`` (default 6.0 and 2.5)."""
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise GenerationError("the prompt and negative prompt must be text")
    for option, value in (("--width", width), ("--height", height)):
        if value is not None and (not _whole(value) or value < 1):
            raise GenerationError(f"{option} must be a whole number of pixels >= 1, got {value!r}")
    h, w = bundle.image_size
    size = (int(height or h), int(width or w))
    try:
        bundle.at(*size)
    except BundleError as exc:
        raise GenerationError(str(exc)) from None
    if not _whole(steps) or steps < 1:
        raise GenerationError(f"steps must be a whole number >= 1, got {steps!r}")
    if not _whole(num_images) or num_images < 1:
        raise GenerationError(f"the number of images must be a whole number >= 1, got {num_images!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise GenerationError(f"the guidance scale must be a finite number, got {guidance_scale!r}")
    if guidance_scale < 0:
        raise GenerationError(f"the guidance scale must be >= 0 (<= 1 turns guidance off), got {guidance_scale!r}")
    # A1111-style readers take a negative seed for "random": seeds are the 64-bit range the rngs share.
    if seed is not None and (not _whole(seed) or not 0 <= seed < 2**64):
        raise GenerationError(f"the seed must be a whole number from 0 to 2^64-1 ({2**64 - 1}), got {seed!r}")
    seed = secrets.randbelow(2**32) if seed is None else int(seed)
    steps, num_images = int(steps), int(num_images)
    try:
        make_rng(seed, rng)  # the seed's range and the rng kind, as the generator itself checks them
    except (ValueError, TypeError) as exc:
        raise GenerationError(str(exc)) from None
    sched = make_scheduler(bundle, scheduler)
    check_steps(sched, steps)
    xl = _check_xl(bundle, size, prompt_2, negative_prompt_2, original_size, crop, aesthetic_score,
                   negative_aesthetic_score, refiner, refiner_start)
    xl["image_size"] = size
    if init_image is None:
        request = Request(prompt, negative_prompt, steps, float(guidance_scale), scheduler, seed, num_images, None, None,
                          rng, **xl)
        check_handoff(request, bundle)
        return request
    if not bundle.has("VAEEncoder"):
        raise GenerationError(
            f"{bundle.path}: image-to-image needs a VAEEncoder; re-convert with --components including vae-encoder"
        )
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise GenerationError(f"strength must be in (0, 1], got {strength!r}")
    try:
        sched.img2img_start(strength)
    except ValueError as exc:
        raise GenerationError(f"{exc}; raise --strength or --steps") from None
    image = read_image(init_image) if isinstance(init_image, (str, Path)) else init_image
    if not isinstance(image, Image.Image):
        raise GenerationError(f"init_image must be a PIL image or a path, got {type(image).__name__}")
    request = Request(prompt, negative_prompt, steps, float(guidance_scale), scheduler, seed, num_images,
                      fit_image(image, size), float(strength), rng, **xl)
    check_handoff(request, bundle)
    return request


def _check_xl(bundle: Bundle, size: tuple[int, int], prompt_2, negative_prompt_2, original_size, crop, aesthetic_score,
              negative_aesthetic_score, refiner, refiner_start) -> dict:
    """The SDXL fields of a request at ``size`` (height, width), checked: each option is refused
    (one line) where the bundle and refiner have nothing that reads it."""
    family = bundle.spec
    if not isinstance(prompt_2, str) or not isinstance(negative_prompt_2, str):
        raise GenerationError("the second prompt and second negative prompt must be text")
    given = [name for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2),
                                      ("original_size", original_size), ("crop", crop), ("refiner", refiner),
                                      ("refiner_start", refiner_start), ("aesthetic_score", aesthetic_score),
                                      ("negative_aesthetic_score", negative_aesthetic_score))
             if value is not None and not (isinstance(value, str) and value == "")]
    if family.time_ids == 0:
        if given:
            raise GenerationError(f"{_option(given[0])} is an SDXL option; this bundle is {family.label}")
        return {}
    if (prompt_2 or negative_prompt_2) and len(family.conditioning.encoders) < 2:
        which = "--prompt-2" if prompt_2 else "--negative-prompt-2"
        raise GenerationError(f"{which} is read by the second text encoder of an SDXL base; this {family.label} bundle "
                              "has one encoder, which reads the prompt")
    fields: dict = {"prompt_2": prompt_2, "negative_prompt_2": negative_prompt_2}
    if original_size is not None:
        fields["original_size"] = _pixels(original_size, "original size", "(height, width)", 1)
    if crop is not None:
        fields["crop"] = _pixels(crop, "crop", "(top, left)", 0)
    if refiner is not None:
        fields["refiner"] = _check_refiner(bundle, refiner, size)
        start = DEFAULT_REFINER_START if refiner_start is None else refiner_start
        if not _number(start) or not 0.0 < start < 1.0:
            raise GenerationError(f"--refiner-start must be a fraction of the schedule between 0 and 1 (exclusive), "
                                  f"got {start!r}")
        fields["refiner_start"] = float(start)
    elif refiner_start is not None:
        raise GenerationError("--refiner-start says where the refiner takes over; add --refiner")
    aesthetic = family.conditioning.time_ids == "aesthetic" or refiner is not None
    for name, value in (("aesthetic_score", aesthetic_score), ("negative_aesthetic_score", negative_aesthetic_score)):
        if value is None:
            continue
        if not aesthetic:
            raise GenerationError(f"{_option(name)} conditions the SDXL refiner; add --refiner")
        if not _number(value):
            raise GenerationError(f"{_option(name)} must be a finite number, got {value!r}")
        fields[name] = float(value)
    return fields


def _option(name: str) -> str:
    """An API option as the CLI spells it (the messages serve both)."""
    return "--" + name.replace("_", "-")


def _number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def _pixels(value, what: str, order: str, least: int) -> tuple[int, int]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_whole(v) and v >= least for v in value)):
        raise GenerationError(f"the {what} must be two whole numbers of pixels >= {least}, {order}, got {value!r}")
    return int(value[0]), int(value[1])


def _check_refiner(bundle: Bundle, refiner: Bundle | str | Path, size: tuple[int, int]) -> Bundle:
    """The refiner bundle, opened if given by path, checked against the base ``bundle``, at the
    base's ``size`` (height, width): the refiner must have been converted for it too."""
    if bundle.spec.conditioning.time_ids != "size":
        raise GenerationError(f"a refiner finishes an SDXL base's generation; this bundle is {bundle.spec.label}")
    opened = refiner if isinstance(refiner, Bundle) else open_bundle(refiner) if isinstance(refiner, (str, Path)) else None
    if opened is None:
        raise GenerationError(f"the refiner must be a bundle or its path, got {type(refiner).__name__}")
    found = refiner_of(opened)
    if found is None:
        raise GenerationError(f"{opened.path} is not an SDXL refiner ({opened.spec.label}); pass a bundle converted "
                              "from an SDXL refiner, such as stabilityai/stable-diffusion-xl-refiner-1.0")
    h, w = size
    if size not in found.sizes and len(found.sizes) == 1 and len(bundle.sizes) == 1:
        (rh, rw) = found.image_size
        raise GenerationError(f"the refiner was converted for {rw}x{rh} images, the base for {w}x{h}; "
                              "re-convert one of them with --width/--height to match")
    if size not in found.sizes:
        have = ", ".join(f"{rw}x{rh}" for rh, rw in found.sizes)
        raise GenerationError(f"the refiner has no {w}x{h} size (it has {have}); generate at one of its sizes or "
                              "re-convert it with --sizes to add one")
    return found.at(*size)


def handoff_cutoff(sched: Scheduler, start: float) -> int:
    """The timestep where the refiner takes over, as diffusers' ``denoising_end`` and
    ``denoising_start`` compute it: the base denoises the timesteps >= it, the refiner those below."""
    big = sched.num_train_timesteps
    return int(round(big - start * big))


def check_handoff(request: Request, bundle: Bundle) -> None:
    """A refiner hand-off must leave the base and the refiner a step each."""
    if request.refiner is None:
        return
    base, refiner = make_scheduler(bundle, request.scheduler), make_scheduler(request.refiner, request.scheduler)
    base.set_timesteps(request.steps)
    start = 0 if request.strength is None else base.img2img_start(request.strength)
    check_steps(refiner, request.steps)
    cutoff = handoff_cutoff(base, request.refiner_start)
    counts = {"base": int((base.timesteps[start:] >= cutoff).sum()), "refiner": int((refiner.timesteps < cutoff).sum())}
    for who, count in counts.items():
        if count == 0:
            raise GenerationError(f"--refiner-start {request.refiner_start:g} of {request.steps} steps leaves the {who} no "
                                  f"step; raise --steps or move --refiner-start toward {'1' if who == 'base' else '0'}")


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_steps(sched: Scheduler, steps: int) -> None:
    """Lay out ``steps`` on ``sched``, refusing more than its schedule has distinct timesteps for:
    beyond ``num_train_timesteps`` (LCM: its distillation's ``original_inference_steps``), steps
    repeat timesteps (PNDM ran 1002 steps at timestep 1 for 1001) or raise."""
    big = sched.num_train_timesteps
    limit = min(big, sched.config.get("original_inference_steps", big))  # only LCM reads that field
    if steps > limit:
        why = "its distillation's original_inference_steps" if limit < big else "the model's training timesteps"
        raise GenerationError(f"the {sched.name} scheduler takes at most {limit} steps ({why}), got --steps {steps}")
    try:
        sched.set_timesteps(steps)
    except ValueError as exc:
        raise GenerationError(f"{exc}; change --steps or --scheduler") from None


def make_scheduler(bundle: Bundle, name: str | None) -> Scheduler:
    """A fresh scheduler: ``name`` (None: the bundle's own algorithm) on the bundle's noise schedule."""
    if name is not None and name not in SCHEDULER_NAMES:
        raise GenerationError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULER_NAMES)}")
    own = bundle.scheduler_config.get("_class_name")
    if name is None and own not in {spec.diffusers_class for spec in SCHEDULERS.values()}:
        raise GenerationError(f"{bundle.path}: the bundle's scheduler {own!r} is not supported; "
                              f"pick one with --scheduler ({', '.join(SCHEDULER_NAMES)})")
    config = {**bundle.scheduler_config, "prediction_type": bundle.prediction_type}
    try:
        return from_config(config, name)
    except (ValueError, TypeError) as exc:
        raise GenerationError(f"{bundle.path}: {exc}") from None


def read_image(path: str | Path) -> Image.Image:
    """An init image file as ``image.read_image`` reads it (upright, 8-bit RGB)."""
    try:
        return image_file(path)
    except ImageError as exc:
        raise GenerationError(str(exc)) from None


def check_setup(bundle: Bundle, backend: str = "auto", precision: str | None = None, names=None,
                purpose: str = "generation") -> str:
    """What ``Pipeline(bundle, backend, precision=...)`` refuses before loading any model: a model
    of ``names`` missing from the bundle or one this backend cannot run (a compiled ``.mlmodelc``
    off the coreml backend), or a precision override the backend lacks. One-line ``BundleError``
    or ``GenerationError`` naming the fix (``purpose`` says who needs the models); returns the
    backend, ``auto`` resolved."""
    backend = default_backend() if backend == "auto" else backend
    names = bundle.spec.required if names is None else names
    missing = [name for name in names if not bundle.has(name)]
    if missing:
        cli_names = {c.name: c.cli_name for c in bundle.spec.components}
        raise BundleError(f"{bundle.path}: the bundle has no {', '.join(missing)}; {purpose} needs {', '.join(names)} "
                          f"(convert with --components {','.join(cli_names.get(n, n) for n in names)})")
    if precision not in (None, "float16", "float32"):
        raise GenerationError(f"precision {precision!r}: use float16 (as the bundle declares) or float32")
    if precision == "float32" and backend != "mil":
        raise GenerationError("--precision float32 is a debugging option of the mil backend; add --backend mil")
    if backend != "coreml":
        compiled_only = [n for n in names if not bundle.models[n].packages]
        if compiled_only:
            raise GenerationError(
                f"{bundle.path}: {', '.join(compiled_only)} {'exists' if len(compiled_only) == 1 else 'exist'} only as "
                "compiled .mlmodelc, which only the coreml "
                "backend (macOS) runs; use the .mlpackage files (Apple's packages/ folder) with the mil backend"
            )
    return backend
