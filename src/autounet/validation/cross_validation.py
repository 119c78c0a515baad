"""Cross-validation summary: every fold's validation cases pooled (``results/CONFIG/cv_summary.json``).

Each case is validated by exactly one fold (the one that did not train on it), so pooling the
folds' per-case metrics gives one score per training case; means are computed over that pool as
for any evaluation. The per-fold foreground means are kept beside it. ``complete`` says whether
every fold of ``splits.json`` is in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autounet.errors import AutounetError
from autounet.evaluation.evaluate import EvaluationResult, load_evaluation, summarize
from autounet.utils.atomic import atomic_write_json, read_json
from autounet.workspace import Workspace, cv_summary_path, fold_folders, validation_summary_path


def fold_summaries(results_dir: Path) -> dict[int, Path]:
    """``fold -> fold_K/validation/summary.json`` for the numbered folds that have one."""
    return {
        int(fold): validation_summary_path(p)
        for fold, p in fold_folders(results_dir).items()
        if fold != "all" and validation_summary_path(p).is_file()
    }


def _expected_folds(results_dir: Path) -> int | None:
    splits = Workspace.of_results_dir(results_dir).splits_json
    try:
        return len(read_json(splits, list))
    except AutounetError:
        return None


def pool_folds(results_dir: Path) -> tuple[EvaluationResult, dict[str, Any]]:
    """The pooled evaluation of every validated fold, and per-fold information."""
    summaries = fold_summaries(results_dir)
    if not summaries:
        raise AutounetError(f"{results_dir}: no fold has validation results (fold_K/validation/summary.json)")
    per_case: dict = {}
    folds: dict[str, Any] = {}
    settings = None
    for fold, path in summaries.items():
        result = load_evaluation(path)
        stored = read_json(path, dict)
        if settings is None:
            settings = result.settings
        elif result.settings != settings:
            raise AutounetError(
                f"{path}: evaluated with other settings than the other folds; redo it with --validate-only"
            )
        overlap = set(per_case) & set(result.per_case)
        if overlap:
            raise AutounetError(f"{path}: case(s) {', '.join(sorted(overlap)[:3])} validated by two folds")
        per_case.update(result.per_case)
        folds[str(fold)] = {
            "n_cases": result.n_cases,
            "foreground_mean_dice": result.foreground_mean.get("dice"),
            "checkpoint": stored.get("checkpoint", {}),
        }
    return summarize(per_case, settings or {"empty": "nan"}), folds


def write_cv_summary(results_dir: Path) -> Path | None:
    """(Re)write ``results/CONFIG/cv_summary.json`` from the folds validated so far; None if there are none."""
    results_dir = Path(results_dir)
    if not fold_summaries(results_dir):
        return None
    pooled, folds = pool_folds(results_dir)
    expected = _expected_folds(results_dir)
    data = pooled.to_dict()
    data["folds"] = folds
    data["complete"] = expected is not None and len(folds) == expected
    data["configuration"] = results_dir.name
    return atomic_write_json(cv_summary_path(results_dir), data)


def load_cv_summary(results_dir: Path) -> EvaluationResult:
    path = cv_summary_path(results_dir)
    if not path.is_file():
        raise AutounetError(f"{path} not found: train and validate the folds of {Path(results_dir).name} first")
    return load_evaluation(path)
