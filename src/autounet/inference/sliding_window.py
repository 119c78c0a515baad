"""Sliding-window prediction of a whole preprocessed volume (seed 001 §2.4).

Tiles of the training patch size overlap by ``1 - step`` of a patch (half by default), are
predicted in batches, and are merged with Gaussian importance weights (sigma = 1/8 of the patch,
centre voxels count most). Mirroring test-time augmentation averages the predictions over the
flips of the given axes. Volumes smaller than the patch are padded. Results are softmax
probabilities, accumulated on the device.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_importance(patch: Sequence[int], sigma_fraction: float = 1 / 8, device="cpu") -> torch.Tensor:
    """Weights of a patch, largest at the centre; never 0 (so every voxel gets a weight)."""
    axes = []
    for p in patch:
        x = torch.arange(p, dtype=torch.float32, device=device) - (p - 1) / 2
        sigma = max(p * sigma_fraction, 1e-3)
        axes.append(torch.exp(-0.5 * (x / sigma) ** 2))
    w = axes[0]
    for a in axes[1:]:
        w = w[..., None] * a
    w = w / w.max()
    return w.clamp_min(w[w > 0].min() if (w > 0).any() else 1e-6)


def tile_starts(size: int, patch: int, step: float) -> list[int]:
    """Start positions covering ``size`` with tiles of ``patch``, ``step * patch`` apart at most."""
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / (patch * step)) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (the empty one first): 2**len(axes) flips."""
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


@torch.no_grad()
def predict_volume(
    network: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    patch: Sequence[int],
    num_classes: int,
    step: float = 0.5,
    mirror_axes: Sequence[int] = (),
    tiles_per_batch: int = 4,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Softmax probabilities ``(K, *spatial)`` (float32, on ``device``) of an image ``(C, *spatial)``.

    ``patch`` has one value per spatial axis of ``image`` (2 for 2D networks on slices).
    ``mirror_axes`` are spatial axes (0-based) to mirror for test-time augmentation.
    """
    device = torch.device(device)
    network.eval()
    # A private float32 copy (images may be read-only memory maps).
    x = image.float() if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image, dtype=np.float32))
    spatial = list(x.shape[1:])
    pad = [max(0, p - s) for p, s in zip(patch, spatial)]
    if any(pad):
        pad_arg = []
        for p in reversed(pad):
            pad_arg += [p // 2, p - p // 2]
        x = F.pad(x, pad_arg)
    padded = list(x.shape[1:])
    x = x.to(device)
    weight = gaussian_importance(patch, device=device)
    probs = torch.zeros((num_classes, *padded), dtype=torch.float32, device=device)
    norm = torch.zeros(padded, dtype=torch.float32, device=device)
    starts = list(itertools.product(*[tile_starts(s, p, step) for s, p in zip(padded, patch)]))
    flips = mirror_combinations([a + 2 for a in mirror_axes])
    for i in range(0, len(starts), tiles_per_batch):
        chunk = starts[i : i + tiles_per_batch]
        boxes = [tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in chunk]
        batch = torch.stack([x[(slice(None), *b)] for b in boxes])
        total = None
        for flip in flips:
            inp = torch.flip(batch, flip) if flip else batch
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = network(inp)
            out = torch.softmax(out.float(), dim=1)
            out = torch.flip(out, flip) if flip else out
            total = out if total is None else total + out
        total = total / len(flips)
        for b, box in enumerate(boxes):
            probs[(slice(None), *box)] += total[b] * weight
            norm[box] += weight
    probs /= norm
    if any(pad):
        probs = probs[(slice(None), *[slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial)])]
    return probs


@torch.no_grad()
def predict_slices(
    network: torch.nn.Module,
    image: np.ndarray,
    patch: Sequence[int],
    num_classes: int,
    step: float = 0.5,
    mirror_axes: Sequence[int] = (),
    tiles_per_batch: int = 16,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A 2D network over every slice (axis 1 of ``image`` ``(C, Z, Y, X)``): probabilities ``(K, Z, Y, X)``."""
    out = []
    for z in range(image.shape[1]):
        out.append(
            predict_volume(
                network,
                np.asarray(image[:, z]),
                patch,
                num_classes,
                step,
                mirror_axes,
                tiles_per_batch,
                device,
                amp_dtype,
            )
        )
    return torch.stack(out, dim=1)
