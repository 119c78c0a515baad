"""Evaluate predicted label maps against references: per case, per class or region, and means.

Metrics and their conventions are those of :mod:`autounet.evaluation.metrics`. The mean of a
metric for a class is over the cases where it is not NaN; ``foreground_mean`` is the mean over
classes (and regions) of those class means, again leaving NaN out. A class evaluated in some
cases but absent from both maps of another case counts there as an empty pair (NaN under the
nnU-Net convention, so it leaves the mean unchanged; 1 under the BraTS convention). With an
``ignore_label`` (sparse annotations) the reference's voxels of that value count in no metric.

Where nothing declares the labels (no ``labels``, ``regions`` or ``ignore_label``, and no
``dataset.json`` beside the references), the classes are the values found. The highest of them
is then refused when no prediction holds it: that is what an ``ignore`` label looks like (a model
never predicts it), and scoring it as a class would put a Dice of 0 into every mean.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from autounet.data.dataset import IGNORE_LABEL_NAME
from autounet.data.geometry import geometry_differences
from autounet.data.image_io import IMAGE_SUFFIXES, image_suffix, read_label
from autounet.errors import AutounetError
from autounet.evaluation.metrics import (
    METRICS,
    case_metrics,
    check_empty,
    empty_pair_metrics,
    evaluation_targets,
)
from autounet.utils.atomic import atomic_write_json
from autounet.utils.loaders import read_json
from autounet.utils.parallel import default_workers, map_cases

CaseMetrics = dict[str, dict[str, float | int]]  # class or region key -> metric -> value


@dataclass
class EvaluationResult:
    """Per-case metrics, their means per class or region, and the settings that produced them."""

    per_case: dict[str, CaseMetrics]
    mean: dict[str, dict[str, float]]  # key -> metric -> mean over cases (NaN left out)
    foreground_mean: dict[str, float]  # metric -> mean over keys of ``mean``
    n_cases: int
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data; NaN becomes None."""
        return _nan_to_none(
            {
                "settings": self.settings,
                "n_cases": self.n_cases,
                "foreground_mean": self.foreground_mean,
                "mean": self.mean,
                "per_case": self.per_case,
            }
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResult:
        """Inverse of :meth:`to_dict` (None becomes NaN)."""
        return cls(
            per_case={c: _none_to_nan(m) for c, m in data["per_case"].items()},
            mean=_none_to_nan(data["mean"]),
            foreground_mean=_none_to_nan(data["foreground_mean"]),
            n_cases=int(data["n_cases"]),
            settings=dict(data.get("settings", {})),
        )


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    labels: Sequence[int] | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
    tolerance_mm: float = 1.0,
    empty: str = "nan",
    workers: int | None = None,
    ignore_label: int | None = None,
) -> EvaluationResult:
    """Evaluate every prediction in ``pred_dir`` against the same-named reference in ``ref_dir``.

    Two files instead of two folders evaluate one case. Cases are matched by file name without its
    image ending (``.nii.gz`` counts as one), so formats may differ. Every prediction needs a
    reference and every reference a prediction; shapes and geometries must agree.
    """
    settings = _settings(labels, regions, tolerance_mm, empty, ignore_label)
    pairs = match_cases(pred_dir, ref_dir)
    fn = partial(
        _evaluate_files,
        labels=labels,
        regions=regions,
        tolerance_mm=tolerance_mm,
        empty=empty,
        ignore_label=ignore_label,
    )
    n_workers = default_workers() if workers is None else workers
    per_case = dict(map_cases(fn, pairs, n_workers, desc="evaluate"))
    if labels is None and regions is None and ignore_label is None and not label_names_near(ref_dir):
        _refuse_reference_only_value(per_case, ref_dir)
    return summarize(per_case, settings)


def _refuse_reference_only_value(per_case: Mapping[str, CaseMetrics], ref_dir: str | Path) -> None:
    """One clear error when the highest value found is in references only (see the module docstring)."""
    classes = sorted({int(k) for metrics in per_case.values() for k in metrics if k.isdigit()})
    if not classes:
        return
    top = str(classes[-1])
    predicted = sum(m[top]["n_pred"] for m in per_case.values() if top in m)
    if predicted == 0:
        others = " ".join(str(c) for c in classes)
        raise AutounetError(
            f"{ref_dir}: value {top} is in the references and in no prediction, and no dataset.json beside the "
            f"references declares the labels: if {top} marks unannotated voxels (an `ignore` label), give "
            f"--ignore-label {top}; if it is a class the model never predicted, give --labels {others}"
        )


def evaluate_arrays(
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray, Sequence[float]]],
    labels: Sequence[int] | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
    tolerance_mm: float = 1.0,
    empty: str = "nan",
    ignore_label: int | None = None,
) -> EvaluationResult:
    """Evaluate in-memory ``(case, prediction, reference, spacing)`` label maps, as :func:`evaluate_folders`."""
    settings = _settings(labels, regions, tolerance_mm, empty, ignore_label)
    per_case: dict[str, CaseMetrics] = {}
    for case, pred, ref, spacing in pairs:
        if case in per_case:
            raise AutounetError(f"{case}: the case is given twice")
        try:
            per_case[case] = case_metrics(pred, ref, spacing, labels, regions, tolerance_mm, empty, ignore_label)
        except ValueError as exc:
            raise AutounetError(f"{case}: {exc}") from None
    return summarize(per_case, settings)


def summarize(per_case: Mapping[str, CaseMetrics], settings: Mapping[str, Any]) -> EvaluationResult:
    """Means per class or region and over classes, from per-case metrics (shared aggregation).

    ``settings`` needs ``empty`` (and keeps any other entries): a class missing from a case's
    metrics is filled in as absent from both of its maps.
    """
    keys = _ordered_keys(per_case, settings)
    empty_pair = empty_pair_metrics(settings["empty"])
    filled = {case: {k: dict(metrics.get(k, empty_pair)) for k in keys} for case, metrics in per_case.items()}
    mean = {k: {m: _nanmean([c[k][m] for c in filled.values()]) for m in METRICS} for k in keys}
    foreground = {m: _nanmean([mean[k][m] for k in keys]) for m in METRICS}
    return EvaluationResult(
        per_case=filled, mean=mean, foreground_mean=foreground, n_cases=len(filled), settings=dict(settings)
    )


def save_evaluation(result: EvaluationResult, path: str | Path) -> Path:
    """Write ``result`` as JSON, atomically; NaN is written as null."""
    return atomic_write_json(path, result.to_dict())


EVALUATION_KEYS = frozenset({"settings", "n_cases", "foreground_mean", "mean", "per_case"})


def check_evaluation_target(path: str | Path) -> Path:
    """Refuse to write an evaluation over a file that is not one: an existing ``path`` is replaced
    only when it is JSON holding an evaluation's keys (what :func:`save_evaluation` writes, and a
    fold's ``summary.json``), never e.g. a reference label map or another JSON document."""
    path = Path(path)
    if path.is_dir():
        raise AutounetError(f"{path}: a folder; --json names the file the evaluation is written to")
    if image_suffix(path) in IMAGE_SUFFIXES:
        raise AutounetError(f"{path}: an image file name; --json names a .json file")
    if not os.path.lexists(path):
        return path
    reason = "too large to be an evaluation"
    try:
        if path.stat().st_size <= 256 * 1024 * 1024:
            reason = "not JSON"
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and EVALUATION_KEYS <= set(data):
                return path
            reason = "JSON, but not an evaluation"
    except OSError as exc:
        reason = f"unreadable: {exc.strerror or exc}"
    except (ValueError, UnicodeDecodeError):
        pass
    raise AutounetError(
        f"{path}: exists and is {reason}; `autounet evaluate` replaces only an evaluation it wrote: "
        "choose another --json or remove the file"
    )


def load_evaluation(path: str | Path) -> EvaluationResult:
    """Read a file written by :func:`save_evaluation`."""
    data = read_json(path, dict)
    try:
        return EvaluationResult.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AutounetError(f"{path}: not an evaluation file ({type(exc).__name__}: {exc})") from None


def format_table(result: EvaluationResult, label_names: Mapping[str, str] | None = None, per_case: bool = False) -> str:
    """A text table: mean Dice, IoU, HD95 and surface Dice per class or region, then the foreground mean.

    ``per_case`` adds one row per case and class first.
    """
    tol = result.settings.get("tolerance_mm", 1.0)
    header = ["class", "Dice", "IoU", "HD95 mm", f"surface Dice {tol:g} mm"]
    names = label_names or {}

    def label(key: str) -> str:
        return f"{key} {names[key]}" if key in names and names[key] != key else key

    def values(metrics: Mapping[str, float]) -> list[str]:
        return [
            _fmt(metrics["dice"], 4),
            _fmt(metrics["iou"], 4),
            _fmt(metrics["hd95"], 2),
            _fmt(metrics["surface_dice"], 4),
        ]

    lines = []
    if per_case:
        rows = [[case, label(k), *values(m)] for case, keys in result.per_case.items() for k, m in keys.items()]
        lines += _layout(["case", *header], rows, text_columns=2) + [""]
    rows = [[label(k), *values(m)] for k, m in result.mean.items()]
    rows.append(["foreground mean", *values(result.foreground_mean)])
    lines += _layout(header, rows, text_columns=1)
    convention = "BraTS: both empty = 1" if result.settings.get("empty") == "one" else "nnU-Net: both empty = NaN"
    lines.append(f"{result.n_cases} case(s); means leave out NaN ('-'); empty masks: {convention}")
    if result.settings.get("ignore_label") is not None:
        lines.append(
            f"reference voxels labelled {result.settings['ignore_label']} (ignore) are left out of every metric"
        )
    return "\n".join(lines)


def match_cases(pred: str | Path, ref: str | Path) -> list[tuple[str, Path, Path]]:
    """``(case, prediction file, reference file)`` for two folders (matched by name) or two files."""
    pred, ref = Path(pred), Path(ref)
    for path, what in ((pred, "prediction"), (ref, "reference")):
        if not path.exists():
            raise AutounetError(f"{path}: {what} folder or file not found")
    if pred.is_file() and ref.is_file():
        return [(case_name(pred), pred, ref)]
    if not (pred.is_dir() and ref.is_dir()):
        raise AutounetError(f"give two folders or two files, not {pred} and {ref}")
    preds, refs = _image_files(pred), _image_files(ref)
    if not preds:
        raise AutounetError(f"{pred}: no prediction files (image endings: {', '.join(IMAGE_SUFFIXES)})")
    _check_all_matched(sorted(set(preds) - set(refs)), f"prediction(s) without a reference in {ref}")
    _check_all_matched(sorted(set(refs) - set(preds)), f"reference(s) without a prediction in {pred}")
    return [(case, preds[case], refs[case]) for case in sorted(preds)]


def case_name(path: str | Path) -> str:
    """The file name without its image ending."""
    name = Path(path).name
    return name[: len(name) - len(image_suffix(name))]


def default_json_path(pred: str | Path) -> Path:
    """``PRED/evaluation.json`` for a folder, ``CASE_evaluation.json`` beside a single file."""
    pred = Path(pred)
    return pred.parent / f"{case_name(pred)}_evaluation.json" if pred.is_file() else pred / "evaluation.json"


def parse_regions(specs: Sequence[str]) -> dict[str, list[int]]:
    """``["WT=1,2,3", "ET=3"]`` -> ``{"WT": [1, 2, 3], "ET": [3]}``."""
    regions: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        try:
            labels = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            labels = []
        if not sep or not name.strip() or not labels:
            raise AutounetError(f"region {spec!r}: expected NAME=L,L,... with whole-number labels, e.g. WT=1,2,3")
        if name.strip() in regions:
            raise AutounetError(f"region {name.strip()!r} is given twice")
        regions[name.strip()] = labels
    return regions


def ignore_label_near(ref: str | Path) -> int | None:
    """The ``ignore`` label a ``dataset.json`` beside the reference folder declares (MSD or nnU-Net v2), if any."""
    for value, name in label_names_near(ref).items():
        if name == IGNORE_LABEL_NAME:
            return int(value)
    return None


def label_names_near(ref: str | Path) -> dict[str, str]:
    """Class names from a ``dataset.json`` beside the reference folder (MSD or nnU-Net v2), if any."""
    ref = Path(ref)
    folder = ref.parent if ref.is_dir() else ref.parent.parent
    try:
        declared = read_json(folder / "dataset.json", dict)["labels"]
    except (AutounetError, KeyError):
        return {}
    if not isinstance(declared, dict):
        return {}
    names = {}
    for k, v in declared.items():
        if isinstance(v, str) and str(k).isdigit():  # MSD: {"1": "edema"}
            names[str(int(k))] = v
        elif isinstance(v, int) and not isinstance(v, bool):  # nnU-Net v2: {"edema": 1}
            names[str(v)] = str(k)
    return names


def _evaluate_files(
    item: tuple[str, Path, Path],
    labels: Sequence[int] | None,
    regions: Mapping[str, Sequence[int]] | None,
    tolerance_mm: float,
    empty: str,
    ignore_label: int | None = None,
) -> tuple[str, CaseMetrics]:
    case, pred_path, ref_path = item
    try:
        pred, pred_geometry = read_label(pred_path)
        ref, ref_geometry = read_label(ref_path)
    except AutounetError as exc:
        raise AutounetError(f"{case}: {exc}") from None
    if pred.shape != ref.shape:
        raise AutounetError(f"{case}: prediction and reference differ in shape {pred.shape} vs {ref.shape}")
    differences = geometry_differences(ref_geometry, pred_geometry)
    if differences:
        raise AutounetError(f"{case}: prediction and reference differ in " + "; ".join(differences))
    pred, ref = _whole_numbers(pred, case, "prediction"), _whole_numbers(ref, case, "reference")
    try:
        return case, case_metrics(pred, ref, ref_geometry.spacing, labels, regions, tolerance_mm, empty, ignore_label)
    except ValueError as exc:
        raise AutounetError(f"{case}: {exc}") from None


def _whole_numbers(arr: np.ndarray, case: str, what: str) -> np.ndarray:
    """Integer label maps pass; float ones must hold whole numbers and become int32."""
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return arr
    bad = ~np.isfinite(arr) | (arr != np.round(arr))
    if bad.any():
        example = arr[bad].flat[0]
        raise AutounetError(f"{case}: the {what} has non-integer values (e.g. {example:g}); expected a label map")
    return arr.astype(np.int32)


def _settings(
    labels: Sequence[int] | None,
    regions: Mapping[str, Sequence[int]] | None,
    tolerance_mm: float,
    empty: str,
    ignore_label: int | None = None,
) -> dict[str, Any]:
    try:
        check_empty(empty)
        targets = evaluation_targets(labels, regions)
    except ValueError as exc:
        raise AutounetError(str(exc)) from None
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise AutounetError(f"the surface Dice tolerance must be >= 0 mm, got {tolerance_mm}")
    if ignore_label is not None:
        inside = [k for k, values in targets.items() if ignore_label in values]
        if inside:
            raise AutounetError(
                f"the ignore label {ignore_label} is no class: it cannot be evaluated (in {', '.join(inside)})"
            )
    settings = {
        "labels": None if labels is None else sorted(int(v) for v in labels),
        "regions": None if regions is None else {str(k): [int(v) for v in vs] for k, vs in regions.items()},
        "tolerance_mm": float(tolerance_mm),
        "empty": empty,
        "hd95": "95th percentile of both directed surface distance sets pooled (mm)",
    }
    if ignore_label is not None:  # only when set: summaries of dense datasets keep their settings
        settings["ignore_label"] = int(ignore_label)
    return settings


def _ordered_keys(per_case: Mapping[str, CaseMetrics], settings: Mapping[str, Any]) -> list[str]:
    """Classes by label value, then regions in their given order."""
    regions = list(settings.get("regions") or {})
    found = {k for metrics in per_case.values() for k in metrics}
    classes = sorted(found - set(regions), key=_class_order)
    return classes + [r for r in regions if r in found]


def _class_order(key: str) -> tuple[int, int, str]:
    try:
        return (0, int(key), "")
    except ValueError:
        return (1, 0, key)


def _check_all_matched(missing: list[str], what: str) -> None:
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise AutounetError(f"{len(missing)} {what}: {', '.join(missing[:5])}{more}")


def _image_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        lower = path.name.lower()
        if path.name.startswith(".") or not path.is_file() or not lower.endswith(IMAGE_SUFFIXES):
            continue
        case = case_name(path)
        if case in files:
            raise AutounetError(f"{folder}: case {case} has two files, {files[case].name} and {path.name}")
        files[case] = path
    return files


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0 or np.isnan(arr).all():
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(arr))


def _fmt(value: float, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _layout(header: list[str], rows: list[list[str]], text_columns: int) -> list[str]:
    """Columns padded to their widest cell: text columns left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _nan_to_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {str(k): _nan_to_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_nan_to_none(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def _none_to_nan(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _none_to_nan(v) for k, v in data.items()}
    return math.nan if data is None else data
