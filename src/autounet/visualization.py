"""Quick-look pictures of an image with its segmentation: ``autounet show``.

:func:`render_overlay` draws one PNG with three rows of slices (axial, coronal, sagittal) through
the segmentation's foreground, the image in grey and each label value in a fixed colour.
:func:`show_files` reads the files, checks that image and segmentation share a grid, turns the
arrays to a standard orientation and calls it.

Matplotlib is used through :class:`matplotlib.figure.Figure` and the Agg canvas only, so the
global ``pyplot`` state (and any backend another part of the program chose) is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autounet.data.geometry import Geometry, geometry_differences
from autounet.data.image_io import IMAGE_SUFFIXES, image_suffix, read_image, read_label
from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write
from autounet.utils.loaders import read_json

# Qualitative colours (matplotlib's tab20 order: tab10's colours, then their light variants,
# without the greys, which would vanish on a grey image).
# Label value v >= 1 always gets _PALETTE[(v - 1) % len(_PALETTE)].
_PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.122, 0.467, 0.706),
    (1.000, 0.498, 0.055),
    (0.173, 0.627, 0.173),
    (0.839, 0.153, 0.157),
    (0.580, 0.404, 0.741),
    (0.549, 0.337, 0.294),
    (0.890, 0.467, 0.761),
    (0.737, 0.741, 0.133),
    (0.090, 0.745, 0.812),
    (0.682, 0.780, 0.910),
    (1.000, 0.733, 0.471),
    (0.596, 0.875, 0.541),
    (1.000, 0.596, 0.588),
    (0.773, 0.690, 0.835),
    (0.769, 0.612, 0.580),
    (0.969, 0.714, 0.824),
    (0.859, 0.859, 0.553),
    (0.620, 0.855, 0.898),
)

_VIEW_NAMES = ("axial", "coronal", "sagittal")
_AXIS_LETTERS = "zyx"
# Side letters (left, right, top, bottom) of each view for arrays in the orientation of
# :func:`_to_lps`: axis 0 inferior -> superior, axis 1 anterior -> posterior, axis 2 right -> left.
_SIDES = (("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I"))
_MAX_WINDOW_SAMPLES = 4_000_000
_MAX_LEGEND_ENTRIES = 24
MAX_SLICES = 32  # per view: more columns would make a picture too large to draw (and no one reads them)
_CELL_INCHES = 2.2
_GAP_INCHES = 0.22  # room for a panel's title above it


def label_colour(value: int) -> tuple[float, float, float]:
    """The overlay colour (RGB in 0..1) of label ``value`` (the same in every picture)."""
    return _PALETTE[(int(value) - 1) % len(_PALETTE)]


def intensity_window(volume: np.ndarray) -> tuple[float, float]:
    """Grey-value window: 0.5 and 99.5 percentiles of the finite nonzero voxels.

    Falls back to all finite voxels when none is nonzero, and to ``(0, 1)`` when none is finite.
    A constant image gets a window of width 2 around its value.
    """
    flat = np.asarray(volume).reshape(-1)
    if flat.size > _MAX_WINDOW_SAMPLES:  # a regular subsample is plenty for two percentiles
        flat = flat[:: flat.size // _MAX_WINDOW_SAMPLES + 1]
    flat = flat.astype(np.float64)
    finite = flat[np.isfinite(flat)]
    values = finite[finite != 0]
    if values.size == 0:
        values = finite
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    return lo, hi


def _as_labels(seg: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if seg is None:
        return None
    seg = np.asarray(seg)
    if seg.shape != tuple(shape):
        raise AutounetError(f"segmentation shape {seg.shape} differs from the image's spatial shape {tuple(shape)}")
    if seg.dtype.kind in "iu":
        return seg  # no copy of a large label map
    if seg.dtype.kind == "f":
        seg = np.rint(np.nan_to_num(seg, nan=0.0, posinf=0.0, neginf=0.0))
    return seg.astype(np.int64)


def _slice_positions(labels: np.ndarray | None, shape: tuple[int, ...], axis: int, count: int) -> list[int]:
    """``count`` evenly spaced slices along ``axis``: within the foreground's extent, else the whole axis."""
    n = shape[axis]
    lo, hi = 0, n - 1
    if labels is not None:
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(np.any(labels != 0, axis=other))
        if hit.size:
            lo, hi = int(hit[0]), int(hit[-1])
    # centres of `count` equal bins of [lo, hi]: for one slice, the middle
    pos = lo + ((np.arange(count) + 0.5) * (hi - lo + 1) / count).astype(int)
    return sorted({int(min(max(p, 0), n - 1)) for p in pos})


def _cut(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One 2D slice, rows top to bottom: axial (y, x); coronal and sagittal with axis 0 flipped (up)."""
    if axis == 0:
        return volume[index]
    if axis == 1:
        return volume[::-1, index, :]
    return volume[::-1, :, index]


def _view_geometry(shape: tuple[int, ...], spacing: Sequence[float], axis: int) -> tuple[float, float]:
    """(imshow aspect = row spacing / column spacing, physical height / width) of a view."""
    rows, cols = [(1, 2), (0, 2), (0, 1)][axis]
    aspect = float(spacing[rows]) / float(spacing[cols])
    return aspect, shape[rows] * float(spacing[rows]) / (shape[cols] * float(spacing[cols]))


def _grey(slice2d: np.ndarray, lo: float, hi: float) -> np.ndarray:
    s = np.asarray(slice2d, dtype=np.float64)
    s = np.nan_to_num(s, nan=lo, posinf=hi, neginf=lo)
    return np.clip((s - lo) / (hi - lo), 0.0, 1.0)


def _overlay(labels2d: np.ndarray, alpha: float) -> np.ndarray:
    rgba = np.zeros((*labels2d.shape, 4), dtype=np.float32)
    for v in np.unique(labels2d):
        if v != 0:
            rgba[labels2d == v] = (*label_colour(int(v)), alpha)
    return rgba


def render_overlay(
    image: np.ndarray,
    spacing: Sequence[float],
    seg: np.ndarray | None,
    out: str | Path,
    title: str | None = None,
    channel: int = 0,
    slices: int = 3,
    label_names: dict[int, str] | None = None,
    *,
    contours: bool = True,
    alpha: float = 0.45,
    orientation_labels: bool = False,
    dpi: int = 100,
) -> Path:
    """Write one picture of ``image[channel]`` with ``seg`` overlaid; returns ``out``.

    ``image`` is ``(C, Z, Y, X)``, ``spacing`` ``(z, y, x)`` mm, ``seg`` ``(Z, Y, X)`` or None.
    Rows are axial, coronal and sagittal views with ``slices`` slices each, evenly spaced within
    the foreground's extent (the whole axis without foreground); a single-slice image (Z = 1)
    gives one axial panel. Coronal and sagittal views put axis 0 upwards. Pixels keep their
    physical aspect. ``orientation_labels`` marks the sides (R/L, A/P, S/I): only right for
    arrays oriented as :func:`show_files` does. The format follows ``out``'s ending (PNG unless
    it names another format matplotlib writes); the file is written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    out = Path(out)
    image = np.asarray(image)
    if image.ndim != 4:
        raise AutounetError(f"expected a (C, Z, Y, X) image, got shape {image.shape}")
    if not 0 <= channel < image.shape[0]:
        raise AutounetError(f"channel {channel} does not exist: the image has {image.shape[0]} channel(s)")
    if not 1 <= slices <= MAX_SLICES:
        raise AutounetError(f"slices must be between 1 and {MAX_SLICES}, got {slices}")
    if min(image.shape[1:]) < 1:
        raise AutounetError(f"the image is empty (shape {image.shape})")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise AutounetError(f"invalid spacing {spacing}: expected three positive numbers (z, y, x)")
    volume = image[channel]
    shape = volume.shape
    labels = _as_labels(seg, shape)
    lo, hi = intensity_window(volume)

    flat = shape[0] == 1
    axes_shown = (0,) if flat else (0, 1, 2)
    rows = []  # (axis, positions, aspect, physical height / width)
    for axis in axes_shown:
        positions = [0] if flat else _slice_positions(labels, shape, axis, slices)
        rows.append((axis, positions, *_view_geometry(shape, spacing, axis)))
    ncols = max(len(r[1]) for r in rows)

    cell_w = 4.5 if flat else _CELL_INCHES
    row_h = [cell_w * float(np.clip(ratio, 0.25, 2.5)) for *_, ratio in rows]
    present = [] if labels is None else [int(v) for v in np.unique(labels) if v != 0]
    top_in = _GAP_INCHES + (0.35 if title else 0.05)
    bottom_in = 0.35 * (1 + (len(present[:_MAX_LEGEND_ENTRIES]) - 1) // 6) if present else 0.05
    width = ncols * cell_w + (ncols - 1) * 0.05 + 0.1
    height = top_in + bottom_in + sum(row_h) + (len(rows) - 1) * _GAP_INCHES

    fig = Figure(figsize=(width, height), dpi=dpi, facecolor="black")
    canvas = FigureCanvasAgg(fig)
    grid = fig.add_gridspec(
        len(rows),
        ncols,
        height_ratios=row_h,
        left=0.05 / width,
        right=1 - 0.05 / width,
        top=1 - top_in / height,
        bottom=bottom_in / height,
        hspace=_GAP_INCHES / float(np.mean(row_h)),
        wspace=0.05 / cell_w,
    )
    for r, (axis, positions, aspect, _) in enumerate(rows):
        for c in range(ncols):
            ax = fig.add_subplot(grid[r, c])
            ax.set_axis_off()
            if c >= len(positions):
                continue
            index = positions[c]
            ax.imshow(
                _grey(_cut(volume, axis, index), lo, hi),
                cmap="gray",
                vmin=0.0,
                vmax=1.0,
                aspect=aspect,
                interpolation="nearest",
            )
            if labels is not None:
                lab = _cut(labels, axis, index)
                ax.imshow(_overlay(lab, alpha), aspect=aspect, interpolation="nearest")
                if contours and min(lab.shape) >= 2:
                    for v in np.unique(lab):
                        mask = lab == v
                        if v != 0 and not mask.all():
                            ax.contour(
                                mask.astype(np.float32), levels=[0.5], colors=[label_colour(int(v))], linewidths=0.6
                            )
            name = "2D" if flat else f"{_VIEW_NAMES[axis]} {_AXIS_LETTERS[axis]}={index}"
            ax.set_title(name, color="white", fontsize=7, pad=2)
            if orientation_labels and not flat and c == 0:
                _mark_sides(ax, _SIDES[axis])
    if title:
        fig.suptitle(title, color="white", fontsize=9, y=1 - 0.05 / height, va="top")
    if present:
        names = label_names or {}
        handles = [
            Patch(facecolor=label_colour(v), edgecolor="none", label=f"{v}: {names[v]}" if v in names else str(v))
            for v in present[:_MAX_LEGEND_ENTRIES]
        ]
        fig.legend(
            handles=handles,
            loc="lower center",
            ncol=min(len(handles), 6),
            frameon=False,
            fontsize=7,
            labelcolor="white",
            handlelength=1.2,
            columnspacing=1.0,
        )

    fmt = out.suffix.lower().lstrip(".")
    if fmt not in canvas.get_supported_filetypes():
        fmt = "png"
    return atomic_write(out, lambda p: fig.savefig(p, format=fmt, dpi=dpi, facecolor=fig.get_facecolor()))


def _mark_sides(ax, sides: tuple[str, str, str, str]) -> None:
    style = {"color": "yellow", "fontsize": 7, "transform": ax.transAxes}
    left, right, top, bottom = sides
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _to_lps(
    image: np.ndarray, seg: np.ndarray | None, geometry: Geometry
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float], bool]:
    """Permute and flip ``(C, Z, Y, X)`` (and ``seg``) so that axis 0 runs towards superior,
    axis 1 towards posterior and axis 2 towards the patient's left (world LPS, closest axes).

    Returns the arrays, their spacing and whether it could be done (2D files and directions
    without one clear world axis per array axis are returned unchanged, with False).
    """
    if geometry.spatial_dims != 3:
        return image, seg, geometry.spacing, False
    d = np.asarray(geometry.direction_xyz, dtype=float).reshape(3, 3)  # column c: direction of index axis c
    world = np.argmax(np.abs(d), axis=0)
    if sorted(world.tolist()) != [0, 1, 2]:
        return image, seg, geometry.spacing, False
    # array axis of index axis c is 2 - c; world axis w (x, y, z) should become array axis 2 - w
    src = [0, 0, 0]
    for c in range(3):
        src[2 - int(world[c])] = 2 - c
    image = np.transpose(image, (0, *(s + 1 for s in src)))
    seg = None if seg is None else np.transpose(seg, src)
    for a in range(3):
        c = 2 - src[a]
        if d[world[c], c] < 0:
            image = np.flip(image, axis=a + 1)
            seg = None if seg is None else np.flip(seg, axis=a)
    spacing = tuple(float(geometry.spacing[s]) for s in src)
    return image, seg, spacing, True


def standard_orientation(image: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, tuple[float, float, float], bool]:
    """``(C, Z, Y, X)`` turned as ``autounet show`` turns it (axis 0 towards superior, 1 towards
    posterior, 2 towards the patient's left); returns the array, its spacing and whether it could
    be turned. Stack label maps as extra channels to turn them alike."""
    image, _, spacing, ok = _to_lps(image, None, geometry)
    return image, spacing, ok


def _label_names_near(seg_path: Path) -> dict[int, str] | None:
    """Label names from the ``dataset.json`` two folders above a dataset's label file, if any."""
    descriptor = seg_path.resolve().parent.parent / "dataset.json"
    try:
        raw = read_json(descriptor, dict).get("labels")
    except AutounetError:
        return None
    if not isinstance(raw, dict):
        return None
    names: dict[int, str] = {}
    for k, v in raw.items():
        if isinstance(v, int) and not isinstance(v, bool):  # nnU-Net v2: {"name": value}
            names[v] = str(k)
        else:  # MSD: {"value": "name"}
            try:
                names[int(k)] = str(v)
            except (TypeError, ValueError):
                continue
    return names or None


def default_output(image_path: str | Path) -> Path:
    """``<image name without its ending>.png`` in the current directory."""
    name = Path(image_path).name
    suffix = image_suffix(name)
    stem = name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name
    return Path.cwd() / f"{stem}.png"


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def picture_path(out: str | Path | None, image_path: str | Path) -> Path:
    """Where `autounet show` writes: ``out`` (a folder gets ``<image name>.png`` inside it),
    default ``./<image name>.png``.

    The rule that keeps it from destroying a file it did not make: an existing file is replaced
    only when it is a PNG picture (by its content, whatever its name), and a name with a medical
    image ending (``.nii.gz``, ``.mha``, ...) is refused even when new."""
    if out is None:
        out = default_output(image_path)
    else:
        out = Path(out)
        if out.is_dir():
            out = out / default_output(image_path).name
    if image_suffix(out) in IMAGE_SUFFIXES:
        raise AutounetError(f"{out}: an image file name; `autounet show` writes a PNG picture: give -o a .png name")
    if out.is_dir():
        raise AutounetError(f"{out}: a folder is in the way of the picture; give -o another name")
    if os.path.lexists(out):
        try:
            with open(out, "rb") as fh:
                head = fh.read(len(PNG_SIGNATURE))
        except OSError as exc:
            raise AutounetError(f"{out}: exists and cannot be read ({exc.strerror}); not replaced") from None
        if head != PNG_SIGNATURE:
            raise AutounetError(
                f"{out}: exists and is not a PNG picture; `autounet show` replaces only a PNG: choose another -o "
                "or remove the file"
            )
    return out


def show_files(
    image_paths: Sequence[str | Path],
    seg_path: str | Path | None = None,
    out: str | Path | None = None,
    channel: int = 0,
    slices: int = 3,
    label_names: dict[int, str] | None = None,
    title: str | None = None,
) -> Path:
    """Read an image (one multi-channel file or one file per channel) and an optional
    segmentation, and write their overlay picture with :func:`render_overlay`; returns its path.

    The segmentation must have the image's spatial shape and geometry (else
    :class:`AutounetError` naming the file and the difference). ``out`` defaults to
    ``<image name>.png`` in the current directory; an existing folder gets that name inside it.
    Label names default to those of a ``dataset.json`` two folders above ``seg_path``. Views are
    turned to a standard orientation (axial seen from the feet, radiological left/right).
    """
    if isinstance(image_paths, (str, Path)):
        image_paths = [image_paths]
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise AutounetError("no image file given")
    out = picture_path(out, paths[0])  # refused before anything is read
    image, geometry = read_image(paths)
    if not 0 <= channel < image.shape[0]:
        raise AutounetError(f"{paths[0]}: channel {channel} does not exist: the image has {image.shape[0]} channel(s)")
    seg = None
    if seg_path is not None:
        seg_path = Path(seg_path)
        seg, seg_geometry = read_label(seg_path)
        if seg.shape != image.shape[1:]:
            raise AutounetError(
                f"{seg_path}: shape {seg.shape} differs from the image {paths[0]} (spatial shape {image.shape[1:]})"
            )
        diffs = geometry_differences(geometry, seg_geometry)
        if diffs:
            raise AutounetError(f"{seg_path}: geometry differs from the image {paths[0]}: " + "; ".join(diffs))
        if label_names is None:
            label_names = _label_names_near(seg_path)
    shape = image.shape[1:]
    image, seg, spacing, oriented = _to_lps(image, seg, geometry)
    if title is None:
        sp = " x ".join(f"{s:g}" for s in geometry.spacing[3 - geometry.spatial_dims :])
        dims = "x".join(str(n) for n in shape[3 - geometry.spatial_dims :])
        title = f"{paths[0].name}  {dims} voxels, {sp} mm"
        if image.shape[0] > 1:
            title += f", channel {channel} of {image.shape[0]}"
        if seg_path is not None:
            title += f"  |  seg {seg_path.parent.name}/{seg_path.name}"
    return render_overlay(
        image,
        spacing,
        seg,
        out,
        title=title,
        channel=channel,
        slices=slices,
        label_names=label_names,
        orientation_labels=oriented,
    )
