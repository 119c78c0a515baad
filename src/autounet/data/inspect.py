"""Read one training case once: validate it and measure what the fingerprint needs.

Runs in worker processes, so inputs and outputs are small picklable dataclasses.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cc3d
import numpy as np

from autounet.data.crop import bounding_box
from autounet.data.dataset import CaseFiles
from autounet.data.findings import Finding, error, warning
from autounet.data.geometry import Geometry, GeometryTolerance, geometry_differences
from autounet.data.image_io import ImageReadError, read_image_scanned, read_label_scanned

# Voxels sampled per case and channel from the foreground for the dataset's intensity statistics
# (the public nnU-Net samples the same number).
INTENSITY_SAMPLES_PER_CASE = 10_000
# Connectivity used to count connected components per class (26: faces, edges and corners).
COMPONENT_CONNECTIVITY = 26


@dataclass(frozen=True)
class InspectTask:
    case: CaseFiles
    num_channels: int
    declared_labels: frozenset[int]
    tolerance: GeometryTolerance = GeometryTolerance()
    compute_stats: bool = True
    root: Path | None = None  # dataset folder; messages show paths relative to it
    ignore_label: int | None = None  # value of the `ignore` label (unannotated voxels), if declared

    def show(self, path: Path | None) -> str:
        if path is None or self.root is None:
            return str(path)
        path = Path(path)
        # The dataset's root is resolved; the case's files keep the folder as given, which may
        # pass through a symbolic link: compare like with like (the file itself is not resolved).
        for base, p in ((self.root, path), (Path(self.root).resolve(), path.parent.resolve() / path.name)):
            try:
                return str(p.relative_to(base))
            except ValueError:
                continue
        return str(path)


@dataclass
class CaseStats:
    """What the fingerprint records about one readable, valid case (arrays ``(C, Z, Y, X)``)."""

    geometry: Geometry
    shape_before_crop: tuple[int, int, int]
    crop_bbox: tuple[tuple[int, int], ...]
    label_voxel_counts: dict[int, int]
    components_per_class: dict[int, int]
    foreground_source: str  # "label" or "nonzero" (no labelled voxel in this case)
    foreground_intensity: list[dict[str, float]]
    intensity_samples: np.ndarray  # (C, n) float32, n <= INTENSITY_SAMPLES_PER_CASE
    corner_values: list[float | None] = field(default_factory=list)  # per channel, see corner_values()
    background_crop_bbox: tuple[tuple[int, int], ...] | None = None  # crop box with the corner values as background

    @property
    def shape_after_crop(self) -> tuple[int, int, int]:
        return tuple(int(b - a) for a, b in self.crop_bbox)

    @property
    def crop_voxel_fraction(self) -> float:
        return float(np.prod(self.shape_after_crop) / np.prod(self.shape_before_crop))


@dataclass
class CaseInspection:
    case_id: str
    findings: list[Finding] = field(default_factory=list)
    image_dtype: str | None = None
    label_dtype: str | None = None
    geometry: Geometry | None = None
    shape: tuple[int, int, int] | None = None  # (Z, Y, X) of the image
    labels_present: tuple[int, ...] = ()
    stats: CaseStats | None = None
    annotated_fraction: float | None = None  # share of label voxels not `ignore` (datasets with one)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


def _read(fn, task: InspectTask, shown: str, what: str, findings: list[Finding]):
    """Call the reader ``fn``; on failure record the finding (paths shown relative to the dataset)."""
    try:
        return fn()
    except ImageReadError as exc:
        message = str(exc)
        if task.root is not None:  # the dataset folder as given, and resolved
            for base in dict.fromkeys((str(task.root), str(Path(task.root).resolve()))):
                message = message.replace(f"{base}{os.sep}", "")
        findings.append(error(exc.kind, task.case.case_id, f"{what}: {message}"))
    except (MemoryError, OSError, ValueError) as exc:
        findings.append(error("unreadable_file", task.case.case_id, f"{what} {shown}: {exc}"))
    return None


def _label_values(label: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Integer label array (int64 view or copy) and voxel count per value present."""
    lab = label if label.dtype.kind in "iu" else label.astype(np.int64)
    lo, hi = int(lab.min()), int(lab.max())
    if lo >= 0 and hi <= 65535:
        counts = np.bincount(lab.ravel(), minlength=hi + 1)
        return lab, {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    values, counts = np.unique(lab, return_counts=True)
    return lab, {int(v): int(c) for v, c in zip(values, counts)}


def _check_label(
    label: np.ndarray, nonfinite: int, path: str, case_id: str, declared: frozenset[int], findings: list[Finding]
):
    """Validate label values (``nonfinite``: its NaN/Inf voxels, see :func:`read_label_scanned`);
    return (integer label array, counts) or None if unusable."""
    if label.size == 0:
        findings.append(error("empty_image", case_id, f"label {path} has no voxels"))
        return None
    if label.dtype.kind == "f":
        if nonfinite:
            findings.append(error("non_integer_label", case_id, f"label {path} has {nonfinite} NaN/infinite values"))
            return None
        frac = label != np.round(label)
        if frac.any():
            examples = ", ".join(f"{v:g}" for v in np.unique(label[frac])[:5])
            findings.append(
                error("non_integer_label", case_id, f"label {path} has non-integer values (e.g. {examples})")
            )
            return None
        findings.append(
            warning(
                "float_label",
                case_id,
                f"label {path} is stored as {label.dtype} (whole-number values; read as integers)",
            )
        )
    elif label.dtype.kind not in "iub":
        findings.append(error("non_integer_label", case_id, f"label {path} has unsupported data type {label.dtype}"))
        return None
    lab, counts = _label_values(label.astype(np.uint8) if label.dtype.kind == "b" else label)
    undeclared = sorted(set(counts) - declared)
    if undeclared:
        findings.append(
            error(
                "undeclared_label",
                case_id,
                f"label {path} has value(s) {undeclared} not declared in dataset.json (declared: {sorted(declared)})",
            )
        )
        return None
    if set(counts) == {0}:
        findings.append(warning("empty_label", case_id, f"label {path} contains background only"))
    return lab, counts


# A constant background must cover at least this fraction of the image to be reported.
BACKGROUND_MIN_FRACTION = 0.2


def _constant_background(image: np.ndarray) -> tuple[list[float], float] | None:
    """Corner values and their share of channel 0 when every channel's 8 corners hold one nonzero constant."""
    values = []
    for c in range(image.shape[0]):
        corners = image[c][np.ix_(*[[0, n - 1] for n in image.shape[1:]])]
        v = corners.flat[0]
        if v == 0 or not np.all(corners == v):
            return None
        values.append(float(v))
    fraction = float(np.mean(image[0] == values[0]))
    return (values, fraction) if fraction >= BACKGROUND_MIN_FRACTION else None


# Voxels within this of a channel's background value count as background (seed 004 preset).
BACKGROUND_TOLERANCE = 1e-6


def corner_values(image: np.ndarray) -> list[float | None]:
    """Per channel of ``(C, Z, Y, X)``: the value of its 8 corner voxels when they all agree, else None."""
    out: list[float | None] = []
    for c in range(image.shape[0]):
        corners = np.asarray(image[c][np.ix_(*[[0, n - 1] for n in image.shape[1:]])], dtype=np.float64)
        v = float(corners.flat[0])
        out.append(v if np.all(np.abs(corners - v) <= BACKGROUND_TOLERANCE) and np.isfinite(v) else None)
    return out


def foreground_mask(image: np.ndarray, background: list[float] | None = None) -> np.ndarray:
    """Voxels where any channel differs from its background value (0 when ``background`` is None).

    A background of 0 is compared exactly (seed 001's nonzero region); another value within
    :data:`BACKGROUND_TOLERANCE`.
    """
    if background is None or not any(background):
        return np.any(image != 0, axis=0)
    mask = np.zeros(image.shape[1:], dtype=bool)
    for c, v in enumerate(background):
        if v == 0:
            mask |= image[c] != 0
        else:
            x = image[c] if image.dtype.kind == "f" else image[c].astype(np.float64)
            mask |= np.abs(x - x.dtype.type(v)) > BACKGROUND_TOLERANCE
    return mask


def _components_per_class(label: np.ndarray) -> dict[int, int]:
    if not label.any():
        return {}
    lab = label.astype(np.uint16, copy=False) if label.max() <= 65535 else label.astype(np.uint32)
    cc, n = cc3d.connected_components(np.ascontiguousarray(lab), connectivity=COMPONENT_CONNECTIVITY, return_N=True)
    comp_class = np.zeros(n + 1, dtype=np.int64)
    comp_class[cc.ravel()] = lab.ravel()
    classes, counts = np.unique(comp_class[1:], return_counts=True)
    return {int(k): int(c) for k, c in zip(classes, counts)}


def _stats(
    case_id: str,
    image: np.ndarray,
    lab: np.ndarray,
    counts: dict[int, int],
    geometry: Geometry,
    findings: list[Finding],
    ignore_label: int | None = None,
) -> CaseStats:
    nonzero = np.any(image != 0, axis=0)
    fg = lab > 0  # unannotated (`ignore`) voxels too: the crop keeps every labelled voxel, as preprocessing does
    corners = corner_values(image)
    # The crop box is the image's nonzero box, widened where needed to keep every labelled voxel.
    image_box = bounding_box(nonzero)
    inside = np.zeros_like(fg)
    inside[tuple(slice(a, b) for a, b in image_box)] = True
    outside = int(np.count_nonzero(fg & ~inside))
    if outside:
        findings.append(
            warning(
                "label_outside_nonzero",
                case_id,
                f"{outside} labelled voxels lie outside the box of nonzero image voxels (the crop box is widened to keep them)",
            )
        )
    bbox = bounding_box(nonzero | fg)
    background_bbox = bbox
    if any(v for v in corners):  # a constant non-zero corner value: the box without it as well
        background_bbox = bounding_box(foreground_mask(image, [v or 0.0 for v in corners]) | fg)
    crop = tuple(slice(a, b) for a, b in bbox)
    img_c, lab_c = image[(slice(None), *crop)], lab[crop]
    fg_c = lab_c > 0
    if ignore_label is not None:  # intensity statistics come from annotated classes only
        fg_c &= lab_c != ignore_label
    source = "label"
    if not fg_c.any():
        fg_c, source = nonzero[crop], "nonzero"
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    n_fg = int(np.count_nonzero(fg_c))
    pick = rng.choice(n_fg, size=min(n_fg, INTENSITY_SAMPLES_PER_CASE), replace=False) if n_fg else np.zeros(0, int)
    pick.sort()
    per_channel, samples = [], []
    for c in range(img_c.shape[0]):
        values = img_c[c][fg_c].astype(np.float64)
        per_channel.append(
            {
                "mean": float(values.mean()),
                "std": float(values.std()),
                "min": float(values.min()),
                "max": float(values.max()),
            }
            if values.size
            else {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
        )
        samples.append(values[pick].astype(np.float32))
    return CaseStats(
        geometry=geometry,
        shape_before_crop=tuple(int(s) for s in lab.shape),
        crop_bbox=bbox,
        label_voxel_counts=counts,
        components_per_class=_components_per_class(lab_c),
        foreground_source=source,
        foreground_intensity=per_channel,
        intensity_samples=np.stack(samples) if samples else np.zeros((0, 0), np.float32),
        corner_values=corners,
        background_crop_bbox=background_bbox,
    )


def _annotated_fraction(counts: dict[int, int], ignore_label: int) -> float:
    """Share of a label map's voxels that are annotated (any value but ``ignore_label``)."""
    total = sum(counts.values())
    return (total - counts.get(ignore_label, 0)) / total if total else 0.0


def inspect_case(task: InspectTask) -> CaseInspection:
    """Validate one case and, if it is valid and ``task.compute_stats``, measure its statistics."""
    case = task.case
    cid = case.case_id
    out = CaseInspection(cid)
    f: list[Finding] = []
    img_what = "image " + ", ".join(task.show(p) for p in case.images)
    read = _read(lambda: read_image_scanned(case.images), task, task.show(case.images[0]), "image", f)
    image, igeo, image_nonfinite = read if read is not None else (None, None, [])
    read = (
        _read(lambda: read_label_scanned(case.label), task, task.show(case.label), "label", f) if case.label else None
    )
    label, lgeo, label_nonfinite = read if read is not None else (None, None, 0)

    if image is not None:
        out.image_dtype, out.geometry, out.shape = str(image.dtype), igeo, tuple(int(v) for v in image.shape[1:])
        if image.shape[0] != task.num_channels:
            f.append(
                error(
                    "channel_count",
                    cid,
                    f"{img_what} has {image.shape[0]} channel(s), dataset.json declares {task.num_channels}",
                )
            )
        if image.size == 0:
            f.append(error("empty_image", cid, f"{img_what} has no voxels (shape {image.shape[1:]})"))
            image = None
        elif image.dtype.kind not in "biuf":
            f.append(error("unreadable_file", cid, f"{img_what} has unsupported pixel type {image.dtype}"))
            image = None
    if image is not None:
        if any(image_nonfinite):
            detail = ", ".join(f"channel {c}: {n}" for c, n in enumerate(image_nonfinite) if n)
            f.append(error("nonfinite_intensity", cid, f"{img_what} has NaN/infinite intensities ({detail} voxels)"))
        if not np.any(image != 0):
            f.append(error("empty_image", cid, f"{img_what} is empty: every voxel is 0"))
        else:
            background = _constant_background(image)
            if background is not None:
                values = ", ".join(f"{v:.4g}" for v in background[0])
                f.append(
                    warning(
                        "nonzero_background",
                        cid,
                        f"{img_what}: {background[1]:.0%} of voxels hold the corner value(s) {values}, not 0; "
                        "cropping to the nonzero region cannot remove this background (`autounet plan --recipe brats` "
                        "treats it as background)",
                    )
                )

    checked = None
    if label is not None:
        out.label_dtype = str(label.dtype)
        checked = _check_label(label, label_nonfinite, task.show(case.label), cid, task.declared_labels, f)
        if checked is not None:
            out.labels_present = tuple(sorted(checked[1]))
            if task.ignore_label is not None:
                out.annotated_fraction = _annotated_fraction(checked[1], task.ignore_label)
                if out.annotated_fraction == 0:
                    f.append(
                        warning(
                            "no_annotation",
                            cid,
                            f"label {task.show(case.label)} is `ignore` ({task.ignore_label}) everywhere: "
                            "the case has no annotated voxel to train on",
                        )
                    )
    if image is not None and label is not None:
        if image.shape[1:] != label.shape:
            f.append(
                error(
                    "shape_mismatch",
                    cid,
                    f"image shape {image.shape[1:]} differs from label shape {label.shape} ({task.show(case.label)})",
                )
            )
        else:
            diffs = geometry_differences(igeo, lgeo, task.tolerance)
            if diffs:
                f.append(
                    error(
                        "geometry_mismatch",
                        cid,
                        f"label {task.show(case.label)} geometry differs from the image: " + "; ".join(diffs),
                    )
                )
    if not any(x.severity == "error" for x in f) and task.compute_stats and image is not None and checked is not None:
        out.stats = _stats(cid, image, checked[0], checked[1], igeo, f, task.ignore_label)
    out.findings = f
    return out
