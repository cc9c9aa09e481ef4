"""Text-to-image and image-to-image with a bundle: Core ML (or MIL) models, numpy everything else.

    pipe = Pipeline.from_bundle("sd15", backend="auto", compute_units="CPU_AND_NE")
    result = pipe("a photo of a cat", steps=20, seed=42)          # images, parameters, timings

    run = pipe.start("a photo of a cat", steps=20, seed=42)       # the generator form
    for step in run:                                              # one Step per denoising step
        print(step.index, step.total, step.latents.shape)        # pause by breaking ...
    for step in run:                                              # ... iterate again to resume
        pass
    result = run.finish()                                         # decode (wherever it stopped)

A request is checked by ``check_request`` against the bundle alone, before any model is loaded:
``coreml-sd generate`` calls it ahead of ``Pipeline(...)``, which loads models eagerly (unless
``reduce_memory``), so a bad option costs nothing; ``Pipeline.start`` calls the same function.

The arithmetic follows diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline on CPU,
including the order in which noise is drawn from the seed's stream, so that a seed gives the same
image here as there. Model constants (latent scaling, prediction type, sizes, pad token) come
from the bundle.
"""

from __future__ import annotations

import math
import secrets
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .backends import ChainedModel, Model, default_backend, load_model
from .bundle import Bundle, BundleError, ModelFiles, open_bundle
from .image import Parameters, fit_image, from_pil, to_pil
from .random import make_rng
from .schedulers import SCHEDULER_NAMES, Scheduler, from_config
from .tokenizer import CLIPTokenizer


class GenerationError(Exception):
    """A request the bundle cannot serve (one-line message naming the fix)."""


@dataclass
class Step:
    index: int  # 1-based
    total: int
    timestep: float
    latents: np.ndarray  # (N, 4, h, w) after this step


@dataclass
class Timings:
    """Seconds spent on one generation; ``load`` counts only models loaded during it (all of
    them with ``reduce_memory``, none for a pipeline that loaded eagerly: see ``Pipeline.load_time``)."""

    load: float = 0.0
    text_encoder: float = 0.0
    vae_encoder: float = 0.0
    unet: list[float] = field(default_factory=list)  # model time per step
    host: list[float] = field(default_factory=list)  # everything else per step
    vae_decoder: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        steps = len(self.unet)
        return {
            "load_s": self.load,
            "text_encoder_s": self.text_encoder,
            "vae_encoder_s": self.vae_encoder,
            "unet_s_per_step": sum(self.unet) / steps if steps else 0.0,
            "host_s_per_step": sum(self.host) / steps if steps else 0.0,
            "denoise_s": sum(self.unet) + sum(self.host),
            "vae_decoder_s": self.vae_decoder,
        }


@dataclass
class Result:
    images: list[Image.Image]
    parameters: list[Parameters]  # one per image
    timings: Timings
    truncated: str  # prompt text cut at the 77-token limit ("" if none)
    negative_truncated: str = ""  # likewise for the negative prompt (when guidance uses it)


# ------------------------------------------------------------------ requests


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
    h, w = bundle.image_size
    if (height or h, width or w) != (h, w):
        raise GenerationError(
            f"this bundle was converted for {w}x{h} images; re-convert with --width/--height to generate {width or w}x{height or h}"
        )
    if not _whole(steps) or steps < 1:
        raise GenerationError(f"steps must be a whole number >= 1, got {steps!r}")
    if not _whole(num_images) or num_images < 1:
        raise GenerationError(f"the number of images must be a whole number >= 1, got {num_images!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise GenerationError(f"the guidance scale must be a finite number, got {guidance_scale!r}")
    if seed is not None and not _whole(seed):
        raise GenerationError(f"the seed must be a whole number, got {seed!r}")
    seed = secrets.randbelow(2**32) if seed is None else int(seed)
    steps, num_images = int(steps), int(num_images)
    try:
        make_rng(seed, rng)  # the seed's range and the rng kind, as the generator itself checks them
    except (ValueError, TypeError) as exc:
        raise GenerationError(str(exc)) from None
    sched = make_scheduler(bundle, scheduler)
    if init_image is None:
        return Request(prompt, negative_prompt, steps, float(guidance_scale), scheduler, seed, num_images, None, None, rng)
    if not bundle.has("VAEEncoder"):
        raise GenerationError(
            f"{bundle.path}: image-to-image needs a VAEEncoder; re-convert with --components including vae-encoder"
        )
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise GenerationError(f"strength must be in (0, 1], got {strength!r}")
    sched.set_timesteps(steps)
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


def make_scheduler(bundle: Bundle, name: str | None) -> Scheduler:
    """A fresh scheduler: ``name`` (None: the bundle's own algorithm) on the bundle's noise schedule."""
    if name is not None and name not in SCHEDULER_NAMES:
        raise GenerationError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULER_NAMES)}")
    config = {**bundle.scheduler_config, "prediction_type": bundle.prediction_type}
    try:
        return from_config(config, name)
    except (ValueError, TypeError) as exc:
        raise GenerationError(f"{bundle.path}: {exc}") from None


def read_image(path: str | Path) -> Image.Image:
    """An image file, fully read (the file is closed on return)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError) as exc:
        raise GenerationError(f"cannot read init image {path}: {exc}") from None


# ------------------------------------------------------------------ the pipeline


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


class _Slot:
    """One component's model: loaded once and kept, or (reduce_memory) loaded per use."""

    def __init__(self, pipe: Pipeline, name: str):
        self.pipe, self.name, self.model = pipe, name, None

    def get(self, timings: Timings | None = None) -> Model:
        """The model, loading it first if needed (the time spent goes to ``timings.load``)."""
        if self.model is None:
            t = time.perf_counter()
            self.model = self.pipe._load(self.name)
            if timings is not None:
                timings.load += time.perf_counter() - t
        return self.model

    def release(self) -> None:
        if self.pipe.reduce_memory:
            self.model = None


class Pipeline:
    """Models of one bundle on one backend. Without ``reduce_memory`` the text encoder, UNet and
    VAE decoder load on construction (``load_time`` seconds) and are reused by every request; with
    it, each model loads just before use and is released after."""

    def __init__(self, bundle: Bundle, backend: str = "auto", compute_units: str = "CPU_AND_NE", reduce_memory: bool = False,
                 precision: str | None = None):
        self.bundle = bundle
        self.backend = check_setup(bundle, backend, precision)  # before any model loads
        self.precision = precision
        self.compute_units = compute_units
        self.reduce_memory = reduce_memory
        self.tokenizer = CLIPTokenizer.from_files(bundle.vocab, bundle.merges, pad_token=bundle.pad_token)
        self.slots = {name: _Slot(self, name) for name in bundle.models}
        self.load_time = 0.0  # seconds spent loading on construction
        if not reduce_memory:
            t = time.perf_counter()
            for name in bundle.spec.required:
                self.slots[name].get()
            self.load_time = time.perf_counter() - t

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        backend: str = "auto",
        compute_units: str = "CPU_AND_NE",
        reduce_memory: bool = False,
        verify: bool = True,
        precision: str | None = None,
    ) -> Pipeline:
        """``precision="float32"`` (mil backend only) keeps the activations the programs declare
        float16 in float32: for finding a float16 overflow, never what a device computes."""
        return cls(open_bundle(path, verify=verify), backend, compute_units, reduce_memory, precision)

    def _load(self, name: str) -> Model:
        files: ModelFiles = self.bundle.models[name]
        check_setup(self.bundle, self.backend, self.precision, names=[name])  # an optional model (VAEEncoder) included
        # compiled models load without a compile step
        paths = (files.compiled or files.packages) if self.backend == "coreml" else files.packages
        models = [load_model(p, self.backend, self.compute_units, precision=self.precision) for p in paths]
        return models[0] if len(models) == 1 else ChainedModel(models)

    # ------------------------------------------------------------------ the API

    def __call__(self, prompt: str, **options) -> Result:
        run = self.start(prompt, **options)
        for _ in run:
            pass
        return run.finish()

    def start(self, prompt: str, **options) -> Generation:
        """Check a request (``check_request``'s options) and prepare it; iterate the result to
        denoise, then ``finish()``."""
        return self.generate(check_request(self.bundle, prompt, **options))

    def generate(self, request: Request) -> Generation:
        """Prepare a request checked against this pipeline's bundle: text encoded, starting
        latents drawn."""
        if request.init_image is not None:  # a request checked against another bundle
            check_setup(self.bundle, self.backend, self.precision, names=["VAEEncoder"], purpose="image-to-image")
        return Generation(self, request)


class _PrefetchedNoise:
    """The scheduler's per-step noise, drawn one step ahead in a background thread, so the draw
    overlaps the UNet call instead of adding to the step (the torch-compatible generator costs
    ~2 ms per 64x64 draw). Draws happen in the same order and shapes as without prefetching: the
    stream is unchanged. Used only for schedulers that draw exactly one latent-shaped noise per
    step.

    ``close()`` hands back the draw made ahead and not yet used; passing it as ``first`` to the
    next prefetcher (denoising resumed after a pause) keeps the stream exactly as if the run had
    never stopped."""

    def __init__(self, rng, shape: tuple[int, ...], first: np.ndarray | None = None):
        from concurrent.futures import Future, ThreadPoolExecutor

        self.rng, self.shape = rng, tuple(shape)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coreml-sd-noise")
        if first is None:
            self.pending = self.pool.submit(rng.randn, self.shape)
        else:
            self.pending = Future()
            self.pending.set_result(first)

    def randn(self, shape) -> np.ndarray:
        noise = self.pending.result()
        if tuple(shape) != self.shape:  # not the expected draw: never happens for our schedulers
            raise RuntimeError(f"prefetched noise of shape {self.shape}, asked for {tuple(shape)}")
        self.pending = self.pool.submit(self.rng.randn, self.shape)
        return noise

    def close(self) -> np.ndarray:
        """Stop the thread; return the noise drawn ahead (the stream's next draw)."""
        try:
            return self.pending.result()
        finally:
            self.pool.shutdown(wait=True)


class Generation:
    """One request: text encoded and latents prepared on construction, denoised by iterating,
    decoded by ``finish()``.

    Iterating runs the remaining steps. Stopping early (``break``) pauses: the UNet is released
    (with ``reduce_memory``), and iterating again resumes from the next step with the same result
    as an uninterrupted run. ``finish()`` decodes the latents as they are; after it, iterating
    raises ``GenerationError``.
    """

    def __init__(self, pipe: Pipeline, request: Request):
        self.pipe, self.request = pipe, request
        self.seed, self.n, self.guidance = request.seed, request.num_images, request.guidance_scale
        self.sched = make_scheduler(pipe.bundle, request.scheduler)
        self.timings = Timings()
        self.position = 0  # steps done
        self._active: weakref.ref | None = None  # the iteration under way or paused, while referenced
        self._spare_noise: np.ndarray | None = None  # drawn ahead by a paused iteration
        self._broken = False
        self._result: Result | None = None
        bundle = pipe.bundle
        self.rng = make_rng(request.seed, request.rng)

        # 1. Text embeddings, (1, C, 1, 77) each: the UNet's layout. As diffusers: guidance of 1
        #    or less runs the text branch only, so the negative prompt is not even encoded.
        t = time.perf_counter()
        slot = pipe.slots["TextEncoder"]
        encoder = slot.get(self.timings)
        tokens = pipe.tokenizer.tokenize(request.prompt)
        self.truncated = tokens.truncated
        self.cond = self._embed(encoder, tokens.ids)
        self.uncond, self.negative_truncated = None, ""
        if request.guided:
            negative = pipe.tokenizer.tokenize(request.negative_prompt)
            self.uncond, self.negative_truncated = self._embed(encoder, negative.ids), negative.truncated
        slot.release()
        self.timings.text_encoder = time.perf_counter() - t

        # 2. Schedule and starting latents, drawing noise in the reference pipelines' order.
        self.sched.set_timesteps(request.steps)
        h, w = bundle.latent_size
        shape = (self.n, 4, h, w)
        if request.init_image is None:
            self.timesteps = self.sched.timesteps
            self.latents = self.rng.randn(shape).astype(np.float32) * np.float32(self.sched.init_noise_sigma)
        else:
            t = time.perf_counter()
            slot = pipe.slots["VAEEncoder"]
            moments = slot.get(self.timings).predict({"x": from_pil(request.init_image, bundle.image_size)})["latent"]
            slot.release()
            moments = moments.astype(np.float32)  # (1, 8, h, w): mean and log-variance
            mean, logvar = moments[:, :4], np.clip(moments[:, 4:], -30.0, 20.0)
            sample = mean + np.exp(0.5 * logvar) * self.rng.randn(mean.shape)  # the latent distribution's sample
            init = np.repeat(sample * np.float32(bundle.vae_scaling), self.n, axis=0).astype(np.float32)
            start = self.sched.img2img_start(request.strength)  # checked by check_request
            self.timesteps = self.sched.timesteps[start:]
            t0 = self.timesteps[0]
            self.latents = self.sched.add_noise(init, self.rng.randn(shape), np.full(self.n, t0)).astype(np.float32)
            self.timings.vae_encoder = time.perf_counter() - t

    @staticmethod
    def _embed(encoder: Model, ids: list[int]) -> np.ndarray:
        hidden = encoder.predict({"input_ids": np.asarray([ids], dtype=np.float32)})["last_hidden_state"]
        return hidden.astype(np.float32).transpose(0, 2, 1)[:, :, None, :]  # (1, 77, C) -> (1, C, 1, 77)

    @property
    def remaining(self) -> int:
        """Denoising steps not yet run."""
        return len(self.timesteps) - self.position

    # ------------------------------------------------------------------ denoising

    def __iter__(self) -> Iterator[Step]:
        if self._result is not None:
            raise GenerationError("this generation is finished (decoded); start a new one for more steps")
        if self._broken:
            raise GenerationError("a step of this generation failed, so it cannot continue; start a new one")
        self._close_active()  # one iteration at a time: one still referenced pauses where it is
        iteration = self._denoise()
        # Weakly held, so that a caller's `break` drops the last reference and the iteration's
        # `finally` runs at once (releasing the UNet), as for any generator.
        self._active = weakref.ref(iteration)
        return iteration

    def _close_active(self) -> None:
        iteration = self._active() if self._active is not None else None
        if iteration is not None:
            iteration.close()
        self._active = None

    def _denoise(self) -> Iterator[Step]:
        if not self.remaining:
            return
        slot = self.pipe.slots["Unet"]
        noise = None
        try:  # whatever ends this iteration (last step, break, error) releases what it holds
            unet = slot.get(self.timings)
            if self.sched.needs_rng:
                noise = _PrefetchedNoise(self.rng, self.latents.shape, first=self._spare_noise)
                self._spare_noise = None
            contexts = self._contexts()
            while self.remaining:
                try:
                    step = self._step(unet, contexts, noise or self.rng)
                except BaseException:
                    self._broken = True  # the scheduler may be mid-update: resuming would be wrong
                    raise
                yield step
        finally:
            if noise is not None:
                self._spare_noise = noise.close()
            slot.release()

    def _step(self, unet: Model, contexts: list[np.ndarray], rng) -> Step:
        """Denoising step ``position + 1``: the guided prediction, then the scheduler's update."""
        i = self.position
        t = self.timesteps[i]
        start = time.perf_counter()
        model_time = [0.0]
        x = self.sched.scale_model_input(self.latents, t)
        pred = self._predict(unet, x, float(t), contexts, model_time)
        self.latents = self.sched.step(pred, t, self.latents, rng=rng)
        self.position = i + 1
        self.timings.unet.append(model_time[0])
        self.timings.host.append(time.perf_counter() - start - model_time[0])
        return Step(i + 1, len(self.timesteps), float(t), self.latents)

    def _contexts(self) -> list[np.ndarray]:
        """The ``encoder_hidden_states`` (B, C, 1, 77) of each UNet call one image needs per step,
        B being the UNet's batch. They are the same at every step, so a run builds them once, not
        per step. Guided: [negative, prompt] as diffusers batches them, in one call (B = 2) or
        one call each (B = 1); unguided: the prompt, repeated to fill the batch."""
        batch = self.pipe.bundle.unet_batch
        if self.uncond is None:
            return [np.concatenate([self.cond] * batch)]
        return [np.concatenate([self.uncond, self.cond])] if batch == 2 else [self.uncond, self.cond]

    def _predict(self, unet: Model, x: np.ndarray, t: float, contexts: list[np.ndarray], model_time: list[float]) -> np.ndarray:
        """The guided model prediction (N, 4, h, w) for latents ``x`` (N, 4, h, w), with as few
        UNet calls as its batch allows; ``contexts`` from ``_contexts``."""

        def call(samples: np.ndarray, context: np.ndarray) -> np.ndarray:
            t0 = time.perf_counter()
            out = unet.predict(
                {"sample": samples, "timestep": np.full(len(samples), t, np.float32), "encoder_hidden_states": context}
            )["noise_pred"]
            model_time[0] += time.perf_counter() - t0
            return out.astype(np.float32)

        n = len(x)
        if self.uncond is not None:  # guided: [negative, prompt] per image, as diffusers orders them
            preds = []
            for i in range(n):
                if len(contexts) == 1:  # both in one batch-2 call
                    both = call(np.concatenate([x[i : i + 1]] * 2), contexts[0])
                    uncond, cond = both[:1], both[1:]
                else:
                    uncond, cond = call(x[i : i + 1], contexts[0]), call(x[i : i + 1], contexts[1])
                preds.append(uncond + np.float32(self.guidance) * (cond - uncond))
            return np.concatenate(preds)
        # No guidance: the text branch only, two images per call on a batch-2 UNet.
        [context] = contexts
        batch = len(context)
        preds = []
        for i in range(0, n, batch):
            chunk = x[i : i + batch]
            pad = batch - len(chunk)
            samples = np.concatenate([chunk, chunk[-1:].repeat(pad, axis=0)]) if pad else chunk
            out = call(samples, context)
            preds.append(out[: len(chunk)])
        return np.concatenate(preds)

    # ------------------------------------------------------------------ decoding

    def finish(self) -> Result:
        """Decode the latents as they are (after all steps, or wherever iteration stopped). A
        paused iteration is closed first; calling ``finish()`` again returns the same result."""
        if self._result is not None:
            return self._result
        self._close_active()  # an iteration the caller still holds: release the UNet now
        bundle, pipe, request = self.pipe.bundle, self.pipe, self.request
        t = time.perf_counter()
        slot = pipe.slots["VAEDecoder"]
        decoder = slot.get(self.timings)
        scale = np.float32(1.0 / bundle.vae_scaling)
        images = np.concatenate([decoder.predict({"z": self.latents[i : i + 1] * scale})["image"] for i in range(self.n)])
        slot.release()
        self.timings.vae_decoder = time.perf_counter() - t
        h, w = bundle.image_size
        params = [
            Parameters(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt if request.guided else "",  # unused without guidance
                steps=request.steps, scheduler=self.sched.name, guidance_scale=request.guidance_scale,
                seed=request.seed, width=w, height=h, model=bundle.name, rng=request.rng,
                batch_size=self.n, batch_pos=i, strength=request.strength,
            )
            for i in range(self.n)
        ]
        self._result = Result(to_pil(images), params, self.timings, self.truncated, self.negative_truncated)
        return self._result
