"""Streaming ensemble and export (issue 22): members' probabilities become the segmentation on
the input grid one class at a time, inside the crop box.

For each class (or region) ``k`` every member's map is resampled from its preprocessed space to
the crop box of the input grid (:func:`revert_channel`), the members are averaged, and a running
argmax (or the region's threshold) updates the segmentation. Memory holds a few box-sized
volumes, never ``K × input grid``. With ``--save-probabilities`` each averaged map goes straight
into ``CASE.npz`` (:class:`~autounet.data.probabilities.ProbabilityStream`); the BraTS ET rule
keeps the one map it needs (the last region's).

The resampling is the one of :mod:`autounet.preprocessing.resample` (linear, pixel-centre
mapping; nearest along the separate axis of anisotropic data): on a GPU (when the model runs
there) its PyTorch twin :func:`resample_linear`, which gives the same float32 values operation for
operation; on a CPU NumPy's own slabbed passes, which measured faster than gathers in PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from autounet.data.crop import box_slices
from autounet.data.probabilities import ProbabilityStream
from autounet.errors import AutounetError
from autounet.postprocessing.apply import Postprocessing
from autounet.postprocessing.brats_et import apply_et_rule, et_labels
from autounet.preprocessing.resample import SLAB_VOXELS, resample_volume
from autounet.preprocessing.store import CaseProperties
from autounet.regions import RegionSet, label_dtype

Box = tuple[tuple[int, int], ...]


@dataclass
class MemberOutput:
    """One ensemble member's probabilities ``(K, z, y, x)`` in its preprocessed space."""

    probabilities: torch.Tensor | np.ndarray
    properties: CaseProperties


def _source_coordinates(n_in: int, n_out: int) -> np.ndarray:
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def _resample_axis(x: torch.Tensor, axis: int, n_out: int, order: int) -> torch.Tensor:
    """:func:`autounet.preprocessing.resample.resample_axis` in PyTorch (orders 0 and 1), slab by
    slab along the largest other axis so that temporaries stay near ``SLAB_VOXELS``."""
    n_in = x.shape[axis]
    if n_out == n_in:
        return x
    src = _source_coordinates(n_in, n_out)
    if order == 0:
        idx = np.clip(np.floor(src + 0.5), 0, n_in - 1).astype(np.int64)
        return x.index_select(axis, torch.from_numpy(idx).to(x.device))
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    shape = [1] * x.dim()
    shape[axis] = n_out
    w1 = torch.from_numpy((src - i0).astype(np.float32)).reshape(shape).to(x.device)
    w0 = 1 - w1
    i0_t, i1_t = torch.from_numpy(i0).to(x.device), torch.from_numpy(i1).to(x.device)
    out_shape = list(x.shape)
    out_shape[axis] = n_out
    out = torch.empty(out_shape, dtype=torch.float32, device=x.device)
    others = [a for a in range(x.dim()) if a != axis]
    slab_axis = max(others, key=lambda a: x.shape[a])
    per_index = max(1, out.numel() // out.shape[slab_axis])
    step = max(1, SLAB_VOXELS // per_index)
    for start in range(0, x.shape[slab_axis], step):
        part = x.narrow(slab_axis, start, min(step, x.shape[slab_axis] - start))
        # the same float32 operations, in the same order, as the NumPy resampler
        res = part.index_select(axis, i0_t).float()
        res *= w0
        res += part.index_select(axis, i1_t) * w1
        out.narrow(slab_axis, start, part.shape[slab_axis]).copy_(res)
    return out


def resample_linear(volume: torch.Tensor, new_shape: Sequence[int], sep_axis: int | None = None) -> torch.Tensor:
    """Linear resampling of one float volume (nearest along ``sep_axis``), shrinking axes first,
    as :func:`autounet.preprocessing.resample.resample_volume` does with order 1."""
    orders = [0 if a == sep_axis else 1 for a in range(volume.dim())]
    axes = sorted(range(volume.dim()), key=lambda a: new_shape[a] / volume.shape[a])
    out = volume.float()
    for a in axes:
        out = _resample_axis(out, a, int(new_shape[a]), orders[a])
    return out


def _backward(props: CaseProperties) -> list[int]:
    tf = props.transpose_forward
    return [tf.index(a) for a in range(len(tf))]


def _crop_shape_network(props: CaseProperties) -> list[int]:
    return [props.shape_after_crop[a] for a in props.transpose_forward]


def revert_channel(channel: torch.Tensor | np.ndarray, props: CaseProperties, device: torch.device) -> np.ndarray:
    """One map ``(z, y, x)`` in preprocessed space -> the crop box of the input grid, float32."""
    if list(channel.shape) != list(props.shape_after_resampling):
        raise AutounetError(
            f"{props.case_id}: result shape {list(channel.shape)} does not match the preprocessed shape "
            f"{props.shape_after_resampling}"
        )
    sep = props.separate_axis
    if device.type == "cpu":  # NumPy's slabbed passes: the same values, and faster on a CPU than gathers in PyTorch
        source = channel.to(torch.float32).numpy() if isinstance(channel, torch.Tensor) else np.asarray(channel)
        p = resample_volume(source.astype(np.float32, copy=False), _crop_shape_network(props), 1, sep, 0)
        if np.shares_memory(p, source):  # nothing resampled: never hand out the member's own memory
            p = p.copy()
        return p.transpose(_backward(props))
    t = torch.as_tensor(channel).to(device)
    p = resample_linear(t, _crop_shape_network(props), sep)
    if p.data_ptr() == t.data_ptr():
        p = p.clone()
    return p.permute(*_backward(props)).cpu().numpy()


def _union_box(boxes: Sequence[Box]) -> Box:
    return tuple((min(b[a][0] for b in boxes), max(b[a][1] for b in boxes)) for a in range(len(boxes[0])))


class _Member:
    def __init__(self, output: MemberOutput, box: Box, device: torch.device):
        self.output, self.device = output, device
        own = tuple(tuple(b) for b in output.properties.crop_bbox)
        # where the member's own box lies inside the common box (identical boxes: all of it)
        self.inner = tuple(slice(o[0] - c[0], o[1] - c[0]) for o, c in zip(own, box))
        self.box_shape = tuple(b[1] - b[0] for b in box)
        self.same = own == box

    def add_to(self, total: np.ndarray | None, k: int, fill: float) -> np.ndarray:
        """``total`` + this member's class ``k`` in the common box (``total`` None: a new array)."""
        p = revert_channel(self.output.probabilities[k], self.output.properties, self.device)
        if not self.same:  # the member's map is ``fill`` outside its own box
            full = np.full(self.box_shape, fill, np.float32)
            full[self.inner] = p
            p = full
        if total is None:
            return np.ascontiguousarray(p, dtype=np.float32)
        total += p
        return total


def stream_segmentation(
    members: Sequence[MemberOutput],
    label_values: Sequence[int],
    regions: RegionSet | None = None,
    postprocessing: Postprocessing | None = None,
    probabilities: ProbabilityStream | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The ensemble's label map on the input grid (label values), computed class by class.

    Equal to averaging every member's reverted probabilities and taking their argmax (or the
    regions' thresholds), with ``postprocessing`` applied; ``probabilities`` receives each
    averaged map on the input grid in class order (background 1 outside the crop box).
    """
    device = torch.device(device)
    first = members[0].properties
    shape = tuple(first.original_shape)
    boxes = [tuple(tuple(b) for b in m.properties.crop_bbox) for m in members]
    box = _union_box(boxes)
    workers = [_Member(m, box, device) for m in members]
    slices = box_slices(box)
    n = members[0].probabilities.shape[0]
    pp = postprocessing
    et_rule = pp is not None and pp.kind == "brats_et"
    if et_rule:  # as Postprocessing.apply: the rule's own region set decides the labels
        if not regions or len(pp.regions.regions) != n:
            raise AutounetError("the ET post-processing needs the model's region probabilities")
        regions = pp.regions
    thresholds = None
    if regions:
        thresholds = list(regions.thresholds)
        if et_rule:
            thresholds[-1] = pp.rule.et_threshold
        out_box = np.zeros(workers[0].box_shape, label_dtype(max(r.paint for r in regions.regions)))
        masks: list[np.ndarray] = []
    else:
        best = None
        seg_box = None
    et_map = None
    for k in range(n):
        fill = 1.0 if (not regions and k == 0) else 0.0
        total = _average(workers, k, fill)
        if regions:
            mask = total >= thresholds[k]
            if regions.hierarchical:
                for q in regions.enclosing(k):
                    mask &= masks[q]
            masks.append(mask)
            out_box[mask] = regions.regions[k].paint
            if et_rule and k == n - 1:
                et_map = total
        elif best is None:
            best, seg_box = total, np.zeros(total.shape, np.uint8 if n <= 256 else np.uint16)
        else:
            better = total > best
            np.copyto(best, total, where=better)
            seg_box[better] = k
        if probabilities is not None:
            probabilities.write(k, total, slices, fill)
    if regions:
        labels = np.zeros(shape, out_box.dtype)
        labels[slices] = out_box
        if et_rule:
            et_label, necrosis_label = et_labels(regions)
            full_et = np.zeros(shape, np.float32)
            full_et[slices] = et_map
            labels = apply_et_rule(labels, full_et, pp.rule, et_label, necrosis_label)
    else:
        values = np.asarray(label_values)
        dtype = np.uint8 if values.max() < 256 else np.uint16
        labels = np.full(shape, values[0], dtype)  # outside the crop box: background
        labels[slices] = values.astype(dtype)[seg_box]
    if pp is not None and not et_rule:
        labels = pp.apply(labels)
    return labels


def _average(workers: Sequence[_Member], k: int, fill: float) -> np.ndarray:
    """The members' mean of class ``k`` in the common box (summed in member order, as before)."""
    total = None
    for w in workers:
        total = w.add_to(total, k, fill)
    if len(workers) > 1:
        total /= len(workers)
    return total
