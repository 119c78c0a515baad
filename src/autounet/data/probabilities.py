"""Class or region probabilities on an image's grid, as a file: ``CASE.npz`` (float16, see
docs/formats.md). Written by prediction and validation, read by selection (ensembles) and the
BraTS post-processing."""

from __future__ import annotations

import io
import zipfile
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


# Rows of the input grid (along its first axis) converted to float16 and written at a time.
_STREAM_VOXELS = 16 * 1024 * 1024


class ProbabilityStream:
    """Writes ``CASE.npz`` one class at a time: the same archive as :func:`save_probability_file`
    (``probabilities`` float16 ``(K, Z, Y, X)``, ``labels``, ``kind``; readers are unchanged), but
    the probabilities never exist in memory as a whole. Use inside :func:`atomic_write`'s callback::

        with ProbabilityStream(tmp, (K, Z, Y, X), labels, kind) as stream:
            for k in range(K):
                stream.write(k, box_map, box_slices, fill)

    Deflate level 1: the archive is a little larger than ``np.savez_compressed``'s and written
    several times faster.
    """

    def __init__(self, path: Path, shape: Sequence[int], label_list: Sequence[int], kind: str):
        self.path, self.shape = Path(path), tuple(int(s) for s in shape)
        self.label_list, self.kind = list(label_list), kind
        self._next = 0
        self._zip: zipfile.ZipFile | None = None
        self._fh = None

    def __enter__(self) -> ProbabilityStream:
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True)
        self._fh = self._zip.open("probabilities.npy", "w", force_zip64=True)
        header = {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._fh, header)
        return self

    def write(self, k: int, values: np.ndarray, box: tuple[slice, ...], fill: float) -> None:
        """Class ``k``'s map on the input grid: ``values`` inside ``box``, ``fill`` elsewhere."""
        if k != self._next:
            raise ValueError(f"class {k} written after class {self._next - 1}")
        grid = self.shape[1:]
        rows = max(1, _STREAM_VOXELS // max(1, int(np.prod(grid[1:]))))
        for start in range(0, grid[0], rows):
            stop = min(grid[0], start + rows)
            chunk = np.full((stop - start, *grid[1:]), fill, np.float16)
            lo, hi = max(start, box[0].start), min(stop, box[0].stop)
            if lo < hi:
                chunk[(slice(lo - start, hi - start), *box[1:])] = values[lo - box[0].start : hi - box[0].start]
            self._fh.write(chunk.tobytes())
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._fh.close()
            if exc_type is None:
                if self._next != self.shape[0]:
                    raise ValueError(f"{self._next} of {self.shape[0]} classes written")
                self._small("labels.npy", np.asarray(self.label_list, dtype=np.int64))
                self._small("kind.npy", np.asarray(self.kind))
        finally:
            self._zip.close()

    def _small(self, name: str, array: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, allow_pickle=False)
        self._zip.writestr(name, buffer.getvalue())
