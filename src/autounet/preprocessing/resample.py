"""Resampling to a target spacing, one axis at a time, in float32 and bounded memory.

Cubic B-spline interpolation on an axis-aligned grid is separable: resampling axis by axis with
1D splines gives the same result as a 3D spline, while each pass holds only the input, its
spline coefficients and the output of one channel. Output voxel centres keep the physical extent
of the input (pixel-centre mapping, as ``skimage.transform.resize`` and the public nnU-Net use):
input coordinate = (i + 0.5) * n_in / n_out - 0.5. Axes whose length does not change are not
touched, so a case already at the target spacing is copied exactly.

For anisotropic data (largest / smallest spacing above a threshold, 3 by default) the coarse
axis is resampled with its own order (nearest by default), as the public nnU-Net does, so that
interpolation never blends distant slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    """Shape covering the same physical extent at ``target_spacing`` (at least 1 voxel per axis)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def separate_axis(spacing: Sequence[float], target_spacing: Sequence[float], threshold: float) -> int | None:
    """The coarse axis to resample on its own, or None when the data are not anisotropic.

    The case's own spacing decides first, then the target spacing (as in the public nnU-Net).
    """
    for sp in (spacing, target_spacing):
        sp = np.asarray(sp, dtype=float)
        if sp.max() / sp.min() > threshold:
            return int(np.argmax(sp))
    return None


def _source_coordinates(n_in: int, n_out: int) -> np.ndarray:
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices at the first and last sample (scipy's 'mirror' boundary)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.abs(idx) % period
    return np.where(idx > n - 1, period - idx, idx)


def _along(weights: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = weights.size
    return weights.reshape(shape).astype(np.float32)


# Interpolating passes work on slabs of about this many voxels, so that the spline coefficients
# and the gathered taps never hold more than a slab, whatever the volume's size.
SLAB_VOXELS = 8 * 1024 * 1024


def _interpolate(array: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """Order 1 or 3 resampling of one slab along ``axis`` (float32 result)."""
    n_in = array.shape[axis]
    x = _source_coordinates(n_in, n_out)
    if order == 1:
        x = np.clip(x, 0, n_in - 1)
        i0 = np.floor(x).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        t = _along(x - i0, axis, array.ndim)
        out = np.take(array, i0, axis=axis).astype(np.float32, copy=False)
        out *= 1 - t
        out += np.take(array, i1, axis=axis) * t
        return out
    coeffs = ndimage.spline_filter1d(array, order=3, axis=axis, mode="mirror", output=np.float32)
    i = np.floor(x).astype(np.intp)
    t = x - i
    weights = ((1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6)
    out = None
    for k, w in enumerate(weights):
        term = np.take(coeffs, _mirror(i + k - 1, n_in), axis=axis)
        term *= _along(w, axis, array.ndim)
        if out is None:
            out = term
        else:
            out += term
    return out


def resample_axis(array: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """Resample ``array`` along ``axis`` to ``n_out`` samples with spline ``order`` 0, 1 or 3.

    Order 0 keeps the dtype (labels, masks); orders 1 and 3 return float32, computed slab by slab
    along another axis so that temporary memory stays bounded.
    """
    n_in = array.shape[axis]
    if n_out == n_in:
        return array
    if order == 0:
        idx = np.clip(np.floor(_source_coordinates(n_in, n_out) + 0.5), 0, n_in - 1).astype(np.intp)
        return np.take(array, idx, axis=axis)
    if order not in (1, 3):
        raise ValueError(f"interpolation order must be 0, 1 or 3, got {order}")
    others = [a for a in range(array.ndim) if a != axis]
    if not others or array.size <= SLAB_VOXELS:
        return _interpolate(array, axis, n_out, order)
    slab_axis = max(others, key=lambda a: array.shape[a])
    per_index = array.size // array.shape[slab_axis]
    step = max(1, SLAB_VOXELS // per_index)
    out_shape = list(array.shape)
    out_shape[axis] = n_out
    out = np.empty(out_shape, dtype=np.float32)
    for start in range(0, array.shape[slab_axis], step):
        index = [slice(None)] * array.ndim
        index[slab_axis] = slice(start, start + step)
        out[tuple(index)] = _interpolate(array[tuple(index)], axis, n_out, order)
    return out


def _orders(ndim: int, order: int, sep_axis: int | None, sep_order: int) -> list[int]:
    return [sep_order if a == sep_axis else order for a in range(ndim)]


def resample_volume(
    volume: np.ndarray, new_shape: Sequence[int], order: int, sep_axis: int | None = None, sep_order: int = 0
) -> np.ndarray:
    """Resample one 3D volume; the separate axis (if any) uses ``sep_order``.

    Axes are processed shrinking ones first, so intermediate arrays stay as small as possible.
    """
    orders = _orders(volume.ndim, order, sep_axis, sep_order)
    axes = sorted(range(volume.ndim), key=lambda a: new_shape[a] / volume.shape[a])
    out = volume if order == 0 else volume.astype(np.float32, copy=False)
    for a in axes:
        out = resample_axis(out, a, int(new_shape[a]), orders[a])
    return out


def resample_image(
    image: np.ndarray, new_shape: Sequence[int], order: int = 3, sep_axis: int | None = None, sep_order: int = 0
) -> np.ndarray:
    """Resample every channel of ``image`` ``(C, Z, Y, X)``; returns float32 ``(C, *new_shape)``."""
    if image.shape[0] == 1:  # no stacking copy for the common single-channel case
        out = resample_volume(image[0], new_shape, order, sep_axis, sep_order)
        return (out if out is not image[0] else out.copy()).astype(np.float32, copy=False)[None]
    out = np.empty((image.shape[0], *new_shape), dtype=np.float32)
    for c in range(image.shape[0]):
        out[c] = resample_volume(image[c], new_shape, order, sep_axis, sep_order)
    return out


def resample_labels_nearest(labels: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label map (the paper's choice); dtype kept."""
    return resample_volume(labels, new_shape, order=0)


def resample_labels_linear(
    labels: np.ndarray, new_shape: Sequence[int], num_classes: int, sep_axis: int | None = None, sep_order: int = 0
) -> np.ndarray:
    """Linear interpolation of each class's one-hot map, then argmax.

    Holds one class at a time (running maximum), never the whole one-hot volume.
    """
    best = np.full(tuple(new_shape), -1.0, dtype=np.float32)
    out = np.zeros(tuple(new_shape), dtype=labels.dtype)
    for k in range(num_classes):
        prob = resample_volume((labels == k).astype(np.float32), new_shape, 1, sep_axis, sep_order)
        better = prob > best
        best[better] = prob[better]
        out[better] = k
    return out
