"""End of training: predict a fold's validation cases in full and score them (DESIGN §3).

Each validation case is predicted from its preprocessed data with the whole-volume predictor
(sliding window, mirroring, the fold's network), reverted to the original grid and written to
``fold_K/validation/CASE.nii.gz`` with its class probabilities (``CASE.npz``, used to build
ensembles in ``autounet select``). The segmentations are scored against the raw reference labels
into ``fold_K/validation/summary.json`` (:mod:`autounet.evaluation.evaluate`'s format, plus the
checkpoint it came from), and the folds found so far are pooled into
``results/CONFIG/cv_summary.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autounet.data.dataset import load_raw_dataset
from autounet.data.geometry import geometry_differences
from autounet.data.image_io import read_label
from autounet.errors import AutounetError
from autounet.evaluation.evaluate import EvaluationResult, evaluate_arrays
from autounet.inference.model import StageModel
from autounet.inference.predictor import finalize, stage_probabilities, write_prediction
from autounet.preprocessing.store import case_paths, read_properties
from autounet.utils.atomic import atomic_write_json, make_folder, read_json
from autounet.utils.loaders import load_npy
from autounet.utils.progress import progress
from autounet.utils.temporary import remove_stale_temporaries
from autounet.validation.cross_validation import write_cv_summary
from autounet.workspace import (
    Workspace,
    checkpoint_path,
    manifest_path,
    previous_stage_path,
    validation_dir,
    validation_summary_path,
)

OUTPUT_SUFFIX = ".nii.gz"


@dataclass
class ValidationResult:
    folder: Path
    evaluation: EvaluationResult
    seconds: float
    checkpoint: dict = field(default_factory=dict)  # which checkpoints, and the run's epoch and step

    @property
    def checkpoints(self) -> list[str]:
        return list(self.checkpoint.get("checkpoints") or [])


def reference_labels(ws: Workspace) -> dict[str, Path]:
    """Raw label file of every training case of the workspace's dataset."""
    dataset = load_raw_dataset(ws.raw_path())
    return {c.case_id: c.label for c in dataset.cases if c.label is not None}


def evaluation_settings(stage: StageModel) -> dict:
    """Classes (softmax models) or regions with the BraTS convention (region models); reference
    voxels of the plan's ignore label (sparse annotations) count in no metric."""
    ignore = {"ignore_label": stage.plan.ignore_label} if stage.plan.ignore_label is not None else {}
    if stage.regions:
        regions = {r.name: list(r.labels) for r in stage.regions.regions}
        return {"labels": None, "regions": regions, "empty": "one", **ignore}
    return {"labels": [v for v in stage.label_values if v != 0], "regions": None, "empty": "nan", **ignore}


def is_validated(fold_dir: Path, step: int | None = None) -> bool:
    """Whether ``fold_K/validation/summary.json`` exists (for the checkpoint at ``step``, if given)."""
    path = validation_summary_path(fold_dir)
    if not path.is_file():
        return False
    if step is None:
        return True
    try:
        return read_json(path, dict).get("checkpoint", {}).get("step") == step
    except (AutounetError, AttributeError):
        return False


def _scored_pairs(
    cases: Sequence[str], out_dir: Path, references: dict[str, Path]
) -> Iterator[tuple[str, np.ndarray, np.ndarray, Sequence[float]]]:
    for case in cases:
        pred, pred_geo = read_label(out_dir / f"{case}{OUTPUT_SUFFIX}")
        ref, ref_geo = read_label(references[case])
        if pred.shape != ref.shape or geometry_differences(ref_geo, pred_geo):
            raise AutounetError(f"{case}: the validation prediction does not lie on the reference label's grid")
        yield case, pred, ref, ref_geo.spacing


def validate_fold(
    ws: Workspace,
    stage: StageModel,
    fold_dir: Path,
    cases: Sequence[str],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    checkpoint_info: dict | None = None,
    tta: bool = True,
    on_probabilities: Callable[[str, torch.Tensor], None] | None = None,
) -> ValidationResult:
    """Predict ``cases`` (preprocessed for ``stage``'s plan) in full, write them and their summary.

    ``on_probabilities(case, probabilities)`` receives each case's probabilities in preprocessed
    space (a cascade's first stage stores its next stage's inputs from them).
    """
    start = time.time()
    plan = stage.plan
    folder = ws.preprocessed_dir(plan.data_identifier)
    references = reference_labels(ws)
    missing = [c for c in cases if c not in references]
    if missing:
        raise AutounetError(f"no reference label for validation case(s) {', '.join(missing[:5])} in the raw dataset")
    previous_dir = ws.next_stage_dir(plan.previous_stage) if plan.previous_stage else None
    out_dir = validation_dir(fold_dir)
    make_folder(out_dir)
    remove_stale_temporaries(out_dir)  # of a killed validation
    validation_summary_path(fold_dir).unlink(missing_ok=True)  # the folder is incomplete until the summary is written
    labels = stage.label_values
    for net in stage.networks:
        net.eval()

    def export(case: str, probs: torch.Tensor) -> None:
        if on_probabilities is not None:
            on_probabilities(case, probs)
        props = read_properties(folder, case)
        prediction = finalize(stage, probs, props, keep_probabilities=True)
        write_prediction(out_dir, case, OUTPUT_SUFFIX, prediction, labels, stage.activation, save_probabilities=True)

    with ThreadPoolExecutor(1, thread_name_prefix="export") as writer:
        pending: Future | None = None
        channels = plan.image_channels + (1 if plan.foreground_channel else 0)  # without a dropped one
        for case in progress(cases, total=len(cases), desc="validation"):
            image = load_npy(case_paths(folder, case)["image"], mmap_mode="r")[:channels]
            previous = None
            if previous_dir is not None:
                previous = load_npy(previous_stage_path(previous_dir, case), mmap_mode="r")
            probs = stage_probabilities(stage, image, device, amp_dtype, tta=tta, previous_seg=previous).cpu()
            if pending is not None:
                pending.result()
            pending = writer.submit(export, case, probs)
        if pending is not None:
            pending.result()

    settings = evaluation_settings(stage)
    evaluation = evaluate_arrays(_scored_pairs(cases, out_dir, references), **settings)
    data = evaluation.to_dict()
    data["checkpoint"] = checkpoint_info or {}
    data["configuration"] = stage.configuration
    atomic_write_json(validation_summary_path(fold_dir), data)
    write_cv_summary(fold_dir.parent)
    return ValidationResult(out_dir, evaluation, time.time() - start, dict(checkpoint_info or {}))


def validation_cases(ws: Workspace, plan_identifier: str, fold: int | str) -> list[str]:
    """The validation cases of ``fold`` in ``splits.json``."""
    from autounet.training.splits import fold_cases, load_or_create_splits

    manifest = manifest_path(ws.preprocessed_dir(plan_identifier))
    if not manifest.is_file():
        raise AutounetError(
            f"{manifest.parent} is not completely preprocessed: run `autounet preprocess {ws.name}` first"
        )
    cases = list(read_json(manifest, dict).get("cases", ()))
    if not ws.splits_json.is_file():
        raise AutounetError(f"{ws.splits_json} not found: this dataset has not been trained yet")
    splits = load_or_create_splits(ws.splits_json, cases, write=False)
    return fold_cases(splits, fold, cases)[1]


def validate_trained_fold(
    ws: Workspace,
    configuration: str,
    fold: int | str,
    device: str | None = None,
    checkpoints: Sequence[str] | None = None,
    tta: bool = True,
) -> ValidationResult:
    """Predict a trained fold's validation cases in full and score them: the step after training
    (and ``autounet train --validate-only``). A cascade's first stage also stores its next stage's
    inputs from these predictions.

    ``checkpoints``: default those the fold's training preset uses for inference: ``final``, or
    the two best (seed 004).
    """
    from autounet.inference.model import load_stage
    from autounet.planning.plans import load_plans
    from autounet.runtime import configure_backends, half_precision, resolve_device
    from autounet.training.checkpoint import load_checkpoint
    from autounet.validation.next_stage import next_stage_writer

    if str(fold) == "all":
        raise AutounetError("fold 'all' has no validation cases: every case was used for training")
    try:
        fold = int(fold)
    except ValueError:
        raise AutounetError(f"fold must be a number, got {fold!r}") from None
    fold_dir = ws.fold_dir(configuration, fold)
    dev = resolve_device(device)
    configure_backends(dev)
    stage = load_stage(fold_dir, None, checkpoints)
    stage.previous = None  # validation reads the stored first-stage predictions instead
    stage.to(dev)
    used = list(stage.extra.get("checkpoints") or checkpoints or ["final"])
    # the run's end (as training's own validation records it), else the checkpoint's
    source = checkpoint_path(fold_dir, "final")
    if not source.is_file():
        source = checkpoint_path(fold_dir, used[0])
    training = load_checkpoint(source, mmap=True)["training"]
    cases = validation_cases(ws, stage.plan.data_identifier, fold)
    writer = next_stage_writer(ws, load_plans(ws.plans_json), configuration)
    info = {"checkpoints": used, "epoch": training["epoch"], "step": training["step"]}
    return validate_fold(ws, stage, fold_dir, cases, dev, half_precision(dev), info, tta, writer)
