"""Class or region probabilities on an image's grid, as a file: ``CASE.npz`` (float16, see
docs/formats.md). Written by prediction and validation, read by selection (ensembles) and the
BraTS post-processing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write


def save_probability_file(path: Path, probabilities: np.ndarray, label_list: Sequence[int], kind: str) -> None:
    """``probabilities`` (float16, original grid), ``labels`` (values of the classes, or of the
    model's labels for regions) and ``kind`` (``softmax`` or ``sigmoid``)."""

    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez_compressed(
                fh,
                probabilities=probabilities.astype(np.float16),
                labels=np.asarray(label_list, dtype=np.int64),
                kind=np.asarray(kind),
            )

    atomic_write(path, write)


def load_probability_file(path: str | Path) -> tuple[np.ndarray, list[int], str]:
    """Probabilities (float32), label values and kind written by :func:`save_probability_file`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["probabilities"].astype(np.float32), [int(v) for v in data["labels"]], str(data["kind"])
    except (OSError, KeyError, ValueError) as exc:
        raise AutounetError(f"{path}: not a readable probability file ({exc})") from None
