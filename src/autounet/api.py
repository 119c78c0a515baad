"""The Python API: one function per `autounet` command, with the command's options as typed
keyword arguments (``autounet plan RAW --work W`` is ``autounet.plan(RAW, work=W)``).

Each function turns ``(work, name)`` into a :class:`~autounet.workspace.Workspace` once, calls
the stage that does the work and returns that stage's result. Stages validate everything before
they write anything, so a failure leaves the workspace as it was. Heavy modules are imported on
first use.

The command line is built from these signatures and docstrings (:mod:`autounet.signature_cli`):
a command function's summary is its line in ``autounet --help``, the text before ``Args:`` its
description, an ``Args:`` entry its option's help (stated once, where the option first appears;
``False:`` starts that of a flag turning a True default off). ``format_*`` print as the commands do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

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

Recipe = Literal["nnunet", "brats", "nnunetv2", "resenc-m", "resenc-l", "resenc-xl"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Logger = Literal["tensorboard", "wandb", "mlflow"]
Checkpoint = Literal["final", "best", "second_best", "latest"]
Executor = Literal["local", "ray"]


def workspace(name: str, *, work: str | Path | None = None) -> Workspace:
    """The workspace ``W/NAME`` of a dataset: where every stage reads and writes its files.

    Args:
        name: dataset name in the workspace
        work: workspace (default: $AUTOUNET_WORK, else ./autounet_work)
    """
    return Workspace.at(work, name)


# --- autounet check / plan ---------------------------------------------------------------------


def check(raw: str | Path, *, workers: int | None = None) -> CheckReport:
    """Validate a raw dataset and print a report; writes nothing.

    Validate a raw dataset (MSD or nnU-Net v2 layout). Exit code 2 lists every problem with its case.

    Args:
        raw: dataset folder holding dataset.json
        workers: worker processes (default: CPU cores, at most 8)
    """
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
    force: bool = False,
    recipe: Recipe | None = None,
    gpu_memory_target_gb: float | None = None,
    patch_size: Sequence[int] | None = None,
    plans_from: str | Path | None = None,
    workers: int | None = None,
    options: PlannerOptions | None = None,
) -> PlanResult:
    """Check + fingerprint + plans for all configurations.

    Check and fingerprint RAW, then plan every configuration into W/NAME/. With --fingerprint, plan from a
    fingerprint.json alone.

    Args:
        name: dataset name in the workspace (default: RAW's folder name)
        fingerprint: plan from this fingerprint.json instead of a raw dataset
        force: recompute the fingerprint even if it is up to date
        recipe: planning recipe: nnunet (default: the nnU-Net paper's planner), brats (NVIDIA's BraTS recipe: one
            3d_fullres configuration, WT/TC/ET regions, foreground channel, deeper encoder, nvidia training preset),
            nnunetv2 (nnU-Net v2's planner) or resenc-m / resenc-l / resenc-xl (nnU-Net v2's residual-encoder presets)
        gpu_memory_target_gb: --recipe nnunetv2 / resenc-*: GPU memory to plan patch and batch for (default: 8, 8,
            24, 40 GB)
        patch_size: --recipe brats only: the 3D patch (Z Y X) instead of 128^3 (a CPU convenience, e.g. 64 64 64)
        plans_from: keep the networks, patch, spacing and normalisation of SOURCE's plans (a workspace W/NAME, a
            model package .zip or a plans.json), e.g. to fine-tune its trained networks with --pretrained
        options: planner settings beyond the recipe (Python only)

    Returns:
        The fingerprint's check report (None when an up-to-date fingerprint was reused), the plans and the
        workspace.
    """
    arguments.workers(workers)
    planning = dict(_pick(locals(), "recipe options gpu_memory_target_gb"), patch_size=_list(patch_size))
    planning.update(_source("plans_from", plans_from))
    if fingerprint is not None:
        if raw is not None:
            raise AutounetError("give either RAW or --fingerprint, not both")
        if not name:
            raise AutounetError("--fingerprint needs --name NAME")
        from autounet.planning.run import plan_from_fingerprint

        return plan_from_fingerprint(fingerprint, Workspace.at(work, name), **planning)
    if raw is None or str(raw) == "":
        raise AutounetError("give a raw dataset folder RAW, or --fingerprint F.json --name NAME")
    from autounet.planning.run import plan_dataset

    ws = Workspace.at(work, name or Path(raw).resolve().name)
    return plan_dataset(raw, ws, workers=workers, force=force, **planning)


# --- autounet preprocess / train -----------------------------------------------------------------


def preprocess(
    name: str,
    *,
    configurations: Sequence[str] | None = None,
    work: str | Path | None = None,
    float16: bool = False,
    label_interpolation: Literal["nearest", "linear"] = "nearest",
    force: bool = False,
    workers: int | None = None,
) -> PreprocessSummary:
    """Write preprocessed data for the configurations.

    Crop, resample and normalise every case of W/NAME for the planned configurations, into
    W/NAME/preprocessed/CONFIG/. Resumable: complete cases are skipped.

    Args:
        name: dataset name in the workspace
        configurations: configurations to preprocess (default: all planned)
        float16: store images as float16 (half the disk and I/O)
        label_interpolation: label resampling: nearest neighbour (the paper) or linear interpolation of the one-hot
            maps + argmax
        force: redo cases that are already complete
    """
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
    pretrained: str | Path | None = None,
    loggers: Sequence[Logger] | None = None,
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
    precision: Precision = "auto",
    foreground_channel: bool | None = None,
) -> FoldResult:
    """Train one fold of a configuration.

    Train one cross-validation fold (or -f all) of a configuration of W/NAME. Checkpoints, log.jsonl and
    progress.png go to W/NAME/results/CONFIG/fold_K/ after every epoch. Multi-process: torchrun
    --nproc_per_node=N -m autounet train ...

    Args:
        configuration: 2d, 3d_fullres, 3d_lowres or 3d_cascade_fullres
        fold: 0..4, or 'all' to train on every case
        preset: training preset: paper, nvidia, poly, or a JSON file (default: the plan's: paper, nvidia for
            --recipe brats)
        augmentation: augmentation preset (default: the plan's, else the training preset's): paper, extended,
            nvidia, or a JSON file
        epochs: maximum epochs (extends a finished run with --resume)
        iterations_per_epoch: training iterations per epoch (default 250)
        validation_iterations: validation batches per epoch (default 50)
        batch_size: global batch size (default: the plan's)
        lr: initial learning rate (default: the preset's)
        device: cpu, cuda, cuda:N or mps (default: cuda when present)
        seed: seed of the network initialisation and of every batch (default 0)
        max_minutes: end training cleanly, with a final checkpoint, when this much time has passed
        resume: continue from checkpoint_latest.pt
        pretrained: start from the weights of SOURCE (a checkpoint, fold folder, W/NAME/results/CONFIG, workspace
            W/NAME or model package .zip) whose name and shape match; the output heads are re-initialised when the
            labels differ. Only for a fold that starts from scratch (--resume continues the fold's own checkpoint)
        loggers: also log every epoch to an experiment tracker: tensorboard, wandb or mlflow (repeatable; pip
            install 'autounet[NAME]'). Local by default: W/NAME/trackers/ (W&B offline; MLFLOW_TRACKING_URI and
            WANDB_MODE choose otherwise). A missing or failing tracker is a warning, never a stop
        loader_threads: background loader threads (default: 1 on the CPU, more beside a GPU)
        validate: False: skip the end-of-training prediction of the validation cases
        validation_tta: False: no mirroring in the end-of-training prediction (faster on CPU)
        attention: attention gates on the decoder's skip connections
        residual: residual conv blocks in encoder and decoder
        drop_block: DropBlock with probability P (block size 5)
        focal: Focal loss (gamma 2) instead of binary cross-entropy (CE for softmax)
        deep_supervision_heads: extra output heads below full resolution (0: off)
        features: features per encoder stage (more: deeper)
        deeper: seed 004's encoder: 64, 96, 128, 192, 256, 384, 512
        width_multiplier: every stage's features times X
        precision: training precision: auto (default: bf16 on GPUs from Ampere on, fp16 with a gradient scaler
            before; bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32), fp32, bf16 or fp16 (CUDA only)
        foreground_channel: False: drop the one-hot foreground input channel of --recipe brats plans (inference
            drops it too)

    None keeps the preset's (or, with ``resume``, the run's) value; the ablation switches (``attention``
    ... ``foreground_channel``, :class:`autounet.training.options.TrainOptions`) are stored in the checkpoint.
    """
    from autounet.pipeline.fold import train_and_validate
    from autounet.training.options import TrainOptions

    given = dict(locals(), features=_list(features), loggers=_list(loggers), **_source("pretrained", pretrained))
    options = TrainOptions(**_pick(given, " ".join(f.name for f in fields(TrainOptions)))).validate()
    return train_and_validate(Workspace.at(work, name), options, validate=validate, validation_tta=validation_tta)


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
    checkpoints: Sequence[Checkpoint] | None = None,
    postprocess: bool = True,
    tta: bool = True,
    step: float = 0.5,
    save_probabilities: bool = False,
    png: bool = False,
    memory_limit: float | None = None,
    name_by: Literal["series", "patientid"] = "series",
    dicom_seg: bool = False,
    overwrite: bool = False,
    skip_complete: bool = False,
    device: str | None = None,
    engine: Literal["auto", "torch", "openvino", "onnxruntime"] = "auto",
    precision: Precision = "auto",
    executor: Executor = "local",
    address: str | None = None,
    part: Sequence[int] | None = None,
) -> PredictionRun:
    """Segment a folder of images (or files).

    Segment raw images with a trained model: preprocessing as in training, sliding window (step 1/2 patch,
    Gaussian weights), mirroring test-time augmentation, the folds' average, reverted to the input's grid and
    written with its exact geometry. Inputs in MSD naming (one file per case) or nnU-Net v2 naming
    (CASE_0000.nii.gz, one file per channel), or folders (trees) of DICOM series: one case per series.

    Args:
        inputs: folder(s) and/or image file(s); DICOM folders
        output: output folder
        model: W/NAME (the selected model), W/NAME/results/CONFIG (all its folds), one fold_K folder, or a model
            package FILE.zip (`autounet package`)
        folds: folds to ensemble (default: every trained fold)
        checkpoints: checkpoint of each fold (default: final, or the training preset's choice)
        postprocess: False: with -m W/NAME: do not apply the selected post-processing
        tta: False: no mirroring test-time augmentation (2**axes times faster)
        step: tile step as a fraction of the patch (default 0.5)
        save_probabilities: also write CASE.npz with the class probabilities
        png: also write CASE.png: slices with the segmentation overlaid
        memory_limit: host memory a case may take (default: what the machine has free); a case estimated above it
            is refused before anything is written, and cases run one at a time when overlapping ones would not fit
        name_by: name the cases of DICOM series by SeriesInstanceUID (default) or PatientID (several series of a
            patient: PATIENTID_1, _2, ... in SeriesNumber order)
        dicom_seg: DICOM inputs: also write CASE.dcm, a DICOM SEG that references the series (pip install
            autounet[dicom])
        overwrite: replace files already in OUT that this prediction writes (default: refuse, naming them)
        skip_complete: skip the cases whose outputs are all in OUT already (an interrupted run); redo the others
        engine: what runs the networks (default auto: OpenVINO on a CPU where installed, else PyTorch); a missing
            or failing engine falls back to PyTorch with a note
        precision: auto (default): bf16 where the hardware runs it natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs),
            else fp32 (fp16 on older GPUs), and fp32 from the first case whose probabilities are too near ties
            for half precision; fp32 gives PyTorch's full-precision results
        executor: local (default): this process; ray: the cases, sharded over workers that each load the model
            once, as tasks of a Ray cluster
        address: the Ray cluster to join: auto or HOST:PORT (default: a local Ray instance)
        part: predict only the I-th (0..N-1) of N interleaved shares of the sorted cases (N jobs of any scheduler)

    The same output files come from a local run, a Ray run and N ``part`` runs. For repeated use in Python
    keep a :class:`autounet.Predictor` instead (it loads the model once).
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
    arguments.folds(folds)
    _checkpoints(checkpoints)
    arguments.executor(executor, address)
    share = arguments.part(part)
    if share is not None and executor == "ray":
        raise AutounetError("give --part (run the shares yourself) or --executor ray (Ray shares the cases), not both")
    given = locals()
    predictor_options = _pick(given, "folds checkpoints device tta step postprocess engine precision")
    predict_options = _pick(given, "save_probabilities png overwrite skip_complete name_by dicom_seg memory_limit")
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
    formats: Sequence[Literal["onnx", "openvino", "all"]] = ("all",),
    folds: Sequence[int | str] | None = None,
    checkpoints: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model's networks as ONNX / OpenVINO files with a model.json to run them anywhere.

    Export MODEL (W/NAME: the selected model; W/NAME/results/CONFIG; one fold_K) to OUT: one network file per
    fold and checkpoint (dynamic batch axis) and model.json, which holds everything needed to reproduce
    `autounet predict` without autounet (docs/model_json.md; examples/onnx_predict.py).

    Args:
        model: W/NAME, W/NAME/results/CONFIG or one fold_K folder
        formats: network file format(s) (default all)
        folds: folds (default: every trained fold, or the selection's)
        checkpoints: final, best, second_best or latest (default: what predict uses)
        overwrite: replace files of OUT the export writes (default: refuse, naming them)

    Returns:
        The path of model.json.
    """
    from autounet.inference.export import export_model

    arguments.folds(folds)
    _checkpoints(checkpoints)
    chosen = ("onnx", "openvino") if "all" in formats else tuple(formats)
    return export_model(model, output, chosen, folds=folds, checkpoints=checkpoints, overwrite=overwrite)


def evaluate(
    pred: str | Path,
    gt: str | Path,
    *,
    labels: Sequence[int] | None = None,
    regions: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    brats: bool = False,
    tolerance_mm: float = 1.0,
    ignore_label: int | None = None,
    json_path: str | Path | None = None,
    workers: int | None = None,
) -> EvaluationResult:
    """Per-case and mean Dice, IoU, HD95 and surface Dice -> JSON + table.

    Compare the label maps in PRED with the same-named reference label maps in GT (or two files): Dice, IoU,
    HD95 (mm) and surface Dice per case and class, their means, and the foreground mean. Writes JSON and prints
    a table.

    Args:
        pred: folder of predicted label maps (or one file)
        gt: folder of reference label maps (or one file)
        labels: classes to evaluate (default: every non-zero label found)
        regions: regions, each a union of labels, e.g. WT=1,2,3 TC=2,3 ET=3
        brats: BraTS convention: both masks empty scores 1 (HD95 0), one empty gives HD95 = the image diagonal
            (default: nnU-Net's, NaN and left out of means)
        tolerance_mm: surface Dice tolerance (default 1 mm)
        ignore_label: reference value of unannotated voxels, left out of every metric (default: the 'ignore' label
            of a dataset.json beside GT, if any)
        json_path: JSON output (default: PRED/evaluation.json); an existing file is replaced only if it is an
            evaluation

    ``regions`` may also be a mapping (``{"WT": [1, 2, 3]}``). Python writes the JSON only when
    ``json_path`` is given (the command writes :func:`evaluation_json_path`).
    """
    from autounet.evaluation import evaluate as scores

    arguments.workers(workers)
    arguments.real("--tolerance", tolerance_mm, above=0)
    labels = None if labels is None else [arguments.whole("--labels", v, 0) for v in labels]
    if json_path is not None:
        scores.check_evaluation_target(json_path)  # refused before anything is computed
    if regions is not None and not isinstance(regions, Mapping):
        regions = scores.parse_regions(list(regions)) if regions else None
    near = ignore_label is None
    ignore_label = scores.ignore_label_near(gt) if near else arguments.whole("--ignore-label", ignore_label, 1)
    empty = "one" if brats else "nan"
    result = scores.evaluate_folders(
        pred, gt, **_pick(locals(), "labels regions tolerance_mm empty workers ignore_label")
    )
    if json_path is not None:
        scores.save_evaluation(result, json_path)
    return result


def show(
    images: str | Path | Sequence[str | Path],
    *,
    seg: str | Path | None = None,
    out: str | Path | None = None,
    channel: int = 0,
    slices: int = 3,
) -> Path:
    """Write a PNG of an image with its segmentation overlaid.

    Write a PNG with axial, coronal and sagittal slices through the segmentation's foreground (the image centre
    without one), the image in grey and each label in its own colour.

    Args:
        images: image file, or one file per channel
        seg: segmentation (label map) on the image's grid
        out: output file or folder (default: ./<image name>.png); an existing file is replaced only if it is a PNG
        channel: channel to show (default 0)
        slices: slices per view (default 3)

    Returns:
        The PNG's path.
    """
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
    """Pick the best configuration / pair ensemble from cross-validation, decide post-processing.

    Rank every trained configuration and every pair ensemble (averaged validation probabilities) by the mean
    foreground Dice of cross-validation, pick the best, and decide post-processing on its cross-validation
    predictions. Writes W/NAME/selection.json and prints the ranking.

    Args:
        configurations: configurations to consider (default: every trained one)

    Rewrites ``report.md`` and ``report.html`` after the selection.
    """
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
    overwrite: bool = False,
    workers: int | None = None,
) -> list[Path]:
    """Apply the selected post-processing to a folder of segmentations.

    Apply the post-processing chosen by `autounet select` for W/NAME to every segmentation in IN, writing OUT
    (IN may equal OUT). The BraTS ET rule needs CASE.npz probabilities beside each file (`autounet predict
    --save-probabilities`).

    Args:
        input_dir: folder of segmentations
        output_dir: output folder
        workspace: the dataset's workspace folder
        overwrite: replace the cases' files already in OUT (default: refuse, naming them; OUT = IN works in place)

    Returns:
        The files written.
    """
    from autounet.postprocessing.apply import apply_to_folder, segmentation_files
    from autounet.selection_document import postprocessing_of

    arguments.workers(workers)
    segmentation_files(input_dir, output_dir, overwrite)  # an empty or missing folder before the selection is read
    return apply_to_folder(input_dir, output_dir, postprocessing_of(workspace), workers, overwrite)


def report(
    name: str, *, work: str | Path | None = None, markdown: bool = True, html: bool = True, cases: int | None = None
) -> Path:
    """Write report.md and report.html of a workspace again from its files (no training).

    Write W/NAME/report.md and W/NAME/report.html from the workspace's files, without retraining. report.html is
    one self-contained page (opens from disk, nothing fetched): the summary, every fold's training curves, every
    cross-validation case of the selected model with Dice, HD95 and NSD per class, and a slice viewer with ground
    truth, prediction and errors for the worst cases and a sample.

    Args:
        markdown: False: write only report.html (leave report.md as it is)
        html: False: leave report.html as it is
        cases: embed the N worst cases in report.html's viewer, plus a sample of N/2 more (default 20)

    Returns:
        report.md's path (report.html's when ``markdown`` is False).
    """
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
    folds: Sequence[int] | None = None,
    description: str = "",
    license: str = "",
    overwrite: bool = False,
    with_report: bool = False,
) -> CreatedPackage:
    """Write one .zip holding everything `predict` needs (checkpoints, plans, selection, manifest).

    Write the model of W/NAME (default: the one `autounet select` chose, with its folds and post-processing) into
    one zip: its inference checkpoints without training state, plans.json, selection.json, dataset.json (labels,
    channels; no case list), fingerprint.json (a dataset summary, no per-case data) and manifest.json (versions,
    description, license, every file's SHA-256); report.md and its pictures only with --with-report. `autounet
    predict -m FILE.zip` uses it directly, with no workspace.

    Args:
        model: the dataset's workspace folder
        output: the package file to write
        configurations: package these configurations as the model (default: the selection's); without
            post-processing unless they are the selected ones
        folds: folds to package (default: the selection's)
        description: free text stored in the manifest (what the model is for)
        license: the model's license, stored in the manifest (e.g. CC-BY-4.0)
        overwrite: replace FILE.zip if it exists (default: refuse)
        with_report: also package report.md, its pictures and the training curves (they show an example training
            image with its labels and per-case results; default: left out)
    """
    from autounet.packaging.create import create_package

    chosen_folds = None
    if folds is not None:
        chosen_folds = [arguments.whole("--folds", int(f) if str(f).isdigit() else f, 0) for f in folds]
    chosen = _pick(locals(), "description license overwrite with_report")
    return create_package(model, output, configurations=_list(configurations), folds=chosen_folds, **chosen)


def info(model: str | Path) -> ModelInfo:
    """Describe a model package or workspace: labels, channels, model, training data, CV Dice, versions.

    Print what a model is: labels and channels, the configurations, folds and post-processing `predict` runs, the
    training data (cases, median spacing and shape), the cross-validation Dice and, for a package, the versions
    that made it, its description and license. A package is verified and unpacked into the cache first, as
    `predict -m FILE.zip` does.

    Args:
        model: a model package or a workspace folder
    """
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
    recipe: Recipe | None = None,
    gpu_memory_target_gb: float | None = None,
    patch_size: Sequence[int] | None = None,
    width_multiplier: float | None = None,
    precision: Precision = "auto",
    validation_tta: bool = True,
    device: str | None = None,
    seed: int = 0,
    plans_from: str | Path | None = None,
    pretrained: str | Path | None = None,
    loggers: Sequence[Logger] | None = None,
    workers: int | None = None,
    executor: Executor = "local",
    address: str | None = None,
    gpus_per_fold: int | None = None,
    cpus_per_fold: int | None = None,
    max_retries: int | None = None,
) -> RunResult:
    """The whole pipeline: check, plan, preprocess, train every configuration and fold, select (resumable).

    check -> plan -> preprocess -> train every planned configuration on every fold (a cascade's first stage
    first) -> select -> report. Every step is skipped when complete and resumed when partial: re-run the same
    command after a crash to finish the job.

    Args:
        configurations: configurations to train (default: every planned one)
        folds: folds (default 0 1 2 3 4)
        epochs: maximum epochs per fold (default: the training preset's)
        max_minutes: time limit per fold
        width_multiplier: every network stage's features times X (as `autounet train`)
        validation_tta: False: no mirroring when the folds' validation cases are predicted
        executor: local (default): this process; ray: the folds as tasks of a Ray cluster
        gpus_per_fold: GPUs per fold (default: 1 where the cluster has GPUs, else 0); more than 1 trains it under
            torchrun
        cpus_per_fold: CPUs (and PyTorch threads) per fold (default 1)
        max_retries: times a fold whose worker or node is lost is resumed (default 3)

    With ``executor="ray"`` the workspace must be on a file system every node sees.
    """
    from autounet.pipeline.run import RunOptions, run_pipeline

    arguments.executor(executor, address)
    if executor == "local" and (gpus_per_fold, cpus_per_fold, max_retries) != (None, None, None):
        raise AutounetError("--gpus-per-fold, --cpus-per-fold and --max-retries need --executor ray")
    given = dict(locals(), folds=list(folds), configurations=_list(configurations), patch_size=_list(patch_size))
    given.update(loggers=_list(loggers), **_source("pretrained", pretrained), **_source("plans_from", plans_from))
    options = RunOptions(**{f.name: given[f.name] for f in fields(RunOptions) if f.name in given}).validate()
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
    """Make a small synthetic dataset and run the whole pipeline on it on the CPU.

    Write a small synthetic dataset, run `autounet run` on it with a tiny budget, predict its held-out test cases
    with the selected model and print their Dice. Resumable; a few minutes on 2 cores.

    Args:
        folder: demo folder (default ./autounet_demo)
        epochs: epochs per fold
        iterations_per_epoch: training iterations per epoch

    None keeps the demo's budget.
    """
    from autounet.pipeline.demo import DemoSettings, run_demo

    arguments.folder_or_new("--dir", folder)
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
    modality: Literal["MRI", "CT", "mri", "ct"] = "MRI",
    channels: int = 1,
    classes: int = 3,
    seed: int = 0,
    layout: Literal["msd", "nnunetv2"] = "msd",
) -> Path:
    """Write a synthetic MSD-layout dataset.

    Write a small synthetic segmentation dataset (for tests and the demo).

    Args:
        out: output folder
        cases: training cases (default 12)
        test_cases: extra held-out cases in imagesTs/ and labelsTs/ (default 0)
        shape: case shape in voxels, varied +-10% per case (default 32 40 36)
        spacing: voxel spacing in mm (default 1 1 1)
        spacing_jitter: vary each case's spacing by up to +-F (a fraction, default 0)
        modality: MRI (0 outside the body, arbitrary scale) or CT (HU-like)
        channels: image channels (default 1; >1 writes 4D files)
        classes: classes including background (default 3)
        seed: seed of the random images and labels (default 0)
        layout: folder layout (default msd)

    Returns:
        The dataset's folder.
    """
    from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset

    for mm in spacing:  # the rest is checked by SyntheticSpec.validate
        arguments.real("--spacing", mm, above=0)
    arguments.whole("--seed", seed, 0)
    arguments.folder_or_new("OUT", out)
    spec = _pick(locals(), "cases test_cases spacing_jitter modality channels classes seed layout")
    return make_synthetic_dataset(out, SyntheticSpec(**spec, shape=tuple(shape), spacing=tuple(spacing)))


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


def _source(option: str, source: str | Path | None) -> dict[str, str | None]:
    """``--pretrained`` / ``--plans-from`` as the stages take them: where the source lies (a package opened)
    and how logs and plans name it."""
    if source is None:
        return {option: None, f"{option}_label": None}
    return {option: str(_model_source(source)), f"{option}_label": str(source)}


def _model_source(source: str | Path) -> Path:
    """Where a trained or planned source lies (``--plans-from``, ``--pretrained``): a model package
    ``.zip`` is opened (extracted) to its workspace folder ``W/NAME``; anything else is itself."""
    if str(source).lower().endswith(".zip"):
        from autounet.packaging import open_package

        return open_package(source)
    return Path(source)


def _checkpoints(checkpoints: Sequence[str] | None) -> None:
    """``--checkpoint`` of predict / export: each one of :data:`~autounet.workspace.CHECKPOINT_KINDS`."""
    from autounet.workspace import CHECKPOINT_KINDS

    for kind in checkpoints or []:
        if kind not in CHECKPOINT_KINDS:
            raise AutounetError(f"--checkpoint {kind!r}: expected one of {', '.join(CHECKPOINT_KINDS)}")


def _pick(values: Mapping[str, object], names: str) -> dict[str, object]:
    """The entries ``names`` (separated by spaces) of ``values``: the arguments a stage takes as they are."""
    return {name: values[name] for name in names.split()}


def _list(values: Sequence | None) -> list | None:
    return None if values is None else list(values)
