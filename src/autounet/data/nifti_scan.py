"""NIfTI files read byte by byte: the header's numbers as stored, the voxel data's length, and
NaN/infinite voxels of floating-point data.

ITK's NIfTI reader (and so SimpleITK's, up to ITK 5) hides three kinds of damage:

* it silently replaces every NaN and +-Inf with 0 while reading (fixed only in ITK 6:
  InsightSoftwareConsortium/ITK#6683), so an array read through SimpleITK can never show them;
* it reads a file that ends inside its voxel data (a ``.nii`` cut short, a ``.nii.gz`` whose
  compressed stream stops early) without a word, filling the missing voxels with 0;
* it reads a spacing (``pixdim``) of 0 as 1 mm and a negative one as its absolute value.

:func:`scan_nifti` therefore reads the header itself and streams the data once: the compressed
stream of a ``.nii.gz`` to its end (Python's :mod:`gzip` checks the CRC and length in its
trailer), counting the bytes after the voxel offset and, when asked, the non-finite values.

A header is data from a stranger too: the voxel data it declares (dims x bytes per voxel) is
checked against :data:`MAX_IMAGE_BYTES`, its volumes against :data:`MAX_VOLUMES`, and (for a
``.nii.gz``) against what the compressed file can hold at deflate's largest ratio before
anything is allocated for it (:func:`size_problem`).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_FLOAT_TYPES = {16: np.float32, 64: np.float64}  # NIfTI datatype codes
# Bytes per voxel of each NIfTI datatype code (nifti1.h).
_DATATYPE_BYTES = {
    2: 1,  # uint8
    4: 2,  # int16
    8: 4,  # int32
    16: 4,  # float32
    32: 8,  # complex64
    64: 8,  # float64
    128: 3,  # RGB24
    256: 1,  # int8
    512: 2,  # uint16
    768: 4,  # uint32
    1024: 8,  # int64
    1280: 8,  # uint64
    1536: 16,  # float128
    1792: 16,  # complex128
    2048: 32,  # complex256
    2304: 4,  # RGBA32
}
# numpy types of the NIfTI datatype codes SimpleITK reads as one scalar per voxel
_STORED_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}
_SINGLE_FILE_MAGIC = (b"n+1\0", b"n+2\0")  # voxels in the same file as the header
_CHUNK_BYTES = 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
MAX_IMAGE_BYTES = 16 * 1024**3  # voxel data of one image: far beyond any volume a U-Net segments
MAX_VOLUMES = 65536  # 3D volumes (dims 4 to 7) of one file
_DEFLATE_MAX_RATIO = 1032  # deflate's largest compression ratio (runs of one byte)


class NiftiDataError(ValueError):
    """The file's bytes are damaged (message without the path; the caller adds it).

    ``truncated``: the compressed data end early (else they are corrupt)."""

    def __init__(self, message: str, truncated: bool):
        super().__init__(message)
        self.truncated = truncated


@dataclass(frozen=True)
class NiftiHeader:
    """The numbers of a NIfTI-1 or NIfTI-2 header as stored (no ITK interpretation)."""

    order: str  # struct byte order, "<" or ">"
    header_size: int  # 348 (NIfTI-1) or 540 (NIfTI-2)
    datatype: int
    bitpix: int
    dims: tuple[int, ...]  # dim[1 .. dim[0]]
    pixdim: tuple[float, ...]  # pixdim[1 .. dim[0]]
    offset: int  # where the voxels start (at least the header's size)
    single_file: bool  # magic n+1 / n+2: the voxels follow the header in this file
    scl_slope: float = 0.0  # intensity scaling as stored (0: none)
    scl_inter: float = 0.0

    @property
    def voxel_bytes(self) -> int | None:
        if self.datatype in _DATATYPE_BYTES:
            return _DATATYPE_BYTES[self.datatype]
        return self.bitpix // 8 if self.bitpix > 0 and self.bitpix % 8 == 0 else None

    @property
    def data_bytes(self) -> int | None:
        """Bytes of voxel data the header declares (None when it cannot say)."""
        if self.voxel_bytes is None or any(d < 0 for d in self.dims):
            return None
        return math.prod(self.dims) * self.voxel_bytes

    def spacing_problem(self) -> str | None:
        """What is wrong with the spatial spacing (pixdim[1..3]), or None."""
        bad = [
            f"{axis} = {value:g}"
            for axis, value in zip("xyz", self.pixdim[:3])
            if not (math.isfinite(value) and value > 0)
        ]
        if not bad:
            return None
        return (
            f"invalid voxel spacing in the header (pixdim {', '.join(bad)}; it must be a positive, finite number of mm)"
        )


def size_problem(header: NiftiHeader, file_bytes: int, compressed: bool) -> str | None:
    """What is impossible about the voxel data ``header`` declares, judged from the header and
    the file's size alone (``compressed``: the size of a gzip file), or None: more than
    :data:`MAX_IMAGE_BYTES` or :data:`MAX_VOLUMES`, or more than a compressed file of that size
    can decompress to (a short uncompressed file is the caller's "truncated")."""
    declared = header.data_bytes
    if declared is None:
        return None
    what = f"{' x '.join(map(str, header.dims))} voxels of {header.voxel_bytes} byte(s)"
    if declared > MAX_IMAGE_BYTES:
        return (
            f"the header declares {declared} bytes of voxel data ({what}), more than the {MAX_IMAGE_BYTES} bytes "
            "autounet reads: a damaged or crafted header"
        )
    volumes = math.prod(header.dims[3:])
    if volumes > MAX_VOLUMES:
        return (
            f"the header declares {volumes} volumes ({what}), more than the {MAX_VOLUMES} autounet reads: "
            "a damaged or crafted header"
        )
    if compressed and header.single_file and declared > file_bytes * _DEFLATE_MAX_RATIO:
        return (
            f"the header declares {declared} bytes of voxel data ({what}), more than this {file_bytes}-byte "
            "compressed file can hold: the file is truncated or its header damaged"
        )
    return None


def parse_header(raw: bytes) -> NiftiHeader | None:
    """The header at the start of ``raw`` (at least 348 or 540 bytes), or None if it is not NIfTI."""
    if len(raw) < 348:
        return None
    for order in ("<", ">"):
        size = struct.unpack(order + "i", raw[:4])[0]
        if size == 348:
            ndim, *dims = struct.unpack(order + "8h", raw[40:56])
            datatype, bitpix = struct.unpack(order + "2h", raw[70:74])
            pixdim = struct.unpack(order + "8f", raw[76:108])
            offset, slope, inter = struct.unpack(order + "3f", raw[108:120])
            magic = raw[344:348]
        elif size == 540 and len(raw) >= 540:
            datatype, bitpix = struct.unpack(order + "2h", raw[12:16])
            ndim, *dims = struct.unpack(order + "8q", raw[16:80])
            pixdim = struct.unpack(order + "8d", raw[104:168])
            offset = struct.unpack(order + "q", raw[168:176])[0]
            slope, inter = struct.unpack(order + "2d", raw[176:192])
            magic = raw[4:8]
        else:
            continue
        if not 1 <= ndim <= 7:
            return None
        offset = int(offset) if math.isfinite(offset) else 0
        return NiftiHeader(
            order=order,
            header_size=size,
            datatype=int(datatype),
            bitpix=int(bitpix),
            dims=tuple(int(d) for d in dims[:ndim]),
            pixdim=tuple(float(p) for p in pixdim[1 : ndim + 1]),
            offset=max(offset, size),
            single_file=magic in _SINGLE_FILE_MAGIC,
            scl_slope=float(slope),
            scl_inter=float(inter),
        )
    return None


def is_nifti_name(path: str | Path) -> bool:
    return Path(path).name.lower().endswith((".nii", ".nii.gz"))


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def _open(path: Path):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def read_header(path: str | Path) -> NiftiHeader | None:
    """The header of a ``.nii`` / ``.nii.gz`` file (reads only its first bytes), or None."""
    path = Path(path)
    try:
        with _open(path) as fh:
            return parse_header(fh.read(540))
    except (OSError, EOFError, zlib.error):
        return None


def gzip_error(exc: BaseException) -> str:
    """A user's description of an error raised while decompressing a gzip stream."""
    if isinstance(exc, EOFError):
        return "the compressed data end early: the file is truncated"
    return f"the compressed data are corrupt ({exc})"


@dataclass(frozen=True)
class NiftiScan:
    header: NiftiHeader
    available: int  # bytes present from the voxel offset to the end of the (decompressed) file
    nonfinite: list[int] | None  # NaN/Inf voxels per 3D volume; None when not counted or not float data


@dataclass(frozen=True)
class NiftiVoxels:
    header: NiftiHeader
    data: np.ndarray | None  # every voxel, flat, stored type in native byte order; None: the file is short
    available: int  # bytes present from the voxel offset to the end of the (decompressed) file


def stored_dtype(header: NiftiHeader) -> np.dtype | None:
    """The numpy type of the voxels as stored (byte order included), or None for types read
    only through SimpleITK (complex, RGB, float128)."""
    code = _STORED_TYPES.get(header.datatype)
    return None if code is None else np.dtype(code).newbyteorder(header.order)


def itk_scaling(header: NiftiHeader) -> tuple[float, float] | None:
    """``(slope, intercept)`` as ITK's NIfTI reader applies them, or None when it applies none:
    a non-finite value counts as 0, a slope of 0 as 1, and (1, 0) is no scaling. ITK then reads
    the image as float32 (float64 for float64 data), ``stored * slope + intercept`` computed in
    double precision, non-finite stored values made 0 first."""
    slope = header.scl_slope if math.isfinite(header.scl_slope) else 0.0
    inter = header.scl_inter if math.isfinite(header.scl_inter) else 0.0
    if slope == 0.0:
        slope = 1.0
    eps = np.finfo(np.float64).eps
    if abs(slope - 1.0) <= eps and abs(inter) <= eps:
        return None
    return slope, inter


def read_voxels(path: str | Path) -> NiftiVoxels | None:
    """Header and voxels of a single-file NIfTI in one pass: a ``.nii.gz`` is decompressed once,
    to the end of its stream (CRC and length checked), straight into the array (no second copy
    of the image in memory).

    Returns None when the file is not a single-file NIfTI with a stored type numpy has (the
    caller reads it another way). Raises :class:`NiftiDataError` when the gzip stream is
    truncated or corrupt or the header declares impossible data (:func:`size_problem`); a file
    that is intact but shorter than its header declares gives ``data`` None.
    """
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        size = os.fstat(raw.fileno()).st_size
        if not compressed:
            return _read_voxels(raw, size, False)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as fh:
                return _read_voxels(fh, size, True)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise _damaged(raw, exc) from None


def _read_voxels(fh, file_bytes: int, compressed: bool) -> NiftiVoxels | None:
    head = fh.read(540)
    header = parse_header(head)
    dtype = None if header is None else stored_dtype(header)
    if header is None or not header.single_file or dtype is None or header.data_bytes is None:
        return None
    problem = size_problem(header, file_bytes, compressed)
    if problem:
        raise NiftiDataError(problem, truncated=False)
    data = np.empty(math.prod(header.dims), dtype)
    buffer = memoryview(data.view(np.uint8))
    wanted = data.nbytes
    if header.offset > len(head):
        skip = header.offset - len(head)  # header extensions
        if _drain(fh, skip) < skip:
            return NiftiVoxels(header, None, 0)
        rest = b""
    else:
        rest = head[header.offset :]
    seen = len(rest)  # bytes after the voxel offset
    filled = min(seen, wanted)
    buffer[:filled] = rest[:filled]
    while filled < wanted:
        n = fh.readinto(buffer[filled : filled + (_CHUNK_BYTES if compressed else wanted)])
        if not n:
            return NiftiVoxels(header, None, filled)
        filled += n
        seen += n
    # a gzip stream is read to its end, which checks its CRC and length
    available = seen + _drain(fh) if compressed else file_bytes - header.offset
    if not dtype.isnative:
        data = data.byteswap(inplace=True).view(dtype.newbyteorder("="))
    return NiftiVoxels(header, data, available)


def nonfinite_count(array: np.ndarray, slab: int = 1 << 22) -> int:
    """NaN and infinite values of ``array``, counted a slab at a time (no full-size mask)."""
    if array.dtype.kind != "f":
        return 0
    flat = array.reshape(-1)
    return sum(int(np.count_nonzero(~np.isfinite(flat[i : i + slab]))) for i in range(0, flat.size, slab))


def _damaged(raw, exc: BaseException) -> NiftiDataError:
    """The error for a gzip stream that failed (``raw``: the file): a stream that ends early after
    a readable header is a truncated image; one that does not even give a header is not an image."""
    raw.seek(0)
    truncated = isinstance(exc, EOFError) and _starts_with_header(raw.read(64 * 1024))
    if isinstance(exc, EOFError) and not truncated:
        return NiftiDataError("not an image: its compressed data end before a NIfTI header", False)
    return NiftiDataError(gzip_error(exc), truncated)


def scan_nifti(path: str | Path, count_nonfinite: bool = False) -> NiftiScan | None:
    """Read ``path``'s header and stream its data once (see the module docstring).

    Returns None when the file is not a single-file NIfTI we can parse (SimpleITK then has its
    say). Raises :class:`NiftiDataError` when a gzip stream is truncated or corrupt. Non-finite
    values are counted only with ``count_nonfinite`` and for float32/float64 data.
    """
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        size = os.fstat(raw.fileno()).st_size
        if not compressed:
            return _scan(raw, raw.read(540), size, False, count_nonfinite)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as fh:
                return _scan(fh, fh.read(540), size, True, count_nonfinite)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise _damaged(raw, exc) from None


def _starts_with_header(compressed: bytes) -> bool:
    try:
        return parse_header(zlib.decompressobj(wbits=31).decompress(compressed, 540)) is not None
    except zlib.error:
        return False


def _scan(fh, head: bytes, file_bytes: int, compressed: bool, count_nonfinite: bool) -> NiftiScan | None:
    header = parse_header(head)
    if header is None or not header.single_file:
        if compressed:
            _drain(fh)  # still verify the compressed stream
        return None
    problem = size_problem(header, file_bytes, compressed)
    if problem:
        raise NiftiDataError(problem, truncated=False)
    count = count_nonfinite and header.datatype in _FLOAT_TYPES and header.data_bytes is not None
    if not compressed:
        available = max(0, file_bytes - header.offset)
        if not count or available < (header.data_bytes or 0):  # cut short: the caller says so
            return NiftiScan(header, available, None)
    if header.offset > len(head):
        skip = header.offset - len(head)  # header extensions
        if _drain(fh, skip) < skip:
            return NiftiScan(header, 0, None)
        rest = b""
    else:
        rest = head[header.offset :]
    if not count:
        return NiftiScan(header, len(rest) + _drain(fh), None)
    available, nonfinite = _count_nonfinite(fh, rest, header)
    return NiftiScan(header, available, nonfinite)


def _drain(fh, limit: int | None = None) -> int:
    """Read (and discard) up to ``limit`` bytes (all by default); return how many were read."""
    total = 0
    while limit is None or total < limit:
        data = fh.read(_CHUNK_BYTES if limit is None else min(_CHUNK_BYTES, limit - total))
        if not data:
            break
        total += len(data)
    return total


def _count_nonfinite(fh, rest: bytes, header: NiftiHeader) -> tuple[int, list[int]]:
    """Stream the voxel data: (bytes available after the offset, NaN/Inf count per 3D volume)."""
    dtype = np.dtype(_FLOAT_TYPES[header.datatype]).newbyteorder(header.order)
    per_volume = math.prod(header.dims[:3])
    volumes = math.prod(header.dims[3:])
    counts = [0] * volumes
    total = per_volume * volumes
    index = 0  # voxel index of the next value
    available, pending = len(rest), rest  # pending: bytes read but not yet scanned
    while True:
        usable = min(len(pending) // dtype.itemsize, total - index)
        if usable > 0:
            values = np.frombuffer(pending, dtype=dtype, count=usable)
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                vols = (bad + index) // per_volume
                for v, n in zip(*np.unique(vols, return_counts=True)):
                    counts[int(v)] += int(n)
            index += usable
            pending = pending[usable * dtype.itemsize :]
        if index >= total:
            return available + _drain(fh), counts
        chunk = fh.read(_CHUNK_BYTES)
        if not chunk:
            return available, counts  # truncated: the caller compares the length with the header
        available += len(chunk)
        pending = pending + chunk if pending else chunk


def nonfinite_per_volume(path: str | Path) -> list[int] | None:
    """NaN/Inf voxel count per 3D volume (per channel of a 4D file) of a float NIfTI file.

    Returns None when the file is not a single-file NIfTI or its voxels are not float32/float64
    (integer data cannot hold NaN).
    """
    path = Path(path)
    if not is_nifti_name(path):
        return None
    try:
        scan = scan_nifti(path, count_nonfinite=True)
    except NiftiDataError:
        return None  # damaged: reading the file reports that
    return None if scan is None else scan.nonfinite
