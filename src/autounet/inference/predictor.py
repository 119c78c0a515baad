"""Predict raw images with trained models (seed 001 §2.4, seed 004 §2.5, DESIGN §4.5).

Per case: read the image, preprocess it with the code used for training (crop, resample,
normalise), run a sliding window (step ½ patch, Gaussian weights, mirroring over every axis the
model was trained to mirror) with each fold's network, average their probabilities, revert them
to the original grid and write the segmentation with the input's exact geometry. A cascade runs
its first stage, whose argmax becomes extra one-hot input channels of the second. 2D models run
over the slices of 3D volumes.

Reading and preprocessing of the next case, and the export of the previous one, run in
background threads while the network predicts the current case.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autounet.data.geometry import Geometry
from autounet.data.image_io import read_image, write_image
from autounet.errors import AutounetError
from autounet.inference.inputs import InputCase, discover_cases
from autounet.inference.model import StageModel, load_stage
from autounet.inference.sliding_window import fits_on_device, predict_slices, predict_volume
from autounet.preprocessing.case import label_values, preprocess_case, revert_map, revert_probabilities
from autounet.preprocessing.resample import resample_volume
from autounet.preprocessing.store import CaseProperties
from autounet.utils.atomic import atomic_write
from autounet.utils.progress import progress

PROBABILITIES_SUFFIX = ".npz"


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cuda`` when present unless told otherwise; a clear error for an unusable device."""
    from autounet.training.trainer import resolve_device as resolve

    return resolve(str(name) if isinstance(name, torch.device) else name)


def half_precision(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; full precision on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class Prepared:
    """A case preprocessed for each stage of a model (the first stage of a cascade first)."""

    case_id: str
    images: list[np.ndarray]  # (C, z, y, x) per stage, network order
    properties: list[CaseProperties]
    raw_image: np.ndarray | None = None  # kept only when a picture is wanted
    seconds: float = 0.0


@dataclass
class Prediction:
    """A case's result in the original grid."""

    segmentation: np.ndarray  # (Z, Y, X) label values
    probabilities: np.ndarray | None  # (K or R, Z, Y, X) float32, when asked for
    geometry: Geometry


@dataclass
class CaseTiming:
    case_id: str
    output: Path | None
    preprocess_s: float
    network_s: float
    export_s: float
    shape: list[int] = field(default_factory=list)


def _stages(stage: StageModel) -> list[StageModel]:
    out = []
    while stage is not None:
        out.insert(0, stage)
        stage = stage.previous
    return out


def prepare(stage: StageModel, case_id: str, image: np.ndarray, geometry: Geometry) -> Prepared:
    """Preprocess a raw image ``(C, Z, Y, X)`` for every stage of ``stage``."""
    t = time.perf_counter()
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise AutounetError(f"{case_id}: the image holds NaN or infinite intensities")
    images, props = [], []
    for s in _stages(stage):
        if image.shape[0] != s.image_channels:
            raise AutounetError(
                f"{case_id}: the image has {image.shape[0]} channel(s), the model expects {s.image_channels}"
            )
        p = preprocess_case(case_id, image, geometry, None, s.plan, label_values(s.labels))
        images.append(p.image)
        props.append(p.properties)
    return Prepared(case_id, images, props, seconds=time.perf_counter() - t)


def _one_hot_previous(seg: np.ndarray, num_classes: int) -> np.ndarray:
    return np.stack([(seg == k).astype(np.float32) for k in range(1, num_classes)])


def stage_probabilities(
    stage: StageModel,
    image: np.ndarray,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    tta: bool = True,
    step: float = 0.5,
    previous_seg: np.ndarray | None = None,
    tiles_per_batch: int | None = None,
) -> torch.Tensor:
    """Probabilities ``(K, z, y, x)`` in the stage's preprocessed space, averaged over its networks.

    A cascade stage needs ``previous_seg``: the first stage's class indices on this grid.
    """
    if stage.plan.previous_stage:
        if previous_seg is None:
            raise AutounetError(f"{stage.configuration} needs the prediction of {stage.plan.previous_stage}")
        image = np.concatenate(
            [np.asarray(image, dtype=np.float32), _one_hot_previous(previous_seg, stage.plan.num_classes)]
        )
    spatial = image.shape[1:]
    accumulate = device if fits_on_device(device, image.shape[0], stage.num_outputs, spatial) else torch.device("cpu")
    three_d = stage.plan.network_dims == 3
    fn = predict_volume if three_d else predict_slices
    total = None
    for i, network in enumerate(stage.networks):
        p = fn(
            network,
            image,
            stage.plan.patch_size,
            stage.num_outputs,
            step=step,
            mirror_axes=stage.mirror_axes if tta else (),
            tiles_per_batch=tiles_per_batch or (4 if three_d else 32),
            device=device,
            amp_dtype=amp_dtype,
            activation=stage.activation,
            accumulate_device=accumulate,
            desc=f"{stage.configuration} {i + 1}/{len(stage.networks)}",
        )
        total = p if total is None else total.add_(p)
    return total / len(stage.networks)


def argmax_on_grid(probabilities: torch.Tensor, shape: Sequence[int]) -> np.ndarray:
    """Class indices of ``probabilities`` resampled linearly to ``shape`` (one class at a time)."""
    best = np.full(tuple(shape), -1.0, dtype=np.float32)
    label = np.zeros(tuple(shape), dtype=np.uint8)
    for k in range(probabilities.shape[0]):
        p = resample_volume(probabilities[k].cpu().numpy(), shape, 1)
        better = p > best
        best[better], label[better] = p[better], k
    return label


def model_probabilities(
    stage: StageModel,
    prepared: Prepared,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    tta: bool = True,
    step: float = 0.5,
    tiles_per_batch: int | None = None,
) -> torch.Tensor:
    """Run every stage of a model on a prepared case; the last stage's probabilities."""
    previous = None
    stages = _stages(stage)
    for i, s in enumerate(stages):
        probs = stage_probabilities(s, prepared.images[i], device, amp_dtype, tta, step, previous, tiles_per_batch)
        if i + 1 < len(stages):
            previous = argmax_on_grid(probs, prepared.properties[i + 1].shape_after_resampling)
            del probs
    return probs


def finalize(
    stage: StageModel, probabilities: torch.Tensor | np.ndarray, props: CaseProperties, keep_probabilities: bool = False
) -> Prediction:
    """Probabilities in preprocessed space -> segmentation (label values) in the original grid."""
    probs = probabilities.cpu().numpy() if isinstance(probabilities, torch.Tensor) else probabilities
    values = np.asarray(stage.label_values)
    if stage.regions:
        from autounet.regions import RegionSet, regions_to_labels
        from autounet.utils.plain_data import from_plain

        region_set = from_plain(RegionSet, stage.regions, "regions")
        maps = np.stack([revert_map(probs[r], props) for r in range(probs.shape[0])])
        seg = regions_to_labels(maps, region_set)
        return Prediction(seg, maps if keep_probabilities else None, props.geometry)
    seg_idx, kept = revert_probabilities(probs, props, keep_probabilities)
    dtype = np.uint8 if values.max() < 256 else np.uint16
    seg = values.astype(dtype)[seg_idx]
    return Prediction(seg, kept, props.geometry)


def write_prediction(
    out_dir: Path,
    case: str,
    suffix: str,
    prediction: Prediction,
    label_list: Sequence[int],
    kind: str = "softmax",
    save_probabilities: bool = False,
) -> Path:
    """Write ``CASE<suffix>`` (and ``CASE.npz`` with the probabilities), each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{case}{suffix}"
    atomic_write(path, lambda p: write_image(p, prediction.segmentation, prediction.geometry))
    if save_probabilities and prediction.probabilities is not None:
        save_probability_file(out_dir / f"{case}{PROBABILITIES_SUFFIX}", prediction.probabilities, label_list, kind)
    return path


def save_probability_file(path: Path, probabilities: np.ndarray, label_list: Sequence[int], kind: str) -> None:
    """``probabilities`` (float16, original grid), ``labels`` (values of the classes, or of the
    model's labels for regions) and ``kind`` (``softmax`` or ``sigmoid``)."""

    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez_compressed(
                fh,
                probabilities=probabilities.astype(np.float16),
                labels=np.asarray(label_list, dtype=np.int64),
                kind=np.asarray(kind),
            )

    atomic_write(path, write)


def load_probability_file(path: str | Path) -> tuple[np.ndarray, list[int], str]:
    """Probabilities (float32), label values and kind written by :func:`save_probability_file`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["probabilities"].astype(np.float32), [int(v) for v in data["labels"]], str(data["kind"])
    except (OSError, KeyError, ValueError) as exc:
        raise AutounetError(f"{path}: not a readable probability file ({exc})") from None


class Predictor:
    """Segments raw images with a trained configuration (an ensemble of its folds).

    ``model_dir``: ``W/NAME/results/CONFIG`` or one of its ``fold_K`` folders. ``folds``: default
    every trained cross-validation fold. ``checkpoints``: which checkpoint(s) of each fold.
    """

    def __init__(
        self,
        model_dir: str | Path,
        folds: Sequence[int | str] | None = None,
        checkpoints: Sequence[str] = ("final",),
        device: str | torch.device | None = None,
        tta: bool = True,
        step: float = 0.5,
        postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
        stage: StageModel | None = None,
    ):
        if not 0 < step <= 1:
            raise AutounetError(f"--step must be in (0, 1], got {step}")
        self.device = resolve_device(device)
        self.stage = (stage or load_stage(model_dir, folds, checkpoints)).to(self.device)
        self.amp_dtype = half_precision(self.device)
        self.tta, self.step, self.postprocess = tta, step, postprocess

    @property
    def num_channels(self) -> int:
        return self.stage.image_channels

    def predict_array(
        self, image: np.ndarray, geometry: Geometry, case_id: str = "case", keep_probabilities: bool = False
    ) -> Prediction:
        """Segment one image ``(C, Z, Y, X)`` with its geometry."""
        prepared = prepare(self.stage, case_id, image, geometry)
        probs = model_probabilities(self.stage, prepared, self.device, self.amp_dtype, self.tta, self.step)
        out = finalize(self.stage, probs, prepared.properties[-1], keep_probabilities)
        if self.postprocess is not None:
            out.segmentation = self.postprocess(out.segmentation)
        return out

    def _load(self, case: InputCase, keep_raw: bool) -> Prepared:
        image, geometry = read_image(case.files)
        prepared = prepare(self.stage, case.case_id, image, geometry)
        prepared.raw_image = image if keep_raw else None
        return prepared

    def _export(
        self,
        case: InputCase,
        probs: torch.Tensor,
        prepared: Prepared,
        out_dir: Path,
        save_probabilities: bool,
        png: bool,
    ) -> tuple[Path, float]:
        t = time.perf_counter()
        prediction = finalize(self.stage, probs, prepared.properties[-1], save_probabilities)
        if self.postprocess is not None:
            prediction.segmentation = self.postprocess(prediction.segmentation)
        labels = self.stage.label_values
        path = write_prediction(
            out_dir, case.case_id, case.suffix, prediction, labels, self.stage.activation, save_probabilities
        )
        if png and prepared.raw_image is not None:
            from autounet.visualization import render_overlay

            render_overlay(
                prepared.raw_image,
                prediction.geometry.spacing,
                prediction.segmentation,
                out_dir / f"{case.case_id}.png",
                title=case.case_id,
                label_names={int(k): v for k, v in self.stage.labels.items()},
            )
        return path, time.perf_counter() - t

    def predict(
        self,
        inputs: Sequence[str | Path] | str | Path,
        output_dir: str | Path,
        save_probabilities: bool = False,
        png: bool = False,
    ) -> list[CaseTiming]:
        """Segment every case of ``inputs`` (folders and/or files) into ``output_dir``."""
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        cases = discover_cases(inputs, self.num_channels)
        out_dir = Path(output_dir)
        for c in cases:
            if any(Path(f).resolve().parent == out_dir.resolve() and Path(f).name == c.output_name() for f in c.files):
                raise AutounetError(
                    f"{c.case_id}: the output would overwrite the input {c.files[0]}; choose another -o"
                )
        out_dir.mkdir(parents=True, exist_ok=True)
        timings: list[CaseTiming] = []
        with (
            ThreadPoolExecutor(1, thread_name_prefix="read") as reader,
            ThreadPoolExecutor(1, thread_name_prefix="export") as writer,
        ):
            upcoming: Future | None = reader.submit(self._load, cases[0], png) if cases else None
            pending: tuple[InputCase, Future, float, float, list[int]] | None = None
            for i, case in enumerate(progress(cases, total=len(cases), desc="predict")):
                prepared = upcoming.result()
                upcoming = reader.submit(self._load, cases[i + 1], png) if i + 1 < len(cases) else None
                t = time.perf_counter()
                probs = model_probabilities(self.stage, prepared, self.device, self.amp_dtype, self.tta, self.step)
                probs = probs.cpu()
                network_s = time.perf_counter() - t
                if pending is not None:
                    timings.append(_finish(pending))
                future = writer.submit(self._export, case, probs, prepared, out_dir, save_probabilities, png)
                pending = (case, future, prepared.seconds, network_s, list(prepared.properties[-1].original_shape))
                del probs, prepared
            if pending is not None:
                timings.append(_finish(pending))
        return timings


def _finish(pending: tuple[InputCase, Future, float, float, list[int]]) -> CaseTiming:
    case, future, pre_s, net_s, shape = pending
    path, export_s = future.result()
    return CaseTiming(case.case_id, path, pre_s, net_s, export_s, shape)


def print_timings(timings: Sequence[CaseTiming], file=sys.stdout) -> None:
    if not timings:
        return
    n = len(timings)
    pre = sum(t.preprocess_s for t in timings) / n
    net = sum(t.network_s for t in timings) / n
    exp = sum(t.export_s for t in timings) / n
    print(
        f"{n} case(s); per case: preprocessing {pre:.2f} s, network {net:.2f} s, export {exp:.2f} s "
        "(preprocessing and export overlap with the network)",
        file=file,
    )
