"""Read and write medical images (NIfTI, NRRD, MHA, ... through SimpleITK) as numpy arrays.

See :mod:`autounet.data` for the axis convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autounet.data.geometry import SPACING_2D_IMAGES, Geometry, geometry_differences
from autounet.errors import AutounetError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class ImageReadError(AutounetError):
    """A file is missing, unreadable, or not an image we can use.

    ``kind`` is the finding kind it corresponds to (see :mod:`autounet.data.findings`).
    """

    def __init__(self, message: str, kind: str = "unreadable_file"):
        super().__init__(message)
        self.kind = kind


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
    their components first; 2D files become a single slice (Z = 1).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found", kind="missing_file")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise ImageReadError(f"{path}: cannot read image ({first})") from None
    geometry = _geometry_of(img, path)
    arr = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = np.moveaxis(arr, -1, 0)
    elif img.GetDimension() in (2, 3):
        arr = arr[None]
    if arr.ndim == 3:  # 2D image: (C, Y, X) -> (C, 1, Y, X)
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ImageReadError(f"{path}: unexpected array shape {arr.shape}")
    return arr, geometry


def read_image(paths: Sequence[str | Path]) -> tuple[np.ndarray, Geometry]:
    """Read one case's image from one multi-channel file or one file per channel.

    Returns ``(C, Z, Y, X)`` and the geometry of the first file. Channel files must share shape
    and geometry; a mismatch raises :class:`ImageReadError` naming the file.
    """
    arrays, geometry = [], None
    for p in paths:
        arr, geo = read_volume(p)
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
        return arrays[0], geometry
    dtype = np.result_type(*[a.dtype for a in arrays])
    return np.concatenate([a.astype(dtype, copy=False) for a in arrays], axis=0), geometry


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a label map as ``(Z, Y, X)`` in its stored dtype; it must have one channel."""
    arr, geometry = read_volume(path)
    if arr.shape[0] != 1:
        raise ImageReadError(f"{path}: a label map must have one channel, found {arr.shape[0]}")
    return arr[0], geometry


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
    """Write ``array`` with ``geometry`` (not atomic; see :mod:`autounet.utils.atomic`)."""
    img = to_sitk(np.ascontiguousarray(array), geometry)
    sitk.WriteImage(img, str(path), useCompression=compress)


def image_suffix(path: str | Path) -> str:
    """The image file ending of ``path`` (``.nii.gz`` counts as one ending)."""
    name = Path(path).name.lower()
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    return Path(path).suffix
