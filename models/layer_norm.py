"""LayerNorm over the channel axis of a (batch, channels, 1, sequence) tensor.

``nn.LayerNorm`` normalises the last axis; in the Neural Engine layout the features sit on axis 1,
so the statistics are taken there instead. Same parameters (``weight``, ``bias``) and the same
numbers as ``nn.LayerNorm`` applied to the transposed (B, S, C) tensor.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerNormBC1S(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.inv_sqrt_c = channels**-0.5
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, 1, S) -> (B, C, 1, S), normalised over C."""
        centred = x - x.mean(dim=1, keepdim=True)
        # Biased variance as sum((c / sqrt(C))^2) rather than mean(c^2): the same number, but the
        # squares stay inside float16 range for |c| up to 256 * sqrt(C) instead of 256.
        scaled = centred * self.inv_sqrt_c
        var = (scaled * scaled).sum(dim=1, keepdim=True)
        x = centred * torch.rsqrt(var + self.eps)
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
