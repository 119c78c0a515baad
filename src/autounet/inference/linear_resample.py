"""Linear resampling of probability maps to the input grid in PyTorch, chunk by chunk (issue 22).

The export resamples every class of every member from the preprocessed grid to the crop box of the
input grid. The sampling is that of :mod:`autounet.preprocessing.resample` (pixel-centre mapping,
linear, nearest along the separate axis of anisotropic data), in-plane first (axes 1 and 2), then
along axis 0. Where both in-plane axes are linear, PyTorch's bilinear kernel takes them in one
call (its weights are computed in float32); otherwise each in-plane axis is two gathers and a
``torch.lerp`` with weights ``w1 = x - floor(x)`` from float64 source coordinates (smaller ratio
first; equal ratios, axis 2 first). Along axis 0 each output row is one ``lerp`` of two source
rows. The values equal :func:`~autounet.preprocessing.resample.resample_volume`'s to float32
rounding (within 2e-6 on probabilities; NumPy takes three operations per pass), which the
export's labels only notice at ties; chunking changes no bit (``tests/test_linear_resample.py``).

What makes it fast is memory, not arithmetic: the output rows along axis 0 are made a chunk at a
time, the in-plane passes of the source rows a chunk needs run in a few buffers of about
``chunk_voxels`` that every chunk reuses (they stay in the CPU's cache, and no pass allocates a
volume-sized array whose first touch costs page faults), and the gathers write into those buffers
(``index_select(out=...)``). The same code runs on a GPU, with larger chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Output voxels per chunk on a CPU (the buffers are a few times this, in float32: a few MB, which
# the cache holds) and on a GPU (fewer, larger kernels).
CPU_CHUNK_VOXELS = 1 << 20
GPU_CHUNK_VOXELS = 1 << 25


@dataclass(frozen=True)
class AxisMap:
    """Where each output sample of one axis reads: ``i0`` (nearest: only ``i0``), or ``i0``/``i1``
    with the float32 weight ``w1`` of ``i1``."""

    i0: np.ndarray
    i1: np.ndarray | None = None
    w1: np.ndarray | None = None

    def rows(self, o0: int, o1: int) -> tuple[int, int]:
        """The source samples ``lo .. hi`` (exclusive) that outputs ``o0 .. o1`` read."""
        last = self.i0 if self.i1 is None else self.i1
        return int(self.i0[o0:o1].min()), int(last[o0:o1].max()) + 1


def axis_map(n_in: int, n_out: int, order: int) -> AxisMap:
    """The sampling of one axis from ``n_in`` to ``n_out`` samples with ``order`` 0 or 1, as
    :func:`autounet.preprocessing.resample.resample_axis` computes it."""
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        return AxisMap(np.clip(np.floor(x + 0.5), 0, n_in - 1).astype(np.int64))
    if order != 1:
        raise ValueError(f"interpolation order must be 0 or 1, got {order}")
    x = np.clip(x, 0, n_in - 1)
    i0 = np.floor(x).astype(np.int64)
    w1 = (x - i0).astype(np.float32)
    return AxisMap(i0, np.minimum(i0 + 1, n_in - 1), w1)


class Buffers:
    """Float32 buffers that successive calls of :func:`resample_rows` reuse, by name: a call
    that allocates its own touches fresh memory, whose page faults cost as much as resampling a
    few rows (a slab-by-slab export makes thousands of calls)."""

    def __init__(self) -> None:
        self._held: dict[str, torch.Tensor] = {}

    def get(self, name: str, voxels: int, device: torch.device) -> torch.Tensor:
        held = self._held.get(name)
        if held is None or held.numel() < voxels or held.device != device:
            held = self._held[name] = torch.empty(voxels, dtype=torch.float32, device=device)
        return held[:voxels]


class _Pass:
    """One axis's map as tensors on ``device``."""

    def __init__(self, m: AxisMap, axis: int, device: torch.device):
        self.axis = axis
        shape = [1, 1, 1]
        shape[axis] = -1
        self.i0 = torch.from_numpy(m.i0).to(device)
        self.i1 = None if m.i1 is None else torch.from_numpy(m.i1).to(device)
        self.w1 = None if m.w1 is None else torch.from_numpy(m.w1).reshape(shape).to(device)
        self.plain = m  # along axis 0: plane by plane, with Python numbers

    def rows(self, row: Callable[[int], torch.Tensor], out: torch.Tensor, c0: int) -> None:
        """Along axis 0, outputs ``c0 ..`` into ``out``: each the copy of one source row (nearest)
        or one ``lerp`` of two (no gathers); ``row(r)``: source row ``r`` (resampled in-plane)."""
        m = self.plain
        for i in range(out.shape[0]):
            j = c0 + i
            if m.i1 is None:
                out[i].copy_(row(int(m.i0[j])))
            else:
                torch.lerp(row(int(m.i0[j])), row(int(m.i1[j])), float(m.w1[j]), out=out[i])

    def run(
        self,
        src: torch.Tensor,
        out: torch.Tensor,
        tmp: torch.Tensor | None,
        c0: int = 0,
        c1: int | None = None,
        lo: int = 0,
    ):
        """``out`` = outputs ``c0 .. c1`` of this map from ``src``, which holds the source samples
        from ``lo`` on; ``tmp``: a buffer of ``out``'s shape. ``out`` and ``tmp`` are contiguous."""
        if self.axis == 0 and self.i1 is not None:
            self.rows(lambda r: src[r - lo], out, c0)
            return
        part = (slice(None),) * self.axis + (slice(c0, c1),)
        i0 = self.i0[c0:c1]
        _select(src, self.axis, i0 - lo if lo else i0, out)
        if self.i1 is None:
            return
        i1 = self.i1[c0:c1]
        _select(src, self.axis, i1 - lo if lo else i1, tmp)
        torch.lerp(out, tmp, self.w1[part], out=out)


def _select(src: torch.Tensor, axis: int, index: torch.Tensor, out: torch.Tensor) -> None:
    """``index_select`` into ``out``. Along the first or last axis of a contiguous 3D array it
    runs on a 2D view: PyTorch's CPU kernel is several times faster on those than on 3D."""
    if src.is_contiguous() and axis in (0, 2):
        shape = (src.shape[0], -1) if axis == 0 else (-1, src.shape[2])
        out_shape = (out.shape[0], -1) if axis == 0 else (-1, out.shape[2])
        torch.index_select(src.view(shape), axis // 2, index, out=out.view(out_shape))
    else:
        torch.index_select(src, axis, index, out=out)


def _take(buffer: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return buffer[: math.prod(shape)].view(*shape)


def source_rows(n_in: int, new_shape: Sequence[int], sep_axis: int | None, o0: int, o1: int) -> tuple[int, int]:
    """The rows ``lo .. hi`` (exclusive) along axis 0 of a source with ``n_in`` rows that output
    rows ``o0 .. o1`` of :func:`resample_rows` read."""
    if n_in == new_shape[0]:
        return o0, o1
    return axis_map(n_in, int(new_shape[0]), 0 if sep_axis == 0 else 1).rows(o0, o1)


def resample_rows(
    block: torch.Tensor,
    n_in: int,
    new_shape: Sequence[int],
    sep_axis: int | None = None,
    rows: tuple[int, int] | None = None,
    first: int = 0,
    out: torch.Tensor | None = None,
    chunk_voxels: int | None = None,
    consume: Callable[[int, int, torch.Tensor], None] | None = None,
    buffers: Buffers | None = None,
) -> torch.Tensor | None:
    """Rows ``rows`` (default all) along axis 0 of a 3D volume of ``n_in`` rows, linearly resampled
    to ``new_shape`` (nearest along ``sep_axis``), float32 on ``block``'s device.

    ``block`` holds the source rows ``first ..`` (at least :func:`source_rows`; any float dtype).
    ``out`` (float32, ``(o1 - o0, *new_shape[1:])``, may be a strided view) receives the result.
    ``consume(c0, c1, chunk)`` instead receives each chunk of output rows ``c0 .. c1`` while it is
    in the cache (a buffer that the next chunk reuses; it may be changed), and nothing is returned.
    ``buffers``: where the working buffers come from (and stay for the next call).
    """
    o0, o1 = rows if rows is not None else (0, int(new_shape[0]))
    device = block.device
    target = [int(s) for s in new_shape]
    plane_out = target[1] * target[2]
    if chunk_voxels is None:
        chunk_voxels = CPU_CHUNK_VOXELS if device.type == "cpu" else GPU_CHUNK_VOXELS
    out_shape = (o1 - o0, target[1], target[2])
    if consume is not None:
        if out is not None:
            raise ValueError("give out or consume, not both")
    elif out is None:
        out = torch.empty(out_shape, dtype=torch.float32, device=device)
    elif tuple(out.shape) != out_shape or out.dtype != torch.float32 or out.device != device:
        raise ValueError(f"out must be float32 {list(out_shape)} on {device}, got {out.dtype} {list(out.shape)}")
    if o1 <= o0:
        return out
    orders = [0 if a == sep_axis else 1 for a in range(3)]
    plane_in = list(block.shape[1:])
    # the in-plane passes, smaller ratio first; equal ratios: the last axis first, whose gathers
    # are the costly ones, while the plane is smaller
    ratio = {a: target[a] / plane_in[a - 1] for a in (1, 2)}
    inplane = [a for a in sorted((2, 1), key=ratio.get) if target[a] != plane_in[a - 1]]
    passes = [_Pass(axis_map(plane_in[a - 1], target[a], orders[a]), a, device) for a in inplane]
    along = None if n_in == target[0] else axis_map(n_in, target[0], orders[0])

    step = max(1, chunk_voxels // plane_out)
    chunks = [(c, min(c + step, o1)) for c in range(o0, o1, step)]
    spans = [along.rows(c0, c1) if along is not None else (c0, c1) for c0, c1 in chunks]
    if spans[0][0] < first or spans[-1][1] > first + block.shape[0]:
        raise ValueError(
            f"block holds source rows {first}..{first + block.shape[0]}, needs {spans[0][0]}..{spans[-1][1]}"
        )
    r_max = max(hi - lo for lo, hi in spans)

    # buffers that every chunk reuses: the in-plane passes' intermediate results and second
    # gathers; the in-plane results of the source rows a chunk reads (``planes``, rows ``have``);
    # a chunk of the result when ``out`` is a strided view
    def buffer(name: str, voxels: int) -> torch.Tensor:
        if buffers is not None:
            return buffers.get(name, voxels, device)
        return torch.empty(voxels, dtype=torch.float32, device=device)

    size, plane = 0, list(plane_in)
    for p in passes:
        plane[p.axis - 1] = target[p.axis]
        size = max(size, r_max * plane[0] * plane[1])
    # both in-plane axes linear and axis 0 resampled: PyTorch's bilinear kernel makes each chunk's
    # new source rows (about three times faster than two passes of gathers; its weights are
    # float32, the same values to rounding), kept by row for the next chunk without a copy
    linear_plane = len(passes) == 2 and all(p.i1 is not None for p in passes)
    bilinear = along is not None and linear_plane
    made: dict[int, torch.Tensor] = {}
    work = [buffer(f"work{i}", size) for i in range(0 if bilinear else min(len(passes), 2) + (1 if passes else 0))]
    # two, alternating: a chunk's first rows are the last chunk's last, copied across
    planes = None
    if passes and along is not None and not bilinear:
        planes = [buffer(f"plane{i}", r_max * plane_out) for i in range(2)]
    direct = consume is None and out.is_contiguous()
    staged = None if direct else buffer("staged", step * plane_out)
    a_pass = None if along is None else _Pass(along, 0, device)
    have = (0, 0)

    for (c0, c1), (lo, hi) in zip(chunks, spans):
        dst = out[c0 - o0 : c1 - o0] if direct else _take(staged, (c1 - c0, target[1], target[2]))
        if bilinear:
            for r in [r for r in made if r < lo]:
                del made[r]
            start = max(lo, max(made) + 1) if made else lo
            if start < hi:
                new = _bilinear(block[start - first : hi - first], target)
                made.update((start + i, new[i]) for i in range(hi - start))
            a_pass.rows(made.__getitem__, dst, c0)
        elif not passes:  # nothing in-plane: the source rows themselves
            if a_pass is not None:
                a_pass.run(block[lo - first : hi - first], dst, None, c0, c1, lo)
            else:
                dst.copy_(block[lo - first : hi - first])
        else:
            if planes is None:  # rows map one to one: the last in-plane pass writes the result
                into, start = dst, lo
            else:
                planes.reverse()
                into = _take(planes[0], (hi - lo, target[1], target[2]))
                kept = max(0, have[1] - max(lo, have[0]))
                if kept:  # the rows this chunk shares with the last one
                    into[:kept].copy_(_take(planes[1], (have[1] - have[0], *target[1:]))[lo - have[0] :])
                start = lo + kept
                have = (lo, hi)
            _in_plane(block[start - first : hi - first], passes, target, work, into[start - lo :], linear_plane)
            if a_pass is not None:
                a_pass.run(into, dst, None, c0, c1, lo)
        if consume is not None:
            consume(c0, c1, dst)
        elif not direct:
            out[c0 - o0 : c1 - o0].copy_(dst)
    return out


def _in_plane(
    src: torch.Tensor, passes: Sequence[_Pass], target: Sequence[int], work, into: torch.Tensor, bilinear: bool
) -> None:
    """``src`` rows resampled in-plane by ``passes`` into ``into`` (``work``: reused buffers;
    ``bilinear``: both passes linear, made by :func:`_bilinear` in one call)."""
    if src.shape[0] == 0:
        return
    if src.dtype != torch.float32:
        src = src.to(torch.float32)
    if bilinear:
        into.copy_(_bilinear(src, target))
        return
    plane = list(src.shape)
    for i, p in enumerate(passes):
        plane[p.axis] = target[p.axis]
        dst = into if i == len(passes) - 1 else _take(work[i % 2], plane)
        p.run(src, dst, _take(work[-1], plane))
        src = dst


def _bilinear(src: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """``src`` rows (float32 or not) resampled in-plane to ``target[1:]`` by PyTorch's bilinear
    kernel (pixel-centre mapping, as ``align_corners=False``), float32, new memory."""
    src = src.to(torch.float32)
    return F.interpolate(src[:, None], size=tuple(target[1:]), mode="bilinear", align_corners=False)[:, 0]


def resample_linear(volume: torch.Tensor, new_shape: Sequence[int], sep_axis: int | None = None) -> torch.Tensor:
    """The whole ``volume`` (3D) resampled to ``new_shape`` by :func:`resample_rows` (float32)."""
    return resample_rows(volume, volume.shape[0], new_shape, sep_axis)
