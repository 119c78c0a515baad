"""Streaming ensemble and export (issue 22): members' probabilities become the segmentation on
the input grid slab by slab and class by class, inside the crop box.

The crop box is cut into slabs along the input axis that the members' preprocessed axis 0 comes
from (``transpose_forward[0]``). For each slab and each class (or region) ``k``, every member's
rows of class ``k`` that the slab needs (with the one-row interpolation margin) are read, from
memory or from the member's file on disk (:mod:`autounet.inference.spill`), resampled to the slab
(:func:`revert_rows`), averaged over the members, and a running argmax (or the region's
threshold) updates the slab's labels. Members on one preprocessed grid (2d and 3d_fullres at one
spacing; a configuration's folds are averaged before, tile by tile) are summed before they are reverted, once
(:class:`_Summed`), and when that leaves one grid the running argmax takes each chunk of reverted
rows while it is in the cache (:func:`_argmax_rows`). Memory holds the label volume and a few
slab-sized float buffers (``slab_bytes``), never ``K × input grid``. With ``--save-probabilities`` the loops turn
round (class outside, slabs inside), so that each averaged map goes straight into ``CASE.npz``
(:class:`~autounet.data.probabilities.ProbabilityStream`) while the running argmax covers the
whole box; the BraTS ET rule keeps the one map it needs (the last region's).

The resampling is the one of :mod:`autounet.preprocessing.resample` (linear, pixel-centre
mapping; nearest along the separate axis of anisotropic data), in PyTorch on the device the model
ran on (:mod:`autounet.inference.linear_resample`): a slab is resampled in-plane first, then along
the slab axis; its values are the whole volume's, bit for bit, and NumPy's to float32 rounding.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from autounet.data.crop import box_slices
from autounet.data.probabilities import ProbabilityStream
from autounet.errors import AutounetError
from autounet.inference.class_code import PACKED_CLASSES, classes_of, code_mask, pack_
from autounet.inference.linear_resample import Buffers, resample_rows, source_rows
from autounet.inference.spill import SpillVolume
from autounet.postprocessing.apply import Postprocessing
from autounet.postprocessing.brats_et import apply_et_rule, et_labels
from autounet.preprocessing.store import CaseProperties
from autounet.regions import RegionSet, label_dtype

Box = tuple[tuple[int, int], ...]


@dataclass
class MemberOutput:
    """One ensemble member's probabilities ``(K, z, y, x)`` in its preprocessed space (in memory,
    or spilled to disk)."""

    probabilities: torch.Tensor | np.ndarray | SpillVolume
    properties: CaseProperties


def _backward(props: CaseProperties) -> list[int]:
    tf = props.transpose_forward
    return [tf.index(a) for a in range(len(tf))]


def _crop_shape_network(props: CaseProperties) -> list[int]:
    return [props.shape_after_crop[a] for a in props.transpose_forward]


def revert_channel(channel: torch.Tensor | np.ndarray, props: CaseProperties, device: torch.device) -> np.ndarray:
    """One map ``(z, y, x)`` in preprocessed space -> the crop box of the input grid, float32 (new
    memory, never the member's own), by :func:`~autounet.inference.linear_resample.resample_rows`
    on ``device``."""
    if list(channel.shape) != list(props.shape_after_resampling):
        raise AutounetError(
            f"{props.case_id}: result shape {list(channel.shape)} does not match the preprocessed shape "
            f"{props.shape_after_resampling}"
        )
    t = _as_tensor(channel).to(device)
    p = resample_rows(t, t.shape[0], _crop_shape_network(props), props.separate_axis)
    return p.cpu().numpy().transpose(_backward(props))


def _as_tensor(array: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


# The export's float buffers per voxel of a slab: a member's reverted rows and their in-plane pass
# (float32, 4 + 4 + 4), the members' sum (4), the running maximum (4), masks and indices (4).
SLAB_BYTES_PER_VOXEL = 24
DEFAULT_SLAB_BYTES = 256 * 1024**2


class _Summed:
    """Members on one preprocessed grid (same shape, crop box and axes: e.g. 2d and 3d_fullres of
    one spacing), summed before they are reverted: resampling is linear, so reverting the sum once
    equals the sum of the reverted maps to float32 rounding, at a fraction of the export's time."""

    def __init__(self, parts: Sequence[torch.Tensor | np.ndarray | SpillVolume]):
        self.parts = list(parts)
        self.shape = tuple(parts[0].shape)


def _grid(props: CaseProperties) -> tuple:
    """What decides how a member's map is reverted: members with the same one share it."""
    return (
        tuple(props.shape_after_resampling),
        tuple(tuple(b) for b in props.crop_bbox),
        tuple(props.transpose_forward),
        props.separate_axis,
    )


def _class_rows(probabilities, k: int, z0: int, z1: int) -> torch.Tensor:
    """Rows ``z0 .. z1`` (axis 0) of class ``k`` as a new float32 tensor on the CPU (parts of a
    :class:`_Summed` added in float32, in member order)."""
    if isinstance(probabilities, _Summed):
        total = _class_rows(probabilities.parts[0], k, z0, z1)
        for part in probabilities.parts[1:]:
            total.add_(_stored_rows(part, k, z0, z1))
        return total
    return _stored_rows(probabilities, k, z0, z1).to(torch.float32, copy=True)


def _stored_rows(probabilities, k: int, z0: int, z1: int) -> torch.Tensor:
    """Rows ``z0 .. z1`` of class ``k`` in their stored type (a view where they are in memory)."""
    if isinstance(probabilities, SpillVolume):
        return torch.from_numpy(probabilities.rows(k, z0, z1))
    if isinstance(probabilities, torch.Tensor):
        return probabilities[k, z0:z1].cpu()
    return _as_tensor(np.asarray(probabilities[k, z0:z1]))


def _sources(
    probabilities, n: int, props: CaseProperties, o0: int, o1: int, device: torch.device, read_ahead: bool = True
):
    """Each class's :class:`_Source` of rows ``o0 .. o1``, in class order. Where rows are read from
    disk (a spilled member) and ``read_ahead``, a second thread reads the next class's while this
    one is reverted, so that the export does not wait for the disk."""
    parts = probabilities.parts if isinstance(probabilities, _Summed) else [probabilities]
    if not read_ahead or not any(isinstance(part, SpillVolume) for part in parts):
        for k in range(n):
            yield _Source(probabilities, k, props, o0, o1, device)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="autounet-export-reader") as reader:
        pending = reader.submit(_Source, probabilities, 0, props, o0, o1, device)
        for k in range(n):
            source = pending.result()
            if k + 1 < n:
                pending = reader.submit(_Source, probabilities, k + 1, props, o0, o1, device)
            yield source


def revert_rows(
    probabilities,
    k: int,
    props: CaseProperties,
    o0: int,
    o1: int,
    device: torch.device,
    out: np.ndarray | None = None,
    consume=None,
    buffers: Buffers | None = None,
) -> np.ndarray | None:
    """Rows ``o0 .. o1`` along the preprocessed axis 0 of class ``k``, reverted to the crop box of
    the input grid (input axis order, float32): the source rows they interpolate from are read
    (``probabilities``: ``(K, z, y, x)`` in memory or a :class:`SpillVolume`), resampled in-plane,
    then along axis 0 with the whole volume's source coordinates. ``out`` (float32, the result's
    shape, input axis order): written and returned instead of new memory (whose first touch costs
    page faults of the order of the resampling itself). ``consume``: given each chunk of rows in
    preprocessed axis order instead (see :func:`resample_rows`); nothing is returned."""
    source = _Source(probabilities, k, props, o0, o1, device)
    if consume is not None:
        source.resample(consume=consume, buffers=buffers)
        return None
    if out is None or device.type != "cpu":
        p = source.resample().cpu()
        if out is None:
            return p.numpy().transpose(_backward(props))
        torch.from_numpy(out).permute(*props.transpose_forward).copy_(p)
        return out
    source.resample(out=torch.from_numpy(out).permute(*props.transpose_forward))
    return out


class _Source:
    """The source rows of class ``k`` that rows ``o0 .. o1`` along the preprocessed axis 0 read
    once reverted (``block``, float32 on ``device``, from row ``lo``), and how they are resampled."""

    def __init__(self, probabilities, k: int, props: CaseProperties, o0: int, o1: int, device: torch.device):
        shape = list(probabilities.shape[1:])
        if shape != list(props.shape_after_resampling):
            raise AutounetError(
                f"{props.case_id}: result shape {shape} does not match the preprocessed shape "
                f"{props.shape_after_resampling}"
            )
        self.n_in, self.rows = shape[0], (o0, o1)
        self.target, self.sep = _crop_shape_network(props), props.separate_axis
        self.lo, hi = source_rows(self.n_in, self.target, self.sep, o0, o1)
        self.block = _class_rows(probabilities, k, self.lo, hi).to(device)

    def resample(self, **options) -> torch.Tensor | None:
        """The rows reverted (in-plane, then along axis 0) by :func:`resample_rows` (``options``:
        its ``out``, ``consume``, ``buffers``)."""
        return resample_rows(self.block, self.n_in, self.target, self.sep, self.rows, self.lo, **options)


def _union_box(boxes: Sequence[Box]) -> Box:
    return tuple((min(b[a][0] for b in boxes), max(b[a][1] for b in boxes)) for a in range(len(boxes[0])))


class _Member:
    def __init__(self, output: MemberOutput, box: Box, device: torch.device, axis: int, whole: bool, count: int = 1):
        self.output, self.device = output, device
        self.count = count  # members summed in ``output`` (:class:`_Summed`)
        own = tuple(tuple(b) for b in output.properties.crop_bbox)
        # where the member's own box lies inside the common box (identical boxes: all of it)
        self.inner = tuple(slice(o[0] - c[0], o[1] - c[0]) for o, c in zip(own, box))
        self.box_shape = tuple(b[1] - b[0] for b in box)
        self.axis, self.whole = axis, whole  # the input axis of the slabs; whole: one slab, every row

    def add_to(self, total: np.ndarray | None, k: int, slab: tuple[int, int], fill: float) -> np.ndarray:
        """``total`` + this member's class ``k`` in ``slab`` (rows ``s0 .. s1`` of the common box
        along the slab axis; ``total`` None: a new array)."""
        a, (s0, s1) = self.axis, slab
        inner = self.inner
        shape = list(self.box_shape)
        shape[a] = s1 - s0
        t0, t1 = max(s0, inner[a].start), min(s1, inner[a].stop)
        p = None
        if t0 < t1:
            props = self.output.properties
            o0, o1 = (0, _crop_shape_network(props)[0]) if self.whole else (t0 - inner[a].start, t1 - inner[a].start)
            p = revert_rows(self.output.probabilities, k, props, o0, o1, self.device)
        where = list(inner)
        where[a] = slice(t0 - s0, t1 - s0)
        if p is None or list(p.shape) != shape:  # the member's map is ``fill`` outside its own box
            full = np.full(shape, fill * self.count, np.float32)
            if p is not None:
                full[tuple(where)] = p
            p = full
        if total is None:
            return np.ascontiguousarray(p, dtype=np.float32)
        total += p
        return total


class _Decision:
    """The running argmax (class indices: the first maximum, NaN counting as -inf) or the regions'
    labels of an array of ``shape`` (a slab, or the whole box), updated one class at a time at
    ``where``."""

    def __init__(self, shape: Sequence[int], n: int, regions: RegionSet | None, thresholds: Sequence[float] | None):
        self.shape, self.regions, self.thresholds = tuple(shape), regions, thresholds
        if regions:
            self.out = np.zeros(self.shape, label_dtype(max(r.paint for r in regions.regions)))
            self.masks: list[np.ndarray] = []
        else:
            self.best = np.empty(self.shape, np.float32)
            self.seg = np.zeros(self.shape, np.uint8 if n <= 256 else np.uint16)
            self._better, self._step = np.empty(self.shape, bool), np.empty(self.shape, self.seg.dtype)

    def add(self, k: int, total: np.ndarray, where: tuple[slice, ...]) -> None:
        if self.regions:
            if len(self.masks) == k:
                self.masks.append(np.zeros(self.shape, bool))
            mask = total >= self.thresholds[k]
            if self.regions.hierarchical:
                for q in self.regions.enclosing(k):
                    mask &= self.masks[q][where]
            self.masks[k][where] = mask
            self.out[where][mask] = self.regions.regions[k].paint
        elif k == 0:  # NaN counts as -inf: never better, as _argmax_rows
            self.best[where] = np.nan_to_num(total, nan=-np.inf)
        else:
            # without branches (a mask-driven copy or assignment mispredicts on every voxel of a
            # noisy map: 10 x slower): seg += better * (k - seg), in its unsigned wrap-around
            best, seg, better, step = (a[where] for a in (self.best, self.seg, self._better, self._step))
            np.greater(total, best, out=better)
            np.fmax(best, total, out=best)  # a NaN in total is never better, as the comparison says
            np.subtract(k, seg, out=step)
            np.multiply(step, better, out=step)
            np.add(seg, step, out=seg)


def _slabs(box_shape: Sequence[int], axis: int, whole: bool, slab_bytes: int):
    """``(s0, s1)`` rows of the box along ``axis``, each slab's buffers within ``slab_bytes``."""
    if whole:
        return [(0, box_shape[axis])]
    plane = max(1, int(np.prod(box_shape)) // max(1, box_shape[axis]))
    rows = max(1, slab_bytes // (SLAB_BYTES_PER_VOXEL * plane))
    return [(s, min(s + rows, box_shape[axis])) for s in range(0, box_shape[axis], rows)]


def _slab_index(axis: int, ndim: int, s0: int, s1: int) -> tuple[slice, ...]:
    index = [slice(None)] * ndim
    index[axis] = slice(s0, s1)
    return tuple(index)


def stream_segmentation(
    members: Sequence[MemberOutput],
    label_values: Sequence[int],
    regions: RegionSet | None = None,
    postprocessing: Postprocessing | None = None,
    probabilities: ProbabilityStream | None = None,
    device: torch.device | str = "cpu",
    slab_bytes: int = DEFAULT_SLAB_BYTES,
) -> np.ndarray:
    """The ensemble's label map on the input grid (label values), computed slab by slab and class
    by class (see the module docstring).

    Equal to averaging every member's reverted probabilities and taking their argmax (or the
    regions' thresholds), with ``postprocessing`` applied; ``probabilities`` receives each
    averaged map on the input grid in class order (background 1 outside the crop box).
    """
    device = torch.device(device)
    first = members[0].properties
    shape = tuple(first.original_shape)
    box = _union_box([tuple(tuple(b) for b in m.properties.crop_bbox) for m in members])
    box_shape = tuple(b[1] - b[0] for b in box)
    axes = {m.properties.transpose_forward[0] for m in members}
    axis = first.transpose_forward[0]
    whole = len(axes) > 1  # members whose axis 0 differs: one slab (every row of each)
    grids: dict[tuple, list[MemberOutput]] = {}
    for m in members:
        grids.setdefault(_grid(m.properties), []).append(m)
    workers = [
        _Member(
            MemberOutput(_Summed([m.probabilities for m in group]), group[0].properties),
            box,
            device,
            axis,
            whole,
            len(group),
        )
        if len(group) > 1
        else _Member(group[0], box, device, axis, whole)
        for group in grids.values()
    ]
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
        labels = np.zeros(shape, label_dtype(max(r.paint for r in regions.regions)))
    else:
        values = np.asarray(label_values)
        lut = values.astype(np.uint8 if values.max() < 256 else np.uint16)
        labels = np.full(shape, lut[0], lut.dtype)  # outside the crop box: background
    inside = labels[slices]  # a view
    et_box = np.zeros(box_shape, np.float32) if et_rule else None
    slabs = _slabs(box_shape, axis, whole, slab_bytes)
    ndim = len(box_shape)
    everything = (slice(None),) * ndim

    if probabilities is None and not regions and len(workers) == 1 and not whole and n <= PACKED_CLASSES:
        # one grid (the usual case): each chunk of rows is decided as soon as it is reverted
        identity = np.array_equal(values, np.arange(len(values)))
        backward = _backward(workers[0].output.properties)
        threads = slab_threads(device)
        # as many slabs at once as threads, each of 1/threads of the slab memory
        parts = _slabs(box_shape, axis, whole, max(1, slab_bytes // threads))
        threads = threads if len(parts) > 1 else 1
        local = threading.local()

        def one_slab(bounds: tuple[int, int]) -> None:
            s0, s1 = bounds
            if not hasattr(local, "buffers"):
                local.buffers = Buffers()
            seg = _argmax_rows(workers[0], n, s0, s1, local.buffers, read_ahead=threads == 1).transpose(backward)
            inside[_slab_index(axis, ndim, s0, s1)] = seg if identity else lut[seg]

        _each(one_slab, parts, threads)
    elif probabilities is None:  # slab by slab; each slab class by class
        for s0, s1 in slabs:
            where = _slab_index(axis, ndim, s0, s1)
            decision = _Decision(inside[where].shape, n, regions, thresholds)
            for k in range(n):
                total = _average(workers, k, (s0, s1), 1.0 if (not regions and k == 0) else 0.0)
                decision.add(k, total, everything)
                if et_rule and k == n - 1:
                    et_box[where] = total
            inside[where] = decision.out if regions else lut[decision.seg]
    else:  # class by class, each class slab by slab, straight into the archive
        decision = _Decision(box_shape, n, regions, thresholds)
        for k in range(n):
            fill = 1.0 if (not regions and k == 0) else 0.0
            mapped = np.empty(box_shape, np.float16)
            for s0, s1 in slabs:
                where = _slab_index(axis, ndim, s0, s1)
                total = _average(workers, k, (s0, s1), fill)
                decision.add(k, total, where)
                mapped[where] = total
                if et_rule and k == n - 1:
                    et_box[where] = total
            probabilities.write(k, mapped, slices, fill)
            del mapped
        for s0, s1 in slabs:
            where = _slab_index(axis, ndim, s0, s1)
            inside[where] = decision.out[where] if regions else lut[decision.seg[where]]
    if et_rule:
        et_label, necrosis_label = et_labels(regions)
        full_et = np.zeros(shape, np.float32)
        full_et[slices] = et_box
        labels = apply_et_rule(labels, full_et, pp.rule, et_label, necrosis_label)
    if pp is not None and not et_rule:
        labels = pp.apply(labels)
    return labels


def slab_threads(device: torch.device) -> int:
    """How many slabs the one-grid export takes at once: on a CPU one per PyTorch thread, each
    slab's operations in its own thread on one core. Many short operations each spread over the
    cores cost a wake-up of the other threads every time, which with the passive OpenMP wait that
    ``import autounet`` sets is a third of the export; slabs side by side need none."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


def _each(work, items: Sequence, threads: int) -> None:
    """``work(item)`` for every item: in this thread, or in ``threads`` threads of one PyTorch
    thread each (the first failure is raised here, once the items begun have ended; the rest are
    not begun)."""
    if threads == 1:
        for item in items:
            work(item)
        return
    pool = ThreadPoolExecutor(
        threads, thread_name_prefix="autounet-export", initializer=torch.set_num_threads, initargs=(1,)
    )
    try:
        for _ in pool.map(work, items):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _argmax_rows(worker: _Member, n: int, o0: int, o1: int, buffers: Buffers, read_ahead: bool = True) -> np.ndarray:
    """The running argmax over the ``n`` (at most ``PACKED_CLASSES``) classes of one member grid's
    rows ``o0 .. o1`` along its preprocessed axis 0, reverted to the input grid's crop box
    (preprocessed axis order), each chunk of reverted rows compared as soon as it is made, while
    it is in the cache: three operations per class and voxel on packed values
    (:mod:`autounet.inference.class_code`; a NaN counts as -inf, as in :class:`_Decision`). The
    members' sum is compared, not their mean: dividing every class by the same count cannot
    change the order.
    ``read_ahead``: spilled rows of the next class are read in a second thread (:func:`_sources`)."""
    props, device = worker.output.properties, worker.device
    shape = (o1 - o0, *_crop_shape_network(props)[1:])
    mask = code_mask(n)
    packed = torch.empty(shape, dtype=torch.int32, device=device)
    # Softmax probabilities sum to 1 (to float16's 2**-11), so the best class of every reverted
    # voxel (a convex combination of source voxels) has at least 1/n of the members' sum: a class
    # below that everywhere in the source rows cannot win in these rows and is not reverted.
    floor = worker.count * (1 - 2**-9) / n
    for k, source in enumerate(_sources(worker.output.probabilities, n, props, o0, o1, device, read_ahead)):
        # NaN (positive NaN's bits are above every number's) can only come from the source rows,
        # checked here at the preprocessed resolution (their maximum is NaN), not in every
        # reverted chunk
        top = float(source.block.max()) if source.block.numel() else 0.0
        nan = math.isnan(top)
        if k > 0 and top < floor:
            continue

        def consume(c0: int, c1: int, chunk: torch.Tensor, k: int = k, nan: bool = nan) -> None:
            if nan:
                torch.nan_to_num(chunk, nan=-torch.inf, out=chunk)
            bits, best = chunk.view(torch.int32), packed[c0 - o0 : c1 - o0]
            if k == 0:
                torch.bitwise_or(bits, mask, out=best)  # class 0's code is the mask
                return
            torch.maximum(best, pack_(bits, k, mask), out=best)

        source.resample(consume=consume, buffers=buffers)
    labels = classes_of(packed, mask, in_place=True)
    return labels.to(torch.uint8).cpu().numpy()


def _average(workers: Sequence[_Member], k: int, slab: tuple[int, int], fill: float) -> np.ndarray:
    """The members' mean of class ``k`` in ``slab`` of the common box (summed in member order)."""
    total = None
    for w in workers:
        total = w.add_to(total, k, slab, fill)
    members = sum(w.count for w in workers)
    if members > 1:
        total /= members
    return total
