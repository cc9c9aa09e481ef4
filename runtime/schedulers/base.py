"""What every scheduler shares: the public API, the step counter, noise drawing and `add_noise`.

The denoising loop (txt2img):

    sched.set_timesteps(n)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(x, t), t)
        x = sched.step(eps, t, x, rng=rng)

img2img starts part-way, as diffusers' img2img pipeline does:

    sched.set_timesteps(n); start = sched.img2img_start(strength)   # sets the begin index
    x = sched.add_noise(image_latents, noise, sched.timesteps[start])
    for t in sched.timesteps[start:]: ...
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import numpy as np

from .config import Field
from .schedule import NoiseSchedule

F32 = np.float32


class RandomSource(Protocol):
    def randn(self, shape: tuple[int, ...]) -> np.ndarray: ...


def as_f32(x: Any) -> np.ndarray:
    """The array as float32, without a copy when it already is (Core ML may hand back float16)."""
    return x if type(x) is np.ndarray and x.dtype == F32 else np.asarray(x, dtype=F32)


class Scheduler:
    """Base class. Subclasses set `FIELDS` and implement `_set_timesteps(n)` and `step`."""

    FIELDS: ClassVar[dict[str, Field]]
    ZERO_SNR_FLOOR: ClassVar[bool] = False  # sigma-based schedulers keep the last sigma finite
    TIMESTEP_DTYPE: ClassVar[type] = np.int64
    order: ClassVar[int] = 1  # model evaluations per entry of `timesteps` (all of ours: 1)

    def __init__(self, params: dict[str, Any], name: str) -> None:
        self.name = name
        self.config = params
        self.schedule = NoiseSchedule(params, zero_snr_floor=self.ZERO_SNR_FLOOR)
        self.num_train_timesteps = params["num_train_timesteps"]
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0, dtype=self.TIMESTEP_DTYPE)
        self._begin_index: int | None = None
        self._step_index: int | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} steps={self.num_inference_steps}>"

    # ----------------------------------------------------------------- schedule set-up

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial latent noise."""
        return 1.0

    @property
    def needs_rng(self) -> bool:
        """True when `step` draws noise, so the loop must pass `rng`."""
        return False

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Lay out the inference schedule (`timesteps`) and reset the per-run state."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = int(num_inference_steps)
        self._begin_index = None
        self._step_index = None
        self._set_timesteps(self.num_inference_steps)

    def _set_timesteps(self, n: int) -> None:
        raise NotImplementedError

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at `timesteps[begin_index]` (img2img). Schedulers that find their place
        from `t` (PNDM, DDIM) accept it and need nothing more."""
        self._begin_index = int(begin_index)

    def img2img_start(self, strength: float) -> int:
        """Where an img2img run of this strength starts in `timesteps` (the reference pipeline's
        `t_start * order`); sets the begin index to it. Raises if no step would be left."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps before img2img_start")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        n = self.num_inference_steps
        kept = min(int(n * strength), n)
        if kept < 1:
            raise ValueError(f"strength {strength} with {n} steps leaves no denoising step")
        start = (n - kept) * self.order
        self.set_begin_index(start)
        return start

    # ----------------------------------------------------------------- per step

    def scale_model_input(self, sample: np.ndarray, t: Any = None) -> np.ndarray:
        """The UNet input for this step (identity unless the scheduler works in sigma units)."""
        return sample

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray, rng: RandomSource | None = None) -> np.ndarray:
        raise NotImplementedError

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise RuntimeError(f"{self.name}: call set_timesteps before step")

    def _noise(self, rng: RandomSource | None, shape: tuple[int, ...]) -> np.ndarray:
        if rng is None:
            raise ValueError(
                f"scheduler {self.name!r} injects noise at this step: pass rng= (an object with "
                "randn(shape), e.g. coreml_sd.runtime.random.TorchRandom(seed))"
            )
        return as_f32(rng.randn(tuple(shape)))

    # Step counter for schedulers that index their tables by position in `timesteps`.

    def index_for_timestep(self, t: Any) -> int:
        """Position of `t` in `timesteps`. If `t` repeats, the second match (the reference's rule
        for a run entering mid-schedule) -- except at the very start: a schedule whose first
        timesteps repeat (Karras sigmas above the training range all map to t=999) starts at
        index 0, where the reference starts at 1 and runs off the end of its sigma table."""
        matches = np.flatnonzero(self.timesteps == t)
        if len(matches) == 0:
            return self._missing_timestep(t)
        return int(matches[1] if len(matches) > 1 and matches[0] != 0 else matches[0])

    def _missing_timestep(self, t: Any) -> int:
        raise ValueError(f"{self.name}: timestep {t!r} is not in this schedule's timesteps")

    def _index(self, t: Any) -> int:
        """This step's position in `timesteps` (the begin index, or found from `t`, on the first call)."""
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(t)
        return self._step_index

    def _noise_indices(self, t: Any) -> list[int]:
        """Schedule positions `add_noise` uses: the current step once the run has started
        (inpainting), else the begin index (img2img), else found from each `t`."""
        ts = np.asarray(t).reshape(-1)
        if self._begin_index is None:
            return [self.index_for_timestep(v) for v in ts]
        pos = self._step_index if self._step_index is not None else self._begin_index
        return [pos] * len(ts)

    # ----------------------------------------------------------------- img2img

    def add_noise(self, original: np.ndarray, noise: np.ndarray, t: Any) -> np.ndarray:
        """Forward-diffuse clean latents to timestep `t`: sqrt(a_t) x0 + sqrt(1 - a_t) noise.
        `t` is a scalar or one timestep per batch item."""
        ac = self.schedule.alphas_cumprod[np.asarray(t, dtype=np.int64).reshape(-1)]
        return self._mix(original, noise, np.sqrt(ac), np.sqrt(F32(1) - ac))

    @staticmethod
    def _mix(original: Any, noise: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a * original + b * noise with per-batch float32 coefficients (length 1 or batch)."""
        original, noise = as_f32(original), as_f32(noise)
        if len(a) == 1:
            return original * float(a[0]) + noise * float(b[0])
        shape = (-1,) + (1,) * (original.ndim - 1)
        return original * a.reshape(shape) + noise * b.reshape(shape)
