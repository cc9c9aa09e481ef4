"""Agreement metrics shared by tests and benchmarks."""

from __future__ import annotations

import numpy as np


def psnr(ours, reference, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio of ``ours`` against ``reference`` in dB (inf when identical).

    ``peak`` defaults to the reference's dynamic range (max - min), so the figure does not depend
    on how a tensor happens to be scaled; pass 255 for 8-bit images.
    """
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        raise ValueError(f"shapes differ: {ours.shape} vs {reference.shape}")
    mse = float(np.mean((ours - reference) ** 2))
    if not np.isfinite(mse):
        return float("-inf")
    peak = float(reference.max() - reference.min()) if peak is None else peak
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))
