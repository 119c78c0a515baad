"""The Python API: one function per `autounet` command, with the command's options as typed
keyword arguments (``autounet plan RAW --work W`` is ``autounet.plan(RAW, work=W)``).

Each function turns ``(work, name)`` into a :class:`~autounet.workspace.Workspace` once, calls
the stage that does the work and returns that stage's result; the command line (:mod:`autounet.cli`)
is a thin layer over these functions and prints their results with the ``format_*`` helpers at
the end of this module. Stages validate everything before they write anything, so a failure
leaves the workspace as it was. Heavy modules are imported on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from autounet.errors import AutounetError, DatasetInvalid
from autounet.utils import arguments
from autounet.workspace import Workspace

if TYPE_CHECKING:
    from autounet.data.check import CheckReport
    from autounet.evaluation.evaluate import EvaluationResult
    from autounet.inference.predictor import CaseTiming
    from autounet.packaging.create import CreatedPackage
    from autounet.packaging.info import ModelInfo
    from autounet.pipeline.demo import DemoResult
    from autounet.pipeline.fold import FoldResult
    from autounet.pipeline.run import RunResult
    from autounet.planning.fingerprint import Fingerprint
    from autounet.planning.planner import PlannerOptions
    from autounet.planning.plans import Plans
    from autounet.planning.run import PlanResult
    from autounet.postprocessing.apply import Postprocessing
    from autounet.preprocessing.run import PreprocessSummary
    from autounet.selection_document import Selection
    from autounet.validation.fold import ValidationResult

__all__ = [
    "AutounetError",
    "DatasetInvalid",
    "PredictionRun",
    "Workspace",
    "check",
    "demo",
    "evaluate",
    "export",
    "evaluation_json_path",
    "fingerprint_dataset",
    "format_evaluation",
    "format_info",
    "format_plans",
    "format_selection",
    "format_timings",
    "info",
    "make_synthetic",
    "package",
    "plan",
    "plan_from_fingerprint",
    "postprocess",
    "predict",
    "preprocess",
    "report",
    "run",
    "select",
    "show",
    "train",
    "validate",
    "workspace",
]


def workspace(name: str, *, work: str | Path | None = None) -> Workspace:
    """The workspace ``W/NAME`` of a dataset: where every stage reads and writes its files."""
    return Workspace.at(work, name)


# --- autounet check / plan ---------------------------------------------------------------------


def check(raw: str | Path, *, workers: int | None = None) -> CheckReport:
    """`autounet check RAW`: validate a raw dataset (MSD or nnU-Net v2 layout); writes nothing."""
    from autounet.data.check import check_dataset

    arguments.workers(workers)
    return check_dataset(raw, workers=workers)


def fingerprint_dataset(raw: str | Path, *, workers: int | None = None) -> tuple[CheckReport, Fingerprint]:
    """Check a raw dataset and, if it is valid, compute its fingerprint (one read per case); writes nothing."""
    from autounet.planning.run import fingerprint_dataset as fingerprint

    arguments.workers(workers)
    return fingerprint(raw, workers)


def plan(
    raw: str | Path | None = None,
    *,
    work: str | Path | None = None,
    name: str | None = None,
    fingerprint: str | Path | None = None,
    recipe: str | None = None,
    patch_size: Sequence[int] | None = None,
    force: bool = False,
    workers: int | None = None,
    options: PlannerOptions | None = None,
    plans_from: str | Path | None = None,
    gpu_memory_target_gb: float | None = None,
) -> PlanResult:
    """`autounet plan RAW`: check, fingerprint and plan a raw dataset into ``W/NAME/``
    (``name`` defaults to RAW's folder name).

    The fingerprint is reused when it was made from the same files unless ``force``. With
    ``fingerprint=F.json`` (and ``name``) instead of RAW, plan from that fingerprint alone.
    ``recipe``: ``nnunet`` (default), ``brats``, or nnU-Net v2's ``nnunetv2`` / ``resenc-m`` /
    ``resenc-l`` / ``resenc-xl`` (``gpu_memory_target_gb``: their memory target, v2's
    ``-gpu_memory_target``); ``patch_size``: the brats recipe's 3D patch instead of 128³ (a CPU
    convenience). ``plans_from``: a planned workspace ``W/NAME``, a model
    package ``.zip`` or a plans.json whose networks, patch, spacing and normalisation the plans
    keep (fine-tuning; :mod:`autounet.planning.transfer`).
    """
    arguments.workers(workers)
    if fingerprint is not None:
        if raw is not None:
            raise AutounetError("give either RAW or --fingerprint, not both")
        if not name:
            raise AutounetError("--fingerprint needs --name NAME")
        return plan_from_fingerprint(
            fingerprint,
            work=work,
            name=name,
            recipe=recipe,
            patch_size=patch_size,
            options=options,
            plans_from=plans_from,
            gpu_memory_target_gb=gpu_memory_target_gb,
        )
    if raw is None or str(raw) == "":
        raise AutounetError("give a raw dataset folder RAW, or --fingerprint F.json --name NAME")
    from autounet.planning.run import plan_dataset

    ws = Workspace.at(work, name or Path(raw).resolve().name)
    source = _model_source(plans_from) if plans_from is not None else None
    return plan_dataset(
        raw,
        ws,
        workers=workers,
        force=force,
        options=options,
        recipe=recipe,
        patch_size=_list(patch_size),
        plans_from=source,
        plans_from_label=None if plans_from is None else str(plans_from),
        gpu_memory_target_gb=gpu_memory_target_gb,
    )


def plan_from_fingerprint(
    fingerprint: str | Path,
    *,
    work: str | Path | None = None,
    name: str,
    recipe: str | None = None,
    patch_size: Sequence[int] | None = None,
    options: PlannerOptions | None = None,
    plans_from: str | Path | None = None,
    gpu_memory_target_gb: float | None = None,
) -> PlanResult:
    """`autounet plan --fingerprint F --name NAME`: plan from a fingerprint.json alone (no images
    needed); writes ``W/NAME/fingerprint.json`` and ``W/NAME/plans.json``. ``plans_from`` as :func:`plan`."""
    from autounet.planning.run import plan_from_fingerprint as plan_fingerprint

    ws = Workspace.at(work, name)
    source = _model_source(plans_from) if plans_from is not None else None
    return plan_fingerprint(
        fingerprint,
        ws,
        options=options,
        recipe=recipe,
        patch_size=_list(patch_size),
        plans_from=source,
        plans_from_label=None if plans_from is None else str(plans_from),
        gpu_memory_target_gb=gpu_memory_target_gb,
    )


# --- autounet preprocess / train -----------------------------------------------------------------


def preprocess(
    name: str,
    *,
    work: str | Path | None = None,
    configurations: Sequence[str] | None = None,
    float16: bool = False,
    label_interpolation: str = "nearest",
    force: bool = False,
    workers: int | None = None,
) -> PreprocessSummary:
    """`autounet preprocess NAME`: crop, resample and normalise every case of ``W/NAME`` for the
    planned configurations (default all), resumably; ``float16`` halves the stored images."""
    from autounet.preprocessing.case import PreprocessOptions
    from autounet.preprocessing.run import preprocess_dataset

    arguments.workers(workers)
    options = PreprocessOptions(
        image_dtype="float16" if float16 else "float32", label_interpolation=label_interpolation
    )
    ws = Workspace.at(work, name)
    return preprocess_dataset(ws, _list(configurations), workers, options, force)


def train(
    name: str,
    configuration: str,
    fold: int | str,
    *,
    work: str | Path | None = None,
    preset: str | None = None,
    augmentation: str | None = None,
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    validation_iterations: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    device: str | None = None,
    seed: int = 0,
    max_minutes: float | None = None,
    resume: bool = False,
    loader_threads: int | None = None,
    validate: bool = True,
    validation_tta: bool = True,
    attention: bool | None = None,
    residual: bool | None = None,
    drop_block: float | None = None,
    focal: bool | None = None,
    deep_supervision_heads: int | None = None,
    features: Sequence[int] | None = None,
    deeper: bool = False,
    width_multiplier: float | None = None,
    foreground_channel: bool | None = None,
    precision: str = "auto",
    pretrained: str | Path | None = None,
    loggers: Sequence[str] | None = None,
) -> FoldResult:
    """`autounet train NAME -c CONFIG -f FOLD`: train one fold (``"all"``: every case), then
    predict its validation cases in full and score them (unless ``validate`` is False).

    ``preset``/``augmentation``: training and augmentation presets (default the plan's); None
    keeps the preset's (or, with ``resume``, the run's) value. The ablation switches
    (``attention`` ... ``foreground_channel``) are those of seed 004 (see
    :class:`autounet.training.options.TrainOptions`). ``pretrained``: start from the weights of a
    checkpoint, fold, configuration folder, workspace ``W/NAME`` or model package ``.zip`` (every
    tensor whose name and shape match; :mod:`autounet.training.pretrained`), unless resuming.
    ``loggers``: experiment trackers (``tensorboard``, ``wandb``, ``mlflow``; local stores under
    ``W/NAME/trackers/`` unless configured otherwise; :mod:`autounet.training.trackers`).
    """
    from autounet.pipeline.fold import train_and_validate
    from autounet.training.options import TrainOptions

    options = TrainOptions(
        configuration=configuration,
        fold=fold,
        preset=preset,
        augmentation=augmentation,
        epochs=epochs,
        iterations_per_epoch=iterations_per_epoch,
        validation_iterations=validation_iterations,
        batch_size=batch_size,
        lr=lr,
        device=device,
        seed=seed,
        max_minutes=max_minutes,
        resume=resume,
        loader_threads=loader_threads,
        attention=attention,
        residual=residual,
        drop_block=drop_block,
        focal=focal,
        deep_supervision_heads=deep_supervision_heads,
        features=_list(features),
        deeper=deeper,
        width_multiplier=width_multiplier,
        foreground_channel=foreground_channel,
        precision=precision,
        pretrained=None if pretrained is None else str(_model_source(pretrained)),
        pretrained_label=None if pretrained is None else str(pretrained),
        loggers=_list(loggers),
    ).validate()
    ws = Workspace.at(work, name)
    return train_and_validate(ws, options, validate=validate, validation_tta=validation_tta)


def validate(
    name: str,
    configuration: str,
    fold: int | str,
    *,
    work: str | Path | None = None,
    device: str | None = None,
    tta: bool = True,
) -> ValidationResult:
    """`autounet train NAME -c CONFIG -f FOLD --validate-only`: redo a trained fold's validation
    (predict its validation cases in full, score them, write ``summary.json``); prints one line."""
    from autounet.pipeline.fold import validate_and_report
    from autounet.training.options import TrainOptions

    TrainOptions(configuration, fold).validate()
    ws = Workspace.at(work, name)
    return validate_and_report(ws, configuration, fold, device=device, tta=tta)


# --- autounet predict / evaluate / show ----------------------------------------------------------


@dataclass
class PredictionRun:
    """What :func:`predict` did: the output folder, each case's timing and the post-processing applied."""

    output: Path
    timings: list[CaseTiming]
    postprocessing: Postprocessing | None
    skipped: list[str] = field(default_factory=list)  # cases found complete (``skip_complete``)


def predict(
    inputs: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    model: str | Path,
    folds: Sequence[int | str] | None = None,
    checkpoints: Sequence[str] | None = None,
    device: str | None = None,
    tta: bool = True,
    step: float = 0.5,
    postprocess: bool = True,
    save_probabilities: bool = False,
    png: bool = False,
    overwrite: bool = False,
    skip_complete: bool = False,
    engine: str = "auto",
    precision: str = "auto",
    name_by: str = "series",
    dicom_seg: bool = False,
    executor: str = "local",
    address: str | None = None,
    part: Sequence[int] | None = None,
    memory_limit: float | None = None,
) -> PredictionRun:
    """`autounet predict -i IN -o OUT -m MODEL`: segment images (folders and/or files) with a
    trained model (``W/NAME/results/CONFIG``, one ``fold_K`` or the selected model ``W/NAME``).

    An output folder that already holds files this prediction would write (``CASE.nii.gz``,
    ``CASE.npz``, ``CASE.png``, ``CASE.dcm``) stops it before anything is predicted, unless ``overwrite``
    (replace them; ``--overwrite``) or ``skip_complete`` (skip the cases whose outputs are all
    there; ``--continue``). ``engine`` / ``precision``: what runs the networks (``auto``: OpenVINO
    on a CPU where installed, PyTorch on a GPU; bf16 where the hardware runs it natively; ``torch``
    + ``fp32`` reproduces PyTorch's full-precision results). Folders of DICOM series give one case
    per series, named by SeriesInstanceUID or (``name_by="patientid"``) PatientID; ``dicom_seg``
    also writes ``CASE.dcm``, a DICOM SEG of each series (``--dicom-seg``; needs highdicom). For
    repeated use in Python keep a :class:`autounet.Predictor` instead (it loads the model once).

    ``part=(I, N)``: only the I-th of N interleaved shares of the sorted cases (N jobs with
    I = 0 .. N-1, on any scheduler, predict every case once). ``executor="ray"``: shard the cases
    over the workers of a Ray cluster (``address``: ``auto`` or ``HOST:PORT``; None: a local
    instance), each loading the model once; the same output files as a local run.
    ``memory_limit`` (GB, ``--memory-limit``; default what the machine has free): a case whose
    estimated peak exceeds it stops the command before anything is written (README, "Memory").
    """
    from autounet.inference.dicom_seg import require_highdicom
    from autounet.inference.inputs import NAME_BY
    from autounet.inference.predictor import Predictor

    if name_by not in NAME_BY:
        raise AutounetError(f"--name-by {name_by}: expected one of {', '.join(NAME_BY)}")
    if dicom_seg:
        require_highdicom()  # before the model is loaded
    if memory_limit is not None and not 0 < memory_limit < float("inf"):  # inf would overflow the byte count
        raise AutounetError(f"--memory-limit must be a positive number of GB, got {memory_limit:g}")
    arguments.step(step)
    _folds(folds)
    _checkpoints(checkpoints)
    _executor(executor, address)
    share = _part(part)
    if share is not None and executor == "ray":
        raise AutounetError("give --part (run the shares yourself) or --executor ray (Ray shares the cases), not both")
    predictor_options = dict(
        folds=folds,
        checkpoints=checkpoints,
        device=device,
        tta=tta,
        step=step,
        postprocess=postprocess,
        engine=engine,
        precision=precision,
    )
    predict_options = dict(
        save_probabilities=save_probabilities,
        png=png,
        overwrite=overwrite,
        skip_complete=skip_complete,
        name_by=name_by,
        dicom_seg=dicom_seg,
        memory_limit=memory_limit,
    )
    if executor == "ray":
        from autounet.cluster.ray_predict import predict_on_ray

        inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
        timings, postprocessing, skipped = predict_on_ray(
            inputs, output, model, predictor_options, predict_options, address
        )
        return PredictionRun(Path(output), timings, postprocessing, skipped)
    predictor = Predictor(model, **predictor_options)
    timings = predictor.predict(inputs, output, **predict_options, part=share)
    return PredictionRun(Path(output), timings, predictor.postprocessing, list(predictor.skipped))


def export(
    model: str | Path,
    output: str | Path,
    *,
    formats: Sequence[str] = ("onnx", "openvino"),
    folds: Sequence[int | str] | None = None,
    checkpoints: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """`autounet export MODEL -o OUT`: write the model's networks (one file per fold and
    checkpoint, ONNX and/or OpenVINO) and ``model.json``, everything needed to reproduce
    `autounet predict` without autounet (docs/model_json.md); returns the ``model.json`` path.
    A file of ``output`` that the export would replace is refused unless ``overwrite``."""
    from autounet.inference.export import export_model

    _folds(folds)
    _checkpoints(checkpoints)
    return export_model(model, output, tuple(formats), folds=folds, checkpoints=checkpoints, overwrite=overwrite)


def evaluate(
    pred: str | Path,
    gt: str | Path,
    *,
    labels: Sequence[int] | None = None,
    regions: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    brats: bool = False,
    tolerance_mm: float = 1.0,
    json_path: str | Path | None = None,
    workers: int | None = None,
    ignore_label: int | None = None,
) -> EvaluationResult:
    """`autounet evaluate PRED GT`: Dice, IoU, HD95 and surface Dice of label maps (two folders
    or two files) per case and class, and their means.

    ``regions``: ``{"WT": [1, 2, 3]}`` or ``["WT=1,2,3"]``; ``brats``: both masks empty score 1
    (default: NaN, left out of means). ``json_path``: also write the result there (the command
    writes :func:`evaluation_json_path`). ``ignore_label``: reference voxels of this value count
    in no metric (default: the ``ignore`` label of a ``dataset.json`` beside GT, if any).
    """
    from autounet.evaluation.evaluate import (
        check_evaluation_target,
        evaluate_folders,
        ignore_label_near,
        parse_regions,
        save_evaluation,
    )

    arguments.workers(workers)
    arguments.real("--tolerance", tolerance_mm, above=0)
    if labels is not None:
        labels = [arguments.whole("--labels", v, 0) for v in labels]
    if json_path is not None:
        check_evaluation_target(json_path)  # refused before anything is computed
    if regions is not None and not isinstance(regions, Mapping):
        regions = parse_regions(list(regions)) if regions else None
    ignore_label = ignore_label_near(gt) if ignore_label is None else arguments.whole("--ignore-label", ignore_label, 1)
    result = evaluate_folders(
        pred,
        gt,
        labels=_list(labels),
        regions=regions,
        tolerance_mm=tolerance_mm,
        empty="one" if brats else "nan",
        workers=workers,
        ignore_label=ignore_label,
    )
    if json_path is not None:
        save_evaluation(result, json_path)
    return result


def show(
    images: str | Path | Sequence[str | Path],
    *,
    seg: str | Path | None = None,
    out: str | Path | None = None,
    channel: int = 0,
    slices: int = 3,
) -> Path:
    """`autounet show IMAGE --seg S`: write a PNG of axial, coronal and sagittal slices with the
    segmentation overlaid; returns its path (default ``./<image name>.png``)."""
    from autounet.visualization import show_files

    arguments.whole("--channel", channel, 0)
    arguments.whole("--slices", slices, 1)
    return show_files(images, seg_path=seg, out=out, channel=channel, slices=slices)


# --- autounet select / postprocess / report ------------------------------------------------------


def select(
    name: str,
    *,
    work: str | Path | None = None,
    configurations: Sequence[str] | None = None,
    workers: int | None = None,
) -> Selection:
    """`autounet select NAME`: rank the trained configurations and pair ensembles by
    cross-validation Dice, choose the best and decide its post-processing; writes and returns
    ``W/NAME/selection.json``, then rewrites ``report.md`` and ``report.html``."""
    from autounet.selection.select import select as select_model

    arguments.workers(workers)
    ws = Workspace.at(work, name)
    selection = select_model(ws, _list(configurations), workers=workers)
    report(name, work=work)  # the reports follow the new selection
    return selection


def postprocess(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    workspace: str | Path,
    workers: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """`autounet postprocess IN OUT --from W/NAME`: apply the post-processing `select` chose for
    the workspace folder ``W/NAME`` to every segmentation in ``input_dir`` (which may equal
    ``output_dir``: in place); returns the files written. A file of a case already in another
    ``output_dir`` is refused unless ``overwrite`` (``--overwrite``)."""
    from autounet.postprocessing.apply import apply_to_folder, segmentation_files
    from autounet.selection_document import postprocessing_of

    arguments.workers(workers)
    segmentation_files(input_dir, output_dir, overwrite)  # an empty or missing folder before the selection is read
    return apply_to_folder(input_dir, output_dir, postprocessing_of(workspace), workers, overwrite)


def report(
    name: str, *, work: str | Path | None = None, markdown: bool = True, html: bool = True, cases: int | None = None
) -> Path:
    """`autounet report W/NAME`: write ``W/NAME/report.md`` (plans, training curves,
    cross-validation, selection) and ``W/NAME/report.html`` (the same, with interactive curves,
    every cross-validation case and a case viewer in one self-contained page) from the workspace's
    files, without retraining. ``cases``: the worst cases embedded in the page's viewer (default
    20; a sample of half as many more is added). Returns report.md's path (report.html's when
    ``markdown`` is False)."""
    from autounet.reporting import write_html_report, write_report
    from autounet.reporting.html_cases import DEFAULT_WORST

    worst = DEFAULT_WORST if cases is None else arguments.whole("--cases", cases, 0)
    ws = Workspace.at(work, name)
    written = write_html_report(ws, worst) if html else None
    if markdown:
        return write_report(ws)
    if written is None:
        raise AutounetError("nothing to write: markdown and html are both off")
    return written


# --- autounet package / info ---------------------------------------------------------------------


def package(
    model: str | Path,
    output: str | Path,
    *,
    configurations: Sequence[str] | None = None,
    folds: Sequence[int | str] | None = None,
    description: str = "",
    license: str = "",
    overwrite: bool = False,
    with_report: bool = False,
) -> CreatedPackage:
    """`autounet package W/NAME -o FILE.zip`: write one file holding everything `predict` needs
    (the selected model's inference checkpoints without training state, plans, selection with its
    post-processing, dataset.json without cases, a fingerprint summary, and a manifest with versions,
    ``description``, ``license`` and every file's SHA-256; the report and its pictures only with
    ``with_report``). ``configurations`` / ``folds``: package those instead of
    the selection's winner (then without post-processing unless they are the winner's
    configurations). ``predict -m FILE.zip`` and :class:`autounet.Predictor` use the file directly."""
    from autounet.packaging.create import create_package

    chosen_folds = None
    if folds is not None:
        chosen_folds = [arguments.whole("--folds", int(f) if str(f).isdigit() else f, 0) for f in folds]
    return create_package(
        model,
        output,
        configurations=_list(configurations),
        folds=chosen_folds,
        description=description,
        license=license,
        overwrite=overwrite,
        with_report=with_report,
    )


def info(model: str | Path) -> ModelInfo:
    """`autounet info FILE.zip|W/NAME`: what a model is (labels, channels, configurations, folds,
    post-processing, training data, cross-validation Dice; a package's versions, description and
    license). A package is verified and unpacked into the cache first, as `predict` does."""
    from autounet.packaging.info import model_info

    return model_info(model)


# --- autounet run / demo / make-synthetic --------------------------------------------------------


def run(
    raw: str | Path,
    *,
    work: str | Path | None = None,
    name: str | None = None,
    configurations: Sequence[str] | None = None,
    folds: Sequence[int | str] = (0, 1, 2, 3, 4),
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    validation_iterations: int | None = None,
    max_minutes: float | None = None,
    recipe: str | None = None,
    patch_size: Sequence[int] | None = None,
    width_multiplier: float | None = None,
    validation_tta: bool = True,
    gpu_memory_target_gb: float | None = None,
    device: str | None = None,
    workers: int | None = None,
    seed: int = 0,
    precision: str = "auto",
    plans_from: str | Path | None = None,
    pretrained: str | Path | None = None,
    executor: str = "local",
    address: str | None = None,
    gpus_per_fold: int | None = None,
    cpus_per_fold: int | None = None,
    max_retries: int | None = None,
    loggers: Sequence[str] | None = None,
) -> RunResult:
    """`autounet run RAW`: check, plan, preprocess, train every configuration (default every
    planned one) on every fold, select and report; resumable at every step. ``max_minutes`` is
    per fold; ``recipe``, ``patch_size``, ``gpu_memory_target_gb`` and ``plans_from`` as :func:`plan`; ``pretrained`` as
    :func:`train` (each fold that starts from scratch); ``loggers`` as :func:`train`, for every fold.

    ``executor="ray"`` trains every configuration x fold as a task of a Ray cluster (``address``:
    ``auto`` or ``HOST:PORT``; None: a local instance sized to this machine) with
    ``cpus_per_fold`` CPUs (None: 1) and ``gpus_per_fold`` GPUs each (None: 1 where the cluster
    has GPUs; more than 1 trains under torchrun), resuming a fold whose worker is lost up to
    ``max_retries`` times (None: 3); the workspace must be on a file system every node sees."""
    from autounet.pipeline.run import RunOptions, run_pipeline

    _executor(executor, address)
    if executor == "local" and (gpus_per_fold, cpus_per_fold, max_retries) != (None, None, None):
        raise AutounetError("--gpus-per-fold, --cpus-per-fold and --max-retries need --executor ray")

    options = RunOptions(
        configurations=_list(configurations),
        folds=list(folds),
        epochs=epochs,
        iterations_per_epoch=iterations_per_epoch,
        validation_iterations=validation_iterations,
        max_minutes=max_minutes,
        recipe=recipe,
        patch_size=_list(patch_size),
        gpu_memory_target_gb=gpu_memory_target_gb,
        width_multiplier=width_multiplier,
        validation_tta=validation_tta,
        device=device,
        workers=workers,
        seed=seed,
        precision=precision,
        plans_from=None if plans_from is None else str(_model_source(plans_from)),
        plans_from_label=None if plans_from is None else str(plans_from),
        pretrained=None if pretrained is None else str(_model_source(pretrained)),
        pretrained_label=None if pretrained is None else str(pretrained),
        loggers=_list(loggers),
    ).validate()
    ws = Workspace.at(work, name or Path(raw).resolve().name)
    if executor == "ray":
        from autounet.cluster.ray_run import ClusterOptions, run_on_ray

        cluster = ClusterOptions(address, gpus_per_fold, cpus_per_fold, max_retries).validate()
        return run_on_ray(raw, ws, options, cluster)
    return run_pipeline(raw, ws, options)


def demo(
    folder: str | Path = "autounet_demo",
    *,
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    device: str | None = None,
) -> DemoResult:
    """`autounet demo --dir DIR`: make a small synthetic dataset in ``folder``, run the whole
    pipeline on it with a tiny budget, predict its held-out cases and score them (None keeps the
    demo's budget)."""
    from autounet.pipeline.demo import DemoSettings, run_demo

    _folder_or_new("--dir", folder)
    settings = DemoSettings(device=device)
    if arguments.whole("--epochs", epochs, 1) is not None:
        settings.epochs = epochs
    if arguments.whole("--iters-per-epoch", iterations_per_epoch, 1) is not None:
        settings.iterations_per_epoch = iterations_per_epoch
    return run_demo(folder, settings)


def make_synthetic(
    out: str | Path,
    *,
    cases: int = 12,
    test_cases: int = 0,
    shape: Sequence[int] = (32, 40, 36),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    spacing_jitter: float = 0.0,
    modality: str = "MRI",
    channels: int = 1,
    classes: int = 3,
    seed: int = 0,
    layout: str = "msd",
) -> Path:
    """`autounet make-synthetic OUT`: write a small synthetic segmentation dataset (MSD or
    nnU-Net v2 layout; ``classes`` includes the background); returns its folder."""
    from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset

    for mm in spacing:  # the rest is checked by SyntheticSpec.validate
        arguments.real("--spacing", mm, above=0)
    arguments.whole("--seed", seed, 0)
    _folder_or_new("OUT", out)
    spec = SyntheticSpec(
        cases=cases,
        test_cases=test_cases,
        shape=tuple(shape),
        spacing=tuple(spacing),
        spacing_jitter=spacing_jitter,
        modality=modality,
        channels=channels,
        classes=classes,
        seed=seed,
        layout=layout,
    )
    return make_synthetic_dataset(out, spec)


# --- what the commands print ---------------------------------------------------------------------


def format_plans(plans: Plans) -> str:
    """The plans as `autounet plan` prints them: one block per configuration."""
    from autounet.planning.summary import format_plans as summary

    return summary(plans)


def format_selection(selection: Selection, *, name: str, work: str | Path | None = None) -> str:
    """The selection as `autounet select` prints it: the ranking (with the dataset's class names),
    the winner and the post-processing."""
    from autounet.planning.plans import load_plans
    from autounet.selection.select import format_selection as table

    return table(selection, load_plans(Workspace.at(work, name).plans_json).labels)


def format_evaluation(result: EvaluationResult, *, gt: str | Path | None = None, per_case: bool = False) -> str:
    """The evaluation as `autounet evaluate` prints it: means per class (named from a dataset.json
    beside ``gt``, if any), optionally one row per case and class."""
    from autounet.evaluation.evaluate import format_table, label_names_near

    names = label_names_near(gt) if gt is not None else None
    return format_table(result, label_names=names, per_case=per_case)


def format_info(info: ModelInfo) -> str:
    """What `autounet info` prints: the package (versions, description, license), labels, channels,
    training data, the model's configurations, folds and post-processing, and its cross-validation Dice."""
    from autounet.packaging.info import format_info as describe

    return describe(info)


def evaluation_json_path(pred: str | Path, json_path: str | Path | None = None) -> Path:
    """Where `autounet evaluate` writes its JSON: ``json_path``, else ``PRED/evaluation.json``
    (``CASE_evaluation.json`` beside a single file)."""
    from autounet.evaluation.evaluate import default_json_path

    return Path(json_path) if json_path else default_json_path(pred)


def format_timings(timings: Sequence[CaseTiming]) -> str:
    """The mean time per case of :func:`predict`, split into preprocessing, network and export ("" for none)."""
    import io

    from autounet.inference.predictor import print_timings

    text = io.StringIO()
    print_timings(timings, file=text)
    return text.getvalue().rstrip("\n")


def _model_source(source: str | Path) -> Path:
    """Where a trained or planned source lies (``--plans-from``, ``--pretrained``): a model package
    ``.zip`` is opened (extracted) to its workspace folder ``W/NAME``; anything else is itself."""
    if str(source).lower().endswith(".zip"):
        from autounet.packaging import open_package

        return open_package(source)
    return Path(source)


def _folder_or_new(option: str, path: str | Path) -> None:
    if Path(path).exists() and not Path(path).is_dir():
        raise AutounetError(f"{path}: a file, where a folder should be ({option} names a folder)")


def _folds(folds: Sequence[int | str] | None) -> None:
    """``-f/--folds`` of predict: fold numbers (or 'all'); whether they are trained is checked when loading."""
    for f in folds or []:
        if str(f) != "all" and not (isinstance(f, int) and not isinstance(f, bool) and f >= 0) and not str(f).isdigit():
            raise AutounetError(f"-f/--folds: {f!r} is not a fold number (0, 1, ...) or 'all'")


def _checkpoints(checkpoints: Sequence[str] | None) -> None:
    """``--checkpoint`` of predict / export: each one of :data:`~autounet.workspace.CHECKPOINT_KINDS`."""
    from autounet.workspace import CHECKPOINT_KINDS

    for kind in checkpoints or []:
        if kind not in CHECKPOINT_KINDS:
            raise AutounetError(f"--checkpoint {kind!r}: expected one of {', '.join(CHECKPOINT_KINDS)}")


EXECUTORS = ("local", "ray")


def _executor(executor: str, address: str | None) -> None:
    """``--executor local|ray`` (``--address`` only with ray)."""
    if executor not in EXECUTORS:
        raise AutounetError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "local" and address is not None:
        raise AutounetError("--address needs --executor ray")


def _part(part: Sequence[int] | None) -> tuple[int, int] | None:
    """``--part I N``: 0 <= I < N."""
    if part is None:
        return None
    if len(part) != 2:
        raise AutounetError(f"--part takes two numbers I N (the I-th of N shares), got {list(part)}")
    count = arguments.whole("--part N", part[1], 1)
    index = arguments.whole("--part I", part[0], 0, count - 1)
    return index, count


def _list(values: Sequence | None) -> list | None:
    return None if values is None else list(values)
