"""Segment an image with a model exported by ``autounet export``, without autounet.

    python examples/onnx_predict.py EXPORT_DIR -i IMAGE [IMAGE ...] -o OUT.nii.gz [--no-tta] [--step F]
                                    [--no-postprocessing] [--threads N]

``EXPORT_DIR`` holds ``model.json`` and the ``.onnx`` files it names (docs/model_json.md).
``IMAGE`` is one file (3D, or 4D with the channels on the 4th axis, as in the Medical Segmentation
Decathlon) or one 3D file per channel in the order of ``channel_names``. The segmentation is
written to ``OUT`` with the input's size, spacing, origin and direction.

Only numpy, scipy, SimpleITK and onnxruntime are used. Every step follows ``model.json``:

1. read the image ``(C, Z, Y, X)`` in its stored data type;
2. per member (configuration) of the ensemble: crop to the foreground's bounding box, permute the
   axes into network order, resample to the target spacing, normalise each channel;
3. sliding window over the preprocessed image with every network of the member (Gaussian
   importance weights, mirroring), probabilities averaged over the networks;
4. the probabilities back to the input grid (resampled per class, axes permuted back, placed into
   the crop box), averaged over the members;
5. labels (argmax of the classes, or the thresholded regions), then the post-processing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import SimpleITK as sitk
from scipy import ndimage

SCHEMA_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------------


def read_case(paths: list[Path]) -> tuple[np.ndarray, sitk.Image, tuple[float, float, float]]:
    """The image ``(C, Z, Y, X)`` in its stored dtype, the first file's ITK image (for its
    geometry) and the spacing in array order (z, y, x)."""
    arrays, first = [], None
    for path in paths:
        image = sitk.ReadImage(str(path))
        if image.GetDimension() not in (3, 4):
            sys.exit(f"{path}: a {image.GetDimension()}D image; this script reads 3D and 4D images")
        array = sitk.GetArrayFromImage(image)
        if image.GetNumberOfComponentsPerPixel() > 1:
            array = np.moveaxis(array, -1, 0)
        elif image.GetDimension() == 3:
            array = array[None]
        if first is None:
            first = image
        elif array.shape[1:] != arrays[0].shape[1:]:
            sys.exit(f"{path}: its shape differs from {paths[0]}'s")
        arrays.append(array)
    dtype = np.result_type(*[a.dtype for a in arrays])
    image = arrays[0] if len(arrays) == 1 else np.concatenate([a.astype(dtype, copy=False) for a in arrays])
    sx, sy, sz = first.GetSpacing()[:3]
    return image, first, (float(sz), float(sy), float(sx))


def write_segmentation(path: Path, segmentation: np.ndarray, reference: sitk.Image) -> None:
    """Write ``(Z, Y, X)`` labels with the geometry of ``reference`` (its first 3 axes)."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(segmentation))
    dim = reference.GetDimension()
    out.SetSpacing(reference.GetSpacing()[:3])
    out.SetOrigin(reference.GetOrigin()[:3])
    direction = np.asarray(reference.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
    out.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(out, str(path), useCompression=True)


# ---------------------------------------------------------------------------------------------
# Resampling (model.json: ResamplingRule)
# ---------------------------------------------------------------------------------------------


def source_coordinates(n_in: int, n_out: int) -> np.ndarray:
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def along(weights: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = weights.size
    return weights.reshape(shape).astype(np.float32)


def mirror_index(idx: np.ndarray, n: int) -> np.ndarray:
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.abs(idx) % period
    return np.where(idx > n - 1, period - idx, idx)


def resample_axis(array: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    n_in = array.shape[axis]
    if n_out == n_in:
        return array
    x = source_coordinates(n_in, n_out)
    if order == 0:
        return np.take(array, np.clip(np.floor(x + 0.5), 0, n_in - 1).astype(np.intp), axis=axis)
    if order == 1:
        x = np.clip(x, 0, n_in - 1)
        i0 = np.floor(x).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        t = along(x - i0, axis, array.ndim)
        out = np.take(array, i0, axis=axis).astype(np.float32, copy=False)
        out *= 1 - t
        out += np.take(array, i1, axis=axis) * t
        return out
    if order != 3:
        raise ValueError(f"interpolation order {order} is not 0, 1 or 3")
    coefficients = ndimage.spline_filter1d(array, order=3, axis=axis, mode="mirror", output=np.float32)
    i = np.floor(x).astype(np.intp)
    t = x - i
    weights = ((1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6)
    out = None
    for k, w in enumerate(weights):
        term = np.take(coefficients, mirror_index(i + k - 1, n_in), axis=axis)
        term *= along(w, axis, array.ndim)
        out = term if out is None else out + term
    return out


def resample_volume(
    volume: np.ndarray, shape, order: int, separate_axis: int | None, separate_order: int
) -> np.ndarray:
    """One 3D volume to ``shape``: axes in increasing order of growth, ``separate_order`` along
    the separate axis; orders 1 and 3 in float32, order 0 keeps the dtype."""
    orders = [separate_order if a == separate_axis else order for a in range(volume.ndim)]
    axes = sorted(range(volume.ndim), key=lambda a: shape[a] / volume.shape[a])
    out = volume if order == 0 else volume.astype(np.float32, copy=False)
    for a in axes:
        out = resample_axis(out, a, int(shape[a]), orders[a])
    return out


def separate_axis_of(spacing, target, threshold: float) -> int | None:
    for sp in (spacing, target):
        sp = np.asarray(sp, dtype=float)
        if sp.max() / sp.min() > threshold:
            return int(np.argmax(sp))
    return None


# ---------------------------------------------------------------------------------------------
# Preprocessing (model.json: members[].preprocessing)
# ---------------------------------------------------------------------------------------------


def case_background(image: np.ndarray, crop: dict) -> list[float] | None:
    background = crop["background"]
    if background is None:
        return None
    out = []
    for c, value in enumerate(background):
        if value is None:  # this case's corner value when the 8 corners agree, else 0
            corners = np.asarray(image[c][np.ix_(*[[0, n - 1] for n in image.shape[1:]])], dtype=np.float64)
            v = float(corners.flat[0])
            agree = np.all(np.abs(corners - v) <= crop["tolerance"]) and np.isfinite(v)
            value = v if agree else 0.0
        out.append(float(value))
    return out


def foreground(image: np.ndarray, background: list[float] | None, tolerance: float) -> np.ndarray:
    if background is None or not any(background):
        return np.any(image != 0, axis=0)
    mask = np.zeros(image.shape[1:], dtype=bool)
    for c, v in enumerate(background):
        if v == 0:
            mask |= image[c] != 0
        else:
            x = image[c] if image.dtype.kind == "f" else image[c].astype(np.float64)
            mask |= np.abs(x - x.dtype.type(v)) > tolerance
    return mask


def bounding_box(mask: np.ndarray) -> list[tuple[int, int]]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append((int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, mask.shape[axis]))
    return box


def normalize(image: np.ndarray, mask: np.ndarray | None, rules: list[dict], epsilon: float) -> None:
    """In place, float32 ``(C, z, y, x)``."""
    for c, rule in enumerate(rules):
        x = image[c]
        region = mask if rule["use_nonzero_mask"] and mask is not None else None
        scheme = rule["scheme"]
        if scheme == "ct":
            np.clip(x, rule["clip_low"], rule["clip_high"], out=x)
            mean, std = float(rule["mean"]), float(rule["std"])
        elif scheme == "zscore":
            values = x[region] if region is not None else x
            mean = float(values.mean(dtype=np.float64)) if values.size else 0.0
            std = float(values.std(dtype=np.float64)) if values.size else 1.0
        elif scheme == "rescale_0_1":
            values = x[region] if region is not None else x
            lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
            mean, std = lo, hi - lo
        elif scheme == "none":
            mean, std = 0.0, 1.0
        else:
            raise ValueError(f"unknown normalisation scheme {scheme!r}")
        x -= np.float32(mean)
        x /= np.float32(max(std, epsilon))
        if region is not None:
            x[~region] = 0


def preprocess(image: np.ndarray, spacing, prep: dict) -> tuple[np.ndarray, dict]:
    """Crop, transpose, resample, normalise; returns the network input and what reverting needs."""
    crop = prep["crop"]
    fg = foreground(image, case_background(image, crop), crop["tolerance"])
    box = bounding_box(fg)
    slices = tuple(slice(a, b) for a, b in box)
    cropped = image[(slice(None), *slices)]
    need_mask = (
        any(r["use_nonzero_mask"] for r in prep["normalization"])
        or prep["zero_outside_mask"]
        or prep["foreground_channel"]
    )
    mask = ndimage.binary_fill_holes(fg[slices]) if need_mask else None

    tf = prep["transpose_forward"]
    transposed = cropped.transpose(0, *[a + 1 for a in tf])
    mask_t = mask.transpose(tf) if mask is not None else None
    spacing_t = [spacing[a] for a in tf]

    target = prep["target_spacing"]
    shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(transposed.shape[1:], spacing_t, target))
    rs = prep["resampling"]
    sep = separate_axis_of(spacing_t, target, rs["anisotropy_threshold"])
    out = np.empty((transposed.shape[0], *shape), dtype=np.float32)
    for c in range(transposed.shape[0]):
        out[c] = resample_volume(transposed[c], shape, rs["image_order"], sep, rs["image_order_separate_axis"])
    mask_r = resample_volume(mask_t, shape, rs["mask_order"], None, 0) if mask_t is not None else None

    normalize(out, mask_r, prep["normalization"], prep["epsilon"])
    if prep["zero_outside_mask"]:
        for c, rule in enumerate(prep["normalization"]):
            if not rule["use_nonzero_mask"]:
                out[c][~mask_r] = 0
    if prep["foreground_channel"]:
        out = np.concatenate([out, mask_r[None].astype(np.float32)])
    geometry = {
        "box": box,
        "original_shape": image.shape[1:],
        "crop_shape_network": [cropped.shape[1:][a] for a in tf],
        "backward": [tf.index(a) for a in range(len(tf))],
        "separate_axis": sep,
        "revert_order": rs["revert_order"],
        "revert_order_separate_axis": rs["revert_order_separate_axis"],
    }
    return out, geometry


def revert(probabilities: np.ndarray, geometry: dict, activation: str) -> np.ndarray:
    """``(K, z, y, x)`` in the preprocessed grid -> ``(K, Z, Y, X)`` on the input grid."""
    out = np.zeros((probabilities.shape[0], *geometry["original_shape"]), dtype=np.float32)
    slices = tuple(slice(a, b) for a, b in geometry["box"])
    for k in range(probabilities.shape[0]):
        p = resample_volume(
            np.asarray(probabilities[k], dtype=np.float32),
            geometry["crop_shape_network"],
            geometry["revert_order"],
            geometry["separate_axis"],
            geometry["revert_order_separate_axis"],
        )
        if activation == "softmax" and k == 0:
            out[0] = 1.0  # outside the crop box: background
        out[k][slices] = p.transpose(geometry["backward"])
    return out


# ---------------------------------------------------------------------------------------------
# Sliding window (model.json: members[].tiling)
# ---------------------------------------------------------------------------------------------


def gaussian(patch, sigma_fraction: float) -> np.ndarray:
    w = None
    for p in patch:
        x = np.arange(p, dtype=np.float32) - np.float32((p - 1) / 2)
        sigma = np.float32(max(p * sigma_fraction, 1e-3))
        a = np.exp(np.float32(-0.5) * (x / sigma) ** 2)
        w = a if w is None else w[..., None] * a
    w = w / w.max()
    positive = w[w > 0]
    return np.maximum(w, positive.min() if positive.size else np.float32(1e-6))


def tile_starts(size: int, patch: int, step: float) -> list[int]:
    if size <= patch:
        return [0]
    if patch == 1:
        return list(range(size))
    n = math.ceil((size - patch) / (patch * step)) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    if activation == "sigmoid":
        return 1 / (1 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class Network:
    """An ONNX network on ``(B, C, *patch)`` tiles; a 2D one gets ``(B, C, 1, Y, X)`` tiles."""

    def __init__(self, path: Path, input_name: str, dims: int, threads: int | None):
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.input_name, self.dims = input_name, dims

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(tiles[:, :, 0] if self.dims == 2 else tiles, dtype=np.float32)
        out = self.session.run(None, {self.input_name: x})[0]
        return out[:, :, None] if self.dims == 2 else out


def sliding_window(
    network: Network, image: np.ndarray, tiling: dict, num_outputs: int, activation: str, tta: bool, step: float
) -> np.ndarray:
    """Probabilities ``(K, z, y, x)`` of the preprocessed image ``(C, z, y, x)``."""
    two_d = tiling["network_dims"] == 2
    patch = [1, *tiling["patch_size"]] if two_d else list(tiling["patch_size"])
    mirror = [a + 1 for a in tiling["mirror_axes"]] if two_d else list(tiling["mirror_axes"])
    mirror = mirror if tta else []
    spatial = image.shape[1:]
    pad = [max(0, p - s) for p, s in zip(patch, spatial)]
    x = np.pad(image, [(0, 0)] + [(p // 2, p - p // 2) for p in pad]) if any(pad) else image
    padded = x.shape[1:]
    weight = gaussian(patch, tiling["gaussian_sigma_fraction"])
    probs = np.zeros((num_outputs, *padded), dtype=np.float32)
    norm = np.zeros(padded, dtype=np.float32)
    starts = list(itertools.product(*[tile_starts(s, p, step) for s, p in zip(padded, patch)]))
    flips = [c for r in range(len(mirror) + 1) for c in itertools.combinations([a + 2 for a in mirror], r)]
    per_batch = 32 if two_d else 4
    for i in range(0, len(starts), per_batch):
        boxes = [tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in starts[i : i + per_batch]]
        batch = np.stack([x[(slice(None), *b)] for b in boxes]).astype(np.float32, copy=False)
        total = None
        for flip in flips:
            inp = np.flip(batch, flip) if flip else batch
            out = activate(network(inp), activation)
            out = np.flip(out, flip) if flip else out
            total = out if total is None else total + out
        total = total / np.float32(len(flips))
        for b, box in enumerate(boxes):
            probs[(slice(None), *box)] += total[b] * weight
            norm[box] += weight
    probs /= norm
    if any(pad):
        probs = probs[(slice(None), *[slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial)])]
    return probs


# ---------------------------------------------------------------------------------------------
# Labels and post-processing (model.json: output, postprocessing)
# ---------------------------------------------------------------------------------------------


def label_dtype(max_value: int) -> type:
    return np.uint8 if max_value < 256 else np.uint16 if max_value < 65536 else np.int32


def region_labels(probabilities: np.ndarray, regions: dict, thresholds: list[float] | None = None) -> np.ndarray:
    rs = regions["regions"]
    thresholds = regions["thresholds"] if thresholds is None else thresholds
    masks = []
    out = np.zeros(probabilities.shape[1:], dtype=label_dtype(max(r["paint"] for r in rs)))
    for r, region in enumerate(rs):
        mask = probabilities[r] >= thresholds[r]
        if regions["hierarchical"]:
            own = set(region["labels"])
            for q in range(r):
                if own <= set(rs[q]["labels"]):
                    mask &= masks[q]
        masks.append(mask)
    for mask, region in zip(masks, rs):
        out[mask] = region["paint"]
    return out


def to_labels(probabilities: np.ndarray, output: dict) -> np.ndarray:
    if output["activation"] == "sigmoid":
        return region_labels(probabilities, output["regions"])
    values = np.asarray(output["label_values"])
    return values.astype(np.uint8 if values.max() < 256 else np.uint16)[np.argmax(probabilities, axis=0)]


def structure(connectivity: int) -> np.ndarray:
    return ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])


def keep_largest(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """The voxels of ``mask`` outside its largest component (ties: the first in raster order)."""
    components, n = ndimage.label(mask, structure(connectivity))
    if n <= 1:
        return np.zeros_like(mask)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    sizes[0] = -1
    return (components != int(np.argmax(sizes))) & mask


def postprocess(seg: np.ndarray | None, probabilities: np.ndarray | None, pp: dict) -> np.ndarray:
    """``components``: on the labels ``seg``; ``brats_et``: labels anew from the region ``probabilities``."""
    if pp["kind"] == "components":
        seg = seg.copy()
        decision = pp["decision"]
        if decision is None:
            return seg
        connectivity = decision.get("connectivity", 26)
        if decision["keep_largest_foreground"]:
            seg[keep_largest(seg > 0, connectivity)] = 0
        for c in decision["keep_largest_classes"]:
            seg[keep_largest(seg == c, connectivity)] = 0
        return seg
    if pp["kind"] == "brats_et":
        rule, regions = pp["rule"], pp["regions"]
        et_label, necrosis_label = regions["regions"][-1]["paint"], regions["regions"][-2]["paint"]
        seg = region_labels(probabilities, regions, [*regions["thresholds"][:-1], rule["et_threshold"]])
        components, n = ndimage.label(seg == et_label, structure(rule["connectivity"]))
        if n == 0:
            return seg
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        psum = np.bincount(components.ravel(), weights=probabilities[-1].astype(np.float64).ravel(), minlength=n + 1)
        means = psum / np.maximum(sizes, 1)
        demote = (sizes < rule["component_voxels"]) & (means < rule["min_mean_probability"])
        demote[0] = False
        keep = ~demote
        keep[0] = False
        total, prob = int(sizes[keep].sum()), float(psum[keep].sum())
        if 0 < total < rule["total_voxels"] and prob / total < rule["min_mean_probability"]:
            demote[1:] = True
        seg[demote[components]] = necrosis_label
        return seg
    raise ValueError(f"unknown post-processing {pp['kind']!r}")


# ---------------------------------------------------------------------------------------------
# The whole prediction
# ---------------------------------------------------------------------------------------------


def predict(
    export_dir: Path,
    images: list[Path],
    tta: bool = True,
    step: float | None = None,
    postprocessing: bool = True,
    threads: int | None = None,
) -> tuple[np.ndarray, sitk.Image]:
    model = json.loads((export_dir / "model.json").read_text(encoding="utf-8"))
    if model.get("format") != "autounet-export" or model.get("schema_version") != SCHEMA_VERSION:
        sys.exit(f"{export_dir}: not an autounet export of schema version {SCHEMA_VERSION}")
    if "onnx" not in model["formats"]:
        sys.exit(f"{export_dir}: the export holds no ONNX files (formats: {model['formats']})")
    image, reference, spacing = read_case(images)
    if image.shape[0] != model["image_channels"]:
        sys.exit(f"the image has {image.shape[0]} channel(s), the model expects {model['image_channels']}")
    output = model["output"]
    total = None
    for member in model["members"]:
        x, geometry = preprocess(image, spacing, member["preprocessing"])
        tiling = member["tiling"]
        probs = None
        for entry in member["networks"]:
            network = Network(export_dir / entry["files"]["onnx"], model["input_name"], tiling["network_dims"], threads)
            p = sliding_window(
                network, x, tiling, member["num_outputs"], output["activation"], tta, step or tiling["step"]
            )
            probs = p if probs is None else probs + p
        probs /= len(member["networks"])
        maps = revert(probs, geometry, output["activation"])
        total = maps if total is None else total + maps
    total /= len(model["members"])
    seg = to_labels(total, output)
    if postprocessing and model["postprocessing"] is not None:
        seg = postprocess(seg, total, model["postprocessing"])
    return seg, reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path, help="folder of model.json and the .onnx files")
    parser.add_argument("-i", "--input", type=Path, nargs="+", required=True, help="the image file(s) of one case")
    parser.add_argument("-o", "--output", type=Path, required=True, help="segmentation file to write")
    parser.add_argument("--no-tta", action="store_true", help="no mirroring (2^axes times faster)")
    parser.add_argument("--step", type=float, default=None, help="tile step as a fraction of the patch")
    parser.add_argument("--no-postprocessing", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    args = parser.parse_args(argv)
    seg, reference = predict(
        args.export_dir, args.input, not args.no_tta, args.step, not args.no_postprocessing, args.threads
    )
    write_segmentation(args.output, seg, reference)
    print(f"{args.output}: {seg.shape[::-1]} voxels, labels {sorted(np.unique(seg).tolist())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
