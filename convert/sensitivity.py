"""Per-layer sensitivity to palettization, for the mixed-bit presets (``--compress mixed-B``).

Apple's mixed-bit recipes palettize one layer at a time and run the whole UNet each time: some
250 full runs per bit width for SD 1.5's UNet, hours on a laptop. This analysis gets the same
quantity, every layer's contribution to the error of the model's output at every bit width, from
a few forward and backward passes of the model in float32:

- A layer palettized to b bits changes its weights by ``e = Q_b(w) - w``, where ``Q_b`` is the
  very k-means palette coremltools makes of the float16 weights (its own function is called).
- To first order, the output then moves by ``J e`` (``J``: the output's Jacobian with respect to
  the layer's weights), and the mean squared error it adds is ``|J e|^2 / N``.
- For a random direction ``v ~ N(0, I)`` over the output, the gradient of ``v . y`` with respect
  to the weights is ``g = J^T v``, and ``E[(g . e)^2] = |J e|^2``: one backward pass gives an
  unbiased estimate for every layer and every bit width at once. ``PROBES`` passes, each with a
  fresh ``v`` and a fresh input (timesteps spread over the schedule), average them.
- Errors of different layers are independent, so they add: the allocation minimises the sum for
  an average of B bits per weight (a greedy walk down each layer's convex hull of
  (bits, error)), and the sum predicts the output's PSNR against the float16 model.

The first-order model is exact in the limit of small errors (6 and 8 bits) and optimistic at 1 or
2 bits, where the layers the allocation would push there are few; the tests compare the predicted
PSNR with the measured one through the mil backend. Inputs are random (Gaussian latents and text
embeddings): with random weights, and without a real text encoder, that is all there is; with a
real model, real prompts' embeddings would be closer to use, and are left for later.

The result is cached in the bundle (``<Component>.sensitivity.json``), keyed by the source's
weights, coremltools' version and these settings, so that another mixed-B of the same model only
re-allocates.
"""

from __future__ import annotations

import heapq
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..families import ComponentSpec, Geometry
from ..system import import_coremltools
from .compress import MIXED_BITS, WEIGHT_THRESHOLD

VERSION = 1
PROBES = 16
MAX_LATENT = 64  # latent side the analysis runs at, at most (SDXL's UNet: 512x512 images, not 1024x1024)
SUFFIX = ".sensitivity.json"
PARALLEL_WEIGHTS = 50_000_000  # from here the palettes' k-means runs in a process per core (seconds to start)


@dataclass
class Sensitivity:
    """The output error each layer adds at each bit width (mean squared, over the output's
    elements), and the output's dynamic range, as measured by ``analyse``."""

    key: str
    elements: dict[str, int]  # parameter name -> weights
    noise: dict[str, dict[int, float]]  # parameter name -> bits -> mean squared error added
    peak: float  # the output's range (max - min), averaged over the probes
    probes: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def psnr(self, bits: dict[str, int]) -> float:
        """The predicted PSNR of the output, in dB, with each layer palettized to ``bits``."""
        mse = sum(self.noise[name][b] for name, b in bits.items())
        return math.inf if mse <= 0 else 10 * math.log10(self.peak**2 / mse)

    def allocate(self, average: float) -> dict[str, int]:
        """Bits per layer, from ``MIXED_BITS``, for at most ``average`` bits per weight over all
        analysed layers, adding the least predicted error: every layer starts at 8 bits, and the
        step costing the least error per bit saved is taken until the budget is met."""
        total = sum(self.elements.values())
        budget = average * total
        bits = {name: MIXED_BITS[-1] for name in self.elements}
        used = MIXED_BITS[-1] * total
        heap: list[tuple[float, str, int]] = []

        def push(name: str) -> None:
            now = bits[name]
            lower = [b for b in MIXED_BITS if b < now]
            if lower:  # the next point of the convex hull: the least error added per bit saved
                slope, b = min(((self.noise[name][b] - self.noise[name][now]) / ((now - b) * self.elements[name]), b)
                               for b in lower)
                heapq.heappush(heap, (slope, name, b))

        for name in self.elements:
            push(name)
        while used > budget + 1e-9 and heap:
            _, name, b = heapq.heappop(heap)
            used -= (bits[name] - b) * self.elements[name]
            bits[name] = b
            push(name)
        return bits

    def to_json(self) -> str:
        data = {"version": VERSION, "key": self.key, "peak": self.peak, "probes": self.probes, "seconds": self.seconds,
                "extra": self.extra, "elements": self.elements,
                "noise": {name: {str(b): v for b, v in by_bits.items()} for name, by_bits in self.noise.items()}}
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def read(cls, path: Path, key: str) -> Sensitivity | None:
        """The analysis cached at ``path`` if it is one for ``key``, else None."""
        try:
            data = json.loads(Path(path).read_text())
            if data.get("version") != VERSION or data.get("key") != key:
                return None
            noise = {name: {int(b): float(v) for b, v in by_bits.items()} for name, by_bits in data["noise"].items()}
            return cls(key, {k: int(v) for k, v in data["elements"].items()}, noise, float(data["peak"]),
                       int(data["probes"]), float(data["seconds"]), dict(data.get("extra", {})))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def analysed(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a preset compresses: weight tensors of more than ``WEIGHT_THRESHOLD`` elements."""
    return {name: p for name, p in module.named_parameters() if p.dim() >= 2 and p.numel() > WEIGHT_THRESHOLD}


def _palette_errors(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """For each bit width of ``MIXED_BITS``, the error palettizing makes of each of the distinct
    float16 ``values`` (occurring ``counts`` times): (len(MIXED_BITS), len(values)) float32.

    The palette is the one coremltools makes of a float16 tensor of 10,000 weights or more:
    ``kmeans1d`` (coremltools' own copy) over the distinct values weighted by their counts,
    centroids rounded to float16 (coremltools 9.0, pinned:
    ``quantization_utils._get_kmeans_lookup_table_and_weight``). That function is not called as it
    maps every weight back through its cluster, once per bit width, where the distinct values
    (tens of thousands per tensor) are all the analysis needs. The test checks the palettes
    against coremltools' pass."""
    import_coremltools()  # quietly: this runs in a worker process of its own
    from coremltools._deps import _kmeans1d as kmeans1d  # private, pinned 9.0; PyPI's takes no weights

    errors = np.zeros((len(MIXED_BITS), len(values)), np.float32)
    for i, b in enumerate(MIXED_BITS):
        clusters, centroids = kmeans1d.cluster(values, min(len(values), 1 << b), weights=counts)
        palettized = np.asarray(centroids, np.float64).astype(np.float16)[np.asarray(clusters)]
        errors[i] = palettized.astype(np.float32) - values.astype(np.float32)
    return errors


def _distinct(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return np.unique(weight.detach().to(torch.float16).reshape(-1).numpy(), return_counts=True)


def _table(values: np.ndarray, errors: np.ndarray) -> torch.Tensor:
    """The errors of ``values`` indexed by each float16 value's 16-bit pattern: (bits, 65536)."""
    tables = np.zeros((len(MIXED_BITS), 1 << 16), np.float32)
    tables[:, values.view(np.uint16)] = errors
    return torch.from_numpy(tables)


def error_tables(weight: torch.Tensor) -> torch.Tensor:
    """For each bit width of ``MIXED_BITS``, the error palettizing ``weight`` in float16 makes of
    each float16 value, indexed by the value's 16-bit pattern: (len(MIXED_BITS), 65536) float32."""
    values, counts = _distinct(weight)
    return _table(values, _palette_errors(values, counts))


def _all_tables(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``error_tables`` of every parameter, the k-means (most of the time: the 8-bit palettes) in
    as many processes as there are cores. Spawned, not forked: this process holds torch's threads."""
    distinct = {name: _distinct(p) for name, p in params.items()}
    workers = min(len(distinct), os.cpu_count() or 1)
    if workers <= 1 or sum(p.numel() for p in params.values()) < PARALLEL_WEIGHTS:  # not worth the processes' start
        return {name: _table(v, _palette_errors(v, c)) for name, (v, c) in distinct.items()}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_palette_errors, v, c) for name, (v, c) in distinct.items()}
        return {name: _table(distinct[name][0], future.result()) for name, future in futures.items()}


def probe_inputs(specs, probe: int, probes: int, g: Geometry, scaling_factor: float, generator: torch.Generator) -> list:
    """Model inputs for probe ``probe`` of ``probes``, by input name: Gaussian latents and text
    embeddings, timesteps spread over 0..999, random token ids, the time ids of the image size."""
    values = []
    for spec in specs:
        shape = spec.shape
        if spec.name == "timestep":
            values.append(torch.full(shape, float(round(999 * (probe + 0.5) / probes))))
        elif spec.name == "time_ids":
            ids = [g.height, g.width, 0, 0, g.height, g.width] if g.time_ids == 6 else [g.height, g.width, 0, 0, 6.0]
            values.append(torch.tensor(ids, dtype=torch.float32).expand(shape).clone())
        elif spec.name == "input_ids":
            values.append(torch.randint(0, 49408, shape, generator=generator).float())
        elif spec.name == "x":
            values.append(torch.rand(shape, generator=generator) * 2 - 1)
        elif spec.name == "z":
            values.append(torch.randn(shape, generator=generator) / scaling_factor)
        else:
            values.append(torch.randn(shape, generator=generator))
    return values


def analysis_geometry(g: Geometry) -> Geometry:
    """The geometry the analysis runs at: batch 1, latent sides of at most ``MAX_LATENT``."""
    height = min(g.height, MAX_LATENT * g.vae_scale)
    width = min(g.width, MAX_LATENT * g.vae_scale)
    return replace(g, height=height, width=width, unet_batch=1)


def analyse(module: torch.nn.Module, spec: ComponentSpec, geometry: Geometry, scaling_factor: float, key: str,
            probes: int = PROBES, log: Callable[[str], None] = print, seed: int = 0) -> Sensitivity:
    """Measure ``module``'s (float32, real weights) sensitivity to palettizing each analysed
    parameter (see the module's docstring)."""
    start = time.perf_counter()
    g = analysis_geometry(geometry)
    specs, _ = spec.io(g)
    params = analysed(module)
    chosen = {id(p) for p in params.values()}
    for p in module.parameters():
        p.requires_grad_(id(p) in chosen)
    tables = _all_tables(params)
    log(f"palettes of {len(params)} layers at {', '.join(map(str, MIXED_BITS))} bits in {time.perf_counter() - start:.1f}s")
    sums = {name: torch.zeros(len(MIXED_BITS), dtype=torch.float64) for name in params}

    def hook(name: str):
        def accumulate(p: torch.Tensor) -> None:
            # g . e_b = sum over float16 values v of e_b(v) * (sum of g where the weight is v): one
            # pass over the gradient for all bit widths.
            codes = p.detach().to(torch.float16).view(torch.int16).reshape(-1).to(torch.int32) & 0xFFFF
            by_value = torch.bincount(codes, weights=p.grad.reshape(-1).double(), minlength=1 << 16)
            sums[name] += (tables[name].double() @ by_value) ** 2
            p.grad = None  # one layer's gradient at a time: SDXL's would be another 10 GB

        return accumulate

    handles = [p.register_post_accumulate_grad_hook(hook(name)) for name, p in params.items()]
    generator = torch.Generator().manual_seed(seed)
    peaks, elements, shown = [], 0, time.perf_counter()
    try:
        for k in range(probes):
            t = time.perf_counter()
            inputs = probe_inputs(specs, k, probes, g, scaling_factor, generator)
            out = module(*inputs)
            y = out[0] if isinstance(out, (tuple, list)) else out
            peaks.append(float(y.detach().max() - y.detach().min()))
            elements = y.numel()
            y.backward(torch.randn(y.shape, generator=generator))
            del out, y
            if time.perf_counter() - shown > 10 or k + 1 == probes:  # a line every 10 s at most
                log(f"probe {k + 1}/{probes} in {time.perf_counter() - t:.1f}s")
                shown = time.perf_counter()
    finally:
        for handle in handles:
            handle.remove()
        for p in module.parameters():
            p.requires_grad_(False)
            p.grad = None
    noise = {name: {b: float(sums[name][i]) / probes / elements for i, b in enumerate(MIXED_BITS)} for name in params}
    return Sensitivity(key, {name: p.numel() for name, p in params.items()}, noise, float(np.mean(peaks)), probes,
                       time.perf_counter() - start, {"latent": list(g.latent), "seed": seed})
