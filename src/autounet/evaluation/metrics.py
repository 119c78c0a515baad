"""Segmentation metrics of binary masks and label maps: Dice, IoU, HD95 and surface Dice.

Definitions (distances in millimetres, from the voxel spacing of each array axis):

* **Surface** of a mask: its voxels with at least one face neighbour (6-neighbourhood in 3D, 4 in
  2D) outside the mask; outside the array counts as background.
* **Surface distances**: for each surface voxel of one mask, the Euclidean distance between voxel
  centres to the nearest surface voxel of the other mask (0 where the two surfaces share a voxel).
* **HD95**: the 95th percentile (linear interpolation) of both directed sets of surface distances,
  prediction -> reference and reference -> prediction, pooled into one set: the convention of
  medpy's ``hd95`` and of the BraTS toolkit. (Some tools take the larger of the two directed 95th
  percentiles instead, which is never smaller.)
* **Surface Dice** at tolerance tau (Nikolov et al. 2018, "normalised surface distance"): prediction
  surface voxels within tau of the reference surface plus reference surface voxels within tau of
  the prediction surface, over all surface voxels of both. Each surface voxel stands for the same
  patch of surface: a voxel-count approximation of the paper's surfel areas. "Within" is
  ``distance <= tau`` (plus 1e-6 mm for float rounding).
* **Dice** ``2 TP / (2 TP + FP + FN)`` and **IoU** ``TP / (TP + FP + FN)``, from voxel counts.

Empty masks, chosen with ``empty=``:

==================  ==================================  =============================================
masks               ``"nan"`` (nnU-Net)                  ``"one"`` (BraTS)
==================  ==================================  =============================================
both empty          dice, iou, surface_dice, hd95: NaN   dice = iou = surface_dice = 1, hd95 = 0
exactly one empty   dice = iou = surface_dice = 0,       dice = iou = surface_dice = 0,
                    hd95 NaN                             hd95 = diagonal of the image extent (mm)
==================  ==================================  =============================================

NaN values are left out of means (:mod:`autounet.evaluation.evaluate`). The BraTS toolkit's fixed
373.13 mm is the diagonal of its 240x240x155 volume of 1 mm voxels; here the diagonal of the
actual image, ``sqrt(sum((size * spacing)**2))``, is used.

Speed: masks are first cropped to the bounding box of prediction ∪ reference, which is exact:
outside it both masks are background, so eroding with a background border finds the same
surfaces. Surface distances are then nearest-neighbour queries of a k-d tree over the other
surface's voxel centres (in mm): the same exact Euclidean distances as
``distance_transform_edt(~surface, sampling=spacing)`` read at the surface voxels, but with time
and memory growing with the number of surface voxels instead of the box volume (a 200x300x300 box:
~1 s instead of ~8 s and ~0.7 GB). The tests check both against each other.

Sparse annotations (``ignore_label``, nnU-Net v2's ignore label): voxels whose reference value is
the ignore label are left out of every metric. Both masks are restricted to the annotated voxels
first, so a prediction under ignored voxels changes nothing; surfaces are those of the restricted
masks (a mask's border with ignored voxels counts as surface in both alike). The ignore value is
never a class to evaluate.

Axes of length 1 are dropped first: a ``(1, Y, X)`` label map is a 2D image (otherwise every voxel
would be surface, its neighbours across the single slice lying outside the array).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

EMPTY_CONVENTIONS = ("nan", "one")
SCORES = ("dice", "iou", "hd95", "surface_dice")
COUNTS = ("tp", "fp", "fn", "n_pred", "n_ref")
METRICS = SCORES + COUNTS
_ROUNDING_MM = 1e-6


def binary_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 1.0,
    empty: str = "nan",
) -> dict[str, float | int]:
    """Dice, IoU, HD95 (mm), surface Dice at ``tolerance_mm`` and voxel counts of two masks."""
    check_empty(empty)
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    _check_shapes(pred, ref, spacing)
    (pred, ref), spacing = _drop_single_axes((pred, ref), spacing)
    return _binary(pred, ref, spacing, tolerance_mm, empty, _diagonal_mm(pred.shape, spacing))


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: Sequence[int] | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
    tolerance_mm: float = 1.0,
    empty: str = "nan",
    ignore_label: int | None = None,
) -> dict[str, dict[str, float | int]]:
    """:func:`binary_metrics` of two label maps per class and per region.

    Classes are keyed by their label value as a string (``"1"``), regions by their name; a region's
    voxels are those whose label is one of its values (BraTS whole tumour: ``{"WT": [1, 2, 3]}``).
    ``labels=None`` means every non-zero value present in either map, unless ``regions`` are given,
    in which case only the regions are evaluated. ``ignore_label``: voxels holding it in ``ref``
    count nowhere (see the module's notes); it may not be evaluated itself.
    """
    check_empty(empty)
    pred, ref = np.asarray(pred), np.asarray(ref)
    _check_shapes(pred, ref, spacing)
    (pred, ref), spacing = _drop_single_axes((pred, ref), spacing)
    diagonal = _diagonal_mm(pred.shape, spacing)
    annotated = None if ignore_label is None else ref != ignore_label
    pred_fg, ref_fg = pred != 0, ref != 0
    if annotated is not None:
        pred_fg &= annotated
        ref_fg &= annotated
    box = _union_box(_bounding_box(pred_fg), _bounding_box(ref_fg))
    if labels is None and regions is None:
        labels = [] if box is None else present_labels(np.where(pred_fg, pred, 0)[box], np.where(ref_fg, ref, 0)[box])
    targets = evaluation_targets(labels, regions)
    if ignore_label is not None:
        for key, values in targets.items():
            if ignore_label in values:
                raise ValueError(f"{key!r} includes the ignore label {ignore_label}, which is no class")
    if box is None or any(0 in values for values in targets.values()):
        box = tuple(slice(0, n) for n in pred.shape)
    pred, ref = pred[box], ref[box]
    annotated = None if annotated is None else annotated[box]

    def select(label_map: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
        mask = _select(label_map, values)
        return mask if annotated is None else mask & annotated

    return {
        key: _binary(select(pred, values), select(ref, values), spacing, tolerance_mm, empty, diagonal)
        for key, values in targets.items()
    }


def evaluation_targets(
    labels: Sequence[int] | None, regions: Mapping[str, Sequence[int]] | None
) -> dict[str, tuple[int, ...]]:
    """The classes (key ``str(value)``, sorted) then the regions (in order) as key -> label values."""
    targets: dict[str, tuple[int, ...]] = {str(v): (v,) for v in sorted({_as_label(v) for v in labels or ()})}
    for name, values in (regions or {}).items():
        if name in targets:
            raise ValueError(f"region name {name!r} is also a label value")
        values = tuple(sorted({_as_label(v) for v in values}))
        if not values:
            raise ValueError(f"region {name!r} has no label values")
        targets[str(name)] = values
    return targets


def present_labels(*maps: np.ndarray) -> list[int]:
    """The non-zero label values found in any of ``maps`` (they must be whole numbers)."""
    found: set[int] = set()
    for m in maps:
        found.update(_as_label(v) for v in np.unique(m[m != 0]).tolist())
    return sorted(found)


def empty_pair_metrics(empty: str = "nan") -> dict[str, float | int]:
    """The metrics of a class that is absent from both the prediction and the reference."""
    check_empty(empty)
    score = math.nan if empty == "nan" else 1.0
    return {
        "dice": score,
        "iou": score,
        "hd95": math.nan if empty == "nan" else 0.0,
        "surface_dice": score,
        **dict.fromkeys(COUNTS, 0),
    }


def check_empty(empty: str) -> None:
    if empty not in EMPTY_CONVENTIONS:
        raise ValueError(f"empty must be one of {EMPTY_CONVENTIONS}, got {empty!r}")


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (outside the array is background)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each pred surface voxel to the ref surface, and from each ref one to pred's.

    Works on the arrays as given (no cropping); both masks must be non-empty.
    """
    scale = np.asarray(spacing, dtype=float)
    pred_points = np.argwhere(surface(pred)) * scale
    ref_points = np.argwhere(surface(ref)) * scale
    # Unbalanced trees build faster and answer these queries as fast (measured).
    to_ref, _ = cKDTree(ref_points, balanced_tree=False, compact_nodes=False).query(pred_points)
    to_pred, _ = cKDTree(pred_points, balanced_tree=False, compact_nodes=False).query(ref_points)
    return np.asarray(to_ref, dtype=float), np.asarray(to_pred, dtype=float)


def _binary(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float, empty: str, diagonal: float
) -> dict[str, float | int]:
    box = _union_box(_bounding_box(pred), _bounding_box(ref))
    if box is None:
        return empty_pair_metrics(empty)
    pred, ref = pred[box], ref[box]
    tp = int(np.count_nonzero(pred & ref))
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if n_pred == 0 or n_ref == 0:
        hd95, surface_dice = (diagonal if empty == "one" else math.nan), 0.0
    else:
        d_pred, d_ref = surface_distances(pred, ref, spacing)
        hd95 = float(np.percentile(np.concatenate([d_pred, d_ref]), 95))
        tol = tolerance_mm + _ROUNDING_MM
        within = np.count_nonzero(d_pred <= tol) + np.count_nonzero(d_ref <= tol)
        surface_dice = within / (d_pred.size + d_ref.size)
    return {
        "dice": 2 * tp / (n_pred + n_ref),
        "iou": tp / (n_pred + n_ref - tp),
        "hd95": hd95,
        "surface_dice": float(surface_dice),
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_ref - tp,
        "n_pred": n_pred,
        "n_ref": n_ref,
    }


def _select(label_map: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    return label_map == values[0] if len(values) == 1 else np.isin(label_map, values)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of ``mask`` (None when there is none)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if a is None or b is None:
        return a if b is None else b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _drop_single_axes(
    arrays: tuple[np.ndarray, ...], spacing: Sequence[float]
) -> tuple[tuple[np.ndarray, ...], tuple[float, ...]]:
    shape = arrays[0].shape
    keep = [a for a, n in enumerate(shape) if n > 1] or [len(shape) - 1]
    new_shape = tuple(shape[a] for a in keep)
    return tuple(a.reshape(new_shape) for a in arrays), tuple(float(spacing[a]) for a in keep)


def _diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def _check_shapes(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if pred.ndim == 0 or len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match arrays of shape {pred.shape}")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")


def _as_label(value: float) -> int:
    if not math.isfinite(float(value)) or float(value) != int(value):
        raise ValueError(f"label values must be whole numbers, got {value!r}")
    return int(value)
