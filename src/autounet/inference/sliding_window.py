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

Precision: the ``K`` probability accumulators are float16 (:data:`ACCUMULATOR_DTYPE`, half the
memory of float32, as nnU-Net v2 keeps its logits), while each tile's probabilities, the weight
map, the normaliser and the division by it are float32. A probability then carries a relative
error of at most about ``overlaps * 2**-11`` (under 0.4 % with 8 overlapping tiles), so a
segmentation can only change where two classes were within that of each other in float32
(:data:`HALF_ACCUMULATION_TIE`); the final argmax (after reverting to the input's grid) is float32.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from autounet.utils.progress import progress_enabled

ACTIVATIONS = ("softmax", "sigmoid")
# What the per-class accumulators (and so the returned probabilities) are stored in.
ACCUMULATOR_DTYPE = torch.float16
# Two classes whose float32 probabilities are closer than this may swap order with float16
# accumulators (at most 8 float16 additions of values <= 1, each rounding by <= 2**-11 relative).
HALF_ACCUMULATION_TIE = 8 * 2.0**-11
# Show a tile progress bar for volumes with at least this many network evaluations.
TILE_BAR_THRESHOLD = 64
# A batch's float32 outputs (K x tiles x patch) stay within this, at one tile at least: with 104
# classes one 160x128x96 tile's probabilities alone take 820 MB.
OUTPUT_BATCH_BYTES = 256 * 1024**2
# The float32 temporaries of adding a tile into the accumulators, and of normalising finished
# rows, are made a few classes (or rows) at a time, within this.
CHUNK_BYTES = 64 * 1024**2


def tiles_per_batch_for(three_d: bool, num_outputs: int, patch: Sequence[int]) -> int:
    """Tiles predicted at once: 4 (3D) or 32 (2D slices), fewer where their ``num_outputs``
    float32 probabilities would exceed :data:`OUTPUT_BATCH_BYTES`."""
    per_tile = 4 * num_outputs * math.prod(patch)
    return max(1, min(4 if three_d else 32, OUTPUT_BATCH_BYTES // per_tile))


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
    """Bytes of what lives for a whole volume on the accumulating device: the input (C, float32),
    one network's probabilities (K), the weight map (1, float32), the running total of a fold
    ensemble (K) and one class's float32 quotient while normalising (1)."""
    half = torch.finfo(ACCUMULATOR_DTYPE).bits // 8
    return math.prod(spatial) * (4 * channels + 2 * half * outputs + 4 + 4)


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


def _most_overlapping(starts: Sequence[int], patch: int, size: int) -> int:
    """The largest number of tiles that cover one voxel along an axis."""
    cover = np.zeros(size + 1, dtype=np.int64)
    for s in starts:
        cover[s] += 1
        cover[s + patch] -= 1
    return int(np.cumsum(cover).max())


def _accumulation_weights(
    patch: Sequence[int], starts: Sequence[Sequence[int]], size: Sequence[int], device: torch.device
) -> torch.Tensor:
    """The Gaussian weights scaled for float16 accumulators: the most overlapping tiles sum to at
    most 2**14 (float16 ends at 65504), and no weight is below 2**-4, so that a weight times a
    probability of at least 2**-10 stays a normal float16 (a tile corner's Gaussian weight, 1e-8
    and less, would otherwise vanish, and a volume corner that one tile covers would get no
    probability at all). The division by the summed weights removes the scale."""
    overlaps = math.prod(_most_overlapping(st, p, s) for st, p, s in zip(starts, patch, size))
    scale = 2.0 ** math.floor(math.log2(2**14 / overlaps))
    return (gaussian_importance(patch, device=device) * scale).clamp_min(2.0**-4)


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


class RowSink(Protocol):
    """Where a rolling accumulator puts finished rows: ``write(z0, rows)`` receives the normalised
    probabilities ``(K, r, Y, X)`` (float16, on the accumulating device) of output rows ``z0 .. z0 + r``
    along axis 0, in increasing order, each row once."""

    def write(self, z0: int, rows: torch.Tensor) -> None: ...


@torch.no_grad()
def predict_volume(
    network: torch.nn.Module | Sequence[torch.nn.Module],
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
    accumulate_dtype: torch.dtype | None = None,
    sink: RowSink | None = None,
) -> torch.Tensor | None:
    """Probabilities ``(K, *spatial)`` of an image ``(C, *spatial)``, on ``accumulate_device``, in
    ``accumulate_dtype`` (default :data:`ACCUMULATOR_DTYPE`, float16; see the module docstring).

    ``patch`` has one value per spatial axis of ``image``. ``mirror_axes`` are spatial axes
    (0-based) to mirror for test-time augmentation. ``accumulate_device`` defaults to ``device``.
    ``network`` may be several networks (the folds of a model): each tile is predicted by all of
    them and their mean is accumulated once, as the mean of their separate results would be.

    With a ``sink`` the accumulator rolls: it holds only the rows of axis 0 that one tile spans;
    rows that no later tile touches (tiles go in order along axis 0) are normalised and handed to
    ``sink.write`` as soon as they are complete, and nothing is returned.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}")
    device = torch.device(device)
    acc = torch.device(accumulate_device) if accumulate_device is not None else device
    networks = list(network) if isinstance(network, Sequence) else [network]
    for net in networks:
        net.eval()
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
    starts_per_axis = [tile_starts(s, p, step) for s, p in zip(padded, patch)]
    weight = _accumulation_weights(patch, starts_per_axis, padded, acc)
    rows = patch[0] if sink is not None else padded[0]  # the rows of axis 0 held at a time
    probs = torch.zeros((num_outputs, rows, *padded[1:]), dtype=accumulate_dtype or ACCUMULATOR_DTYPE, device=acc)
    norm = torch.zeros((rows, *padded[1:]), dtype=torch.float32, device=acc)
    rolling = _Rolling(probs, norm, sink, pad, spatial) if sink is not None else None
    starts = list(itertools.product(*starts_per_axis))  # in order along axis 0
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
        for net in networks:
            for flip in flips:
                inp = torch.flip(batch, flip) if flip else batch
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = net(inp)
                out = _activate(out, activation)
                out = torch.flip(out, flip) if flip else out
                total = out if total is None else total.add_(out)
                del out  # one batch of outputs besides the running total
        total = total.div_(len(flips) * len(networks)).to(acc)
        classes = max(1, CHUNK_BYTES // (4 * weight.numel()))
        for b, box in enumerate(boxes):
            if rolling is not None:
                box = rolling.advance(box)
            target = probs[(slice(None), *box)]
            for k in range(0, num_outputs, classes):  # float32 temporaries of a few classes at a time
                target[k : k + classes] += (total[b, k : k + classes] * weight).to(probs.dtype)
            norm[box] += weight
        bar.update(len(chunk))
    bar.close()
    if rolling is not None:
        rolling.finish(padded[0])
        return None
    for k in range(num_outputs):  # in float32, one class at a time
        probs[k] = probs[k].float().div_(norm)
    if any(pad):
        probs = probs[(slice(None), *[slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial)])]
    return probs


class _Rolling:
    """The window of rows ``base .. base + rows`` (axis 0, padded coordinates) of a rolling
    accumulator: before a tile that starts at row ``s`` is added, rows ``base .. s`` are complete
    (every later tile starts at ``s`` or after), so they go to the sink and the window moves on."""

    def __init__(self, probs: torch.Tensor, norm: torch.Tensor, sink: RowSink, pad: Sequence[int], spatial):
        self.probs, self.norm, self.sink = probs, norm, sink
        self.base = 0
        # the unpadded volume inside the padded one
        self.keep = [slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial)]

    def advance(self, box: tuple[slice, ...]) -> tuple[slice, ...]:
        """``box`` (padded coordinates) in window coordinates, after flushing what it completes."""
        start = box[0].start
        if start > self.base:
            self._flush(start)
        return (slice(start - self.base, box[0].stop - self.base), *box[1:])

    def finish(self, end: int) -> None:
        if end > self.base:
            self._flush(end)

    def _flush(self, stop: int) -> None:
        done = stop - self.base
        lo, hi = max(self.base, self.keep[0].start), min(stop, self.keep[0].stop)
        k_all, plane = self.probs.shape[0], math.prod(self.probs.shape[2:])
        step = max(1, CHUNK_BYTES // (2 * k_all * plane))  # rows normalised and written at a time
        for r0 in range(lo, hi, step):  # the rows of the unpadded volume, normalised in float32, class by class
            r1 = min(hi, r0 + step)
            inner = (slice(r0 - self.base, r1 - self.base), *self.keep[1:])
            norm = self.norm[inner]
            rows = torch.empty((k_all, *norm.shape), dtype=self.probs.dtype, device=self.probs.device)
            for k in range(k_all):
                rows[k] = self.probs[(k, *inner)].float().div_(norm)
            self.sink.write(r0 - self.keep[0].start, rows)
        held = self.probs.shape[1]
        for r in range(held - done):  # move the unfinished rows to the front, row by row (no copy of the window)
            self.probs[:, r] = self.probs[:, r + done]
            self.norm[r] = self.norm[r + done]
        self.probs[:, max(0, held - done) :] = 0
        self.norm[max(0, held - done) :] = 0
        self.base = stop


@torch.no_grad()
def predict_slices(
    network: torch.nn.Module | Sequence[torch.nn.Module],
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
    accumulate_dtype: torch.dtype | None = None,
    sink: RowSink | None = None,
) -> torch.Tensor | None:
    """A 2D network over every slice (axis 1 of ``image`` ``(C, Z, Y, X)``): probabilities ``(K, Z, Y, X)``.

    ``patch`` and ``mirror_axes`` are the 2D network's (in-plane axes 0 and 1). Tiles of
    different slices are predicted in the same batch.
    """
    nets = [_SliceNet(n) for n in network] if isinstance(network, Sequence) else _SliceNet(network)
    return predict_volume(
        nets,
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
        accumulate_dtype,
        sink,
    )
