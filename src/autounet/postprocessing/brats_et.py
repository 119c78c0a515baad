"""BraTS enhancing-tumour post-processing and its grid search (seed 004 §2.5).

Seed 004 §2.5: find the ET connected components; a component smaller than 16 voxels whose mean ET
probability is below 0.9 becomes necrosis (NCR, so its voxels stay in the tumour core); then, if
fewer than 73 ET voxels remain in total and their mean probability is below 0.9, all ET becomes
necrosis. This avoids the costly edge case of a few false-positive ET voxels in a case without ET:
with the BraTS convention the ET Dice is 1 for an empty prediction of an empty reference, else 0.
The ET threshold (0.3-0.7, step 0.05) and the voxel counts (0-100) were chosen by grid search on
the cross-validation predictions, maximising the mean of the WT, TC and ET Dice.

Components use 26-connectivity (``EtRule.connectivity``); the paper does not say which.

Sparse annotations (``ignore_label``): reference voxels of the ignore label count in no Dice of the
grid search; the rule itself still sees whole components (sizes, mean probabilities).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autounet.data.image_io import read_label, read_volume
from autounet.errors import AutounetError
from autounet.postprocessing.components import _bbox, _components
from autounet.regions import RegionSet, labels_to_regions, region_masks, regions_to_labels
from autounet.utils.loaders import load_npy, load_npz
from autounet.utils.parallel import map_cases

ArrayOrPath = np.ndarray | str | Path


@dataclass
class EtRule:
    """The ET rule's parameters (seed 004 §2.5 values by default; plain data).

    ``et_threshold`` is the ET region threshold used when probabilities become labels
    (:func:`brats_postprocess`); :func:`apply_et_rule` works on labels already made.
    """

    component_voxels: int = 16
    total_voxels: int = 73
    min_mean_probability: float = 0.9
    et_threshold: float = 0.45
    connectivity: int = 26


def et_labels(region_set: RegionSet) -> tuple[int, int]:
    """``(et_label, necrosis_label)``: the innermost region's paint and the paint it is demoted to
    (the enclosing region's, e.g. TC → necrosis), checked so that demotion keeps the other regions."""
    if len(region_set.regions) < 2:
        raise AutounetError("the ET rule needs a region set with an enclosing region (e.g. WT, TC, ET)")
    et, outer = region_set.regions[-1], region_set.regions[-2]
    if et.paint not in et.labels or outer.paint in et.labels:
        raise AutounetError(f"region {et.name!r} must contain its paint label and not {outer.name!r}'s")
    for r in region_set.regions[:-1]:
        if r.paint in et.labels:
            raise AutounetError(f"region {r.name!r} paints {r.paint}, which is inside region {et.name!r}")
        if (et.paint in r.labels) != (outer.paint in r.labels):
            raise AutounetError(
                f"region {r.name!r} holds one of labels {et.paint} and {outer.paint} but not the other: demoting "
                "ET would change it"
            )
    return et.paint, outer.paint


def apply_et_rule(
    labels: np.ndarray,
    et_probability: np.ndarray,
    rule: EtRule | None = None,
    et_label: int = 4,
    necrosis_label: int = 1,
) -> np.ndarray:
    """Seed 004 §2.5's rule on a label map; returns a new array.

    1. ET components with fewer than ``component_voxels`` voxels and mean ET probability below
       ``min_mean_probability`` become ``necrosis_label``;
    2. if the ET left has fewer than ``total_voxels`` voxels and their mean probability is below
       ``min_mean_probability``, all of it becomes ``necrosis_label``.
    """
    rule = rule or EtRule()
    if et_probability.shape != labels.shape:
        raise ValueError(f"ET probability shape {et_probability.shape} differs from labels {labels.shape}")
    out = np.array(labels, copy=True)
    et = out == et_label
    box = _bbox(et)
    if box is None:
        return out
    cc, n = _components(et[box], rule.connectivity)
    sizes = np.bincount(cc.ravel(), minlength=n + 1)
    psum = np.bincount(cc.ravel(), weights=np.asarray(et_probability[box], dtype=np.float64).ravel(), minlength=n + 1)
    means = psum / np.maximum(sizes, 1)
    demote = (sizes < rule.component_voxels) & (means < rule.min_mean_probability)
    demote[0] = False
    keep = ~demote
    keep[0] = False
    total, prob = int(sizes[keep].sum()), float(psum[keep].sum())
    if 0 < total < rule.total_voxels and prob / total < rule.min_mean_probability:
        demote[1:] = True
    if demote.any():
        out[box][demote[cc]] = necrosis_label
    return out


def brats_postprocess(probabilities: np.ndarray, region_set: RegionSet, rule: EtRule | None = None) -> np.ndarray:
    """Region probabilities → labels with ``rule.et_threshold`` for ET, then the ET rule (seed 004 §2.5)."""
    rule = rule or EtRule()
    et_label, necrosis_label = et_labels(region_set)
    thresholds = [*region_set.thresholds[:-1], rule.et_threshold]
    labels = regions_to_labels(probabilities, region_set, thresholds)
    return apply_et_rule(labels, np.asarray(probabilities[-1]), rule, et_label, necrosis_label)


# ---------------------------------------------------------------------------------------------
# Grid search
# ---------------------------------------------------------------------------------------------


@dataclass
class EtGridTable:
    """Grid-search results; ``score[t, m, c, v]`` is the mean over cases of mean(WT, TC, ET) Dice
    for ET threshold ``thresholds[t]``, ``min_mean_probabilities[m]``, ``component_voxels[c]`` and
    ``total_voxels[v]``; ``et_dice`` the ET part alone; ``region_dice[t]`` the other regions' mean
    Dice (they do not depend on the rule)."""

    region_names: list[str]
    thresholds: list[float]
    min_mean_probabilities: list[float]
    component_voxels: list[int]
    total_voxels: list[int]
    score: np.ndarray
    et_dice: np.ndarray
    region_dice: np.ndarray
    num_cases: int
    best: EtRule
    default_threshold: float

    def score_of(self, rule: EtRule) -> float | None:
        """The table's score for ``rule``, or None when it is not on the grid."""
        try:
            t = _index(self.thresholds, rule.et_threshold)
            m = _index(self.min_mean_probabilities, rule.min_mean_probability)
            c = self.component_voxels.index(rule.component_voxels)
            v = self.total_voxels.index(rule.total_voxels)
        except ValueError:
            return None
        return float(self.score[t, m, c, v])

    def summary(self) -> dict[str, Any]:
        """Plain-data summary: best rule and score, the unprocessed baseline and the paper's rule."""
        no_rule = EtRule(0, 0, self.best.min_mean_probability, self.default_threshold, self.best.connectivity)
        paper = EtRule(et_threshold=self.default_threshold, connectivity=self.best.connectivity)
        per_threshold = []
        for t, thr in enumerate(self.thresholds):
            entry: dict[str, Any] = {"et_threshold": thr, "best_score": float(self.score[t].max())}
            if 0 in self.component_voxels and 0 in self.total_voxels:
                entry["no_rule_score"] = float(
                    self.score[t, 0, self.component_voxels.index(0), self.total_voxels.index(0)]
                )
            entry["region_dice"] = {n: float(d) for n, d in zip(self.region_names[:-1], self.region_dice[t])}
            per_threshold.append(entry)
        return {
            "num_cases": self.num_cases,
            "score": "mean over cases of the mean of the region Dice scores (both empty counts as 1)",
            "best": {
                "component_voxels": self.best.component_voxels,
                "total_voxels": self.best.total_voxels,
                "min_mean_probability": self.best.min_mean_probability,
                "et_threshold": self.best.et_threshold,
                "connectivity": self.best.connectivity,
            },
            "best_score": self.score_of(self.best),
            "no_rule_score": self.score_of(no_rule),
            "paper_rule_score": self.score_of(paper),
            "per_threshold": per_threshold,
        }


def _index(values: Sequence[float], x: float) -> int:
    for i, v in enumerate(values):
        if math.isclose(v, x, abs_tol=1e-9):
            return i
    raise ValueError(x)


def _region_dice(tp: float, pred: float, ref: float) -> float:
    """BraTS convention: both empty → 1."""
    return 1.0 if pred + ref == 0 else 2.0 * tp / (pred + ref)


def _et_dice_grid(
    sizes: np.ndarray,
    psum: np.ndarray,
    tps: np.ndarray,
    ref_count: int,
    mps: np.ndarray,
    cvs: np.ndarray,
    tvs: np.ndarray,
    counted: np.ndarray | None = None,
) -> np.ndarray:
    """ET Dice ``(M, C, V)`` of every rule on one case, from its ET components' sizes, probability
    sums and true positives (index 0 is background and ignored); ``counted``: the components'
    voxels that count in Dice (annotated ones), default all."""
    s, q, tp = sizes[1:].astype(np.float64), psum[1:], tps[1:]
    a = s if counted is None else counted[1:].astype(np.float64)
    shape = (len(mps), len(cvs), len(tvs))
    if s.size == 0:
        return np.full(shape, 1.0 if ref_count == 0 else 0.0)
    weak = (q / s)[None, :] < mps[:, None]  # (M, n)
    small = s[None, :] < cvs[:, None]  # (C, n)
    keep = ~(weak[:, None, :] & small[None, :, :])  # (M, C, n)
    total = (keep * s).sum(-1)
    prob = (keep * q).sum(-1)
    hits = (keep * tp).sum(-1)
    scored = (keep * a).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(total > 0, prob / np.maximum(total, 1), np.inf)
    drop_all = (total[..., None] > 0) & (total[..., None] < tvs) & (mean[..., None] < mps[:, None, None])
    pred = np.where(drop_all, 0.0, scored[..., None])
    hits = np.where(drop_all, 0.0, hits[..., None])
    denom = pred + ref_count
    return np.where(denom == 0, 1.0, 2.0 * hits / np.maximum(denom, 1))


def _load_probabilities(item: ArrayOrPath) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return item
    path = Path(item)
    if path.suffix == ".npy":
        return load_npy(path)
    if path.suffix == ".npz":
        arrays = load_npz(path)
        if "probabilities" in arrays:
            return arrays["probabilities"]
        if len(arrays) == 1:
            return next(iter(arrays.values()))
        raise AutounetError(f"{path}: expected one array or one named 'probabilities', found {sorted(arrays)}")
    return read_volume(path)[0]


def _load_reference(item: ArrayOrPath) -> np.ndarray:
    return item if isinstance(item, np.ndarray) else read_label(item)[0]


@dataclass
class _Grid:
    region_set: RegionSet
    thresholds: np.ndarray
    mps: np.ndarray
    cvs: np.ndarray
    tvs: np.ndarray
    connectivity: int


def _case_sums(
    items: list[tuple[ArrayOrPath, ArrayOrPath]],
    grid: _Grid,
    load_probabilities: Callable[[ArrayOrPath], np.ndarray],
    load_reference: Callable[[ArrayOrPath], np.ndarray],
    ignore_label: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sums over ``items`` of the other regions' Dice ``(T, R-1)`` and of the ET Dice ``(T, M, C, V)``.

    Per case, the label map without ET is made once; the ET mask at each threshold is painted over
    it, so only the ET components are labelled per threshold, inside the tumour's bounding box.
    """
    rs = grid.region_set
    n_r = len(rs.regions)
    et = n_r - 1
    et_label, _ = et_labels(rs)
    in_region = [et_label in r.labels for r in rs.regions]
    other = np.zeros((len(grid.thresholds), et))
    et_sum = np.zeros((len(grid.thresholds), len(grid.mps), len(grid.cvs), len(grid.tvs)))
    for prob_item, ref_item in items:
        probs, ref = load_probabilities(prob_item), load_reference(ref_item)
        if probs.shape != (n_r, *ref.shape):
            raise AutounetError(
                f"{prob_item if not isinstance(prob_item, np.ndarray) else 'probabilities'}: shape {probs.shape} "
                f"does not match {n_r} regions and the reference shape {ref.shape}"
            )
        ref_masks = labels_to_regions(ref, rs)
        annotated = np.ones(ref.shape, dtype=bool) if ignore_label is None else ref != ignore_label
        masks = region_masks(probs, rs, [*rs.thresholds[:-1], np.inf])
        no_et = np.zeros(ref.shape, dtype=np.int64)
        for r in range(et):
            no_et[masks[r]] = rs.regions[r].paint
        base = labels_to_regions(no_et, rs)
        gate = np.ones(ref.shape, dtype=bool)
        if rs.hierarchical:
            for q in rs.enclosing(et):
                gate &= masks[q]
        base_tp = [int(np.count_nonzero(base[r] & ref_masks[r])) for r in range(et)]
        base_pn = [int(np.count_nonzero(base[r] & annotated)) for r in range(et)]
        ref_n = [int(np.count_nonzero(ref_masks[r])) for r in range(n_r)]
        box = _bbox(gate & (probs[et] >= grid.thresholds.min()))
        for t, thr in enumerate(grid.thresholds):
            if box is None:
                et_mask = None
            else:
                et_mask = (probs[et][box] >= thr) & gate[box]
            for r in range(et):
                tp, pn = base_tp[r], base_pn[r]
                if et_mask is not None:
                    old = base[r][box][et_mask]
                    ref_in = ref_masks[r][box][et_mask]
                    scored = annotated[box][et_mask]
                    if in_region[r]:  # ET voxels join region r where they were outside it
                        pn += int(np.count_nonzero(~old & scored))
                        tp += int(np.count_nonzero(~old & ref_in))
                    else:
                        pn -= int(np.count_nonzero(old & scored))
                        tp -= int(np.count_nonzero(old & ref_in))
                other[t, r] += _region_dice(tp, pn, ref_n[r])
            if et_mask is None or not et_mask.any():
                sizes = psum = tps = counted = np.zeros(1)
            else:
                cc, n = _components(et_mask, grid.connectivity)
                flat = cc.ravel()
                sizes = np.bincount(flat, minlength=n + 1)
                psum = np.bincount(flat, weights=np.asarray(probs[et][box], np.float64).ravel(), minlength=n + 1)
                tps = np.bincount(flat, weights=ref_masks[et][box].ravel(), minlength=n + 1)
                counted = np.bincount(flat, weights=annotated[box].ravel(), minlength=n + 1)
            et_sum[t] += _et_dice_grid(sizes, psum, tps, ref_n[et], grid.mps, grid.cvs, grid.tvs, counted)
    return other, et_sum


def grid_search_et_rule(
    cases: Sequence[tuple[ArrayOrPath, ArrayOrPath]],
    region_set: RegionSet,
    thresholds: Sequence[float] = tuple(np.arange(0.30, 0.7001, 0.05)),
    component_voxels: Sequence[int] = range(0, 101),
    total_voxels: Sequence[int] = range(0, 101),
    min_mean_probabilities: Sequence[float] = (0.9,),
    connectivity: int = 26,
    load_probabilities: Callable[[ArrayOrPath], np.ndarray] | None = None,
    load_reference: Callable[[ArrayOrPath], np.ndarray] | None = None,
    workers: int = 1,
    ignore_label: int | None = None,
) -> tuple[EtRule, EtGridTable]:
    """Choose the ET threshold and rule on cross-validation predictions (seed 004 §2.5).

    ``cases`` are ``(region probabilities (R, *S), reference label map)`` pairs, as arrays or files
    (``.npy``/``.npz``/images; override with the ``load_*`` callables). Maximises the mean over cases
    of the mean region Dice (BraTS convention: both empty → 1). Every grid point is evaluated
    exactly: per case and threshold the ET components are labelled once and every voxel-count pair
    is scored from their sizes, probability sums and hits. The WT and TC Dice do not depend on the
    rule (demoted ET stays in TC and WT). Ties go to the threshold nearest the region set's, then
    the smallest ``total_voxels``, ``component_voxels`` and the probability nearest 0.9.
    ``ignore_label``: reference voxels of that value (sparse annotations) count in no Dice.
    """
    if not cases:
        raise AutounetError("the ET grid search needs at least one cross-validation case")
    et_labels(region_set)
    grid = _Grid(
        region_set=region_set,
        thresholds=np.round(np.asarray(thresholds, dtype=np.float64), 6),
        mps=np.asarray(min_mean_probabilities, dtype=np.float64),
        cvs=np.asarray(list(component_voxels), dtype=np.float64),
        tvs=np.asarray(list(total_voxels), dtype=np.float64),
        connectivity=connectivity,
    )
    if not (grid.thresholds.size and grid.mps.size and grid.cvs.size and grid.tvs.size):
        raise AutounetError("every grid of the ET search needs at least one value")
    items = list(cases)
    chunk = max(1, math.ceil(len(items) / (4 * max(1, workers))))
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    fn = functools.partial(
        _case_sums,
        grid=grid,
        load_probabilities=load_probabilities or _load_probabilities,
        load_reference=load_reference or _load_reference,
        ignore_label=ignore_label,
    )
    parts = map_cases(fn, chunks, workers, "ET grid search")
    n = len(items)
    other = sum(p[0] for p in parts) / n
    et_dice = sum(p[1] for p in parts) / n
    n_r = len(region_set.regions)
    score = (other.sum(axis=1)[:, None, None, None] + et_dice) / n_r

    default_t = float(region_set.thresholds[-1])
    best_value = score.max()
    ties = np.argwhere(score >= best_value - 1e-12)
    t, m, c, v = min(
        (tuple(int(i) for i in idx) for idx in ties),
        key=lambda i: (
            abs(grid.thresholds[i[0]] - default_t),
            grid.tvs[i[3]],
            grid.cvs[i[2]],
            abs(grid.mps[i[1]] - 0.9),
        ),
    )
    best = EtRule(
        component_voxels=int(grid.cvs[c]),
        total_voxels=int(grid.tvs[v]),
        min_mean_probability=float(grid.mps[m]),
        et_threshold=float(grid.thresholds[t]),
        connectivity=connectivity,
    )
    table = EtGridTable(
        region_names=region_set.names,
        thresholds=[float(x) for x in grid.thresholds],
        min_mean_probabilities=[float(x) for x in grid.mps],
        component_voxels=[int(x) for x in grid.cvs],
        total_voxels=[int(x) for x in grid.tvs],
        score=score,
        et_dice=et_dice,
        region_dice=other,
        num_cases=n,
        best=best,
        default_threshold=default_t,
    )
    return best, table
