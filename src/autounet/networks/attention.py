"""Additive attention gates on the skip connections (Oktay et al. 2018, "Attention U-Net").

Seed 004 §2.3/§3.3 (Table 2, "Attention") ablates this "decoder attention". The gate of a decoder
level is ``alpha = sigmoid(psi(relu(W_x x + W_g g)))`` (Oktay et al. Eq. 1) with 1x1
convolutions, one attention coefficient per voxel, and the skip features ``x`` are multiplied by
``alpha`` before the concatenation.

The gating signal ``g`` is the decoder feature map *after* the transposed-convolution up-sampling:
it already has the skip's shape, so no strided ``W_x`` and no resampling of ``alpha`` are needed
(Oktay et al. gate with the coarser map and resample; NVIDIA's public code for seed 004, like
this module, gates with the up-sampled map).
"""

from __future__ import annotations

import torch
from torch import nn


class AttentionGate(nn.Module):
    """``x * sigmoid(psi(relu(W_x x + W_g g)))`` with ``max(1, skip_channels // 2)`` inner channels."""

    def __init__(self, dims: int, skip_channels: int, gate_channels: int):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        inner = max(1, skip_channels // 2)
        self.w_x = conv(skip_channels, inner, kernel_size=1, bias=False)  # Oktay et al.: bias on W_g only
        self.w_g = conv(gate_channels, inner, kernel_size=1)
        self.psi = conv(inner, 1, kernel_size=1)

    def gate(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Attention coefficients in (0, 1), shape ``(N, 1, *spatial)``."""
        return torch.sigmoid(self.psi(torch.relu(self.w_x(x) + self.w_g(g))))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x, g)
