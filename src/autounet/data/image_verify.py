"""Check an image file's name and bytes before SimpleITK sees them.

SimpleITK accepts some damage without a word, and a file name that is not valid UTF-8 aborts the
whole process (SIGABRT inside ITK). So before every read :func:`verify_image_file` checks:

* the path: every byte of it must decode as UTF-8;
* NIfTI (``.nii``, ``.nii.gz``): the spacing (``pixdim``) must be positive and finite, the gzip
  stream of a ``.nii.gz`` must decompress to its end with a correct CRC, and the (decompressed)
  file must hold all the voxel data its header declares (see :mod:`autounet.data.nifti_scan`);
* MetaImage (``.mha``, ``.mhd`` + raw) and NRRD (``.nrrd``, ``.nhdr`` + data file): the data must
  be as long as the header declares (raw), or decompress completely to that length (zlib, gzip).

Cost: one extra pass over the file's data for compressed files (measured on one core: about
0.7 ms for a hippocampus image read by SimpleITK in 4 ms, 60-90 ms for a 240x240x155x2 BraTS
image read in 155-175 ms); a ``stat`` for uncompressed ones. Counting the NaNs of a float NIfTI
in that same pass (:func:`verify_image_file` with ``count_nonfinite``) makes the count free for
`check` and `predict`, which counted them in a pass of their own before. A NIfTI file that is
read anyway needs no pass of its own: :func:`read_nifti_verified` verifies it in the one pass
that reads its voxels (what :func:`~autounet.data.image_io.read_volume` does).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

from autounet.data.nifti_scan import (
    NiftiDataError,
    NiftiVoxels,
    gzip_error,
    is_gzip,
    is_nifti_name,
    read_header,
    read_voxels,
    scan_nifti,
    size_problem,
)
from autounet.errors import AutounetError

_CHUNK_BYTES = 1024 * 1024


class ImageReadError(AutounetError):
    """A file is missing, unreadable, or not an image we can use.

    ``kind`` is the finding kind it corresponds to (see :mod:`autounet.data.findings`).
    """

    def __init__(self, message: str, kind: str = "unreadable_file"):
        super().__init__(message)
        self.kind = kind


def shown(path: str | Path) -> str:
    """``path`` for a message: bytes that are not UTF-8 appear as ``\\xNN`` escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def name_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be handed to SimpleITK (a name that is not valid UTF-8), or None."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return (
            f"{shown(path)}: the file name is not valid UTF-8 (undecodable bytes shown as \\xNN); "
            "rename the file (the image library cannot open such names)"
        )
    return None


def check_name(path: str | Path) -> None:
    problem = name_problem(path)
    if problem:
        raise ImageReadError(problem, kind="invalid_file_name")


def _truncated(path: Path, available: int, expected: int) -> ImageReadError:
    return ImageReadError(
        f"{path}: the file is truncated: its header declares {expected} bytes of voxel data, the file holds {available}"
        + ("" if available == 0 else " (the missing voxels would silently be read as 0)"),
        kind="truncated_file",
    )


def _corrupt(path: Path, what: str, truncated: bool) -> ImageReadError:
    """Compressed data that end early (``truncated_file``) or do not decompress (``unreadable_file``)."""
    return ImageReadError(f"{path}: {what}", kind="truncated_file" if truncated else "unreadable_file")


def _verify_nifti(path: Path, count_nonfinite: bool) -> list[int] | None:
    try:
        scan = scan_nifti(path, count_nonfinite)
    except NiftiDataError as exc:
        raise _corrupt(path, str(exc), exc.truncated) from None
    if scan is None:
        return None
    problem = scan.header.spacing_problem()
    if problem:
        raise ImageReadError(f"{path}: {problem}", kind="invalid_header")
    expected = scan.header.data_bytes
    if expected is not None and scan.available < expected:
        raise _truncated(path, scan.available, expected)
    return scan.nonfinite


def read_nifti_verified(path: Path) -> NiftiVoxels | None:
    """A single-file NIfTI's header and voxels, verified as :func:`verify_image_file` verifies
    them, in the one pass that reads them (:func:`~autounet.data.nifti_scan.read_voxels`); None
    when the file must be read another way (verify it with :func:`verify_image_file` then)."""
    try:
        voxels = read_voxels(path)
    except NiftiDataError as exc:
        raise _corrupt(path, str(exc), exc.truncated) from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if voxels is None:
        return None
    problem = voxels.header.spacing_problem()
    if problem:
        raise ImageReadError(f"{path}: {problem}", kind="invalid_header")
    expected = voxels.header.data_bytes or 0
    if voxels.data is None or voxels.available < expected:
        raise _truncated(path, voxels.available, expected)
    return voxels


# --- MetaImage -------------------------------------------------------------------------------

_MET_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def _text_header(path: Path, end_of_header) -> tuple[list[str], int] | None:
    """The header lines of a text-header format and the byte where its data start (None: no header found).

    The header ends at the first line for which ``end_of_header`` is true, or at the end of a
    file that holds nothing else (a detached header)."""
    with open(path, "rb") as fh:
        head = fh.read(1024 * 1024)
    complete = len(head) < 1024 * 1024
    lines, pos = [], 0
    while pos < len(head):
        nl = head.find(b"\n", pos)
        end = len(head) if nl < 0 else nl
        if nl < 0 and not complete:
            return None
        line = head[pos:end].decode("latin-1").rstrip("\r")
        pos = end + 1
        lines.append(line)
        if end_of_header(line):
            return lines, min(pos, len(head))
    return (lines, len(head)) if complete else None


def _decompressed_length(data_file: Path, start: int, compression: str) -> int:
    """Decompress the stream at byte ``start`` to its end in bounded memory; return its length.

    Raises :class:`ImageReadError` if it ends early or is corrupt (gzip and zlib check their CRC
    / Adler-32 at the end)."""
    total = 0
    try:
        with open(data_file, "rb") as fh:
            fh.seek(start)
            if compression == "gzip":  # possibly several members: the gzip module reads them all
                with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                    while chunk := gz.read(_CHUNK_BYTES):
                        total += len(chunk)
                return total
            d = zlib.decompressobj(wbits=47)  # zlib or gzip header, detected
            while not d.eof:
                data = d.unconsumed_tail or fh.read(_CHUNK_BYTES)
                if not data:
                    total += len(d.flush())
                    if d.eof:
                        break
                    raise EOFError
                total += len(d.decompress(data, _CHUNK_BYTES))
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise _corrupt(data_file, gzip_error(exc), isinstance(exc, EOFError)) from None
    return total


def _verify_data(header: Path, data_file: Path, start: int, expected: int, compression: str | None) -> None:
    """The data in ``data_file`` from byte ``start`` hold ``expected`` bytes (once decompressed)."""
    if not data_file.is_file():
        return  # SimpleITK reports a missing data file
    try:
        if compression is None:
            available = max(0, data_file.stat().st_size - start)
        else:
            available = _decompressed_length(data_file, start, compression)
        if available < expected:
            raise _truncated(data_file, available, expected)
    except ImageReadError as exc:
        if data_file == header:
            raise
        raise ImageReadError(f"{exc} (the data file of {header})", kind=exc.kind) from None


def _verify_metaimage(path: Path) -> None:
    parsed = _text_header(path, lambda line: line.split("=", 1)[0].strip().lower() == "elementdatafile")
    if parsed is None:
        return
    lines, data_start = parsed
    fields = {}
    for line in lines:
        if "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip().lower()] = value.strip()
    try:
        dims = [int(v) for v in fields["dimsize"].split()]
        channels = int(fields.get("elementnumberofchannels", "1"))
        voxel = _MET_BYTES[fields["elementtype"].upper()]
    except (KeyError, ValueError):
        return  # SimpleITK judges headers we do not understand
    if fields.get("headersize", "0") != "0" or fields.get("binarydata", "true").lower() != "true":
        return  # data at an offset we do not compute, or ASCII data
    if any(d < 0 for d in dims):
        return
    source = fields["elementdatafile"]
    if source.upper() == "LOCAL":
        data_file, start = path, data_start
    elif source.upper().startswith("LIST") or "%" in source or len(source.split()) > 1:
        return
    else:
        data_file, start = path.parent / source, 0
    compressed = fields.get("compresseddata", "false").lower() == "true"
    _verify_data(path, data_file, start, math.prod(dims) * channels * voxel, "zlib" if compressed else None)


# --- NRRD ------------------------------------------------------------------------------------

_NRRD_BYTES = {}
for _n, _names in {
    1: "signed char, int8, int8_t, uchar, unsigned char, uint8, uint8_t",
    2: "short, short int, signed short, signed short int, int16, int16_t, ushort, unsigned short, "
    "unsigned short int, uint16, uint16_t",
    4: "int, signed int, int32, int32_t, uint, unsigned int, uint32, uint32_t, float",
    8: "longlong, long long, long long int, signed long long, signed long long int, int64, int64_t, ulonglong, "
    "unsigned long long, unsigned long long int, uint64, uint64_t, double",
}.items():
    _NRRD_BYTES.update({name.strip(): _n for name in _names.split(",")})


def _verify_nrrd(path: Path) -> None:
    with open(path, "rb") as fh:
        if not fh.read(4) == b"NRRD":
            return
    parsed = _text_header(path, lambda line: line == "")
    if parsed is None:
        return
    lines, data_start = parsed
    fields = {}
    for line in lines[1:]:
        if ":" in line and not line.startswith("#") and ":=" not in line:
            key, value = line.split(":", 1)
            fields[key.strip().lower().replace(" ", "")] = value.strip()
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        voxel = _NRRD_BYTES[" ".join(fields["type"].lower().split())]
    except (KeyError, ValueError):
        return
    encoding = fields.get("encoding", "").lower()
    if encoding not in ("raw", "gzip", "gz") or any(d < 0 for d in sizes):
        return
    if fields.get("lineskip", "0") != "0" or fields.get("byteskip", "0") != "0":
        return
    source = fields.get("datafile")
    if source is None:
        data_file, start = path, data_start
    elif source.upper().startswith("LIST") or "%" in source or len(source.split()) > 1:
        return
    else:
        data_file, start = path.parent / source, 0
    _verify_data(path, data_file, start, math.prod(sizes) * voxel, None if encoding == "raw" else "gzip")


# --- entry points ----------------------------------------------------------------------------


def verify_image_file(path: str | Path, count_nonfinite: bool = False) -> list[int] | None:
    """Refuse a file SimpleITK must not see or would read wrongly (see the module docstring).

    Raises :class:`ImageReadError` naming the file (kinds ``invalid_file_name``,
    ``truncated_file``, ``invalid_header``). With ``count_nonfinite``, returns the NaN/Inf
    count per 3D volume of a float32/float64 NIfTI file, counted in the same pass; None otherwise.
    """
    check_name(path)
    path = Path(path)
    name = path.name.lower()
    try:
        if is_nifti_name(path):
            return _verify_nifti(path, count_nonfinite)
        if name.endswith((".mha", ".mhd")):
            _verify_metaimage(path)
        elif name.endswith((".nrrd", ".nhdr")):
            _verify_nrrd(path)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return None


def verify_image_header(path: str | Path) -> None:
    """The cheap part of :func:`verify_image_file`, from the first bytes of the file only: its name,
    a NIfTI header's spacing, the voxel data it declares (:func:`~autounet.data.nifti_scan.size_problem`),
    and the length of an uncompressed NIfTI file."""
    check_name(path)
    path = Path(path)
    if not is_nifti_name(path):
        return
    try:
        header = read_header(path)
        if header is None:
            return
        problem = header.spacing_problem() or size_problem(header, path.stat().st_size, is_gzip(path))
        if problem:
            raise ImageReadError(f"{path}: {problem}", kind="invalid_header")
        if header.single_file and header.data_bytes is not None and not is_gzip(path):
            available = max(0, path.stat().st_size - header.offset)
            if available < header.data_bytes:
                raise _truncated(path, available, header.data_bytes)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
