"""One case through preprocessing (crop, transpose, resample, normalise) and back (revert).

Forward, for training and inference alike: crop to the box of the nonzero region (widened to
every labelled voxel when a label is given), permute the axes into network order, resample to
the configuration's target spacing (cubic spline for images, nearest neighbour or one-hot linear
for labels, the coarse axis on its own for anisotropic data), normalise per channel. An ignore
label (sparse annotations) is one more class index here, so both label interpolations keep it:
nearest copies it, one-hot linear interpolates its map like any class's.

Seed 004 (the ``brats`` preset) adds two plan fields: ``background`` (per channel, the value that
counts as zero for cropping and the nonzero mask; those voxels are 0 after normalisation) and
``foreground_channel`` (the resampled nonzero mask appended as an extra 1/0 input channel).

Backward (:func:`revert_probabilities`, :func:`revert_segmentation`): resample network-space
results to the cropped shape, permute back and place them into the original image grid, whose
geometry the case's properties keep.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from autounet.data.crop import bounding_box, box_slices, uncrop
from autounet.data.geometry import Geometry
from autounet.data.inspect import corner_values, foreground_mask
from autounet.errors import AutounetError
from autounet.planning.plans import ConfigurationPlan
from autounet.preprocessing.locations import sample_class_locations
from autounet.preprocessing.normalize import normalize
from autounet.preprocessing.resample import (
    resample_image,
    resample_labels_linear,
    resample_labels_nearest,
    resample_volume,
    resampled_shape,
    separate_axis,
)
from autounet.preprocessing.store import CaseProperties, ClassLocationInfo
from autounet.utils.plain_data import to_plain

# Bump when a change to the code alters preprocessed data, so that stored cases are redone.
PREPROCESS_VERSION = 1
IMAGE_DTYPES = ("float32", "float16")
LABEL_INTERPOLATIONS = ("nearest", "linear")


@dataclass(frozen=True)
class PreprocessOptions:
    """Choices beyond the plan: storage precision and label interpolation."""

    image_dtype: str = "float32"
    label_interpolation: str = "nearest"  # the paper's; "linear": one-hot linear + argmax

    def validate(self) -> None:
        if self.image_dtype not in IMAGE_DTYPES:
            raise AutounetError(f"image dtype must be one of {IMAGE_DTYPES}, got {self.image_dtype!r}")
        if self.label_interpolation not in LABEL_INTERPOLATIONS:
            raise AutounetError(
                f"label interpolation must be one of {LABEL_INTERPOLATIONS}, got {self.label_interpolation!r}"
            )


@dataclass
class PreprocessedCase:
    image: np.ndarray  # (C, z, y, x), network order
    seg: np.ndarray | None  # (z, y, x) class indices, or None without a label
    locations: np.ndarray  # (N, 4) int32 (class, z, y, x)
    properties: CaseProperties


def label_values(labels: dict[str, str], ignore_label: int | None = None) -> list[int]:
    """Declared label values in class-index order (index i stands for ``values[i]``).

    With ``ignore_label`` (a plan's, absent from its ``labels``) it comes last: being the highest
    value, its class index is the number of classes.
    """
    return sorted(int(v) for v in labels) + ([int(ignore_label)] if ignore_label is not None else [])


def ignore_index(plan: ConfigurationPlan, values: list[int]) -> int | None:
    """The class index of ``plan``'s ignore label in ``values`` (:func:`label_values`), or None."""
    if plan.ignore_label is None or plan.ignore_label not in values:
        return None
    return values.index(plan.ignore_label)


def preprocess_key(plan: ConfigurationPlan, values: list[int], options: PreprocessOptions) -> str:
    """Hash of everything that determines a configuration's stored data."""
    relevant = {
        "version": PREPROCESS_VERSION,
        "spacing": plan.spacing,
        "transpose_forward": plan.transpose_forward,
        "normalization": to_plain(plan.normalization),
        "resampling": to_plain(plan.resampling),
        "label_values": values,
        "options": asdict(options),
    }
    if plan.background is not None:  # only when set, so that other plans keep their keys
        relevant["background"] = plan.background
    if plan.foreground_channel:
        relevant["foreground_channel"] = True
    if plan.ignore_label is not None:  # the same values as a dense dataset's, other locations
        relevant["ignore_label"] = plan.ignore_label
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _class_indices(label: np.ndarray, values: list[int], case_id: str) -> np.ndarray:
    """Label values -> class indices through a lookup table, without a wide copy of the volume."""
    dtype = np.uint8 if len(values) <= 256 else np.uint16
    lab = label
    if lab.dtype.kind == "f":  # whole-number float labels (validated by `check`)
        lab = np.rint(lab).astype(np.int32)
    elif lab.dtype.kind == "b":
        lab = lab.view(np.uint8)
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0:
        raise AutounetError(
            f"{case_id}: label values {sorted(set(np.unique(lab[lab < 0]).tolist()))} are not declared in dataset.json"
        )
    known = np.zeros(hi + 1, dtype=bool)
    lut = np.zeros(hi + 1, dtype=dtype)
    for i, v in enumerate(values):
        if v <= hi:
            known[v], lut[v] = True, i
    if not known[lab].all():
        bad = sorted(set(np.unique(lab[~known[lab]]).tolist()))
        raise AutounetError(f"{case_id}: label values {bad} are not declared in dataset.json")
    return lut[lab]


def case_background(image: np.ndarray, background: list[float | None] | None) -> list[float] | None:
    """Background value per channel of ``image`` for a plan's ``background`` (None: 0 everywhere).

    A None entry takes this case's own value: that of its 8 corners when they agree, else 0.
    """
    if background is None:
        return None
    if len(background) != image.shape[0]:
        raise AutounetError(f"the plan gives {len(background)} background value(s) for {image.shape[0]} channel(s)")
    corners = corner_values(image) if any(v is None for v in background) else [None] * image.shape[0]
    return [float(v) if v is not None else float(c or 0.0) for v, c in zip(background, corners)]


def preprocess_case(
    case_id: str,
    image: np.ndarray,
    geometry: Geometry,
    label: np.ndarray | None,
    plan: ConfigurationPlan,
    values: list[int],
    options: PreprocessOptions = PreprocessOptions(),
) -> PreprocessedCase:
    """Preprocess one case (image ``(C, Z, Y, X)``, label ``(Z, Y, X)`` or None) for ``plan``."""
    if image.shape[0] != len(plan.normalization):
        raise AutounetError(
            f"{case_id}: image has {image.shape[0]} channel(s), the plan expects {len(plan.normalization)}"
        )
    # 1. crop to the nonzero region (and every labelled voxel); "zero" is the plan's background
    background = case_background(image, plan.background)
    nonzero = foreground_mask(image, background)
    box = bounding_box(nonzero | (label > 0) if label is not None else nonzero)
    crop = box_slices(box)
    image_c = image[(slice(None), *crop)]
    use_mask = any(n.use_nonzero_mask for n in plan.normalization)
    need_mask = use_mask or plan.background is not None or plan.foreground_channel
    mask_c = ndimage.binary_fill_holes(nonzero[crop]) if need_mask else None  # seed 001 §2.2: holes filled
    del nonzero
    seg_c = _class_indices(label[crop], values, case_id) if label is not None else None

    # 2. network axis order
    tf = list(plan.transpose_forward)
    image_t = image_c.transpose(0, *[a + 1 for a in tf])
    seg_t = seg_c.transpose(tf) if seg_c is not None else None
    mask_t = mask_c.transpose(tf) if mask_c is not None else None
    spacing_t = [geometry.spacing[a] for a in tf]

    # 3. resample to the target spacing
    target = plan.spacing
    new_shape = resampled_shape(image_t.shape[1:], spacing_t, target)
    rs = plan.resampling
    sep = separate_axis(spacing_t, target, rs.anisotropy_threshold)
    image_r = resample_image(image_t, new_shape, rs.image_order, sep, rs.image_order_low_res_axis)
    seg_r = None
    if seg_t is not None:
        if options.label_interpolation == "linear":
            seg_r = resample_labels_linear(seg_t, new_shape, len(values), sep, rs.label_order_low_res_axis)
        else:
            seg_r = resample_labels_nearest(seg_t, new_shape)
        seg_r = np.ascontiguousarray(seg_r)
    mask_r = resample_labels_nearest(mask_t, new_shape) if mask_t is not None else None

    # 4. normalise (background 0: seed 004 §2.2), then the one-hot foreground channel
    applied = normalize(image_r, mask_r, plan.normalization)
    if plan.background is not None:
        for c, n in enumerate(plan.normalization):
            if not n.use_nonzero_mask:
                image_r[c][~mask_r] = 0
    if plan.foreground_channel:
        image_r = np.concatenate([image_r, mask_r[None].astype(image_r.dtype)])
    image_r = image_r.astype(options.image_dtype, copy=False)

    if seg_r is not None:
        ignore = ignore_index(plan, values)
        classes = len(values) - (1 if ignore is not None else 0)
        locations, info = sample_class_locations(seg_r, classes, case_id, ignore)
    else:
        locations, info = np.zeros((0, 4), np.int32), {}
    props = CaseProperties(
        case_id=case_id,
        configuration=plan.data_identifier,
        preprocess_key=preprocess_key(plan, values, options),
        original_geometry=geometry.to_dict(),
        original_shape=[int(s) for s in image.shape[1:]],
        crop_bbox=[list(b) for b in box],
        shape_after_crop=[int(s) for s in image_c.shape[1:]],
        transpose_forward=tf,
        spacing_after_crop=[float(s) for s in spacing_t],
        target_spacing=[float(s) for s in target],
        spacing_after_resampling=[float(n * s / m) for n, s, m in zip(image_t.shape[1:], spacing_t, new_shape)],
        shape_after_resampling=[int(s) for s in new_shape],
        separate_axis=sep,
        image_dtype=options.image_dtype,
        seg_dtype=str(seg_r.dtype) if seg_r is not None else "uint8",
        normalization=applied,
        classes={str(k): ClassLocationInfo(**v) for k, v in info.items()},
        has_label=label is not None,
    )
    return PreprocessedCase(image_r, seg_r, locations, props)


def _crop_shape_network(props: CaseProperties) -> list[int]:
    return [props.shape_after_crop[a] for a in props.transpose_forward]


def _backward(props: CaseProperties) -> list[int]:
    tf = props.transpose_forward
    return [tf.index(a) for a in range(len(tf))]


def _check_shape(array_shape: tuple[int, ...], props: CaseProperties) -> None:
    if list(array_shape) != props.shape_after_resampling:
        raise AutounetError(
            f"{props.case_id}: result shape {list(array_shape)} does not match the preprocessed shape {props.shape_after_resampling}"
        )


def revert_segmentation(seg: np.ndarray, props: CaseProperties) -> np.ndarray:
    """Class indices in preprocessed space ``(z, y, x)`` -> the original grid ``(Z, Y, X)`` (nearest)."""
    _check_shape(seg.shape, props)
    resampled = resample_labels_nearest(seg, _crop_shape_network(props))
    raw = np.ascontiguousarray(resampled.transpose(_backward(props)))
    return uncrop(raw, tuple(tuple(b) for b in props.crop_bbox), tuple(props.original_shape), fill=0)


def revert_probabilities(
    probabilities: np.ndarray, props: CaseProperties, keep_probabilities: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities ``(K, z, y, x)`` in preprocessed space -> original grid.

    Each class is resampled linearly (nearest along the separate axis of anisotropic data) and
    the segmentation is their argmax, computed one class at a time so that memory holds two
    output volumes, not K. With ``keep_probabilities`` the probabilities ``(K, Z, Y, X)`` float32
    are returned too (outside the crop box: background 1, other classes 0).
    """
    _check_shape(probabilities.shape[1:], props)
    shape_net = _crop_shape_network(props)
    backward = _backward(props)
    box = tuple(tuple(b) for b in props.crop_bbox)
    best = np.full(shape_net, -np.inf, dtype=np.float32)
    seg = np.zeros(shape_net, dtype=np.uint8 if probabilities.shape[0] <= 256 else np.uint16)
    kept = np.zeros((probabilities.shape[0], *props.original_shape), np.float32) if keep_probabilities else None
    for k in range(probabilities.shape[0]):
        p = resample_volume(np.asarray(probabilities[k], dtype=np.float32), shape_net, 1, props.separate_axis, 0)
        better = p > best
        best[better] = p[better]
        seg[better] = k
        if kept is not None:
            kept[k] = uncrop(
                np.ascontiguousarray(p.transpose(backward)),
                box,
                tuple(props.original_shape),
                fill=1.0 if k == 0 else 0.0,
            )
    raw = np.ascontiguousarray(seg.transpose(backward))
    return uncrop(raw, box, tuple(props.original_shape), fill=0), kept


def revert_map(values: np.ndarray, props: CaseProperties, fill: float = 0.0) -> np.ndarray:
    """One probability map ``(z, y, x)`` in preprocessed space -> the original grid, float32.

    Linear resampling (nearest along the separate axis of anisotropic data), as for
    :func:`revert_probabilities`; ``fill`` outside the crop box.
    """
    _check_shape(values.shape, props)
    p = resample_volume(np.asarray(values, dtype=np.float32), _crop_shape_network(props), 1, props.separate_axis, 0)
    return uncrop(
        np.ascontiguousarray(p.transpose(_backward(props))),
        tuple(tuple(b) for b in props.crop_bbox),
        tuple(props.original_shape),
        fill=fill,
    )
