"""Connected-component post-processing, chosen on cross-validation (seed 001 §2.5, DESIGN §4.6).

Seed 001 §2.5: when a class lies in a single connected component in every training label, all but
the largest component of that class are removed from predictions. Like the public nnU-Net, and
"better than the paper", a step is only adopted when it does not lower the cross-validation Dice:

1. "keep the largest foreground component" (all labels > 0 taken as one object) is tried first and
   adopted when the mean over classes of the per-class mean Dice does not decrease (gain ≥
   ``min_gain``) and it changed at least one case (a step that changes nothing has no evidence);
2. then, on top of that result, "keep the largest component of class c" for every candidate class
   (the seed-001 criterion, :func:`single_component_classes`), adopted when class c's mean Dice
   does not decrease and the step changed at least one case. Removing components of class c changes no other class's Dice, so the
   per-class decisions are independent of each other.

Dice follows nnU-Net: a case where a class is absent from both prediction and reference has Dice
NaN for that class and is left out of that class's mean. A step that changes no CV case has gain 0
and is adopted: the CV predictions already have the property the step enforces.

Components use 26-connectivity (8 in 2D arrays), as the fingerprint counts them.

Sparse annotations (``ignore_label``): reference voxels of the ignore label count in no Dice of the
decision. Components are still those of the whole prediction (that is what the steps act on); only
their annotated voxels are counted.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cc3d
import numpy as np

from autounet.data.image_io import IMAGE_SUFFIXES, image_suffix, read_label, save_image
from autounet.errors import AutounetError
from autounet.utils.parallel import default_workers, map_cases

CONNECTIVITY = 26

ArrayOrPath = np.ndarray | str | Path


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


def _connectivity(ndim: int, connectivity: int) -> int:
    if ndim == 2:
        return {26: 8, 18: 8, 6: 4}.get(connectivity, connectivity)
    return connectivity


def _as_labels(seg: np.ndarray) -> np.ndarray:
    """cc3d wants integer or bool input; label maps are sometimes stored as floats."""
    if seg.dtype == bool or np.issubdtype(seg.dtype, np.integer):
        return np.ascontiguousarray(seg)
    return np.ascontiguousarray(seg.astype(np.int64 if seg.size and seg.max() >= 65536 else np.uint16))


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a mask, or None when it is empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _components(seg: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Multi-label connected components (each label value labelled separately), and their number."""
    return cc3d.connected_components(_as_labels(seg), connectivity=_connectivity(seg.ndim, connectivity), return_N=True)


def _largest(ids: np.ndarray, sizes: np.ndarray) -> int:
    """The component among ``ids`` with most voxels; ties go to the lowest id (first in raster order)."""
    return int(ids[np.argmax(sizes[ids])])


def keep_largest_component(seg: np.ndarray, classes: Sequence[int], connectivity: int = CONNECTIVITY) -> np.ndarray:
    """Keep only the largest connected component of each listed label value (seed 001 §2.5).

    Voxels of the other components become background (0). Returns a new array of seg's dtype.
    """
    out = np.array(seg, copy=True)
    box = _bbox(out > 0)
    if box is None or not len(classes):
        return out
    sub = out[box]
    cc, n = _components(sub, connectivity)
    flat = cc.ravel()
    sizes = np.bincount(flat, minlength=n + 1)
    comp_class = np.zeros(n + 1, dtype=np.int64)
    comp_class[flat] = sub.ravel()
    remove = np.zeros(n + 1, dtype=bool)
    for c in classes:
        ids = np.flatnonzero(comp_class == c)
        ids = ids[ids > 0]
        if ids.size > 1:
            remove[ids] = True
            remove[_largest(ids, sizes)] = False
    if remove.any():
        sub[remove[cc]] = 0  # sub is a view into out
    return out


def keep_largest_foreground(seg: np.ndarray, connectivity: int = CONNECTIVITY) -> np.ndarray:
    """Treat all foreground (seg > 0) as one object and keep its largest connected component."""
    out = np.array(seg, copy=True)
    fg = out > 0
    box = _bbox(fg)
    if box is None:
        return out
    cc, n = _components(fg[box], connectivity)
    if n > 1:
        sizes = np.bincount(cc.ravel(), minlength=n + 1)
        keep = _largest(np.arange(1, n + 1), sizes)
        out[box][(cc != keep) & (cc > 0)] = 0
    return out


def single_component_classes(components_per_class: Sequence[dict[str, int]]) -> list[int]:
    """Classes that form exactly one connected component in every training case (seed 001 §2.5).

    ``components_per_class`` is one mapping per case, label value (as text) → number of components,
    as the fingerprint stores it. A case where the class is absent (missing key or 0) does not
    count against it; a class must occur in at least one case to be listed.
    """
    seen: set[int] = set()
    broken: set[int] = set()
    for case in components_per_class:
        for key, count in case.items():
            c = int(key)
            if c == 0 or count == 0:
                continue
            seen.add(c)
            if count != 1:
                broken.add(c)
    return sorted(seen - broken)


# ---------------------------------------------------------------------------------------------
# Decision
# ---------------------------------------------------------------------------------------------


@dataclass
class PostprocessingDecision:
    """Which component steps to apply, and the cross-validation evidence for them (plain data).

    ``evidence["foreground"]`` and ``evidence["classes"][str(c)]`` give the mean CV Dice per class
    (``dice_without`` / ``dice_with``), the mean over classes (``mean_without`` / ``mean_with``),
    ``gain``, ``cases_changed`` and ``adopted``; ``evidence["final"]`` the Dice after all adopted
    steps. Dice values that are undefined (class never present) are ``None``.
    """

    keep_largest_foreground: bool
    keep_largest_classes: list[int]
    candidates: list[int]
    evidence: dict[str, Any] = field(default_factory=dict)
    connectivity: int = CONNECTIVITY


def apply_postprocessing(seg: np.ndarray, decision: PostprocessingDecision) -> np.ndarray:
    """Apply a decision: the foreground step first, then the per-class steps."""
    if decision.keep_largest_foreground:
        seg = keep_largest_foreground(seg, decision.connectivity)
    if decision.keep_largest_classes:
        seg = keep_largest_component(seg, decision.keep_largest_classes, decision.connectivity)
    elif not decision.keep_largest_foreground:
        seg = np.array(seg, copy=True)
    return seg


def _load_label(item: ArrayOrPath) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return item
    return read_label(item)[0]


def _dice(tp: np.ndarray, pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Count-based Dice; NaN where the class is absent from both prediction and reference."""
    denom = (pred + ref).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), np.nan)


@dataclass
class _CaseDice:
    raw: np.ndarray  # (K,) Dice per class, unprocessed
    fg: np.ndarray  # (K,) after keeping the largest foreground component
    fg_changed: bool
    cand_raw: np.ndarray  # (J,) Dice of candidate j's class after its step on the raw prediction
    cand_fg: np.ndarray  # (J,) ... on the foreground-processed prediction
    cand_raw_changed: np.ndarray  # (J,) bool
    cand_fg_changed: np.ndarray


def _case_dice(
    pair: tuple[ArrayOrPath, ArrayOrPath],
    classes: tuple[int, ...],
    candidates: tuple[int, ...],
    connectivity: int,
    load: Callable[[ArrayOrPath], np.ndarray],
    ignore_label: int | None = None,
) -> _CaseDice:
    """Every Dice the decision needs for one case, from two component labellings.

    A class component lies inside one foreground component, so the components after the
    foreground step are the raw ones inside the kept foreground component: one multi-label
    labelling and one foreground labelling give every variant's counts.
    """
    pred, ref = load(pair[0]), load(pair[1])
    if pred.shape != ref.shape:
        where = pair[0] if not isinstance(pair[0], np.ndarray) else "prediction"
        raise AutounetError(f"{where}: shape {pred.shape} differs from the reference's {ref.shape}")
    cls = np.asarray(classes, dtype=np.int64)
    k_of = {c: k for k, c in enumerate(classes)}
    ref_n = np.array([np.count_nonzero(ref == c) for c in classes], dtype=np.int64)
    empty = _CaseDice(
        raw=_dice(np.zeros(len(cls)), np.zeros(len(cls)), ref_n),
        fg=_dice(np.zeros(len(cls)), np.zeros(len(cls)), ref_n),
        fg_changed=False,
        cand_raw=np.full(len(candidates), np.nan),
        cand_fg=np.full(len(candidates), np.nan),
        cand_raw_changed=np.zeros(len(candidates), dtype=bool),
        cand_fg_changed=np.zeros(len(candidates), dtype=bool),
    )
    box = _bbox(pred > 0)
    if box is None:
        for j, c in enumerate(candidates):
            empty.cand_raw[j] = empty.cand_fg[j] = empty.raw[k_of[c]]
        return empty
    p, r = _as_labels(pred[box]), ref[box]
    cc, n = _components(p, connectivity)
    fg_cc, n_fg = _components(p > 0, connectivity)
    flat = cc.ravel()
    sizes = np.bincount(flat, minlength=n + 1)  # decide which component is the largest
    # counted in Dice: every voxel, or only the annotated ones (sparse annotations)
    hit = (p == r) & (p > 0)
    counted = sizes
    if ignore_label is not None:
        annotated = r != ignore_label
        counted = np.bincount(flat, weights=annotated.ravel(), minlength=n + 1)
        hit &= annotated
    tps = np.bincount(flat, weights=hit.ravel(), minlength=n + 1)
    comp_class = np.zeros(n + 1, dtype=np.int64)
    comp_class[flat] = p.ravel()
    comp_fg = np.zeros(n + 1, dtype=np.int64)
    comp_fg[flat] = fg_cc.ravel()
    fg_sizes = np.bincount(fg_cc.ravel(), minlength=n_fg + 1)
    kept_fg = _largest(np.arange(1, n_fg + 1), fg_sizes)

    ids = np.arange(n + 1)
    in_raw = ids > 0
    in_fg = in_raw & (comp_fg == kept_fg)

    def counts(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pn = np.array([counted[members & (comp_class == c)].sum() for c in cls], dtype=np.int64)
        tp = np.array([tps[members & (comp_class == c)].sum() for c in cls], dtype=np.float64)
        return tp, pn

    tp_raw, pn_raw = counts(in_raw)
    tp_fg, pn_fg = counts(in_fg)
    out = _CaseDice(
        raw=_dice(tp_raw, pn_raw, ref_n),
        fg=_dice(tp_fg, pn_fg, ref_n),
        fg_changed=bool(n_fg > 1),
        cand_raw=np.full(len(candidates), np.nan),
        cand_fg=np.full(len(candidates), np.nan),
        cand_raw_changed=np.zeros(len(candidates), dtype=bool),
        cand_fg_changed=np.zeros(len(candidates), dtype=bool),
    )
    for j, c in enumerate(candidates):
        k = k_of[c]
        for members, tp0, pn0, dice, changed in (
            (in_raw, tp_raw, pn_raw, out.cand_raw, out.cand_raw_changed),
            (in_fg, tp_fg, pn_fg, out.cand_fg, out.cand_fg_changed),
        ):
            own = np.flatnonzero(members & (comp_class == c))
            if own.size <= 1:
                dice[j] = _dice(tp0[k : k + 1], pn0[k : k + 1], ref_n[k : k + 1])[0]
                continue
            best = _largest(own, sizes)
            dice[j] = _dice(np.array([tps[best]]), np.array([counted[best]]), ref_n[k : k + 1])[0]
            changed[j] = True
    return out


def _nanmean(values: np.ndarray, axis: int | None = None) -> Any:
    """``np.nanmean`` without the "mean of empty slice" warning: an all-NaN mean is NaN by design."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _plain(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _per_class(classes: Sequence[int], values: np.ndarray) -> dict[str, float | None]:
    return {str(c): _plain(v) for c, v in zip(classes, values)}


def decide_postprocessing(
    cases: Sequence[tuple[ArrayOrPath, ArrayOrPath]],
    classes: Sequence[int],
    candidates: Sequence[int],
    min_gain: float = 0.0,
    connectivity: int = CONNECTIVITY,
    load: Callable[[ArrayOrPath], np.ndarray] | None = None,
    workers: int = 1,
    ignore_label: int | None = None,
) -> PostprocessingDecision:
    """Choose the component steps on cross-validation predictions (seed 001 §2.5, DESIGN §4.6).

    ``cases`` are ``(prediction, reference)`` pairs of label maps, as arrays or file paths that
    ``load`` reads (default: :func:`~autounet.data.image_io.read_label`). Each case is read once:
    its Dice per class is computed raw, after the foreground step, and after each candidate's step
    on both bases, which is all the greedy decision needs. ``classes`` are the evaluated label
    values (foreground classes of the dataset); ``candidates`` ⊆ ``classes`` are those allowed a
    per-class step (usually :func:`single_component_classes` of the fingerprint). ``ignore_label``:
    reference voxels of that value (sparse annotations) count in no Dice.
    """
    classes = tuple(int(c) for c in classes)
    candidates = tuple(int(c) for c in candidates)
    if not classes:
        raise AutounetError("post-processing needs at least one foreground class to evaluate")
    unknown = sorted(set(candidates) - set(classes))
    if unknown:
        raise AutounetError(f"candidate class(es) {unknown} are not among the evaluated classes {list(classes)}")
    if not cases:
        raise AutounetError("post-processing needs at least one cross-validation case")
    fn = functools.partial(
        _case_dice,
        classes=classes,
        candidates=candidates,
        connectivity=connectivity,
        load=load or _load_label,
        ignore_label=ignore_label,
    )
    per_case = map_cases(fn, list(cases), workers, "post-processing")

    raw = _nanmean(np.stack([c.raw for c in per_case]), axis=0)
    fg = _nanmean(np.stack([c.fg for c in per_case]), axis=0)
    mean_raw, mean_fg = _nanmean(raw), _nanmean(fg)
    fg_gain = mean_fg - mean_raw
    # A step that changes no case has no evidence for it: it is not adopted (it would be a no-op).
    fg_changed = int(sum(c.fg_changed for c in per_case))
    use_fg = bool(not math.isnan(fg_gain) and fg_gain >= min_gain and fg_changed > 0)
    evidence: dict[str, Any] = {
        "num_cases": len(per_case),
        "min_gain": float(min_gain),
        "connectivity": connectivity,
        "dice": "mean over cases per class; cases where the class is absent from prediction and reference are skipped",
        "foreground": {
            "dice_without": _per_class(classes, raw),
            "dice_with": _per_class(classes, fg),
            "mean_without": _plain(mean_raw),
            "mean_with": _plain(mean_fg),
            "gain": _plain(fg_gain),
            "cases_changed": fg_changed,
            "adopted": use_fg,
        },
        "classes": {},
    }
    if ignore_label is not None:
        evidence["ignore_label"] = int(ignore_label)
    base = fg if use_fg else raw
    final = base.copy()
    kept: list[int] = []
    cand = _nanmean(np.stack([c.cand_fg if use_fg else c.cand_raw for c in per_case]), axis=0)
    changed = np.stack([c.cand_fg_changed if use_fg else c.cand_raw_changed for c in per_case]).sum(axis=0)
    for j, c in enumerate(candidates):
        k = classes.index(c)
        with_step = base.copy()
        with_step[k] = cand[j]
        gain = cand[j] - base[k]
        adopt = bool(not math.isnan(gain) and gain >= min_gain and changed[j] > 0)
        if adopt:
            kept.append(c)
            final[k] = cand[j]
        evidence["classes"][str(c)] = {
            "dice_without": _per_class(classes, base),
            "dice_with": _per_class(classes, with_step),
            "mean_without": _plain(_nanmean(base)),
            "mean_with": _plain(_nanmean(with_step)),
            "gain": _plain(gain),
            "cases_changed": int(changed[j]),
            "adopted": adopt,
        }
    evidence["final"] = {"dice": _per_class(classes, final), "mean": _plain(_nanmean(final))}
    return PostprocessingDecision(
        keep_largest_foreground=use_fg,
        keep_largest_classes=sorted(kept),
        candidates=list(candidates),
        evidence=evidence,
        connectivity=connectivity,
    )


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------


def _postprocess_file(pair: tuple[Path, Path], decision: PostprocessingDecision) -> Path:
    src, dst = pair
    seg, geometry = read_label(src)
    out = apply_postprocessing(seg, decision)
    return save_image(dst, out, geometry)


def postprocess_folder(
    in_dir: str | Path, out_dir: str | Path, decision: PostprocessingDecision, workers: int | None = None
) -> list[Path]:
    """Apply ``decision`` to every segmentation file in ``in_dir``, written atomically to ``out_dir``.

    Geometry and dtype are kept; files that are not images (JSON, probabilities) are skipped.
    ``in_dir`` may equal ``out_dir``. Returns the written paths in name order.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise AutounetError(f"{in_dir}: folder not found")
    files = sorted(
        p for p in in_dir.iterdir() if p.is_file() and not p.name.startswith(".") and image_suffix(p) in IMAGE_SUFFIXES
    )
    pairs = [(p, out_dir / p.name) for p in files]
    fn = functools.partial(_postprocess_file, decision=decision)
    return map_cases(fn, pairs, default_workers() if workers is None else workers, "post-processing")
