"""Read and write medical images (NIfTI, NRRD, MHA, ... through SimpleITK) as numpy arrays.

See :mod:`autounet.data` for the axis convention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autounet.data.geometry import SPACING_2D_IMAGES, Geometry, geometry_differences
from autounet.data.image_verify import (
    ImageReadError,
    check_name,
    read_nifti_verified,
    verify_image_file,
    verify_image_header,
)
from autounet.data.nifti_scan import is_nifti_name, itk_scaling, nonfinite_count, read_header, stored_dtype

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _geometry_of(img: sitk.Image, path: Path) -> Geometry:
    dim = img.GetDimension()
    spacing = img.GetSpacing()
    origin = img.GetOrigin()
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(dim, dim)
    if dim == 2:
        d3 = np.eye(3)
        d3[:2, :2] = direction
        return Geometry(
            spacing=(SPACING_2D_IMAGES, float(spacing[1]), float(spacing[0])),
            origin_xyz=(float(origin[0]), float(origin[1]), 0.0),
            direction_xyz=tuple(float(v) for v in d3.ravel()),
            spatial_dims=2,
        )
    if dim not in (3, 4):
        raise ImageReadError(f"{path}: {dim}-dimensional images are not supported (expected 2D, 3D or 4D)")
    sp = np.asarray(spacing[:3], dtype=float)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ImageReadError(f"{path}: invalid voxel spacing {tuple(spacing[:3])} in the header")
    return Geometry(
        spacing=(float(sp[2]), float(sp[1]), float(sp[0])),
        origin_xyz=tuple(float(v) for v in origin[:3]),
        direction_xyz=tuple(float(v) for v in direction[:3, :3].ravel()),
        spatial_dims=3,
    )


def read_volume(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read one file as ``(C, Z, Y, X)`` in its stored dtype, with its geometry.

    3D files give C = 1; 4D files (MSD multi-modal) put the 4th axis first; vector-pixel files put
    their components first; 2D files become a single slice (Z = 1). The file's name and bytes are
    verified (:func:`~autounet.data.image_verify.verify_image_file`; a NIfTI file in the one pass
    that reads it, one decompression of a ``.nii.gz``): a truncated or corrupt file, a NIfTI
    spacing of 0 or a name that is not UTF-8 raise :class:`ImageReadError`.
    """
    arr, geometry, _ = _read_volume(path, count_nonfinite=False)
    return arr, geometry


def _read_volume(
    path: str | Path, count_nonfinite: bool, verified: bool = False
) -> tuple[np.ndarray, Geometry, list[int] | None]:
    check_name(path)
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found", kind="missing_file")
    if is_nifti_name(path):
        once = _read_nifti_once(path)
        if once is not None:
            arr, geometry, nonfinite = once
            return arr, geometry, (nonfinite if count_nonfinite else None)
    if verified and not is_nifti_name(path):  # checked (non-finite voxels refused) by the caller
        verify_image_header(path)
        nonfinite = None
    else:
        nonfinite = verify_image_file(path, count_nonfinite)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise ImageReadError(f"{path}: cannot read image ({first})") from None
    geometry = _geometry_of(img, path)
    arr = _channels_first(sitk.GetArrayFromImage(img), img.GetNumberOfComponentsPerPixel(), img.GetDimension(), path)
    if nonfinite is not None and len(nonfinite) != arr.shape[0]:
        nonfinite = None
    return arr, geometry, nonfinite


def _channels_first(arr: np.ndarray, components: int, dim: int, path: Path) -> np.ndarray:
    """SimpleITK's array of an image as ``(C, Z, Y, X)``."""
    if components > 1:
        arr = np.moveaxis(arr, -1, 0)
    elif dim in (2, 3):
        arr = arr[None]
    if arr.ndim == 3:  # 2D image: (C, Y, X) -> (C, 1, Y, X)
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ImageReadError(f"{path}: unexpected array shape {arr.shape}")
    return arr


def _read_nifti_once(path: Path) -> tuple[np.ndarray, Geometry, list[int]] | None:
    """A NIfTI file read and verified in one pass over its bytes (one decompression of a
    ``.nii.gz``, :func:`~autounet.data.image_verify.read_nifti_verified`), with the geometry from
    SimpleITK's reading of its header alone: the array SimpleITK would give (non-finite voxels
    made 0 and intensity scaling applied as ITK 5 does, see
    :func:`~autounet.data.nifti_scan.itk_scaling`) and the non-finite voxels per channel. None when
    SimpleITK would read the file into another type or layout (vector pixels, complex or RGB
    data): the caller verifies and reads it in two passes."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()  # the header only: the first bytes of the stream
    except RuntimeError:
        return None  # the full read names what is wrong
    header = read_header(path)
    stored = None if header is None else stored_dtype(header)
    if header is None or stored is None:
        return None
    scaling = itk_scaling(header)
    if scaling is None:
        out = stored.newbyteorder("=")
    else:
        out = np.dtype(np.float64 if stored.kind == "f" and stored.itemsize == 8 else np.float32)
    size = reader.GetSize()
    if (
        reader.GetNumberOfComponents() != 1
        or reader.GetPixelID() != _SITK_TYPES.get(out.str[1:])
        or math.prod(size) != math.prod(header.dims)
    ):
        return None
    voxels = read_nifti_verified(path)
    if voxels is None or repr(voxels.header) != repr(header) or voxels.data is None:  # repr: NaN fields
        raise ImageReadError(f"{path}: the file changed while it was read")
    geometry = _geometry_of(reader, path)
    arr = _channels_first(voxels.data.reshape(size[::-1]), 1, reader.GetDimension(), path)
    nonfinite = [nonfinite_count(c) for c in arr]
    if any(nonfinite):  # as ITK 5 reads them
        for c in arr:
            _zero_nonfinite(c)
    if scaling is not None:
        arr = _scaled(arr, *scaling, out)
    return arr, geometry, nonfinite


_SITK_TYPES = {  # numpy type (without byte order) -> SimpleITK pixel type of a scalar image
    "u1": sitk.sitkUInt8,
    "i1": sitk.sitkInt8,
    "u2": sitk.sitkUInt16,
    "i2": sitk.sitkInt16,
    "u4": sitk.sitkUInt32,
    "i4": sitk.sitkInt32,
    "u8": sitk.sitkUInt64,
    "i8": sitk.sitkInt64,
    "f4": sitk.sitkFloat32,
    "f8": sitk.sitkFloat64,
}
_SLAB = 1 << 22  # values processed at a time (bounded temporaries)


def _zero_nonfinite(arr: np.ndarray) -> None:
    flat = arr.reshape(-1)
    for i in range(0, flat.size, _SLAB):
        part = flat[i : i + _SLAB]
        part[~np.isfinite(part)] = 0


def _scaled(arr: np.ndarray, slope: float, intercept: float, out: np.dtype) -> np.ndarray:
    """``arr * slope + intercept`` in double precision, stored as ``out`` (as ITK computes it)."""
    result = np.empty(arr.shape, out)
    src, dst = arr.reshape(-1), result.reshape(-1)
    for i in range(0, src.size, _SLAB):
        dst[i : i + _SLAB] = src[i : i + _SLAB].astype(np.float64) * slope + intercept
    return result


def read_image(paths: Sequence[str | Path]) -> tuple[np.ndarray, Geometry]:
    """Read one case's image from one multi-channel file or one file per channel.

    Returns ``(C, Z, Y, X)`` and the geometry of the first file. Channel files must share shape
    and geometry; a mismatch raises :class:`ImageReadError` naming the file.
    """
    arr, geometry, _ = _read_image(paths, count_nonfinite=False)
    return arr, geometry


def read_image_scanned(paths: Sequence[str | Path], verified: bool = False) -> tuple[np.ndarray, Geometry, list[int]]:
    """:func:`read_image`, plus the NaN/infinite voxels per channel found in the files' bytes.

    SimpleITK's NIfTI reader turns non-finite voxels into 0 (see :mod:`~autounet.data.nifti_scan`),
    so for float NIfTI files they are counted in the pass that verifies and reads the file, before
    they are made 0 as SimpleITK makes them; for other files in the array. ``verified``: the
    caller has run :func:`~autounet.data.image_verify.verify_image_file` with ``count_nonfinite``
    on every file that is not NIfTI and refused any non-finite voxel, so those files are not
    decompressed a second time to verify them (NIfTI files are always verified by their read).
    """
    return _read_image(paths, count_nonfinite=True, verified=verified)


def read_label_scanned(path: str | Path) -> tuple[np.ndarray, Geometry, int]:
    """:func:`read_label`, plus its NaN/infinite voxels (see :func:`read_image_scanned`)."""
    arr, geometry, nonfinite = _read_image([path], count_nonfinite=True)
    return _one_channel(arr, path), geometry, nonfinite[0]


def _nonfinite_in(arr: np.ndarray, on_disk: list[int] | None) -> list[int]:
    if on_disk is not None:  # counted in the file's bytes (the array has them as 0)
        return on_disk
    return [int(np.count_nonzero(~np.isfinite(c))) if arr.dtype.kind == "f" else 0 for c in arr]


def _read_image(
    paths: Sequence[str | Path], count_nonfinite: bool, verified: bool = False
) -> tuple[np.ndarray, Geometry, list[int]]:
    arrays, geometry, nonfinite = [], None, []
    for p in paths:
        arr, geo, on_disk = _read_volume(p, count_nonfinite, verified)
        if count_nonfinite:
            nonfinite += _nonfinite_in(arr, on_disk)
        if geometry is None:
            geometry = geo
        else:
            if arr.shape[1:] != arrays[0].shape[1:]:
                raise ImageReadError(
                    f"{p}: shape {arr.shape[1:]} differs from {paths[0]} {arrays[0].shape[1:]}", kind="shape_mismatch"
                )
            diffs = geometry_differences(geometry, geo)
            if diffs:
                raise ImageReadError(
                    f"{p}: geometry differs from {paths[0]}: " + "; ".join(diffs), kind="geometry_mismatch"
                )
        arrays.append(arr)
    if geometry is None:
        raise ImageReadError("no image files given")
    if len(arrays) == 1:
        return arrays[0], geometry, nonfinite
    dtype = np.result_type(*[a.dtype for a in arrays])
    return np.concatenate([a.astype(dtype, copy=False) for a in arrays], axis=0), geometry, nonfinite


def _one_channel(arr: np.ndarray, path: str | Path) -> np.ndarray:
    if arr.shape[0] != 1:
        raise ImageReadError(f"{path}: a label map must have one channel, found {arr.shape[0]}")
    return arr[0]


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a label map as ``(Z, Y, X)`` in its stored dtype; it must have one channel."""
    arr, geometry = read_volume(path)
    return _one_channel(arr, path), geometry


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """Build an ITK image from a ``(Z, Y, X)`` array (or ``(C, Z, Y, X)``, written as 4D)."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if geometry.spatial_dims == 2:
        if array.ndim != 3 or array.shape[0] != 1:
            raise ValueError(f"2D geometry needs a (1, Y, X) array, got {array.shape}")
        img = sitk.GetImageFromArray(array[0])
        img.SetSpacing((geometry.spacing[2], geometry.spacing[1]))
        img.SetOrigin(geometry.origin_xyz[:2])
        d = np.asarray(geometry.direction_xyz).reshape(3, 3)[:2, :2]
        img.SetDirection(tuple(d.ravel()))
        return img
    if array.ndim == 3:
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(tuple(reversed(geometry.spacing)))
        img.SetOrigin(geometry.origin_xyz)
        img.SetDirection(geometry.direction_xyz)
        return img
    if array.ndim == 4:
        img = sitk.JoinSeries([to_sitk(a, geometry) for a in array])
        return img
    raise ValueError(f"cannot write an array of shape {array.shape}")


def write_image(path: str | Path, array: np.ndarray, geometry: Geometry, compress: bool = True) -> None:
    """Write ``array`` with ``geometry`` (not atomic; see :mod:`autounet.utils.atomic`).

    A ``.nii.gz`` is written by ITK uncompressed to a temporary beside it, checked to hold every
    voxel (ITK reports no error when a write stops short), and gzipped on every core at level 1
    (:func:`~autounet.utils.deflate.gzip_file`): ITK deflates at level 6 on one core, which takes
    seconds on a large, noisy label map. A failed ITK write raises :class:`RuntimeError`."""
    import os
    import tempfile

    from autounet.utils.deflate import gzip_file
    from autounet.utils.temporary import temporary_prefix

    check_name(path)  # SimpleITK aborts the process on a name that is not UTF-8
    array = np.ascontiguousarray(array)
    img = to_sitk(array, geometry)
    if not (compress and image_suffix(path) == ".nii.gz"):
        sitk.WriteImage(img, str(path), useCompression=compress)
        return
    fd, plain = tempfile.mkstemp(prefix=temporary_prefix(), suffix=".nii", dir=Path(path).parent)
    os.close(fd)
    try:
        sitk.WriteImage(img, plain, useCompression=False)
        if os.path.getsize(plain) < 348 + array.nbytes:  # the NIfTI-1 header, then the voxels
            raise RuntimeError("the NIfTI file was written incompletely")
        gzip_file(Path(plain), Path(path))
    finally:
        Path(plain).unlink(missing_ok=True)


def image_suffix(path: str | Path) -> str:
    """The image file ending of ``path`` (``.nii.gz`` counts as one ending)."""
    name = Path(path).name.lower()
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    return Path(path).suffix


# --- writing a file atomically (every command that writes an image uses this) ---------------------

TWO_FILE_SUFFIXES = (".mhd", ".nhdr")  # a header that names a separate data file
_DATA_FILE_ENDINGS = {".mhd": ".zraw", ".nhdr": ".raw.gz"}  # what ITK names the data file (compressed)


def companion_files(path: str | Path) -> list[Path]:
    """The data file that :func:`save_image` writes beside a ``.mhd``/``.nhdr`` header (none for
    one-file formats)."""
    path = Path(path)
    suffix = image_suffix(path)
    if suffix not in TWO_FILE_SUFFIXES:
        return []
    return [path.parent / (path.name[: -len(suffix)] + _DATA_FILE_ENDINGS[suffix])]


def save_image(path: str | Path, array: np.ndarray, geometry: Geometry) -> Path:
    """Write ``array`` with ``geometry`` atomically: a reader sees the old file or the new one,
    never a part. A header + data file pair (``.mhd``, ``.nhdr``) is written under its final names
    in a temporary folder beside ``path`` (so the header names its data file, not a temporary),
    then the data file is moved into place and the header last. A failed write (disk full, file
    size limit, read-only folder) raises :class:`OSError` naming ``path`` and leaves no temporary
    and any earlier file of that name as it was."""
    import os
    import shutil
    import tempfile

    from autounet.utils.atomic import atomic_write, make_folder
    from autounet.utils.temporary import temporary_prefix, write_failure

    path = Path(path)
    if image_suffix(path) not in TWO_FILE_SUFFIXES:
        return atomic_write(path, lambda p: _write_verified(p, path, array, geometry))
    make_folder(path.parent)
    try:
        staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(), suffix="." + path.name, dir=path.parent))
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        staged = staging / path.name
        _write_verified(staged, path, array, geometry)
        for f in staging.iterdir():
            if f.name != path.name:
                os.replace(f, path.parent / f.name)
        os.replace(staged, path)
    except OSError as exc:
        if exc.errno is None:
            raise write_failure(path, str(exc)) from None
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _write_verified(tmp: Path, final: Path, array: np.ndarray, geometry: Geometry) -> None:
    """:func:`write_image` to ``tmp``, with ITK's failures as :class:`OSError` naming ``final``.

    ITK's NIfTI writer reports no error when a write stops short (disk full, file size limit):
    the file is checked to hold the whole array."""
    from autounet.utils.temporary import write_failure

    try:
        write_image(tmp, array, geometry)
    except RuntimeError as exc:
        raise write_failure(final, str(exc)) from None
    if image_suffix(tmp) == ".nii":  # (a .nii.gz is checked before it is gzipped: write_image)
        needed = 348 + np.asarray(array).nbytes  # the NIfTI-1 header, then the voxels
        if tmp.stat().st_size < needed:
            raise write_failure(final, "the NIfTI file was written incompletely")
