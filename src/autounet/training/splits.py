"""Cross-validation splits: ``W/NAME/splits.json``, five folds by case (seed 001 §2.3).

Schema: a list of folds, each ``{"train": [case ids], "val": [case ids]}``. A file already there
(the user's own, or an earlier run's) is kept and validated against the dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write_json, read_json

DEFAULT_FOLDS = 5
DEFAULT_SEED = 12345  # fixed so that every configuration of a dataset shares the same folds


def make_splits(
    case_ids: list[str], folds: int = DEFAULT_FOLDS, seed: int = DEFAULT_SEED
) -> list[dict[str, list[str]]]:
    """Shuffle the (sorted) cases with ``seed`` and deal them into ``folds`` validation sets."""
    if len(case_ids) < 2:
        raise AutounetError(
            f"cross-validation needs at least 2 cases, the dataset has {len(case_ids)} (train with -f all)"
        )
    folds = min(folds, len(case_ids))
    order = np.random.default_rng(seed).permutation(sorted(case_ids)).tolist()
    parts = [sorted(order[i::folds]) for i in range(folds)]
    return [
        {"train": sorted(c for j, p in enumerate(parts) if j != i for c in p), "val": parts[i]} for i in range(folds)
    ]


def validate_splits(splits: object, case_ids: list[str], source: str) -> list[dict[str, list[str]]]:
    """Check a splits structure against the dataset; one clear error naming what is wrong."""
    known = set(case_ids)
    if not isinstance(splits, list) or not splits:
        raise AutounetError(f"{source}: splits must be a non-empty list of folds")
    for i, fold in enumerate(splits):
        if not isinstance(fold, dict) or set(fold) != {"train", "val"}:
            raise AutounetError(f"{source}: fold {i} must have exactly the keys 'train' and 'val'")
        train, val = fold["train"], fold["val"]
        if not all(isinstance(c, str) for c in train + val) or not train or not val:
            raise AutounetError(f"{source}: fold {i} needs non-empty lists of case ids")
        unknown = sorted((set(train) | set(val)) - known)
        if unknown:
            raise AutounetError(f"{source}: fold {i} names case(s) not in the dataset: {', '.join(unknown[:5])}")
        overlap = sorted(set(train) & set(val))
        if overlap:
            raise AutounetError(f"{source}: fold {i} has case(s) in both train and val: {', '.join(overlap[:5])}")
    return splits


def load_or_create_splits(path: Path, case_ids: list[str], write: bool = True) -> list[dict[str, list[str]]]:
    """The dataset's folds: read and validated if ``path`` exists, else made and written."""
    path = Path(path)
    if path.is_file():
        return validate_splits(read_json(path), case_ids, str(path))
    splits = make_splits(case_ids)
    if write:
        atomic_write_json(path, splits)
    return splits


def check_fold_number(path: Path, fold: int | str) -> None:
    """Refuse a fold number the splits at ``path`` (or, before they exist, the default
    :data:`DEFAULT_FOLDS`) do not have, before anything is written for it."""
    if fold == "all":
        return
    stored = read_json(path) if Path(path).is_file() else None
    count = len(stored) if isinstance(stored, list) and stored else DEFAULT_FOLDS
    if not isinstance(fold, int) or not 0 <= fold < count:
        raise AutounetError(f"fold {fold!r} does not exist: use 0..{count - 1} or 'all'")


def fold_cases(splits: list[dict[str, list[str]]], fold: int | str, case_ids: list[str]) -> tuple[list[str], list[str]]:
    """(training cases, validation cases) of ``fold``; fold ``all`` trains and validates on every case."""
    if fold == "all":
        return sorted(case_ids), sorted(case_ids)
    if not isinstance(fold, int) or not 0 <= fold < len(splits):
        raise AutounetError(f"fold {fold!r} does not exist: use 0..{len(splits) - 1} or 'all'")
    return list(splits[fold]["train"]), list(splits[fold]["val"])
