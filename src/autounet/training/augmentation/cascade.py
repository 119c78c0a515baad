"""Perturbation of the previous cascade stage's one-hot channels (seed 001 §2.3): random morphology
(on the device) and removal of a random connected component (on the CPU, in the loader)."""

from __future__ import annotations

import cc3d
import numpy as np
import torch
import torch.nn.functional as F

from autounet.training.augmentation.preset import AugmentationPreset
from autounet.training.augmentation.sync import nothing_chosen


def _dilate(x: torch.Tensor, r: int) -> torch.Tensor:
    pool = F.max_pool3d if x.ndim == 5 else F.max_pool2d
    return pool(x, kernel_size=2 * r + 1, stride=1, padding=r)


def _erode(x: torch.Tensor, r: int) -> torch.Tensor:
    return -_dilate(-x, r)


OPERATORS = {
    "dilation": _dilate,
    "erosion": _erode,
    "opening": lambda x, r: _dilate(_erode(x, r), r),
    "closing": lambda x, r: _erode(_dilate(x, r), r),
}


def morphology(
    image: torch.Tensor, first_channel: int, preset: AugmentationPreset, gen: torch.Generator
) -> torch.Tensor:
    """Random erosion / dilation / opening / closing of channels ``first_channel:`` (binary maps)."""
    n = image.shape[1] - first_channel
    if n <= 0 or preset.cascade.p_morphology <= 0:
        return image
    chosen = torch.rand((image.shape[0], n), generator=gen, device=image.device) < preset.cascade.p_morphology
    if nothing_chosen(chosen):
        return image
    names = list(OPERATORS)
    ops = torch.randint(0, len(names), (image.shape[0], n), generator=gen, device=image.device)
    lo, hi = preset.cascade.radius
    radii = torch.randint(lo, hi + 1, (image.shape[0], n), generator=gen, device=image.device)
    out = image.clone()
    # the operator and radius of each channel pick the code to run: one read-back of all draws
    ops, radii = ops.cpu(), radii.cpu()
    for b, c in torch.nonzero(chosen.cpu()).tolist():
        channel = out[b : b + 1, first_channel + c : first_channel + c + 1]
        out[b, first_channel + c] = OPERATORS[names[int(ops[b, c])]](channel, int(radii[b, c]))[0, 0]
    return out


def remove_random_component(onehot: np.ndarray, rng: np.random.Generator, p: float, max_fraction: float) -> np.ndarray:
    """For each channel of ``onehot`` (K, *S) with probability ``p``, clear one random connected
    component that covers at most ``max_fraction`` of the patch."""
    out = onehot
    for k in range(onehot.shape[0]):
        if rng.random() >= p or not onehot[k].any():
            continue
        labels, n = cc3d.connected_components(np.ascontiguousarray(onehot[k] > 0), connectivity=26, return_N=True)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        small = np.flatnonzero(sizes <= max_fraction * onehot[k].size) + 1
        if small.size:
            if out is onehot:
                out = onehot.copy()
            out[k][labels == rng.choice(small)] = 0
    return out
