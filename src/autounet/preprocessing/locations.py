"""Voxel coordinates of each class, stored for foreground-centred patch sampling.

Sparse annotations: the ignore label is never a class to oversample. In a case that has ignored
voxels, rows of class :data:`ANNOTATED` (0, background, which is otherwise never stored) hold a
sample of the annotated voxels (any class but ignore), so that the sampler can centre its random
patches on annotated voxels; a uniformly placed patch may hold none.
"""

from __future__ import annotations

import math
import zlib

import cc3d
import numpy as np

from autounet.data.crop import bounding_box, box_slices

# Coordinates kept per class: at least this many (or all)...
SAMPLES_PER_CLASS = 10_000
# ...and at least this fraction of the class's voxels (as the public nnU-Net does)...
MIN_FRACTION = 0.01
# ...and up to this many from every connected component, so that small structures (a lesion
# beside a large organ of the same class) are reachable by the sampler.
SAMPLES_PER_COMPONENT = 50
# Rows of this class are annotated voxels (cases with ignored voxels only).
ANNOTATED = 0


def _annotated_rows(seg: np.ndarray, ignore_index: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, int]]:
    """Rows ``(ANNOTATED, z, y, x)`` of a uniform sample of the voxels that are not ``ignore_index``."""
    flat = np.flatnonzero(seg.ravel() != ignore_index)
    n = flat.size
    keep = min(n, max(SAMPLES_PER_CLASS, math.ceil(n * MIN_FRACTION)))
    chosen = np.sort(rng.choice(flat, size=keep, replace=False)) if keep < n else flat
    coords = np.stack(np.unravel_index(chosen, seg.shape), axis=1)
    rows = np.concatenate([np.full((coords.shape[0], 1), ANNOTATED), coords], axis=1).astype(np.int32)
    return rows, {"voxels": int(n), "stored": int(coords.shape[0])}


def sample_class_locations(
    seg: np.ndarray, num_classes: int, seed_text: str, ignore_index: int | None = None
) -> tuple[np.ndarray, dict[int, dict[str, int]]]:
    """Coordinates ``(N, 1 + ndim)`` int32 rows ``(class, z, y, x)`` sorted by class, and per-class counts.

    Every voxel of a class is kept when there are few; otherwise a uniform sample plus a few from
    each connected component (``components`` is then reported too). Classes are ``1 ..
    num_classes - 1``; ``ignore_index`` (sparse annotations) is none of them, and when ``seg``
    holds it, rows of class :data:`ANNOTATED` sample the other voxels.

    Deterministic for a given ``seed_text`` (the case id).
    """
    rng = np.random.default_rng(zlib.crc32(seed_text.encode()))
    rows, info = [], {}
    if ignore_index is not None and bool(np.any(seg == ignore_index)):
        annotated, info[ANNOTATED] = _annotated_rows(seg, ignore_index, rng)
        rows.append(annotated)
    for k in range(1, num_classes):
        mask = seg == k
        box = bounding_box(mask)
        mask = mask[box_slices(box)]  # work inside the class's box: cc3d's labels are 4 bytes a voxel
        index_type = np.int32 if mask.size < 2**31 else np.int64
        flat = np.flatnonzero(mask).astype(index_type)
        n = flat.size
        if n == 0:
            info[k] = {"voxels": 0, "stored": 0}
            continue
        keep = min(n, max(SAMPLES_PER_CLASS, math.ceil(n * MIN_FRACTION)))
        chosen = flat[rng.choice(n, size=keep, replace=False)] if keep < n else flat
        info[k] = {"voxels": int(n)}
        if keep < n:
            cc, components = cc3d.connected_components(np.ascontiguousarray(mask), connectivity=26, return_N=True)
            info[k]["components"] = int(components)
            if components > 1:  # one component is already covered by the uniform sample
                # A random order, grouped by component (stable sort), keeps a random subset of each.
                perm = rng.permutation(n).astype(index_type)
                comp = cc.ravel()[flat[perm]]
                del cc
                order = np.argsort(comp, kind="stable").astype(index_type)
                grouped = comp[order]
                rank = np.arange(n, dtype=index_type) - np.searchsorted(grouped, grouped).astype(index_type)
                chosen = np.union1d(chosen, flat[perm[order[rank < SAMPLES_PER_COMPONENT]]])
        chosen = np.sort(chosen)
        coords = np.stack(np.unravel_index(chosen, mask.shape), axis=1) + np.array([a for a, _ in box])
        rows.append(np.concatenate([np.full((coords.shape[0], 1), k), coords], axis=1).astype(np.int32))
        info[k]["stored"] = int(coords.shape[0])
    table = np.concatenate(rows) if rows else np.zeros((0, 1 + seg.ndim), np.int32)
    return table, info
