"""Geometry of an image on disk: spacing, origin and direction, and how to compare two of them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Spacing given to the missing axis of a 2D image so that it is always the "slice" axis
# (the public nnU-Net uses the same convention).
SPACING_2D_IMAGES = 999.0


@dataclass(frozen=True)
class Geometry:
    """Where an array's voxels lie in the world.

    ``spacing`` is in array order ``(z, y, x)``, mm. ``origin_xyz`` (mm) and ``direction_xyz``
    (3x3 direction cosines, row-major) are as ITK reports them. ``spatial_dims`` is 2 for a 2D
    file read as a single slice, else 3.
    """

    spacing: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction_xyz: tuple[float, ...]
    spatial_dims: int = 3

    def to_dict(self) -> dict:
        return {
            "spacing": list(self.spacing),
            "origin_xyz": list(self.origin_xyz),
            "direction_xyz": list(self.direction_xyz),
            "spatial_dims": self.spatial_dims,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(
            spacing=tuple(float(v) for v in d["spacing"]),
            origin_xyz=tuple(float(v) for v in d["origin_xyz"]),
            direction_xyz=tuple(float(v) for v in d["direction_xyz"]),
            spatial_dims=int(d.get("spatial_dims", 3)),
        )

    def orientation(self) -> str:
        """Three-letter orientation code (e.g. ``RAS``, ``LPS``) of the index axes i, j, k."""
        import SimpleITK as sitk

        return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(list(self.direction_xyz))


@dataclass(frozen=True)
class GeometryTolerance:
    """How far two geometries may differ and still count as the same grid.

    Spacing is compared relatively, origin in units of the smallest voxel edge, direction
    cosines absolutely. The defaults accept the float rounding found in real NIfTI headers.
    """

    spacing_rel: float = 1e-3
    origin_voxels: float = 0.05
    direction_abs: float = 1e-3


def geometry_differences(a: Geometry, b: Geometry, tol: GeometryTolerance = GeometryTolerance()) -> list[str]:
    """Describe every way ``b`` differs from ``a`` beyond ``tol`` (empty list: same grid)."""
    out = []
    sa, sb = np.asarray(a.spacing), np.asarray(b.spacing)
    if np.any(np.abs(sa - sb) > tol.spacing_rel * np.maximum(np.abs(sa), np.abs(sb))):
        out.append(f"spacing {_fmt(sb)} vs {_fmt(sa)}")
    oa, ob = np.asarray(a.origin_xyz), np.asarray(b.origin_xyz)
    if np.any(np.abs(oa - ob) > tol.origin_voxels * float(np.min(sa))):
        out.append(f"origin {_fmt(ob)} vs {_fmt(oa)}")
    da, db = np.asarray(a.direction_xyz), np.asarray(b.direction_xyz)
    if np.any(np.abs(da - db) > tol.direction_abs):
        out.append(f"direction {_fmt(db)} vs {_fmt(da)}")
    return out


def _fmt(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{x:.6g}" for x in v) + ")"
