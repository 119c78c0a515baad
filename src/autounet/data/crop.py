"""Cropping to the nonzero region and its inverse."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

Box = tuple[tuple[int, int], ...]  # per axis [start, stop)


def nonzero_mask(image: np.ndarray, fill_holes: bool = True) -> np.ndarray:
    """Voxels where any channel of ``image`` ``(C, Z, Y, X)`` is nonzero, holes filled (seed 001 §2.2)."""
    mask = np.any(image != 0, axis=0)
    return ndimage.binary_fill_holes(mask) if fill_holes else mask


def bounding_box(mask: np.ndarray) -> Box:
    """Smallest box holding every True voxel of ``mask`` (the whole array if there is none)."""
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append((int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, mask.shape[axis]))
    return tuple(out)


def box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def uncrop(array: np.ndarray, box: Box, full_shape: tuple[int, ...], fill: float | int = 0) -> np.ndarray:
    """Place ``array`` (its last ``len(box)`` axes cropped by ``box``) into a ``full_shape`` array."""
    lead = array.shape[: array.ndim - len(box)]
    out = np.full((*lead, *full_shape), fill, dtype=array.dtype)
    out[(Ellipsis, *box_slices(box))] = array
    return out
