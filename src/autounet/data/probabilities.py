"""Class or region probabilities on an image's grid, as a file: ``CASE.npz`` (float16, see
docs/formats.md). Written by prediction and validation, read by selection (ensembles) and the
BraTS post-processing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write
from autounet.utils.loaders import load_npz


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
    data = load_npz(path, ("probabilities", "labels", "kind"))
    try:
        labels = [int(v) for v in np.asarray(data["labels"]).ravel()]
        kind = str(data["kind"])
    except (TypeError, ValueError) as exc:
        raise AutounetError(f"{path}: not a probability file ({exc})") from None
    probabilities = data["probabilities"]
    if probabilities.ndim != 4 or probabilities.dtype.kind != "f":
        raise AutounetError(
            f"{path}: not a probability file (probabilities are {probabilities.dtype} {probabilities.shape}, "
            "expected floats (C, Z, Y, X))"
        )
    return probabilities.astype(np.float32), labels, kind
