"""The HTML report's cases: every cross-validation case of the selected model with its scores, and
for the worst N and a sample of the rest, the image, ground truth and prediction as slice stacks.

A stack is the (standard-oriented, downsampled) volume quantised to uint8 and tiled into one PNG
per channel, plus one RGB PNG whose red byte is the ground-truth label and green byte the
prediction; the page slices it along any axis. A case whose files cannot be read stays in the
table with the reason; the page's image budget caps what is embedded.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autounet.errors import AutounetError
from autounet.reporting.common import SKIPPABLE, class_key, is_number
from autounet.reporting.context import ReportContext
from autounet.reporting.example import best_configurations, prediction_files
from autounet.workspace import validation_dir, validation_summary_path

DEFAULT_WORST = 20  # `autounet report --cases N`
MAX_SIDE = 192  # voxels per axis of an embedded volume
MAX_VOXELS = 3_000_000  # per embedded volume
IMAGE_BUDGET = 15 * 1024 * 1024  # bytes of embedded PNG in one page (base64 makes it 20 MB)
CT_FALLBACK_WINDOW = (-160.0, 240.0)  # soft tissue (level 40, width 400) when the plans hold no CT clip
METRICS = (("dice", "Dice"), ("hd95", "HD95"), ("surface_dice", "NSD"))


@dataclass
class CaseRow:
    """One cross-validation case in the table."""

    case: str
    fold: str
    scores: dict[str, dict[str, float | None]]  # class key -> metric -> value
    mean_dice: float | None
    note: str = ""  # why the case is not shown, when it is not
    volume: dict[str, Any] | None = None  # the viewer's data, when embedded


@dataclass
class CaseTable:
    model: str  # the selected model (or best configuration) whose predictions these are
    classes: list[str]
    rows: list[CaseRow] = field(default_factory=list)
    missing: str = ""  # why there are no rows, when there are none
    notes: list[str] = field(default_factory=list)


def _clean(value: Any) -> float | None:
    return float(value) if is_number(value) else None


def _row(case: str, fold: str, metrics: Mapping[str, Mapping[str, Any]]) -> CaseRow:
    scores = {str(k): {m: _clean(v.get(m)) for m, _ in METRICS} for k, v in metrics.items()}
    dice = [s["dice"] for s in scores.values() if s["dice"] is not None]
    return CaseRow(case, fold, scores, sum(dice) / len(dice) if dice else None)


def _winner(ctx: ReportContext) -> tuple[str, list[str]]:
    """The selected model's name and member configurations (else the best trained configuration)."""
    if ctx.selection is not None:
        members = [m for m in ctx.selection.winner.members if m in ctx.folds]
        if members and len(members) == len(ctx.selection.winner.members):
            return ctx.selection.winner.name, members
    best = best_configurations(ctx)
    return (best[0], best[:1]) if best else ("", [])


def case_table(ctx: ReportContext) -> tuple[CaseTable, dict[str, Path]]:
    """The rows (unsorted) and each row's prediction file."""
    from autounet.evaluation.evaluate import load_evaluation

    name, members = _winner(ctx)
    table = CaseTable(name, [])
    if not members:
        table.missing = "no trained fold yet, so there is no cross-validation case to show"
        return table, {}
    predictions: dict[str, Path] = {}
    # the folds (and, for an ensemble, the case-to-fold map) of the first member with validation results
    source = next((m for m in members if any(_validated(f.folder) for f in ctx.folds[m])), members[0])
    for fold in ctx.folds[source]:
        if fold.fold == "all":
            continue
        path = validation_summary_path(fold.folder)
        if not path.is_file():
            table.notes.append(f"{source} fold {fold.fold}: no validation results ({path.name}) yet")
            continue
        try:
            result = load_evaluation(path)
        except SKIPPABLE as exc:
            table.notes.append(f"{source} fold {fold.fold}: {exc}")
            continue
        files = prediction_files(validation_dir(fold.folder))
        for case, metrics in result.per_case.items():
            table.rows.append(_row(case, fold.fold, metrics))
            if case in files:
                predictions[case] = files[case]
    if len(members) > 1:  # a pair ensemble: its own predictions, scored here
        predictions = _ensemble_scores(ctx, members, table)
    if not table.rows and not table.missing:
        table.missing = (
            f"no validation results of {name} yet (results/CONFIG/fold_K/validation/summary.json): "
            "the folds have not been validated"
        )
    keys = {k for r in table.rows for k in r.scores}
    table.classes = sorted(keys, key=class_key)
    return table, predictions


def _validated(folder: Path) -> bool:
    return validation_summary_path(folder).is_file()


def _ensemble_scores(ctx: ReportContext, members: Sequence[str], table: CaseTable) -> dict[str, Path]:
    """Score the pair ensemble's saved cross-validation predictions against the references."""
    from autounet.data.image_io import read_label
    from autounet.evaluation.evaluate import evaluate_arrays
    from autounet.validation.fold import reference_labels

    folder = ctx.ws.ensemble_dir(list(members))
    files = prediction_files(folder)
    settings = _settings_of(ctx, members)
    references = reference_labels(ctx.ws)
    fold_of = {r.case: r.fold for r in table.rows}
    rows = []
    for case, path in sorted(files.items()):
        if case not in references:
            continue
        try:
            pred, geometry = read_label(path)
            ref, _ = read_label(references[case])
            result = evaluate_arrays([(case, pred, ref, geometry.spacing)], **settings)
        except SKIPPABLE as exc:
            rows.append(CaseRow(case, fold_of.get(case, "-"), {}, None, note=f"not scored: {exc}"))
            continue
        rows.append(_row(case, fold_of.get(case, "-"), result.per_case[case]))
    table.rows = rows
    return files


def _settings_of(ctx: ReportContext, members: Sequence[str]) -> dict[str, Any]:
    """The evaluation settings of the members' validation results (classes or regions, tolerance)."""
    from autounet.evaluation.evaluate import load_evaluation

    for fold in [f for m in members for f in ctx.folds[m]]:
        path = validation_summary_path(fold.folder)
        if path.is_file():
            s = load_evaluation(path).settings
            return {
                "labels": s.get("labels"),
                "regions": s.get("regions"),
                "tolerance_mm": float(s.get("tolerance_mm", 1.0)),
                "empty": s.get("empty", "nan"),
                "ignore_label": s.get("ignore_label"),
            }
    raise AutounetError(f"no validation results of {' or '.join(members)}, so the ensemble cannot be scored")


def worst_first(rows: list[CaseRow]) -> list[CaseRow]:
    """Lowest mean Dice first; cases without a Dice (nothing to find, nothing found) last."""
    return sorted(rows, key=lambda r: (r.mean_dice is None, r.mean_dice if r.mean_dice is not None else 0.0, r.case))


def chosen(rows: Sequence[CaseRow], worst: int) -> list[CaseRow]:
    """The ``worst`` first rows and a sample of half as many more, evenly spread over the rest."""
    picked = list(rows[:worst])
    rest = list(rows[worst:])
    extra = min(len(rest), max(1, worst // 2)) if worst > 0 else 0
    if extra:
        step = len(rest) / extra
        picked += [rest[int(i * step + step / 2)] for i in range(extra)]
    return picked


def _strides(shape: Sequence[int]) -> list[int]:
    strides = [max(1, math.ceil(n / MAX_SIDE)) for n in shape]
    while math.prod(math.ceil(n / s) for n, s in zip(shape, strides)) > MAX_VOXELS:
        strides = [s + 1 for s in strides]
    return strides


def _tiles(volume: np.ndarray) -> tuple[np.ndarray, int]:
    """(Z, Y, X) -> one 2D mosaic of the Z slices, ``cols`` per row (row-major)."""
    z, y, x = volume.shape[:3]
    cols = max(1, math.ceil(math.sqrt(z * y / max(x, 1))))  # roughly square pictures
    cols = min(cols, z)
    rows = math.ceil(z / cols)
    out = np.zeros((rows * y, cols * x, *volume.shape[3:]), dtype=np.uint8)
    for i in range(z):
        r, c = divmod(i, cols)
        out[r * y : (r + 1) * y, c * x : (c + 1) * x] = volume[i]
    return out, cols


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, "RGB" if array.ndim == 3 else "L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _quantise(volume: np.ndarray, lo: float, hi: float) -> np.ndarray:
    v = np.nan_to_num(volume.astype(np.float32), nan=lo, posinf=hi, neginf=lo)
    return np.clip(np.rint((v - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def channel_window(ctx: ReportContext, channel: int, volume: np.ndarray) -> tuple[float, float, str]:
    """Grey window of a channel: CT at the dataset's foreground 0.5-99.5 percentiles (the plans'
    clip; a soft-tissue window without plans), anything else at the case's own percentiles."""
    from autounet.visualization import intensity_window

    names = ctx.plans.channel_names if ctx.plans else (ctx.fingerprint.channel_names if ctx.fingerprint else [])
    modality = str(names[channel]) if channel < len(names) else ""
    if modality.upper() == "CT":
        if ctx.plans is not None:
            for plan in ctx.plans.configurations.values():
                for n in plan.normalization:
                    if n.channel == channel and is_number(n.clip_low) and is_number(n.clip_high):
                        if n.clip_high > n.clip_low:
                            return float(n.clip_low), float(n.clip_high), "CT: dataset foreground 0.5-99.5 %"
        lo, hi = CT_FALLBACK_WINDOW
        return lo, hi, "CT: soft tissue (W 400, L 40)"
    lo, hi = intensity_window(volume)
    return lo, hi, "0.5-99.5 percentile of the case"


def case_volume(ctx: ReportContext, images: Sequence[Path], reference: Path | None, prediction: Path) -> dict[str, Any]:
    """The viewer's data of one case (PNG data URIs, shape, spacing, windows)."""
    from autounet.data.image_io import read_image, read_label
    from autounet.visualization import standard_orientation

    image, geometry = read_image(list(images))
    spatial = image.shape[1:]
    pred, _ = read_label(prediction)
    if pred.shape != spatial:
        raise AutounetError(f"{prediction.name}: shape {pred.shape} differs from the image's {spatial}")
    truth = np.zeros(spatial, np.int64)
    if reference is not None:
        truth, _ = read_label(reference)
        if truth.shape != spatial:
            raise AutounetError(f"{reference.name}: shape {truth.shape} differs from the image's {spatial}")
    channels = image.shape[0]
    stack = np.concatenate([image.astype(np.float32), truth[None].astype(np.float32), pred[None].astype(np.float32)])
    stack, spacing, oriented = standard_orientation(stack, geometry)
    strides = _strides(stack.shape[1:])
    stack = stack[:, :: strides[0], :: strides[1], :: strides[2]]
    spacing = [float(s) * k for s, k in zip(spacing, strides)]
    pictures, windows = [], []
    cols = 1
    for c in range(channels):
        lo, hi, how = channel_window(ctx, c, stack[c])
        if not hi > lo:
            lo, hi = lo - 1.0, hi + 1.0
        mosaic, cols = _tiles(_quantise(stack[c], lo, hi))
        pictures.append(_png(mosaic))
        windows.append(f"{lo:.4g} to {hi:.4g} ({how})")
    labels = np.zeros((*stack.shape[1:], 3), np.uint8)
    labels[..., 0] = np.clip(np.rint(stack[channels]), 0, 255)
    labels[..., 1] = np.clip(np.rint(stack[channels + 1]), 0, 255)
    mosaic, _ = _tiles(labels)
    label_png = _png(mosaic)
    return {
        "shape": list(stack.shape[1:]),
        "spacing": spacing,
        "cols": cols,
        "oriented": oriented,
        "windows": windows,
        "images": [_data_uri(p) for p in pictures],
        "labels": _data_uri(label_png),
        "bytes": sum(len(p) for p in pictures) + len(label_png),
    }


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def embed_cases(ctx: ReportContext, table: CaseTable, predictions: Mapping[str, Path], worst: int) -> None:
    """Attach the viewer's data to the worst ``worst`` rows and a sample; notes on the others."""
    rows = worst_first(table.rows)
    table.rows = rows
    picked = {id(r) for r in chosen(rows, worst)}
    try:
        from autounet.data.dataset import load_raw_dataset

        dataset = load_raw_dataset(ctx.ws.raw_path())
        raw = {c.case_id: c for c in dataset.cases}
    except SKIPPABLE as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        table.notes.append(f"no case can be shown: the raw dataset cannot be read ({reason})")
        for r in rows:
            r.note = r.note or "image not available (raw dataset unreadable)"
        return
    spent = 0
    for r in rows:
        if id(r) not in picked:
            r.note = r.note or "scores only (not embedded)"
            continue
        if r.case not in raw:
            r.note = "not in the raw dataset"
            continue
        if r.case not in predictions:
            r.note = "no prediction file"
            continue
        if spent >= IMAGE_BUDGET:
            r.note = "not embedded: the page's image budget is spent"
            continue
        try:
            r.volume = case_volume(ctx, raw[r.case].images, raw[r.case].label, predictions[r.case])
        except SKIPPABLE as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            r.note = f"cannot be shown: {reason}"
            continue
        spent += r.volume.pop("bytes")
