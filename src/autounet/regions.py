"""Region-based labels: train on overlapping regions (sigmoid outputs), convert back to labels.

Seed 004 §2.4 (after Isensee et al., "nnU-Net for Brain Tumor Segmentation"): the BraTS classes are
turned into three partially overlapping regions, whole tumour (WT), tumour core (TC) and enhancing
tumour (ET), one sigmoid output each. Seed 004 §2.5 turns region probabilities back into labels:
WT < 0.45 → background, else TC < 0.4 → edema, else ET < 0.45 → necrosis, else enhancing tumour.

A :class:`RegionSet` lists its regions outermost first. Converting back paints each region's
``paint`` label where its probability reaches its threshold, in order, so inner regions overwrite
outer ones. With ``hierarchical`` (the BraTS presets) a region is painted only where every earlier
region containing it is painted too, which is exactly seed 004's nested rule; without it
(nnU-Net v2's ``regions_class_order`` behaviour) each region is painted on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from autounet.data.dataset import IGNORE_LABEL_NAME, without_ignore
from autounet.errors import AutounetError

if TYPE_CHECKING:
    import torch

    from autounet.data.dataset import RawDataset

# Seed 004 §2.5: WT, TC, ET thresholds.
BRATS_THRESHOLDS = (0.45, 0.4, 0.45)
# nnU-Net v2 thresholds sigmoid outputs at 0.5.
DEFAULT_THRESHOLD = 0.5


@dataclass
class Region:
    """One region: the label values it unites and the label painted where it is predicted."""

    name: str
    labels: tuple[int, ...]
    paint: int


@dataclass
class RegionSet:
    """Regions ordered outermost first, one threshold each (plain data, JSON-able)."""

    regions: list[Region]
    thresholds: list[float]
    hierarchical: bool = False

    def __post_init__(self) -> None:
        if not self.regions:
            raise AutounetError("a region set needs at least one region")
        if len(self.thresholds) != len(self.regions):
            raise AutounetError(
                f"a region set with {len(self.regions)} regions needs as many thresholds, got {len(self.thresholds)}"
            )
        for r in self.regions:
            if not r.labels:
                raise AutounetError(f"region {r.name!r} is empty: it must list at least one label value")
            if any(v <= 0 for v in r.labels):
                raise AutounetError(
                    f"region {r.name!r}: label values must be positive (0 is background), got {r.labels}"
                )
            if r.paint <= 0:
                raise AutounetError(f"region {r.name!r}: paint label must be positive, got {r.paint}")

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.regions]

    @property
    def label_values(self) -> list[int]:
        """Every foreground label value some region contains, sorted."""
        return sorted({v for r in self.regions for v in r.labels})

    def enclosing(self, index: int) -> list[int]:
        """Indices of earlier regions that contain every label of region ``index``."""
        own = set(self.regions[index].labels)
        return [q for q in range(index) if own <= set(self.regions[q].labels)]


def _brats(labels: Sequence[Sequence[int]], paints: Sequence[int]) -> RegionSet:
    names = ("whole tumor", "tumor core", "enhancing tumor")
    return RegionSet(
        regions=[Region(n, tuple(v), p) for n, v, p in zip(names, labels, paints)],
        thresholds=list(BRATS_THRESHOLDS),
        hierarchical=True,
    )


def brats_2015() -> RegionSet:
    """BRATS 2013/2015 labels (1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing).

    Converting back paints TC as necrosis (1): non-enhancing tumour (3) is not recovered.
    """
    return _brats([(1, 2, 3, 4), (1, 3, 4), (4,)], [2, 1, 4])


def brats_2017() -> RegionSet:
    """BraTS 2017+ labels (1 necrosis/non-enhancing core, 2 edema, 4 enhancing); seed 004 §2.4."""
    return _brats([(1, 2, 4), (1, 4), (4,)], [2, 1, 4])


def msd_brain_tumour() -> RegionSet:
    """MSD Task01_BrainTumour labels (1 edema, 2 non-enhancing tumour, 3 enhancing tumour)."""
    return _brats([(1, 2, 3), (2, 3), (3,)], [1, 2, 3])


def brats_regions_for(label_values: Iterable[int]) -> RegionSet:
    """The BraTS region set for a dataset's declared label values (background 0 may be included).

    {1, 2, 3, 4} → BRATS 2015, {1, 2, 4} → BraTS 2017+, {1, 2, 3} → MSD Task01 (BraTS data with
    renumbered labels); anything else is not a BraTS convention and raises :class:`AutounetError`.
    """
    fg = {int(v) for v in label_values} - {0}
    if fg == {1, 2, 3, 4}:
        return brats_2015()
    if fg == {1, 2, 4}:
        return brats_2017()
    if fg == {1, 2, 3}:
        return msd_brain_tumour()
    raise AutounetError(
        f"label values {sorted(fg)} are not a BraTS convention: expected {{1, 2, 3, 4}} (BRATS 2015), "
        "{1, 2, 4} (BraTS 2017+) or {1, 2, 3} (MSD Task01); declare regions in dataset.json instead"
    )


def regions_from_v2(
    regions: Mapping[str, int | Sequence[int]],
    labels: Mapping[int, str] | None = None,
    regions_class_order: Sequence[int] | None = None,
    thresholds: Sequence[float] | None = None,
) -> RegionSet:
    """Region set from nnU-Net v2 ``dataset.json`` declarations, outermost first.

    ``regions`` maps names to label values in file order (``{"whole tumor": [1, 2, 3], ...}``);
    entries with value 0 (background) are skipped. ``labels`` (value → name), when given, must
    declare every value a region uses. Paint labels are ``regions_class_order`` when given, else
    for each region the smallest value it contains that no later (inner) region contains.
    """
    items = [(str(n), (v,) if isinstance(v, int) else tuple(int(x) for x in v)) for n, v in regions.items()]
    items = [(n, v) for n, v in items if v != (0,)]
    if not items:
        raise AutounetError("dataset.json declares no regions")
    for name, values in items:
        if not values:
            raise AutounetError(f"region {name!r} is empty: list the label values it unites")
        if 0 in values:
            raise AutounetError(f"region {name!r} contains background (0); regions unite foreground labels only")
        if labels is not None:
            missing = sorted(set(values) - set(labels))
            if missing:
                raise AutounetError(f"region {name!r} uses label value(s) {missing} that dataset.json does not declare")
    for i, (name, values) in enumerate(items):
        for later, lv in items[i + 1 :]:
            if set(lv) == set(values):
                raise AutounetError(f"regions {name!r} and {later!r} contain the same labels {sorted(values)}")
            if set(lv) > set(values):
                raise AutounetError(
                    f"region {later!r} contains region {name!r} but is listed after it: list regions outermost "
                    "first, or the inner region would always be painted over"
                )
    if regions_class_order is not None:
        order = [int(v) for v in regions_class_order]
        if len(order) != len(items):
            raise AutounetError(
                f"regions_class_order has {len(order)} entries but dataset.json declares {len(items)} regions"
            )
        paints = order
    else:
        paints = []
        for i, (name, values) in enumerate(items):
            inner = {v for _, lv in items[i + 1 :] for v in lv}
            own = sorted(set(values) - inner)
            if not own:
                raise AutounetError(
                    f"region {name!r}: cannot choose its paint label, every value {sorted(values)} is also in a "
                    "later region; give 'regions_class_order' in dataset.json"
                )
            paints.append(own[0])
    thr = [DEFAULT_THRESHOLD] * len(items) if thresholds is None else [float(t) for t in thresholds]
    return RegionSet([Region(n, v, p) for (n, v), p in zip(items, paints)], thr)


def region_set_for_dataset(dataset: RawDataset) -> RegionSet | None:
    """The region set a raw dataset declares (nnU-Net v2 ``labels`` lists), or None.

    In nnU-Net v2, once any label entry is a list every foreground entry is a region, integer ones
    included; their file order is read from the descriptor because ``RawDataset.labels`` is sorted.
    """
    if not dataset.regions:
        return None
    raw = {k: v for k, v in dataset.descriptor.get("labels", {}).items() if k != IGNORE_LABEL_NAME}
    return regions_from_v2(raw, without_ignore(dataset.labels), dataset.descriptor.get("regions_class_order"))


def _lookup(region_set: RegionSet, size: int) -> np.ndarray:
    """``(R, size + 1)`` bool: whether label value v is in region r; column ``size`` is "none"."""
    lut = np.zeros((len(region_set.regions), size + 1), dtype=bool)
    for r, region in enumerate(region_set.regions):
        lut[r, [v for v in region.labels if v < size]] = True
    return lut


def labels_to_regions(seg: np.ndarray, region_set: RegionSet) -> np.ndarray:
    """Label map → bool ``(R, *seg.shape)``; values in no region (or negative) are in none."""
    size = max(region_set.label_values) + 1
    idx = np.clip(np.asarray(seg), 0, size).astype(np.intp, copy=False)
    lut = _lookup(region_set, size)
    return np.stack([lut[r][idx] for r in range(lut.shape[0])])


def labels_to_regions_torch(seg: torch.Tensor, region_set: RegionSet) -> torch.Tensor:
    """Training targets: integer ``(B, 1, *S)`` labels → float ``(B, R, *S)`` regions, on seg's device."""
    import torch

    if seg.ndim < 3 or seg.shape[1] != 1:
        raise ValueError(f"expected labels of shape (B, 1, *S), got {tuple(seg.shape)}")
    size = max(region_set.label_values) + 1
    lut = torch.as_tensor(_lookup(region_set, size), dtype=torch.float32, device=seg.device)
    idx = seg[:, 0].long().clamp(0, size)
    return torch.stack([lut[r][idx] for r in range(lut.shape[0])], dim=1)


def label_dtype(max_value: int) -> np.dtype:
    return np.dtype(np.uint8 if max_value < 256 else np.uint16 if max_value < 65536 else np.int32)


def region_masks(
    probabilities: np.ndarray, region_set: RegionSet, thresholds: Sequence[float] | None = None
) -> list[np.ndarray]:
    """Where each region is painted: probability ≥ threshold, and, in a hierarchical set, inside
    every earlier region that contains it (seed 004 §2.5's nested rule)."""
    probabilities = np.asarray(probabilities)
    n = len(region_set.regions)
    if probabilities.shape[0] != n:
        raise ValueError(f"expected {n} region channels, got array of shape {probabilities.shape}")
    thr = region_set.thresholds if thresholds is None else list(thresholds)
    if len(thr) != n:
        raise ValueError(f"expected {n} thresholds, got {len(thr)}")
    masks: list[np.ndarray] = []
    for r in range(n):
        mask = probabilities[r] >= thr[r]
        if region_set.hierarchical:
            for q in region_set.enclosing(r):
                mask &= masks[q]
        masks.append(mask)
    return masks


def regions_to_labels(
    probabilities: np.ndarray, region_set: RegionSet, thresholds: Sequence[float] | None = None
) -> np.ndarray:
    """Region probabilities ``(R, *S)`` → label map in the dataset's label values (seed 004 §2.5).

    A region counts where its probability is ≥ its threshold (``thresholds`` overrides the set's);
    paint labels are written outermost first so inner regions overwrite outer ones.
    """
    masks = region_masks(probabilities, region_set, thresholds)
    out = np.zeros(masks[0].shape, dtype=label_dtype(max(r.paint for r in region_set.regions)))
    for mask, region in zip(masks, region_set.regions):
        out[mask] = region.paint
    return out
