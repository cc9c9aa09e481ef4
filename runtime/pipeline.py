"""Text-to-image and image-to-image with a bundle: Core ML (or MIL) models, numpy everything else.

    pipe = Pipeline.from_bundle("sd15", backend="auto", compute_units="CPU_AND_NE")
    result = pipe("a photo of a cat", steps=20, seed=42)          # images, parameters, timings

    run = pipe.start("a photo of a cat", steps=20, seed=42)       # the generator form
    for step in run:                                              # one Step per denoising step
        print(step.index, step.total, step.latents.shape)        # stop early by breaking
    result = run.finish()                                         # decode

The arithmetic follows diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline on CPU,
including the order in which noise is drawn from the seed's stream, so that a seed gives the same
image here as there. Model constants (latent scaling, prediction type, sizes, pad token) come
from the bundle.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .backends import ChainedModel, Model, default_backend, load_model
from .bundle import Bundle, BundleError, ModelFiles, open_bundle
from .image import Parameters, from_pil, to_pil
from .random import make_rng
from .schedulers import SCHEDULER_NAMES, from_config
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


class _Slot:
    """One component's model: loaded once and kept, or (reduce_memory) loaded per use."""

    def __init__(self, pipe: Pipeline, name: str):
        self.pipe, self.name, self.model = pipe, name, None

    def get(self) -> Model:
        if self.model is None:
            t = time.perf_counter()
            self.model = self.pipe._load(self.name)
            self.pipe.timings_load += time.perf_counter() - t
        return self.model

    def release(self) -> None:
        if self.pipe.reduce_memory:
            self.model = None


class Pipeline:
    def __init__(self, bundle: Bundle, backend: str, compute_units: str, reduce_memory: bool):
        self.bundle = bundle
        self.backend = default_backend() if backend == "auto" else backend
        self.compute_units = compute_units
        self.reduce_memory = reduce_memory
        self.timings_load = 0.0
        self.tokenizer = CLIPTokenizer.from_files(bundle.vocab, bundle.merges, pad_token=bundle.pad_token)
        self.slots = {name: _Slot(self, name) for name in bundle.models}
        if not reduce_memory:
            for name in ("TextEncoder", "Unet", "VAEDecoder"):
                self.slots[name].get()

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        backend: str = "auto",
        compute_units: str = "CPU_AND_NE",
        reduce_memory: bool = False,
        verify: bool = True,
    ) -> Pipeline:
        bundle = open_bundle(path, verify=verify)
        for name in ("TextEncoder", "Unet", "VAEDecoder"):
            if not bundle.has(name):
                raise BundleError(f"{bundle.path}: the bundle has no {name}; convert it with that component")
        return cls(bundle, backend, compute_units, reduce_memory)

    def _load(self, name: str) -> Model:
        files: ModelFiles = self.bundle.models[name]
        if self.backend == "coreml":
            paths = files.compiled or files.packages  # compiled models load without a compile step
        else:
            paths = files.packages
            if not paths:
                raise GenerationError(
                    f"{self.bundle.path}: {name} exists only as compiled .mlmodelc, which only the coreml backend (macOS) runs"
                )
        models = [load_model(p, self.backend, self.compute_units) for p in paths]
        return models[0] if len(models) == 1 else ChainedModel(models)

    # ------------------------------------------------------------------ the API

    def __call__(self, prompt: str, **kwargs) -> Result:
        run = self.start(prompt, **kwargs)
        for _ in run:
            pass
        return run.finish()

    def start(
        self,
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
    ) -> Generation:
        """Validate a request and prepare it; iterate the result to denoise, then ``finish()``."""
        bundle = self.bundle
        if (height or bundle.image_size[0], width or bundle.image_size[1]) != bundle.image_size:
            h, w = bundle.image_size
            raise GenerationError(
                f"this bundle was converted for {w}x{h} images; re-convert with --width/--height to generate {width or w}x{height or h}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise GenerationError(f"steps must be a whole number >= 1, got {steps!r}")
        if not isinstance(num_images, int) or num_images < 1:
            raise GenerationError(f"the number of images must be >= 1, got {num_images!r}")
        if scheduler is not None and scheduler not in SCHEDULER_NAMES:
            raise GenerationError(f"unknown scheduler {scheduler!r}: use one of {', '.join(SCHEDULER_NAMES)}")
        if init_image is not None and not bundle.has("VAEEncoder"):
            raise GenerationError(
                f"{bundle.path}: image-to-image needs a VAEEncoder; re-convert with --components including vae-encoder"
            )
        if init_image is not None and not 0.0 < strength <= 1.0:
            raise GenerationError(f"strength must be in (0, 1], got {strength}")
        config = {**bundle.scheduler_config, "prediction_type": bundle.prediction_type}
        try:
            sched = from_config(config, scheduler)
        except ValueError as exc:
            raise GenerationError(str(exc)) from None
        if isinstance(init_image, (str, Path)):
            init_image = _read_image(Path(init_image))
        seed = secrets.randbelow(2**32) if seed is None else int(seed)
        return Generation(self, prompt, negative_prompt, steps, float(guidance_scale), sched, seed, num_images,
                          init_image, float(strength), rng)


def _read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError) as exc:
        raise GenerationError(f"cannot read init image {path}: {exc}") from None


class _PrefetchedNoise:
    """The scheduler's per-step noise, drawn one step ahead in a background thread, so the draw
    overlaps the UNet call instead of adding to the step (the torch-compatible generator costs
    ~2 ms per 64x64 draw). Draws happen in the same order and shapes as without prefetching: the
    stream is unchanged. Used only for schedulers that draw exactly one latent-shaped noise per
    step; any other request is served directly after the pending draw is taken back."""

    def __init__(self, rng, shape: tuple[int, ...]):
        from concurrent.futures import ThreadPoolExecutor

        self.rng, self.shape = rng, tuple(shape)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coreml-sd-noise")
        self.pending = self.pool.submit(rng.randn, self.shape)

    def randn(self, shape) -> np.ndarray:
        noise = self.pending.result()
        if tuple(shape) != self.shape:  # not the expected draw: never happens for our schedulers
            raise RuntimeError(f"prefetched noise of shape {self.shape}, asked for {tuple(shape)}")
        self.pending = self.pool.submit(self.rng.randn, self.shape)
        return noise

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class Generation:
    """One request: text encoded and latents prepared on construction, denoised by iterating."""

    def __init__(self, pipe: Pipeline, prompt, negative_prompt, steps, guidance, sched, seed, n, init_image, strength, rng):
        self.pipe, self.sched, self.steps, self.guidance = pipe, sched, steps, guidance
        self.prompt, self.negative_prompt, self.seed, self.n = prompt, negative_prompt, seed, n
        self.strength = strength if init_image is not None else None
        self.rng_kind = rng
        self.timings = Timings()
        self.done = False
        bundle = pipe.bundle
        h, w = bundle.latent_size
        self.cfg = guidance > 1.0  # as diffusers: guidance of 1 or less runs the text branch only
        try:
            self.rng = make_rng(seed, rng)
        except ValueError as exc:
            raise GenerationError(str(exc)) from None

        # 1. Text embeddings, (1, C, 1, 77) each: the UNet's layout.
        t = time.perf_counter()
        tokens = pipe.tokenizer.tokenize(prompt)
        self.truncated = tokens.truncated
        encoder = pipe.slots["TextEncoder"].get()
        cond = self._embed(encoder, tokens.ids)
        uncond = self._embed(encoder, pipe.tokenizer.encode(negative_prompt)) if self.cfg else None
        pipe.slots["TextEncoder"].release()
        self.timings.text_encoder = time.perf_counter() - t
        self.cond, self.uncond = cond, uncond

        # 2. Schedule and starting latents, drawing noise in the reference pipelines' order.
        sched.set_timesteps(steps)
        shape = (n, 4, h, w)
        if init_image is None:
            self.timesteps = sched.timesteps
            self.latents = self.rng.randn(shape).astype(np.float32) * np.float32(sched.init_noise_sigma)
        else:
            t = time.perf_counter()
            encoder = pipe.slots["VAEEncoder"].get()
            moments = encoder.predict({"x": from_pil(init_image, bundle.image_size)})["latent"].astype(np.float32)
            pipe.slots["VAEEncoder"].release()
            mean, logvar = moments[:, :4], np.clip(moments[:, 4:], -30.0, 20.0)
            sample = mean + np.exp(0.5 * logvar) * self.rng.randn(mean.shape)  # the latent distribution's sample
            init = np.repeat(sample * np.float32(bundle.vae_scaling), n, axis=0).astype(np.float32)
            try:
                start = sched.img2img_start(strength)
            except ValueError as exc:
                raise GenerationError(f"{exc}; raise --strength or --steps") from None
            self.timesteps = sched.timesteps[start:]
            t0 = self.timesteps[0]
            self.latents = sched.add_noise(init, self.rng.randn(shape), np.full(n, t0)).astype(np.float32)
            self.timings.vae_encoder = time.perf_counter() - t

    @staticmethod
    def _embed(encoder: Model, ids: list[int]) -> np.ndarray:
        hidden = encoder.predict({"input_ids": np.asarray([ids], dtype=np.float32)})["last_hidden_state"]
        return hidden.astype(np.float32).transpose(0, 2, 1)[:, :, None, :]  # (1, 77, C) -> (1, C, 1, 77)

    # ------------------------------------------------------------------ denoising

    def __iter__(self) -> Iterator[Step]:
        if self.done:
            return
        unet = self.pipe.slots["Unet"].get()
        total = len(self.timesteps)
        noise = _PrefetchedNoise(self.rng, self.latents.shape) if self.sched.needs_rng else None
        try:
            for i, t in enumerate(self.timesteps):
                start = time.perf_counter()
                model_time = [0.0]
                x = self.sched.scale_model_input(self.latents, t)
                pred = self._predict(unet, x, float(t), model_time)
                self.latents = self.sched.step(pred, t, self.latents, rng=noise or self.rng)
                self.timings.unet.append(model_time[0])
                self.timings.host.append(time.perf_counter() - start - model_time[0])
                yield Step(i + 1, total, float(t), self.latents)
        finally:
            if noise is not None:
                noise.close()
        self.pipe.slots["Unet"].release()
        self.done = True

    def _predict(self, unet: Model, x: np.ndarray, t: float, model_time: list[float]) -> np.ndarray:
        """The guided model prediction for every image, with as few UNet calls as its batch allows."""
        batch = self.pipe.bundle.unet_batch

        def call(samples: np.ndarray, context: np.ndarray) -> np.ndarray:
            t0 = time.perf_counter()
            out = unet.predict(
                {"sample": samples, "timestep": np.full(len(samples), t, np.float32), "encoder_hidden_states": context}
            )["noise_pred"]
            model_time[0] += time.perf_counter() - t0
            return out.astype(np.float32)

        n = len(x)
        if self.cfg:  # [negative, prompt] per image, as diffusers orders them
            preds = []
            for i in range(n):
                if batch == 2:
                    both = call(np.concatenate([x[i : i + 1]] * 2), np.concatenate([self.uncond, self.cond]))
                    uncond, cond = both[:1], both[1:]
                else:
                    uncond, cond = call(x[i : i + 1], self.uncond), call(x[i : i + 1], self.cond)
                preds.append(uncond + np.float32(self.guidance) * (cond - uncond))
            return np.concatenate(preds)
        # No guidance: the text branch only, two images per call on a batch-2 UNet.
        preds = []
        for i in range(0, n, batch):
            chunk = x[i : i + batch]
            pad = batch - len(chunk)
            samples = np.concatenate([chunk, chunk[-1:].repeat(pad, axis=0)]) if pad else chunk
            out = call(samples, np.concatenate([self.cond] * batch))
            preds.append(out[: len(chunk)])
        return np.concatenate(preds)

    # ------------------------------------------------------------------ decoding

    def finish(self) -> Result:
        """Decode the latents as they are (after all steps, or wherever iteration stopped)."""
        bundle, pipe = self.pipe.bundle, self.pipe
        t = time.perf_counter()
        decoder = pipe.slots["VAEDecoder"].get()
        scale = np.float32(1.0 / bundle.vae_scaling)
        images = np.concatenate([decoder.predict({"z": self.latents[i : i + 1] * scale})["image"] for i in range(self.n)])
        pipe.slots["VAEDecoder"].release()
        self.timings.vae_decoder = time.perf_counter() - t
        self.timings.load = pipe.timings_load
        h, w = bundle.image_size
        params = [
            Parameters(
                prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps, scheduler=self.sched.name,
                guidance_scale=self.guidance, seed=self.seed, width=w, height=h, model=bundle.name, rng=self.rng_kind,
                batch_size=self.n, batch_pos=i, strength=self.strength,
            )
            for i in range(self.n)
        ]
        return Result(to_pil(images), params, self.timings, self.truncated)
