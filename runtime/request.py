"""A generation request checked against a bundle alone, before any model loads.

``coreml-sd generate`` calls ``check_setup`` and ``check_request`` ahead of ``Pipeline(...)``,
which loads models eagerly (unless ``reduce_memory``), so a bad option costs nothing;
``Pipeline.start`` calls the same functions.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .backends import default_backend
from .bundle import Bundle, BundleError
from .image import ImageError, fit_image
from .image import read_image as image_file
from .random import make_rng
from .schedulers import SCHEDULER_NAMES, SCHEDULERS, Scheduler, from_config


class GenerationError(Exception):
    """A request the bundle cannot serve (one-line message naming the fix)."""


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
    init_image: Image.Image | None  # already fitted to the bundle's image size
    strength: float | None  # img2img only
    rng: str

    @property
    def guided(self) -> bool:
        """Classifier-free guidance on; as in diffusers, a scale <= 1 runs the text branch only
        (and the negative prompt is not used)."""
        return self.guidance_scale > 1.0


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
) -> Request:
    """Validate a request against ``bundle`` without loading any model: raises ``GenerationError``
    (one line naming the fix) for anything the bundle cannot serve. Reads the init image (and
    fits it to the bundle's size, see ``image.fit_image``); a missing seed becomes a random one."""
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise GenerationError("the prompt and negative prompt must be text")
    for option, value in (("--width", width), ("--height", height)):
        if value is not None and (not _whole(value) or value < 1):
            raise GenerationError(f"{option} must be a whole number of pixels >= 1, got {value!r}")
    h, w = bundle.image_size
    height, width = height or h, width or w
    if (height, width) != (h, w):
        raise GenerationError(
            f"this bundle was converted for {w}x{h} images; re-convert with --width/--height to generate {width}x{height}"
        )
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
    if init_image is None:
        return Request(prompt, negative_prompt, steps, float(guidance_scale), scheduler, seed, num_images, None, None, rng)
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
    return Request(prompt, negative_prompt, steps, float(guidance_scale), scheduler, seed, num_images,
                   fit_image(image, bundle.image_size), float(strength), rng)


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
