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

import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autounet.data.geometry import SPACING_2D_IMAGES, Geometry
from autounet.data.image_io import companion_files, save_image
from autounet.data.probabilities import ProbabilityStream, save_probability_file
from autounet.errors import AutounetError
from autounet.inference.dicom_seg import DICOM_SEG_SUFFIX, require_highdicom, segmentation_dataset, write_dicom_seg
from autounet.inference.inputs import InputCase, discover_cases, read_input, verify_inputs
from autounet.inference.model import StageModel, load_stage, stage_chain
from autounet.inference.output_check import PROBABILITIES_SUFFIX, output_problem
from autounet.inference.sliding_window import fits_on_device, predict_slices, predict_volume, tiles_per_batch_for
from autounet.inference.spill import SpillFolder, SpillVolume, release
from autounet.packaging import open_package
from autounet.postprocessing.apply import Postprocessing
from autounet.preprocessing.case import (
    PreprocessOptions,
    label_values,
    preprocess_case,
    preprocess_key,
    revert_map,
    revert_probabilities,
)
from autounet.preprocessing.resample import resample_volume
from autounet.preprocessing.store import CaseProperties
from autounet.regions import RegionSet
from autounet.runtime import configure_backends, resolve_device
from autounet.selection_document import load_selection
from autounet.utils.atomic import atomic_write, make_folder
from autounet.utils.paths import inside
from autounet.utils.progress import progress
from autounet.utils.temporary import remove_stale_temporaries
from autounet.workspace import Workspace


@dataclass
class Prepared:
    """A case preprocessed for each stage of a model (the first stage of a cascade first)."""

    case_id: str
    images: list[np.ndarray]  # (C, z, y, x) per stage, network order
    properties: list[CaseProperties]
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


def prepare(stage: StageModel, case_id: str, image: np.ndarray, geometry: Geometry) -> Prepared:
    """Preprocess a raw image ``(C, Z, Y, X)`` for every stage of ``stage``."""
    t = time.perf_counter()
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise AutounetError(f"{case_id}: the image holds NaN or infinite intensities")
    images, props = [], []
    for s in stage_chain(stage):
        if geometry.spatial_dims == 2 and max(s.plan.spacing) < SPACING_2D_IMAGES / 2:
            raise AutounetError(
                f"{case_id}: a 2D image, but the model was trained on 3D volumes (it would be resampled to "
                f"{SPACING_2D_IMAGES:g} mm / {min(s.plan.spacing):g} mm slices)"
            )
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
    sink: SpillVolume | None = None,
) -> torch.Tensor | SpillVolume:
    """Probabilities ``(K, z, y, x)`` in the stage's preprocessed space, averaged over its networks.

    A cascade stage needs ``previous_seg``: the first stage's class indices on this grid. With a
    ``sink`` the probabilities go to it as they are finished (a rolling accumulator, see
    :func:`~autounet.inference.sliding_window.predict_volume`), and the sink is returned.
    """
    if stage.plan.previous_stage:
        if previous_seg is None:
            raise AutounetError(f"{stage.configuration} needs the prediction of {stage.plan.previous_stage}")
        image = np.concatenate(
            [np.asarray(image, dtype=np.float32), _one_hot_previous(previous_seg, stage.plan.num_classes)]
        )
    spatial = image.shape[1:]
    three_d = stage.plan.network_dims == 3
    patch = stage.plan.patch_size if three_d else [1, *stage.plan.patch_size]
    tiles = tiles_per_batch or tiles_per_batch_for(three_d, stage.num_outputs, patch)
    attempts = accumulation_attempts(
        device, fits_on_device(device, image.shape[0], stage.num_outputs, spatial, patch, tiles)
    )
    for i, accumulate in enumerate(attempts):
        try:
            return _ensemble_probabilities(stage, image, device, amp_dtype, tta, step, tiles, accumulate, sink)
        except torch.OutOfMemoryError:
            if i + 1 == len(attempts):
                raise AutounetError(
                    f"{stage.configuration}: out of memory on {device} even with the accumulators in host memory "
                    f"(patch {list(stage.plan.patch_size)}, {tiles} tiles per batch); free the device or use --device cpu"
                ) from None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(
                f"note: {stage.configuration}: out of memory with the volume on {accumulate}; "
                f"predicting this case again with the accumulators on {attempts[i + 1]}",
                file=sys.stderr,
            )
    raise AssertionError("unreachable")


def accumulation_attempts(device: torch.device, fits: bool) -> list[torch.device]:
    """Where to keep a case's input and accumulators, in the order to try: the compute device
    when the budget says they fit, then host memory (after an out-of-memory error: the budget was
    wrong, or another process took memory)."""
    host = torch.device("cpu")
    return [device, host] if fits and device != host else [host]


def _ensemble_probabilities(
    stage: StageModel,
    image: np.ndarray,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    tta: bool,
    step: float,
    tiles: int,
    accumulate: torch.device,
    sink: SpillVolume | None = None,
) -> torch.Tensor | SpillVolume:
    """The average of the stage's networks' probabilities, accumulated on ``accumulate`` (or
    handed to ``sink`` row by row). Every network predicts each batch of tiles and their mean is
    accumulated once: one accumulator for all folds, never one per fold (issue 22)."""
    fn = predict_volume if stage.plan.network_dims == 3 else predict_slices
    folds = len(stage.networks)
    p = fn(
        list(stage.networks),
        image,
        stage.plan.patch_size,
        stage.num_outputs,
        step=step,
        mirror_axes=stage.mirror_axes if tta else (),
        tiles_per_batch=tiles,
        device=device,
        amp_dtype=amp_dtype,
        activation=stage.activation,
        accumulate_device=accumulate,
        desc=stage.configuration + (f" ({folds} folds)" if folds > 1 else ""),
        sink=sink,
    )
    return sink if sink is not None else p


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
    sink: SpillVolume | None = None,
) -> torch.Tensor | SpillVolume:
    """Run every stage of a model on a prepared case; the last stage's probabilities (into
    ``sink`` when given)."""
    previous = None
    stages = stage_chain(stage)
    for i, s in enumerate(stages):
        last = i + 1 == len(stages)
        probs = stage_probabilities(
            s, prepared.images[i], device, amp_dtype, tta, step, previous, tiles_per_batch, sink if last else None
        )
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
        from autounet.regions import regions_to_labels

        region_set = stage.regions
        maps = np.stack([revert_map(probs[r], props) for r in range(probs.shape[0])])
        seg = regions_to_labels(maps, region_set)
        return Prediction(seg, maps if keep_probabilities else None, props.geometry)
    seg_idx, kept = revert_probabilities(probs, props, keep_probabilities)
    dtype = np.uint8 if values.max() < 256 else np.uint16
    seg = values.astype(dtype)[seg_idx]
    return Prediction(seg, kept, props.geometry)


def write_segmentation(path: Path, segmentation: np.ndarray, geometry: Geometry) -> None:
    """Write a label map atomically (``.mhd``/``.nhdr`` pairs included: :func:`save_image`)."""
    save_image(path, segmentation, geometry)


def write_prediction(
    out_dir: Path,
    case: str,
    suffix: str,
    prediction: Prediction,
    label_list: Sequence[int],
    kind: str = "softmax",
    save_probabilities: bool = False,
) -> Path:
    """Write ``CASE<suffix>`` (and ``CASE.npz`` with the probabilities), each atomically and
    each checked first to lie in ``out_dir`` (:func:`~autounet.utils.paths.inside`)."""
    make_folder(out_dir)
    path = inside(out_dir, f"{case}{suffix}")
    for companion in companion_files(path):
        inside(out_dir, companion.name)
    write_segmentation(path, prediction.segmentation, prediction.geometry)
    if save_probabilities and prediction.probabilities is not None:
        npz = inside(out_dir, f"{case}{PROBABILITIES_SUFFIX}")
        save_probability_file(npz, prediction.probabilities, label_list, kind)
    return path


def labels_from_probabilities(
    probabilities: np.ndarray, labels: Sequence[int], regions: RegionSet | None
) -> np.ndarray:
    """Label values from probabilities: argmax of the classes (``labels`` in class order), or the
    thresholded regions (seed 004 §2.5)."""
    if regions:
        from autounet.regions import regions_to_labels

        return regions_to_labels(probabilities, regions)
    values = np.asarray(labels)
    return values.astype(np.uint8 if values.max() < 256 else np.uint16)[np.argmax(probabilities, axis=0)]


def _check_members(members: Sequence[StageModel]) -> None:
    first = members[0]
    for m in members[1:]:
        if m.labels != first.labels or m.activation != first.activation or m.image_channels != first.image_channels:
            raise AutounetError(
                f"{m.configuration} and {first.configuration} cannot be ensembled: their labels, outputs or channels differ"
            )


def resolve_model(
    model: str | Path,
    folds: Sequence[int | str] | None,
    checkpoints: Sequence[str] | None,
    postprocess: bool,
) -> tuple[list[StageModel], Postprocessing | None]:
    """The models and post-processing behind ``-m``: a configuration folder, one fold, a
    dataset workspace ``W/NAME`` (its ``selection.json``: best configuration or pair, all its folds,
    its post-processing), or a model package ``FILE.zip`` (`autounet package`: verified and
    unpacked once into the cache, then used as the workspace it holds)."""
    model = Path(model)
    if model.suffix.lower() == ".zip" or model.is_file():
        model = open_package(model)
    ws = Workspace.of(model)
    if not ws.selection_json.is_file():
        if ws.plans_json.is_file():
            raise AutounetError(
                f"{model}: no {ws.selection_json.name} yet: run `autounet select {model.name} --work {model.parent}`"
            )
        kwargs = {} if checkpoints is None else {"checkpoints": checkpoints}
        return [load_stage(model, folds, **kwargs)], None
    selection = load_selection(ws.selection_json)
    chosen_folds = folds if folds is not None else selection.winner.folds
    members = []
    for config in selection.winner.members:
        kwargs = {} if checkpoints is None else {"checkpoints": checkpoints}
        members.append(load_stage(ws.results_dir(config), chosen_folds, **kwargs))
    return members, selection.chosen_postprocessing() if postprocess else None


class Predictor:
    """Segments raw images with trained models.

    ``model_dir``: ``W/NAME/results/CONFIG`` (an ensemble of its folds), one of its ``fold_K``
    folders, or the dataset's workspace ``W/NAME`` (the model ``autounet select`` chose, with its
    post-processing unless ``postprocess`` is False), or a model package ``FILE.zip`` made by
    `autounet package` (the same, from the package; no workspace needed). ``folds``: default every
    trained fold (or the selection's). ``checkpoints``: which checkpoint(s) of each fold (default: ``final``, or
    what the training preset says, e.g. the two best for the BraTS recipe).

    ``engine`` (``auto``, ``torch``, ``openvino``, ``onnxruntime``) and ``precision`` (``auto``,
    ``fp32``, ``bf16``, ``fp16``) choose what runs the networks (:mod:`autounet.inference.engines`):
    ``auto`` is OpenVINO on a CPU where it is installed and PyTorch on a GPU, in bf16 where the
    hardware runs it natively, and in fp32 from the first case whose probabilities are too near
    ties for half precision (:attr:`check_half`). Only the network call differs: tiling, mirroring, ensembling and
    reverting are the same for every engine. An engine that is missing or fails falls back to
    PyTorch with a note; ``torch`` + ``fp32`` gives exactly the results of PyTorch in full precision.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        folds: Sequence[int | str] | None = None,
        checkpoints: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        tta: bool = True,
        step: float = 0.5,
        postprocess: bool = True,
        members: Sequence[StageModel] | None = None,
        postprocessing: Postprocessing | None = None,
        engine: str = "auto",
        precision: str = "auto",
        quiet: bool = False,
    ):
        if not 0 < step <= 1:
            raise AutounetError(f"--step must be in (0, 1], got {step}")
        self.device = resolve_device(device)
        configure_backends(self.device)
        if members is None:
            if model_dir is None:
                raise AutounetError("give a model folder")
            members, postprocessing = resolve_model(model_dir, folds, checkpoints, postprocess)
        _check_members(members)
        self.members = [m.to(self.device) for m in members]
        self.postprocessing = postprocessing if postprocess else None
        self._converted: list = []  # engines that hand over to PyTorch when they fail at run time
        self._engines: list = []  # every compiled network
        self.engines = self._compile(engine, precision, quiet)
        # precision auto in bf16/fp16: each case's probabilities are checked for voxels that half
        # precision could flip (agreement.tie_risk); too many, and fp32 predicts from then on
        self.check_half = precision == "auto" and any(e.precision in ("bf16", "fp16") for e in self._engines)
        self.amp_dtype = None  # each engine runs its own precision
        self.tta, self.step = tta, step
        self.skipped: list[str] = []  # cases the last predict(skip_complete=True) found complete
        # True: the export of before issue 22 (every member's K probability maps on the input grid
        # in memory); kept for benchmarks/big_ct.py --legacy
        self.legacy_export = False
        # per case of the running predict(): its memory plan (spill to disk or not, slab size);
        # where spilled probabilities go (the output folder; predict_array: the temporary folder)
        self._plans: dict = {}
        self._spill_root: Path | None = None

    def _compile(self, engine: str, precision: str, quiet: bool) -> str:
        """Put every network of every member behind its engine; say once what runs them."""
        from autounet.inference.engines import check_request, compile_stage

        check_request(engine, precision)
        described: set[str] = set()
        notes: list[str] = []
        for m in self.members:
            done = compile_stage(m, engine=engine, precision=precision, device=self.device)
            self._engines += done.engines
            described.update(e.describe() for e in done.engines)
            for e in done.engines:
                if hasattr(e, "redo_case"):  # a converted engine: a failure redoes the case (one engine per case)
                    e.redo_case = True
                    self._converted.append(e)
            notes += [n for n in done.notes if n not in notes]
        summary = ", ".join(sorted(described))
        if not quiet:
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
            print(f"networks run on {self.device} with {summary}", file=sys.stderr)
        return summary

    @property
    def stage(self) -> StageModel:
        return self.members[0]

    @property
    def num_channels(self) -> int:
        return self.stage.image_channels

    def _prepare(self, case_id: str, image: np.ndarray, geometry: Geometry) -> list[Prepared]:
        """One :class:`Prepared` per member; members whose stages preprocess identically (2d and
        3d_fullres do) share it instead of preprocessing the case twice."""
        done: dict[tuple[str, ...], Prepared] = {}
        out = []
        for m in self.members:
            key = tuple(preprocess_key(s.plan, label_values(s.labels), PreprocessOptions()) for s in stage_chain(m))
            if key not in done:
                done[key] = prepare(m, case_id, image, geometry)
            out.append(done[key])
        return out

    def _network(self, prepared: list[Prepared]) -> list[torch.Tensor]:
        """Every member's probabilities of a case. When a converted engine fails at run time,
        every network hands over to PyTorch fp32 for good and the whole case is predicted again,
        so that all its tiles come from one engine (a note says so)."""
        from autounet.inference.engines import EngineRunFailure

        try:
            out = self._network_once(prepared)
        except EngineRunFailure as exc:
            for e in self._converted:
                e.fall_back(str(exc), self.device)
            self.engines = "torch fp32"
            self.check_half = self.check_half and any(e.precision in ("bf16", "fp16") for e in self._engines)
            print(
                f"note: {exc}; PyTorch fp32 predicts from here on: case {prepared[0].case_id} is predicted again "
                "with it from its first tile",
                file=sys.stderr,
            )
            return self._network_once(prepared)
        problem = self._half_precision_problem(out) if self.check_half else None
        if problem is None:
            return out
        release(out)
        for e in self._engines:
            e.full_precision()
        self.check_half = False
        self.engines = ", ".join(sorted({e.describe() for e in self._engines}))
        print(
            f"note: case {prepared[0].case_id}: half precision could change its segmentation against fp32 "
            f"({problem}); it is predicted again, and every later case, with {self.engines}",
            file=sys.stderr,
        )
        return self._network_once(prepared)

    def _half_precision_problem(self, results: list) -> str | None:
        """Why a case's probabilities (every member's) could lose Dice >= agreement.MIN_DICE per
        class against fp32 (:func:`~autounet.inference.agreement.tie_risk`), or None."""
        from autounet.inference.agreement import risk_problem, tie_risk

        regions = self.stage.regions
        labels = [r.paint for r in regions.regions] if regions else list(self.stage.label_values)
        for r in results:
            sizes, risks = tie_risk(r, self.stage.activation, regions.thresholds if regions else None)
            problem = risk_problem(sizes, risks, labels)
            if problem is not None:
                return problem
        return None

    def _network_once(self, prepared: list[Prepared]) -> list[torch.Tensor | SpillVolume]:
        """Every member's probabilities: in memory, or (when the case's memory plan says so) in
        files of a private folder that the export removes (:mod:`autounet.inference.spill`)."""
        plan = self._plans.get(prepared[0].case_id)
        folder = None
        if plan is not None and plan.spill and not self.legacy_export:
            import tempfile

            folder = SpillFolder(self._spill_root or tempfile.gettempdir(), plan.disk)
        out: list[torch.Tensor | SpillVolume] = []
        try:
            for i, (m, p) in enumerate(zip(self.members, prepared)):
                sink = None
                if folder is not None:
                    sink = folder.volume(f"member{i}", (m.num_outputs, *p.properties[-1].shape_after_resampling))
                r = model_probabilities(m, p, self.device, self.amp_dtype, self.tta, self.step, sink=sink)
                out.append(r.cpu() if isinstance(r, torch.Tensor) else r)
        except BaseException:
            release(out)
            if folder is not None:
                folder.remove()
            raise
        return out

    def _stream(self, probs: list[torch.Tensor], prepared: list[Prepared], stream=None) -> Prediction:
        """The segmentation without ``K × input grid`` in memory (:mod:`autounet.inference.streaming`);
        ``stream`` (a :class:`~autounet.data.probabilities.ProbabilityStream`) receives the probabilities."""
        from autounet.inference.streaming import MemberOutput, stream_segmentation

        outputs = [MemberOutput(pr, prep.properties[-1]) for pr, prep in zip(probs, prepared)]
        plan = self._plans.get(prepared[0].case_id)
        seg = stream_segmentation(
            outputs,
            self.stage.label_values,
            self.stage.regions,
            self.postprocessing,
            stream,
            self.device if self.device.type == "cuda" else "cpu",
            **({"slab_bytes": plan.slab} if plan is not None else {}),
        )
        return Prediction(seg, None, prepared[0].properties[-1].geometry)

    def _finalize(self, probs: list[torch.Tensor], prepared: list[Prepared], keep_probabilities: bool) -> Prediction:
        if not keep_probabilities and not self.legacy_export:
            return self._stream(probs, prepared)
        pp = self.postprocessing
        need = keep_probabilities or len(self.members) > 1 or (pp is not None and pp.needs_probabilities)
        if not need:
            out = finalize(self.stage, probs[0], prepared[0].properties[-1], False)
        else:
            total = None
            for m, pr, prep in zip(self.members, probs, prepared):
                maps = finalize(m, pr, prep.properties[-1], True)
                total = maps.probabilities if total is None else total + maps.probabilities
            total /= len(self.members)
            labels = labels_from_probabilities(total, self.stage.label_values, self.stage.regions)
            out = Prediction(labels, total, maps.geometry)
        if pp is not None:
            out.segmentation = pp.apply(out.segmentation, out.probabilities)
        if not keep_probabilities:
            out.probabilities = None
        return out

    def predict_array(
        self, image: np.ndarray, geometry: Geometry, case_id: str = "case", keep_probabilities: bool = False
    ) -> Prediction:
        """Segment one image ``(C, Z, Y, X)`` with its geometry."""
        prepared = self._prepare(case_id, image, geometry)
        return self._finalize(self._network(prepared), prepared, keep_probabilities)

    def _load(self, case: InputCase, keep_raw: bool) -> tuple[list[Prepared], np.ndarray | None, float]:
        t = time.perf_counter()
        # NIfTI files are verified, and their NaN/Inf voxels (ITK 5 reads them as 0) counted, in the
        # one pass that reads them; other files were verified by verify_inputs before the first
        # case, so they are read here without a second verifying pass (issue 22).
        image, geometry, nonfinite = read_input(case, verified=True)
        if any(nonfinite):
            files = case.files
            if len(files) == len(nonfinite):
                files = tuple(f for f, n in zip(files, nonfinite) if n)
            raise AutounetError(
                f"{case.case_id}: the image holds NaN or infinite intensities "
                f"({sum(nonfinite)} voxel(s) in {', '.join(map(str, files))})"
            )
        prepared = self._prepare(case.case_id, image, geometry)
        return prepared, (image if keep_raw else None), time.perf_counter() - t

    def _export(self, case: InputCase, probs: list[torch.Tensor | SpillVolume], *rest) -> tuple[Path, float]:
        """:meth:`_export_once`; then the spilled probabilities are removed, whatever happened.
        Once the segmentation is made they are removed in the background while it is written
        (deleting a multi-GB file takes seconds)."""
        removing: list[threading.Thread] = []

        def done_reading() -> None:
            if any(isinstance(p, SpillVolume) for p in probs):
                thread = threading.Thread(target=release, args=(probs,), name="autounet-spill-removal")
                thread.start()
                removing.append(thread)

        try:
            return self._export_once(case, probs, *rest, done_reading=done_reading)
        finally:
            for thread in removing:
                thread.join()
            release(probs)

    def _export_once(
        self,
        case: InputCase,
        probs: list[torch.Tensor | SpillVolume],
        prepared: list[Prepared],
        raw_image: np.ndarray | None,
        out_dir: Path,
        save_probabilities: bool,
        png: bool,
        dicom_seg: bool = False,
        done_reading=None,
    ) -> tuple[Path, float]:
        """Write ``case``'s outputs; ``done_reading()`` is called once ``probs`` are no longer read."""
        t = time.perf_counter()
        made: list = []

        def build(npz_tmp: Path | None) -> None:
            if self.legacy_export:
                made.append(self._finalize(probs, prepared, save_probabilities))
                if npz_tmp is not None:
                    save_probability_file(
                        npz_tmp, made[0].probabilities, self.stage.label_values, self.stage.activation
                    )
            elif npz_tmp is None:
                made.append(self._stream(probs, prepared))
            else:
                shape = (probs[0].shape[0], *prepared[0].properties[-1].original_shape)
                with ProbabilityStream(npz_tmp, shape, self.stage.label_values, self.stage.activation) as stream:
                    made.append(self._stream(probs, prepared, stream))
            # made before the segmentation is written: a SEG highdicom refuses leaves no NIfTI without it
            if dicom_seg:
                made.append(segmentation_dataset(case.series, made[0].segmentation, self.stage.labels))

        if save_probabilities:  # the probabilities go to disk class by class, while the segmentation is made
            make_folder(out_dir)
            atomic_write(inside(out_dir, f"{case.case_id}{PROBABILITIES_SUFFIX}"), build)
        else:
            build(None)
        if done_reading is not None:
            done_reading()
        prediction = made[0]
        seg_dataset = made[1] if dicom_seg else None
        path = write_prediction(
            out_dir, case.case_id, case.suffix, prediction, self.stage.label_values, self.stage.activation, False
        )
        if seg_dataset is not None:
            write_dicom_seg(inside(out_dir, f"{case.case_id}{DICOM_SEG_SUFFIX}"), seg_dataset)
        if png and raw_image is not None:
            from autounet.visualization import render_overlay

            render_overlay(
                raw_image,
                prediction.geometry.spacing,
                prediction.segmentation,
                inside(out_dir, f"{case.case_id}.png"),
                title=case.case_id,
                label_names={int(k): v for k, v in self.stage.labels.items()},
            )
        return path, time.perf_counter() - t

    @staticmethod
    def output_files(
        case: InputCase, out_dir: Path, save_probabilities: bool = False, png: bool = False, dicom_seg: bool = False
    ) -> list[Path]:
        """Every file :meth:`predict` writes for ``case``: the segmentation (with the data file of a
        ``.mhd``/``.nhdr`` header), ``CASE.npz``, ``CASE.png`` and ``CASE.dcm`` when asked for; each
        checked to lie in ``out_dir`` (a case name is never a path, and no link leads out)."""
        seg = inside(out_dir, case.output_name())
        files = [seg, *(inside(out_dir, f.name) for f in companion_files(seg))]
        if save_probabilities:
            files.append(inside(out_dir, f"{case.case_id}{PROBABILITIES_SUFFIX}"))
        if png:
            files.append(inside(out_dir, f"{case.case_id}.png"))
        if dicom_seg:
            files.append(inside(out_dir, f"{case.case_id}{DICOM_SEG_SUFFIX}"))
        return files

    @staticmethod
    def _complete(case_id: str, outputs: Sequence[Path], present: Sequence[Path]) -> bool:
        """Whether an earlier run's outputs of a case are all there and read back completely
        (:func:`~autounet.inference.output_check.output_problem`); a damaged one is named on
        stderr and the case is predicted again."""
        if len(present) != len(outputs):
            return False
        for f in present:
            problem = output_problem(f)
            if problem:
                print(
                    f"note: {case_id}: its earlier output is damaged ({problem}); predicting it again", file=sys.stderr
                )
                return False
        return True

    def predict(
        self,
        inputs: Sequence[str | Path] | str | Path,
        output_dir: str | Path,
        save_probabilities: bool = False,
        png: bool = False,
        overwrite: bool = False,
        skip_complete: bool = False,
        part: tuple[int, int] | None = None,
        dry_run: bool = False,
        name_by: str = "series",
        dicom_seg: bool = False,
        only: Sequence[str] | None = None,
        memory_limit: float | None = None,
    ) -> list[CaseTiming]:
        """Segment every case of ``inputs`` (folders and/or files) into ``output_dir``; with
        ``part=(i, n)`` only the i-th of n interleaved shares of the cases (sorted by name);
        with ``only`` only the cases of these names (a cluster share of the remaining cases).
        ``dry_run``: check the inputs' names and the outputs already there as a prediction does,
        write nothing, and return the cases that would be predicted (with no times).

        Files already in ``output_dir`` that the prediction would write stop it before anything
        is predicted (naming them), unless ``overwrite`` (replace them) or ``skip_complete`` (skip
        the cases whose outputs are all there and read back completely, redo the others, naming
        each case whose earlier output was damaged); the cases skipped are in
        :attr:`skipped`. DICOM series are named by SeriesInstanceUID or (``name_by="patientid"``)
        PatientID; ``dicom_seg`` also writes ``CASE.dcm``, a DICOM SEG (DICOM inputs only;
        needs highdicom). Temporaries of an earlier, killed prediction are removed first.
        ``memory_limit`` (GB; default what the machine has free) bounds the estimated peak
        (:mod:`autounet.inference.memory`): a case that cannot fit stops the command before anything
        is written, naming it; when overlapping cases would not fit, they are predicted one at a time.
        Reading and preprocessing of the next case and the export of the previous one run in
        background threads while the network predicts the current case.
        """
        if overwrite and skip_complete:
            raise AutounetError(
                "give --overwrite (replace existing outputs) or --continue (skip complete cases), not both"
            )
        if dicom_seg:
            require_highdicom()
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        out_dir = Path(output_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise AutounetError(f"{out_dir}: a file, not a folder: -o names the folder the segmentations go to")
        cases = share_of(discover_cases(inputs, self.num_channels, name_by), part)
        if only is not None:
            cases = [c for c in cases if c.case_id in set(only)]
        if dicom_seg and any(c.series is None for c in cases):
            plain = [c.case_id for c in cases if c.series is None]
            raise AutounetError(
                f"--dicom-seg writes a DICOM SEG for each DICOM series; {len(plain)} case(s) are image files "
                f"({', '.join(plain[:5])}{', ...' if len(plain) > 5 else ''})"
            )
        outputs = {c.case_id: self.output_files(c, out_dir, save_probabilities, png, dicom_seg) for c in cases}
        for c in cases:
            written = {f.resolve() for f in outputs[c.case_id]}
            for f in c.files:
                if Path(f).resolve() in written:
                    raise AutounetError(f"{c.case_id}: the output would overwrite the input {f}; choose another -o")
        present = {c.case_id: [f for f in outputs[c.case_id] if os.path.lexists(f)] for c in cases}
        self.skipped = []
        if skip_complete:
            self.skipped = [
                c.case_id for c in cases if self._complete(c.case_id, outputs[c.case_id], present[c.case_id])
            ]
            cases = [c for c in cases if c.case_id not in self.skipped]
        elif not overwrite:
            clash = [f for c in cases for f in present[c.case_id]]
            if clash:
                names = ", ".join(f.name for f in clash[:5]) + (f" and {len(clash) - 5} more" if len(clash) > 5 else "")
                raise AutounetError(
                    f"{out_dir} already holds {len(clash)} file(s) this prediction would write ({names}); nothing was "
                    "predicted. Add --overwrite to replace them, or --continue to skip the cases whose outputs are complete"
                )
        if dry_run:
            return [CaseTiming(c.case_id, out_dir / c.output_name(), 0.0, 0.0, 0.0) for c in cases]
        overlap = self._memory_plan(cases, memory_limit, save_probabilities, out_dir)
        verify_inputs(cases)  # later cases' files to their last byte before anything is written (see its docstring)
        make_folder(out_dir)
        remove_stale_temporaries(out_dir)
        if not overlap:
            return self._predict_one_at_a_time(cases, out_dir, save_probabilities, png, dicom_seg)
        timings: list[CaseTiming] = []
        with (
            ThreadPoolExecutor(1, thread_name_prefix="read") as reader,
            ThreadPoolExecutor(1, thread_name_prefix="export") as writer,
        ):
            upcoming: Future | None = reader.submit(self._load, cases[0], png) if cases else None
            pending: tuple | None = None
            for i, case in enumerate(progress(cases, total=len(cases), desc="predict")):
                prepared, raw_image, pre_s = upcoming.result()
                upcoming = reader.submit(self._load, cases[i + 1], png) if i + 1 < len(cases) else None
                t = time.perf_counter()
                probs = self._network(prepared)
                network_s = time.perf_counter() - t
                if pending is not None:
                    timings.append(_finish(pending))
                prepared = _without_images(prepared)  # the export needs only the properties
                shape = list(prepared[0].properties[-1].original_shape)
                export = (self._export, case, probs, prepared, raw_image, out_dir, save_probabilities, png, dicom_seg)
                if i + 1 < len(cases):
                    pending = (case, writer.submit(*export), pre_s, network_s, shape)
                else:  # the last case: nothing is left to overlap with, and PyTorch's operations run
                    # about 1.5 x slower in a second thread (with its own OpenMP team) than in this one
                    pending = None
                    path, export_s = export[0](*export[1:])
                    timings.append(CaseTiming(case.case_id, path, pre_s, network_s, export_s, shape))
                del probs, prepared, raw_image, export
            if pending is not None:
                timings.append(_finish(pending))
        return timings

    def _memory_plan(
        self, cases: Sequence[InputCase], memory_limit: float | None, save_probabilities: bool, out_dir: Path
    ) -> bool:
        """Whether cases may overlap (read next, export previous) within ``memory_limit`` GB; refuses
        a case that does not fit alone (:func:`~autounet.inference.memory.plan_memory`), or whose
        spilled probabilities would not fit on the disk of ``out_dir``; records each case's plan
        (spill or not, slab size) for the network and the export."""
        from autounet.inference.memory import (
            GB,
            available_bytes,
            check_disk,
            estimate_case,
            input_grid,
            plan_memory,
            resident_bytes,
        )

        if memory_limit is not None and not memory_limit > 0:
            raise AutounetError(f"--memory-limit must be a positive number of GB, got {memory_limit}")
        given = int(memory_limit * GB) if memory_limit is not None else None
        limit = given if given is not None else available_bytes()
        base = resident_bytes()
        estimates = []
        for c in cases:
            shape, spacing, channels = input_grid(c)
            estimates.append(
                estimate_case(self.members, c.case_id, shape, spacing, channels, base, save_probabilities, given)
            )
        overlap = plan_memory(estimates, limit)
        if not self.legacy_export:
            check_disk(estimates, out_dir, overlap)
        self._plans = {e.case_id: e for e in estimates}
        self._spill_root = out_dir
        if not overlap and len(cases) > 1:
            print(
                f"note: overlapping cases would exceed the memory limit of {limit / GB:.1f} GB; "
                "predicting one case at a time",
                file=sys.stderr,
            )
        return overlap

    def _predict_one_at_a_time(
        self, cases: Sequence[InputCase], out_dir: Path, save_probabilities: bool, png: bool, dicom_seg: bool
    ) -> list[CaseTiming]:
        """:meth:`predict` without overlap: read, network and export of one case before the next."""
        timings = []
        for case in progress(cases, total=len(cases), desc="predict"):
            prepared, raw_image, pre_s = self._load(case, png)
            t = time.perf_counter()
            probs = self._network(prepared)
            network_s = time.perf_counter() - t
            prepared = _without_images(prepared)
            path, export_s = self._export(case, probs, prepared, raw_image, out_dir, save_probabilities, png, dicom_seg)
            shape = list(prepared[0].properties[-1].original_shape)
            timings.append(CaseTiming(case.case_id, path, pre_s, network_s, export_s, shape))
            del probs, prepared, raw_image
        return timings


def _without_images(prepared: list[Prepared]) -> list[Prepared]:
    """The same cases without their preprocessed images (freed before the export)."""
    return [Prepared(p.case_id, [], p.properties, p.seconds) for p in prepared]


def share_of(cases: Sequence[InputCase], part: tuple[int, int] | None) -> list[InputCase]:
    """The ``i``-th of ``n`` interleaved shares of ``cases`` (sorted by name; ``part=(i, n)``,
    None: all), so that ``n`` jobs with ``i = 0 .. n-1`` predict every case once."""
    ordered = sorted(cases, key=lambda c: c.case_id)
    if part is None:
        return ordered
    index, count = part
    return ordered[index::count]


def _finish(pending: tuple) -> CaseTiming:
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
