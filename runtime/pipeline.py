"""Text-to-image and image-to-image with a bundle: Core ML (or MIL) models, numpy everything else.

    pipe = Pipeline.from_bundle("sd15", backend="auto", compute_units="CPU_AND_NE")
    result = pipe("a photo of a cat", steps=20, seed=42)          # images, parameters, timings

    run = pipe.start("a photo of a cat", steps=20, seed=42)       # the generator form
    for step in run:                                              # one Step per denoising step
        print(step.index, step.total, step.latents.shape)        # pause by breaking ...
    for step in run:                                              # ... iterate again to resume
        pass
    result = run.finish()                                         # decode (wherever it stopped)

    xl = Pipeline.from_bundle("sdxl-base")                       # SDXL, finished by its refiner
    result = xl("a photo of a cat", seed=42, refiner="sdxl-refiner", refiner_start=0.8)

    pipe.sizes                                                    # ((512, 512), (768, 512)): (height, width)
    pipe("a photo of a cat", height=768, width=512)               # another size of a multi-size bundle

Requests are checked against the bundle before any model loads (``request.py``). The arithmetic
follows diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline on CPU (for SDXL its
StableDiffusionXLPipeline, and its two-pipeline hand-off to StableDiffusionXLImg2ImgPipeline for
the refiner), including the order in which noise is drawn from the seed's stream, so that a seed
gives the same image here as there. Model constants (latent scaling, prediction type, sizes, pad token) come from the bundle;
how a prompt conditions the UNet from its family (``conditioning.py``); guidance from
``guidance.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..families import SDXL_REFINER
from .backends import ChainedModel, Model, load_model
from .bundle import Bundle, BundleError, ModelFiles, open_bundle
from .conditioning import Encoded, encode_prompt, time_ids, zeros_like
from .guidance import GuidedUNet
from .image import Parameters, from_pil, to_pil
from .nonfinite import NonFiniteError, all_finite, nonfinite_error
from .random import make_rng
from .request import GenerationError, Request, check_request, check_setup, handoff_cutoff, make_scheduler
from .schedulers import Scheduler
from .tokenizer import CLIPTokenizer

__all__ = ["Generation", "GenerationError", "NonFiniteError", "Pipeline", "Request", "Result", "Step", "Timings", "check_request"]


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
    """Models of one bundle on one backend. Without ``reduce_memory`` the text encoders, UNet and
    VAE decoder load on construction (``load_time`` seconds) and are reused by every request; with
    it, each model loads just before use and is released after.

    A bundle of several sizes holds one function per size in its UNet and VAE packages; the
    pipeline keeps those of one size loaded (the bundle's ``image_size`` at first) and a request
    for another size releases them and loads its own (``Timings.load`` counts it)."""

    def __init__(self, bundle: Bundle, backend: str = "auto", compute_units: str = "CPU_AND_NE", reduce_memory: bool = False,
                 precision: str | None = None):
        self.bundle = bundle
        self.backend = check_setup(bundle, backend, precision)  # before any model loads
        self.precision = precision
        self.compute_units = compute_units
        self.reduce_memory = reduce_memory
        # One tokenizer per text encoder: the bundle's pad token for the first, the family's for
        # others (SDXL's second pads with "!", as Apple's Swift pipeline and diffusers' tokenizer_2 do).
        encoders = bundle.spec.conditioning.encoders
        self.tokenizers = {
            use.model: CLIPTokenizer.from_files(
                bundle.vocab, bundle.merges, pad_token=bundle.pad_token if i == 0 else use.pad_token
            )
            for i, use in enumerate(encoders)
        }
        self.slots = {name: _Slot(self, name) for name in bundle.models}
        self.loaded_size = bundle.image_size  # the size the UNet and VAE slots hold (or will load) models for
        self._refiners: dict[tuple[Path, str], Pipeline] = {}  # refiner pipelines made from bundles, reused
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

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The (height, width) sizes the bundle generates, its default first."""
        return self.bundle.sizes

    def use_size(self, size: tuple[int, int]) -> Bundle:
        """The bundle at ``size`` (height, width), one of ``sizes``; the UNet and VAE models of
        another size are released first (the next use loads this size's function)."""
        sized, loaded = self.bundle.at(*size), self.bundle.at(*self.loaded_size)
        for name, slot in self.slots.items():
            if sized.function_of(name) != loaded.function_of(name):  # text encoders take no size: kept
                slot.model = None
        self.loaded_size = size
        return sized

    def _load(self, name: str) -> Model:
        bundle = self.bundle.at(*self.loaded_size)
        files: ModelFiles = bundle.models[name]
        check_setup(bundle, self.backend, self.precision, names=[name])  # an optional model (VAEEncoder) included
        # compiled models load without a compile step
        paths = (files.compiled or files.packages) if self.backend == "coreml" else files.packages
        units = self.compute_units_for(name)
        function = bundle.function_of(name)
        # A compiled multifunction model's I/O as the manifest records it (one entry: not for chunks).
        schema = _recorded_schema(bundle, name, function) if self.backend == "coreml" and len(paths) == 1 else None
        models = [load_model(p, self.backend, units, precision=self.precision, function=function, schema=schema)
                  for p in paths]
        return models[0] if len(models) == 1 else ChainedModel(models)

    def compute_units_for(self, name: str) -> str:
        """The compute units model ``name`` loads on: the pipeline's, except that a model converted
        in float32 (an SDXL VAE that overflows float16) asks for the GPU instead of the Neural
        Engine, which computes in float16 only and would leave it to the CPU; Apple's Swift
        pipeline does the same for SDXL's VAE (StableDiffusionXL+Resources.swift lines 95-97)."""
        if self.compute_units == "CPU_AND_NE" and self.bundle.models[name].precision == "float32":
            return "CPU_AND_GPU"
        return self.compute_units

    # ------------------------------------------------------------------ the API

    def __call__(self, prompt: str, **options) -> Result:
        run = self.start(prompt, **options)
        for _ in run:
            pass
        return run.finish()

    def start(self, prompt: str, refiner: Pipeline | Bundle | str | Path | None = None, **options) -> Generation:
        """Check a request (``check_request``'s options) and prepare it; iterate the result to
        denoise, then ``finish()``. ``refiner``: an SDXL refiner's pipeline, bundle or path, which
        finishes the denoising from ``refiner_start`` on; one given as a bundle or path is loaded
        like this pipeline (backend, compute units, reduce_memory) and kept for later requests."""
        ready = refiner if isinstance(refiner, Pipeline) and refiner.bundle.family == SDXL_REFINER.name else None
        bundle = refiner.bundle if isinstance(refiner, Pipeline) else refiner
        return self.generate(check_request(self.bundle, prompt, refiner=bundle, **options), refiner=ready)

    def generate(self, request: Request, refiner: Pipeline | None = None) -> Generation:
        """Prepare a request checked against this pipeline's bundle: text encoded, starting
        latents drawn. ``refiner``: the pipeline to run ``request.refiner`` with (default: one
        loaded like this pipeline)."""
        if request.init_image is not None:  # a request checked against another bundle
            check_setup(self.bundle, self.backend, self.precision, names=["VAEEncoder"], purpose="image-to-image")
        if request.image_size is not None:
            try:
                self.bundle.at(*request.image_size)
            except BundleError as exc:
                raise GenerationError(str(exc)) from None
        if request.refiner is None and refiner is not None:
            raise GenerationError("this request has no refiner; check it with refiner= to use one")
        if request.refiner is not None and refiner is None:
            key = (request.refiner.path, request.refiner.family)
            if key not in self._refiners:
                self._refiners[key] = Pipeline(request.refiner, self.backend, self.compute_units, self.reduce_memory,
                                               self.precision)
            refiner = self._refiners[key]
        return Generation(self, request, refiner)

    def condition(self, request: Request, timings: Timings | None = None) -> tuple[Encoded, Encoded | None]:
        """The UNet's conditioning inputs of one image (batch 1) for ``request``, text branch and
        (with guidance) negative branch, as this pipeline's model reads them."""
        bundle, conditioning = self.bundle, self.bundle.spec.conditioning
        target = request.image_size or bundle.image_size
        slots = [self.slots[use.model] for use in conditioning.encoders]
        encoders = {slot.name: slot.get(timings) for slot in slots}
        try:
            positive = encode_prompt(request.texts, conditioning, self.tokenizers, encoders, self.precision)
            negative = None
            if request.guided and bundle.force_zeros and not request.negative_given:
                negative = zeros_like(positive)
            elif request.guided:
                negative = encode_prompt(request.negative_texts, conditioning, self.tokenizers, encoders, self.precision)
        finally:
            for slot in slots:
                slot.release()
        size = request.original_size or target
        positive = _with(positive, time_ids(conditioning, size, request.crop, target, request.aesthetic_score))
        if negative is not None:
            # As diffusers: the base's negative time ids are the text branch's; the refiner's take
            # the negative aesthetic score and diffusers' default negative crop, (0, 0), whatever
            # the crop (its negative_crops_coords_top_left, which coreml-sd does not expose).
            crop = request.crop if conditioning.time_ids == "size" else (0, 0)
            negative = _with(negative, time_ids(conditioning, size, crop, target, request.negative_aesthetic_score))
        return positive, negative


def _recorded_schema(bundle: Bundle, name: str, function: str | None):
    """A model function's (inputs, outputs) as the bundle's manifest records them, for a compiled
    multifunction model (whose metadata.json layout per function is not known, see
    ``backends.compiled_schema``); None where the manifest has no such entry."""
    from .backends import schema_from_manifest

    if function is None or not bundle.manifest:
        return None
    components = bundle.manifest.get("components")
    component = components.get(name) if isinstance(components, dict) else None
    functions = component.get("functions") if isinstance(component, dict) else None
    entry = functions.get(function) if isinstance(functions, dict) else None
    try:
        return schema_from_manifest(entry) if entry is not None else None
    except (KeyError, TypeError, ValueError):
        return None  # a malformed entry: read the model's own


def _with(encoded: Encoded, inputs: dict[str, np.ndarray]) -> Encoded:
    return Encoded({**encoded.inputs, **inputs}, encoded.truncated)


def _inputs(encoded: Encoded | None) -> dict[str, np.ndarray] | None:
    return None if encoded is None else encoded.inputs


@dataclass
class _Phase:
    """One model's share of the denoising: the base's, or after the hand-off the refiner's, each
    with its own scheduler (diffusers runs the two pipelines with a scheduler each) and conditioning."""

    pipe: Pipeline
    sched: Scheduler
    timesteps: np.ndarray
    cond: dict[str, np.ndarray]
    uncond: dict[str, np.ndarray] | None
    label: str  # for messages: "UNet", "refiner UNet"


class Generation:
    """One request: text encoded and starting latents drawn on construction, denoised by
    iterating, decoded by ``finish()``.

    Iterating runs the remaining steps: the steps are one plain generator, so a ``break`` pauses
    it and iterating again resumes from the next step, with the result of an uninterrupted run.
    ``finish()`` closes it (releasing the UNet with ``reduce_memory``) and decodes the latents as
    they are; after it, iterating raises ``GenerationError``.

    With a refiner, as diffusers' ``StableDiffusionXLPipeline(denoising_end=s)`` followed by
    ``StableDiffusionXLImg2ImgPipeline(denoising_start=s, image=latents)`` given the same
    generator: the base denoises the timesteps at or above the hand-off, the refiner (with its
    own scheduler, text encoder and conditioning) the rest of its schedule, continuing the seed's
    noise stream, and the refiner's VAE decodes. Steps are counted across both.
    """

    def __init__(self, pipe: Pipeline, request: Request, refiner: Pipeline | None = None):
        self.pipe, self.request, self.refiner = pipe, request, refiner
        # Its size's UNet and VAE models, on each pipeline (re-asked before each use: another
        # generation of the same pipeline may have switched it to its own size meanwhile).
        self.size = request.image_size or pipe.bundle.image_size
        self.bundle = pipe.use_size(self.size)  # the base bundle at this size
        if refiner is not None:
            refiner.use_size(self.size)
        self.n = request.num_images
        self.sched = make_scheduler(pipe.bundle, request.scheduler)
        self.rng = make_rng(request.seed, request.rng)
        self.timings = Timings()
        self.position = 0  # steps done
        self._failed = False
        self._result: Result | None = None
        self._last = pipe  # the pipeline whose UNet denoised last: its VAE decodes
        self._encode_text()
        self._initial_latents()
        self._steps = self._denoise()

    def _encode_text(self) -> None:
        """The conditioning of the prompt and, with guidance, of the negative prompt, for the base
        and the refiner. As diffusers: guidance of 1 or less runs the text branch only, so the
        negative prompt is not encoded. Truncation is reported for the first encoder's texts and,
        where given, the second prompts."""
        t = time.perf_counter()
        self.conditioning = [pipe.condition(self.request, self.timings) for pipe in (self.pipe, self.refiner) if pipe]
        (positive, negative) = self.conditioning[0]
        second = len(positive.truncated) > 1
        self.truncated = positive.truncated[0]
        self.truncated_2 = positive.truncated[1] if second and self.request.prompt_2 else ""
        self.negative_truncated = negative.truncated[0] if negative else ""
        self.negative_truncated_2 = negative.truncated[1] if negative and second and self.request.negative_prompt_2 else ""
        self.timings.text_encoder = time.perf_counter() - t

    def _initial_latents(self) -> None:
        """Schedule and starting latents, drawing noise in the reference pipelines' order."""
        bundle, request, sched = self.bundle, self.request, self.sched
        sched.set_timesteps(request.steps)
        shape = (self.n, bundle.spec.latent_channels, *bundle.latent_size)
        if request.init_image is None:
            timesteps = sched.timesteps
            self.latents = self.rng.randn(shape).astype(np.float32) * np.float32(sched.init_noise_sigma)
        else:
            t = time.perf_counter()
            self.pipe.use_size(self.size)
            slot = self.pipe.slots["VAEEncoder"]
            moments = slot.get(self.timings).predict({"x": from_pil(request.init_image, bundle.image_size)})["latent"]
            slot.release()
            mean, logvar = np.split(moments.astype(np.float32), 2, axis=1)  # (1, 4, h, w) each
            logvar = np.clip(logvar, -30.0, 20.0)
            sample = mean + np.exp(0.5 * logvar) * self.rng.randn(mean.shape)  # the latent distribution's sample
            x_0 = np.repeat(sample * np.float32(bundle.vae_scaling), self.n, axis=0).astype(np.float32)
            start = sched.img2img_start(request.strength)  # checked by check_request
            timesteps = sched.timesteps[start:]
            self.latents = sched.add_noise(x_0, self.rng.randn(shape), np.full(self.n, timesteps[0])).astype(np.float32)
            self.timings.vae_encoder = time.perf_counter() - t
        (cond, uncond), *refined = self.conditioning
        if self.refiner is None:
            self.phases = [_Phase(self.pipe, sched, timesteps, cond.inputs, _inputs(uncond), "UNet")]
        else:
            cutoff = handoff_cutoff(sched, request.refiner_start)
            kept = int((timesteps >= cutoff).sum())  # diffusers' denoising_end: a prefix, timesteps descend
            late = make_scheduler(self.refiner.bundle, request.scheduler)
            late.set_timesteps(request.steps)
            begin = len(late.timesteps) - int((late.timesteps < cutoff).sum())  # denoising_start
            late.set_begin_index(begin)
            [(cond_2, uncond_2)] = refined
            self.phases = [
                _Phase(self.pipe, sched, timesteps[:kept], cond.inputs, _inputs(uncond), "UNet"),
                _Phase(self.refiner, late, late.timesteps[begin:], cond_2.inputs, _inputs(uncond_2),
                       "refiner UNet"),
            ]
        self.timesteps = np.concatenate([phase.timesteps for phase in self.phases])

    @property
    def cond(self) -> dict[str, np.ndarray]:
        """The base UNet's text-branch conditioning of one image (batch 1)."""
        return self.phases[0].cond

    @property
    def uncond(self) -> dict[str, np.ndarray] | None:
        """Its negative branch (None without guidance)."""
        return self.phases[0].uncond

    @property
    def remaining(self) -> int:
        """Denoising steps not yet run."""
        return len(self.timesteps) - self.position

    def __iter__(self) -> Iterator[Step]:
        if self._result is not None:
            raise GenerationError("this generation is finished (decoded); start a new one for more steps")
        if self._failed:
            raise GenerationError("a step of this generation failed, so it cannot continue; start a new one")
        return self._steps

    def _denoise(self) -> Iterator[Step]:
        total, end = len(self.timesteps), 0
        for phase in self.phases:
            first, end = end, end + len(phase.timesteps)
            phase.pipe.use_size(self.size)
            slot = phase.pipe.slots[phase.pipe.bundle.unet]
            try:  # however this phase ends (its last step, finish(), an error), it releases its UNet
                unet = GuidedUNet(slot.get(self.timings), phase.pipe.bundle.unet_batch, phase.cond, phase.uncond,
                                  self.request.guidance_scale)
                self._last = phase.pipe
                for i in range(self.position, end):
                    t_i = phase.timesteps[i - first]
                    start, model_before = time.perf_counter(), unet.model_time
                    try:
                        # An overflow is caught below, by stage, instead of as numpy warnings.
                        with np.errstate(over="ignore", invalid="ignore"):
                            eps_pred = unet.predict(phase.sched.scale_model_input(self.latents, t_i), float(t_i))
                            self.latents = phase.sched.step(eps_pred, t_i, self.latents, rng=self.rng)
                        if not all_finite(self.latents):
                            raise self._unet_error(unet, phase.label, i + 1)
                    except BaseException:
                        self._failed = True  # the scheduler may be mid-update: resuming would be wrong
                        raise
                    model = unet.model_time - model_before
                    self.timings.unet.append(model)
                    self.timings.host.append(time.perf_counter() - start - model)
                    self.position = i + 1
                    yield Step(i + 1, total, float(t_i), self.latents)
            finally:
                slot.release()

    def _unet_error(self, unet: GuidedUNet, label: str, index: int) -> NonFiniteError:
        stage = f"{label} at step {index} of {len(self.timesteps)}"
        guidance = self.request.guidance_scale if self.request.guided else None
        if unet.failed_inputs is not None:
            return nonfinite_error(stage, unet.unet, unet.failed_inputs, self.pipe.precision, guidance)
        # Every prediction finite: the guidance or the scheduler's update overflowed float32.
        remedy = f"lower --guidance (now {guidance:g})" if guidance is not None else "try another --scheduler"
        return NonFiniteError(f"NaN or inf in the {stage} (its prediction was finite; the guidance and scheduler "
                              f"arithmetic overflowed float32); {remedy}")

    def finish(self) -> Result:
        """Decode the latents as they are (after all steps, or wherever iteration stopped) with
        the VAE of the bundle whose UNet denoised last; calling it again returns the same result."""
        if self._result is not None:
            return self._result
        self._steps.close()  # a paused iteration: release the UNet now
        bundle, request = self.bundle, self.request
        t = time.perf_counter()
        self._last.use_size(self.size)
        slot = self._last.slots["VAEDecoder"]
        decoder = slot.get(self.timings)
        scale = np.float32(1.0 / self._last.bundle.vae_scaling)
        images = []
        for latent in np.split(self.latents, self.n):
            with np.errstate(over="ignore"):  # latents beyond float32 / scale: caught as non-finite below
                inputs = {"z": latent * scale}
            images.append(decoder.predict(inputs)["image"])
            if not all_finite(images[-1]):
                guidance = request.guidance_scale if request.guided else None
                error = nonfinite_error("VAE decoder", decoder, inputs, self.pipe.precision, guidance)
                slot.release()
                raise error
        slot.release()
        images = np.concatenate(images)
        self.timings.vae_decoder = time.perf_counter() - t
        h, w = bundle.image_size
        refiner = request.refiner
        params = [
            Parameters(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt if request.guided else "",  # unused without guidance
                steps=request.steps, scheduler=self.sched.name, guidance_scale=request.guidance_scale,
                seed=request.seed, width=w, height=h, model=bundle.name, rng=request.rng,
                batch_size=self.n, batch_pos=i, strength=request.strength,
                prompt_2=request.prompt_2, negative_prompt_2=request.negative_prompt_2 if request.guided else "",
                original_size=request.original_size,
                crop=request.crop if bundle.spec.time_ids else None,
                refiner=refiner.name if refiner else None,
                refiner_start=request.refiner_start,
                aesthetic_score=request.aesthetic_score if refiner or bundle.spec.conditioning.time_ids == "aesthetic"
                else None,
                negative_aesthetic_score=request.negative_aesthetic_score if request.guided and (
                    refiner or bundle.spec.conditioning.time_ids == "aesthetic") else None,
            )
            for i in range(self.n)
        ]
        self._result = Result(to_pil(images), params, self.timings, self.truncated, self.negative_truncated)
        return self._result
