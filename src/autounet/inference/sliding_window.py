"""Sliding-window prediction of a whole preprocessed volume (seed 001 §2.4).

Tiles of the training patch size overlap by ``1 - step`` of a patch (half by default), are
predicted in batches, and are merged with Gaussian importance weights (sigma = 1/8 of the patch,
centre voxels count most). Mirroring test-time augmentation averages the predictions over the
flips of the given axes. Volumes smaller than the patch are padded. Results are probabilities
(softmax over classes, or one sigmoid per region).

Memory: the input and the accumulators live on ``accumulate_device``, which is the compute
device when they fit there (the caller decides, see :func:`fits_on_device`) and host memory
otherwise; only the tiles of one batch travel to the compute device. 2D networks run on a 3D
volume as a 3D window of depth 1, so tiles of different slices share a batch.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from autounet.utils.progress import progress_enabled

ACTIVATIONS = ("softmax", "sigmoid")
# Show a tile progress bar for volumes with at least this many network evaluations.
TILE_BAR_THRESHOLD = 64


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
    if patch == 1:  # a 2D network's slice axis: every slice once
        return list(range(size))
    n = math.ceil((size - patch) / (patch * step)) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (the empty one first): 2**len(axes) flips."""
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


# Floats per voxel of one tile that a forward pass without gradients keeps alive at its peak
# (the skip connections of every level plus the convolution in flight, for the plans' 32-320
# features); a margin over what the 3d_fullres networks need.
ACTIVATION_FLOATS_PER_VOXEL = 128


def accumulator_bytes(channels: int, outputs: int, spatial: Sequence[int]) -> int:
    """Bytes of what lives for a whole volume on the accumulating device: the input (C), one
    network's probabilities (K), the weight map (1) and the running total of a fold ensemble (K)."""
    return 4 * math.prod(spatial) * (channels + 2 * outputs + 1)


def activation_bytes(patch: Sequence[int], tiles_per_batch: int) -> int:
    """Bytes a batch of tiles may need for the network's activations."""
    return 4 * math.prod(patch) * tiles_per_batch * ACTIVATION_FLOATS_PER_VOXEL


def fits_in_memory(needed: int, free: int, reserved_unused: int, fraction: float = 0.6) -> bool:
    """Whether ``needed`` bytes fit in ``fraction`` of what is free: the device's free memory plus
    what PyTorch holds reserved but unused (its cache, which it hands out first)."""
    return needed < fraction * (free + reserved_unused)


def fits_on_device(
    device: torch.device,
    channels: int,
    outputs: int,
    spatial: Sequence[int],
    patch: Sequence[int] = (),
    tiles_per_batch: int = 1,
    fraction: float = 0.6,
) -> bool:
    """Whether a volume's input and accumulators, and a batch's activations, fit on ``device``."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    needed = accumulator_bytes(channels, outputs, spatial) + (activation_bytes(patch, tiles_per_batch) if patch else 0)
    return fits_in_memory(needed, free, cached, fraction)


class _SliceNet(torch.nn.Module):
    """A 2D network applied to ``(B, C, 1, Y, X)`` tiles."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x[:, :, 0]).unsqueeze(2)


def _activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    logits = logits.float()
    return torch.softmax(logits, dim=1) if activation == "softmax" else torch.sigmoid(logits)


@torch.no_grad()
def predict_volume(
    network: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    patch: Sequence[int],
    num_outputs: int,
    step: float = 0.5,
    mirror_axes: Sequence[int] = (),
    tiles_per_batch: int = 4,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    activation: str = "softmax",
    accumulate_device: str | torch.device | None = None,
    desc: str = "tiles",
) -> torch.Tensor:
    """Probabilities ``(K, *spatial)`` (float32, on ``accumulate_device``) of an image ``(C, *spatial)``.

    ``patch`` has one value per spatial axis of ``image``. ``mirror_axes`` are spatial axes
    (0-based) to mirror for test-time augmentation. ``accumulate_device`` defaults to ``device``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}")
    device = torch.device(device)
    acc = torch.device(accumulate_device) if accumulate_device is not None else device
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
    x = x.to(acc)
    weight = gaussian_importance(patch, device=acc)
    probs = torch.zeros((num_outputs, *padded), dtype=torch.float32, device=acc)
    norm = torch.zeros(padded, dtype=torch.float32, device=acc)
    starts = list(itertools.product(*[tile_starts(s, p, step) for s, p in zip(padded, patch)]))
    flips = mirror_combinations([a + 2 for a in mirror_axes])
    bar = tqdm(
        total=len(starts),
        desc=desc,
        unit="tile",
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not progress_enabled() or len(starts) * len(flips) < TILE_BAR_THRESHOLD,
    )
    for i in range(0, len(starts), tiles_per_batch):
        chunk = starts[i : i + tiles_per_batch]
        boxes = [tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in chunk]
        batch = torch.stack([x[(slice(None), *b)] for b in boxes]).to(device, non_blocking=True)
        total = None
        for flip in flips:
            inp = torch.flip(batch, flip) if flip else batch
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = network(inp)
            out = _activate(out, activation)
            out = torch.flip(out, flip) if flip else out
            total = out if total is None else total + out
        total = (total / len(flips)).to(acc)
        for b, box in enumerate(boxes):
            probs[(slice(None), *box)] += total[b] * weight
            norm[box] += weight
        bar.update(len(chunk))
    bar.close()
    probs /= norm
    if any(pad):
        probs = probs[(slice(None), *[slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial)])]
    return probs


@torch.no_grad()
def predict_slices(
    network: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    patch: Sequence[int],
    num_outputs: int,
    step: float = 0.5,
    mirror_axes: Sequence[int] = (),
    tiles_per_batch: int = 16,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    activation: str = "softmax",
    accumulate_device: str | torch.device | None = None,
    desc: str = "tiles",
) -> torch.Tensor:
    """A 2D network over every slice (axis 1 of ``image`` ``(C, Z, Y, X)``): probabilities ``(K, Z, Y, X)``.

    ``patch`` and ``mirror_axes`` are the 2D network's (in-plane axes 0 and 1). Tiles of
    different slices are predicted in the same batch.
    """
    return predict_volume(
        _SliceNet(network),
        image,
        (1, *patch),
        num_outputs,
        step,
        [a + 1 for a in mirror_axes],
        tiles_per_batch,
        device,
        amp_dtype,
        activation,
        accumulate_device,
        desc,
    )
