"""Probabilities that do not fit in memory, on disk (issue 22).

A member's probabilities ``(K, Z, Y, X)`` in preprocessed space go, as the rolling accumulator of
:func:`~autounet.inference.sliding_window.predict_volume` finishes them, into one float16 file
laid out class-major, so that the export reads the rows of one class it needs with one read.
Files are written and read with ``os.pwrite``/``os.preadv`` (no writable memory map: its dirty
pages would count in the process's resident memory) in a private folder named as an autounet
temporary (:mod:`autounet.utils.temporary`): removed when the case is done or fails, and by a
later command when the process was killed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from autounet.errors import AutounetError
from autounet.utils.temporary import temporary_prefix

# What the free space must exceed beyond the files, so that the rest of the command still writes.
SPARE_DISK_BYTES = 256 * 1024**2
_IO_BYTES = 1 << 30  # one pwrite/preadv at most (Linux moves at most 2 GiB - 4 KiB per call)


class SpillFolder:
    """A private folder for one case's spilled probabilities; :meth:`remove` (also on garbage
    collection and at exit) deletes it with everything in it."""

    def __init__(self, root: str | Path, needed: int):
        root = Path(root)
        try:
            free = shutil.disk_usage(root).free
        except OSError as exc:
            raise AutounetError(f"{root}: cannot check the free disk space for the probabilities ({exc})") from None
        if free < needed + SPARE_DISK_BYTES:
            raise AutounetError(
                f"{root}: the probabilities of this case need {needed / 1024**3:.1f} GB ({needed} bytes) of disk "
                f"there while they are exported, but only {free / 1024**3:.1f} GB are free; free space there, "
                "raise --memory-limit (the probabilities then stay in memory), or write to a larger disk"
            )
        try:
            self.path = Path(tempfile.mkdtemp(prefix=temporary_prefix(), suffix=".spill", dir=root))
        except OSError as exc:
            raise AutounetError(f"{root}: cannot create a temporary folder for the probabilities ({exc})") from None
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def volume(self, name: str, shape: Sequence[int]) -> SpillVolume:
        volume = SpillVolume(self.path / f"{name}.f16", shape)
        volume.folder = self
        return volume

    def remove(self) -> None:
        self._finalizer()


class SpillVolume:
    """A float16 volume ``(K, Z, Y, X)`` in a file, written row block by row block along Z (all
    classes at once, see :class:`~autounet.inference.sliding_window.RowSink`) and read one class's
    rows at a time."""

    def __init__(self, path: Path, shape: Sequence[int]):
        self.path, self.shape = path, tuple(int(s) for s in shape)
        self._plane = int(np.prod(self.shape[2:])) * 2
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(self._fd, self.shape[0] * self.shape[1] * self._plane)
        except OSError as exc:
            raise AutounetError(f"{path}: cannot create the file for the probabilities ({exc})") from None
        self._closer = weakref.finalize(self, os.close, self._fd)
        self.written = 0  # rows of Z written, in order
        self.folder: SpillFolder | None = None

    def _offset(self, k: int, z: int) -> int:
        return (k * self.shape[1] + z) * self._plane

    def write(self, z0: int, rows: torch.Tensor | np.ndarray) -> None:
        """Rows ``z0 ..`` of every class: ``rows`` ``(K, r, Y, X)``."""
        data = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        data = data.astype(np.float16, copy=False)
        if data.shape[0] != self.shape[0] or data.shape[2:] != self.shape[2:] or z0 + data.shape[1] > self.shape[1]:
            raise ValueError(f"rows {data.shape} at {z0} do not fit {self.shape}")
        for k in range(self.shape[0]):
            self._pwrite(np.ascontiguousarray(data[k]), self._offset(k, z0))
        self.written = max(self.written, z0 + data.shape[1])

    def rows(self, k: int, z0: int, z1: int) -> np.ndarray:
        """Rows ``z0 .. z1`` of class ``k`` (float16, a new array)."""
        out = np.empty((z1 - z0, *self.shape[2:]), np.float16)
        view = memoryview(out.reshape(-1).view(np.uint8))
        offset, done = self._offset(k, z0), 0
        try:
            while done < len(view):
                n = os.preadv(self._fd, [view[done : done + _IO_BYTES]], offset + done)
                if n <= 0:
                    raise OSError(f"the file ends after {offset + done} bytes")
                done += n
        except OSError as exc:
            raise AutounetError(f"{self.path}: cannot read the spilled probabilities back ({exc})") from None
        return out

    def _pwrite(self, array: np.ndarray, offset: int) -> None:
        view = memoryview(array.reshape(-1).view(np.uint8))
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done : done + _IO_BYTES], offset + done)
        except OSError as exc:
            raise AutounetError(f"{self.path}: cannot write the probabilities to disk ({exc})") from None

    def close(self) -> None:
        self._closer()


def release(results: Sequence[object]) -> None:
    """Close the spilled volumes among ``results`` and remove their folders (with their files)."""
    for r in results:
        if isinstance(r, SpillVolume):
            r.close()
            if r.folder is not None:
                r.folder.remove()
