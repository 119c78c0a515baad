"""DropBlock (Ghiasi et al. 2018, "DropBlock: A regularization method for convolutional networks").

Seed 004 §3.3 (Table 2, "DB") ablates it on the U-Net. Whole ``block_size``-wide cubes (squares in
2D) of a feature map are zeroed, per sample and channel, and the rest is rescaled so that the
expected activation stays the same. Identity in eval mode and when ``prob`` is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def drop_block_gamma(prob: float, block: list[int], size: list[int]) -> float:
    """Seed rate so that about ``prob`` of the units are dropped (Ghiasi et al. §3, Eq. 1).

    gamma = p / bs^d * fs^d / (fs - bs + 1)^d, taken per spatial axis so anisotropic maps and
    clipped blocks work; clamped to [0, 1].
    """
    gamma = prob
    for b, s in zip(block, size):
        gamma *= s / (b * (s - b + 1))
    return min(max(gamma, 0.0), 1.0)


def drop_block_mask(shape: torch.Size, prob: float, block_size: int, generator=None, device=None) -> torch.Tensor:
    """A {0, 1} keep mask for a ``(N, C, *spatial)`` feature map (1: keep).

    Seeds are Bernoulli(gamma) draws in the valid region only, i.e. where a whole block fits inside
    the map (Ghiasi et al. Algorithm 1, step 5). They are zero-padded to the map size and spread to
    blocks by a max pooling with kernel ``bs``, stride 1 and padding ``bs // 2``. The block size is
    clipped to the map size along each axis.
    """
    spatial = list(shape[2:])
    block = [min(block_size, s) for s in spatial]
    gamma = drop_block_gamma(prob, block, spatial)
    valid = [s - b + 1 for s, b in zip(spatial, block)]
    seeds = torch.rand(*shape[:2], *valid, generator=generator, device=device) < gamma
    pad = []  # F.pad wants (last axis before, after, ...): seeds sit where whole blocks fit
    for b in reversed(block):
        pad += [b - 1 - b // 2, b // 2]
    seeds = F.pad(seeds.float(), pad)
    pool = F.max_pool3d if len(spatial) == 3 else F.max_pool2d
    dropped = pool(seeds, kernel_size=block, stride=1, padding=[b // 2 for b in block])
    dropped = dropped[(..., *[slice(0, s) for s in spatial])]  # even blocks give one extra voxel
    return 1.0 - dropped


class DropBlock(nn.Module):
    """DropBlock for 2D or 3D feature maps; ``prob`` may be changed between steps (a schedule)."""

    def __init__(self, prob: float, block_size: int):
        super().__init__()
        self.prob = prob
        self.block_size = block_size

    def extra_repr(self) -> str:
        return f"prob={self.prob}, block_size={self.block_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob <= 0:
            return x
        mask = drop_block_mask(x.shape, self.prob, self.block_size, device=x.device)  # float32
        # counted in float32: an fp16 sum saturates past 65,504 kept elements and the scale would
        # become 0 (or inf), zeroing whole layers under fp16 autocast
        scale = mask.numel() / mask.sum(dtype=torch.float32).clamp_min(1.0)
        return x * (mask * scale).to(x.dtype)  # renormalise (Ghiasi et al. Algorithm 1, step 7)


def set_drop_block_prob(module: nn.Module, prob: float) -> int:
    """Set ``prob`` of every :class:`DropBlock` in ``module`` (e.g. a linear warm-up); returns how many."""
    blocks = [m for m in module.modules() if isinstance(m, DropBlock)]
    for m in blocks:
        m.prob = prob
    return len(blocks)


__all__ = ["DropBlock", "drop_block_gamma", "drop_block_mask", "set_drop_block_prob"]
