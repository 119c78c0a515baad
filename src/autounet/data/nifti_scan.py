"""Count NaN/infinite voxels in floating-point NIfTI files, reading the bytes on disk.

ITK's NIfTI reader (and so SimpleITK's, up to ITK 5) silently replaces every NaN and +-Inf with 0
while reading (fixed only in ITK 6: InsightSoftwareConsortium/ITK#6683), so an array read through
SimpleITK can never show them. Validation therefore scans the voxel data itself: the header
gives the data type, the dimensions and where the voxels start; the data are streamed in chunks.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

_FLOAT_TYPES = {16: np.float32, 64: np.float64}  # NIfTI datatype codes
_CHUNK_BYTES = 32 * 1024 * 1024


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _header(raw: bytes) -> tuple[str, int, int, list[int], int] | None:
    """(byte order, datatype, header size, dims, voxel offset) of a NIfTI-1 or NIfTI-2 header."""
    for order in ("<", ">"):
        size = struct.unpack(order + "i", raw[:4])[0]
        if size == 348 and len(raw) >= 348:
            ndim, *dims = struct.unpack(order + "8h", raw[40:56])
            datatype = struct.unpack(order + "h", raw[70:72])[0]
            offset = int(struct.unpack(order + "f", raw[108:112])[0])
            return order, datatype, 348, dims[: max(ndim, 0)], offset
        if size == 540 and len(raw) >= 540:
            datatype = struct.unpack(order + "h", raw[12:14])[0]
            ndim, *dims = struct.unpack(order + "8q", raw[16:80])
            offset = struct.unpack(order + "q", raw[168:176])[0]
            return order, datatype, 540, dims[: max(ndim, 0)], offset
    return None


def nonfinite_per_volume(path: str | Path) -> list[int] | None:
    """NaN/Inf voxel count per 3D volume (per channel of a 4D file) of a float NIfTI file.

    Returns None when the file is not a single-file NIfTI or its voxels are not float32/float64
    (integer data cannot hold NaN).
    """
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    with _open(path) as fh:
        head = fh.read(540)
        parsed = _header(head)
        if parsed is None:
            return None
        order, datatype, header_size, dims, offset = parsed
        if datatype not in _FLOAT_TYPES or not dims:
            return None
        dtype = np.dtype(_FLOAT_TYPES[datatype]).newbyteorder(order)
        per_volume = int(np.prod(dims[:3]))
        volumes = int(np.prod(dims[3:])) if len(dims) > 3 else 1
        offset = max(offset, header_size)
        if offset > len(head):
            fh.read(offset - len(head))  # skip header extensions
        buffer = head[offset:]  # voxels already read with the header
        counts = [0] * volumes
        index = 0  # voxel index of the next value
        total = per_volume * volumes
        chunk_items = max(1, _CHUNK_BYTES // dtype.itemsize)
        while index < total:
            need = min(chunk_items, total - index) * dtype.itemsize - len(buffer)
            data = buffer + (fh.read(need) if need > 0 else b"")
            buffer = b""
            usable = len(data) // dtype.itemsize
            if usable == 0:
                break  # truncated file: SimpleITK reports that as unreadable
            values = np.frombuffer(data[: usable * dtype.itemsize], dtype=dtype)
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                vols = (bad + index) // per_volume
                for v, n in zip(*np.unique(vols, return_counts=True)):
                    counts[int(v)] += int(n)
            index += usable
    return counts
