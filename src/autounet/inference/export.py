"""Export a trained model as ONNX / OpenVINO files and a ``model.json`` that describes, without
autounet, everything ``autounet predict`` does with them (issue 12; schema: docs/model_json.md).

``MODEL`` is whatever ``autounet predict -m`` accepts: the dataset's workspace ``W/NAME`` (the
configuration or pair ``autounet select`` chose, its folds and post-processing), a configuration
folder ``W/NAME/results/CONFIG`` (the ensemble of its folds) or one ``fold_K`` folder. One network
file is written per fold and checkpoint (``CONFIG.foldK.KIND.onnx``, and ``.xml`` + ``.bin`` for
OpenVINO), each with a dynamic batch axis and the training patch as its spatial shape. A cascade
(``3d_cascade_fullres``) is refused: its second stage needs the first stage's prediction,
resampled and one-hot encoded, as extra input channels, which ``model.json`` does not describe.

``examples/onnx_predict.py`` reproduces ``autounet predict`` from an export folder with numpy,
scipy, SimpleITK and onnxruntime only.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from autounet.data.inspect import BACKGROUND_TOLERANCE
from autounet.errors import AutounetError
from autounet.inference.engines import (
    INPUT_NAME,
    ONNX_OPSET,
    OUTPUT_NAME,
    engine_version,
    network_digest,
    onnx_exporter_available,
    write_onnx,
    write_openvino_ir,
    write_openvino_ir_from_network,
)
from autounet.inference.model import StageModel, fold_dirs
from autounet.inference.predictor import resolve_model
from autounet.planning.plans import ChannelNormalization
from autounet.postprocessing.apply import Postprocessing
from autounet.regions import RegionSet
from autounet.training.checkpoint import load_checkpoint
from autounet.utils.atomic import atomic_write_json, make_folder
from autounet.utils.plain_data import from_plain, read_json_document, to_plain
from autounet.utils.temporary import remove_stale_temporaries, temporary_prefix
from autounet.workspace import CHECKPOINT_KINDS, checkpoint_path

MODEL_FORMAT = "autounet-export"
MODEL_SCHEMA_VERSION = 1
MODEL_FILE = "model.json"
FORMATS = ("onnx", "openvino")
_ENGINE_OF_FORMAT = {"onnx": "onnxruntime", "openvino": "openvino"}
GAUSSIAN_SIGMA_FRACTION = 1 / 8


# ---------------------------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------------------------


@dataclass
class CropRule:
    """Cropping to the foreground's bounding box (before anything else, on the raw grid).

    The foreground is every voxel where any channel differs from that channel's background value
    (``background`` None: 0 for every channel, compared exactly; otherwise per channel a number, or
    null: this case's own value, that of its 8 corner voxels when they agree within
    ``tolerance``, else 0; a nonzero background is compared within ``tolerance``). No foreground
    voxel: no crop. The nonzero *mask* used by normalisation and the foreground channel is the
    cropped foreground with its holes filled (3D hole filling, face connectivity).
    """

    kind: str
    background: list[float | None] | None
    tolerance: float
    mask_fill_holes: bool = True


@dataclass
class ResamplingRule:
    """Resampling to the target spacing and back.

    Shape at the target spacing: ``max(1, round(n * spacing / target))`` per axis. ``separate
    axis``: when the case's spacing (network order) has max / min > ``anisotropy_threshold``, its
    coarsest axis; else the same test on the target spacing; else none. One axis at a time, the
    axes in increasing order of ``n_out / n_in`` (stable), an axis whose length does not change is
    left alone. Source coordinate of output voxel i: ``(i + 0.5) * n_in / n_out - 0.5``. Order 3:
    cubic B-spline with mirror boundary (``scipy.ndimage.spline_filter1d(mode="mirror")`` then the
    4 cubic B-spline weights at mirrored indices); order 1: linear, coordinate clamped to
    ``[0, n_in - 1]``; order 0: nearest, index ``clip(floor(x + 0.5), 0, n_in - 1)``. Images use
    ``image_order`` (``image_order_separate_axis`` along the separate axis), the mask
    ``mask_order``; probabilities go back to the cropped grid with ``revert_order``
    (``revert_order_separate_axis`` along the separate axis). All in float32.
    """

    anisotropy_threshold: float
    image_order: int
    image_order_separate_axis: int
    mask_order: int = 0
    revert_order: int = 1
    revert_order_separate_axis: int = 0


@dataclass
class Preprocessing:
    """One member's preprocessing, in this order: crop, transpose, resample, normalise.

    ``transpose_forward``: raw array axis (z, y, x) of each network axis (``image.transpose(0,
    *[a + 1 for a in transpose_forward])``); ``transpose_backward`` undoes it. ``target_spacing``
    in network order, mm. ``normalization``: one entry per image channel (see docs/model_json.md:
    ``ct`` clips to ``[clip_low, clip_high]`` and uses ``mean``/``std``; ``zscore`` and
    ``rescale_0_1`` use this case's statistics, inside the mask when ``use_nonzero_mask``).
    ``zero_outside_mask``: channels without ``use_nonzero_mask`` are set to 0 outside the mask too
    (the BraTS recipe). ``foreground_channel``: the mask is appended as one more input channel (1/0).
    """

    transpose_forward: list[int]
    transpose_backward: list[int]
    target_spacing: list[float]
    crop: CropRule
    resampling: ResamplingRule
    normalization: list[ChannelNormalization]
    zero_outside_mask: bool
    foreground_channel: bool
    epsilon: float = 1e-8  # the divisor is max(std, epsilon)


@dataclass
class Tiling:
    """The sliding window in the preprocessed (network-order) grid.

    A 2D member (``network_dims`` 2) runs over the slices of network axis 0 (each slice a tile
    row), with ``patch_size`` in-plane. Images smaller than the patch are zero-padded, centred
    (``before = pad // 2``). Tile starts per axis: one at 0 when the axis fits in the patch, else
    ``n = ceil((size - patch) / (patch * step)) + 1`` starts ``round(i * (size - patch) / (n - 1))``.
    Each tile's softmax (or sigmoid) is averaged over every subset of ``mirror_axes`` flipped
    (spatial axes of the network input; flip the input, flip the output back), multiplied by a
    Gaussian ``exp(-0.5 * ((i - (p - 1) / 2) / (p * gaussian_sigma_fraction)) ** 2)`` per axis
    (normalised to a maximum of 1, its zeros raised to its smallest positive value) and summed;
    the sum is divided by the summed weights.
    """

    network_dims: int
    patch_size: list[int]
    step: float
    gaussian_sigma_fraction: float
    mirror_axes: list[int]


@dataclass
class NetworkFile:
    """One trained network (a fold's checkpoint) and its exported files (relative to model.json)."""

    fold: str
    checkpoint: str
    files: dict[str, str]  # format -> file name (openvino: the .xml; its .bin lies beside it)
    sha256: str  # of the network's structure and weights (autounet.inference.engines.network_digest)


@dataclass
class Member:
    """One configuration of the model: its networks are averaged (in its preprocessed grid)."""

    configuration: str
    input_channels: int
    num_outputs: int
    preprocessing: Preprocessing
    tiling: Tiling
    networks: list[NetworkFile]


@dataclass
class Output:
    """From probabilities to labels.

    ``softmax``: output channel k is class ``label_values[k]``; the label is the argmax (ties: the
    lowest k). ``sigmoid``: output channel r is ``regions.regions[r]``; the label map starts at 0
    and each region, outermost first, paints its ``paint`` value where its probability is >= its
    threshold (``hierarchical``: and inside every earlier region holding all its labels).
    Probabilities return to the input grid per channel (``ResamplingRule.revert_order``), outside
    the crop box background is 1 and every other class 0 (regions: 0).
    """

    activation: str
    label_values: list[int]
    regions: RegionSet | None


@dataclass
class ModelDocument:
    """``model.json``: see docs/model_json.md."""

    format: str
    dataset: str
    source: str
    labels: dict[str, str]  # label value (as text) -> name
    channel_names: list[str]
    image_channels: int
    input_name: str
    output_name: str
    formats: list[str]
    output: Output
    members: list[Member]
    ensemble: str
    postprocessing: Postprocessing | None
    versions: dict[str, str]
    schema_version: int = MODEL_SCHEMA_VERSION
    notes: list[str] = field(default_factory=list)


ENSEMBLE_RULE = (
    "per member: the mean of its networks' probabilities in its preprocessed grid, reverted to the "
    "input grid; then the mean over members; then labels (output) and post-processing"
)


def load_model_document(path: str | Path) -> ModelDocument:
    """Read a ``model.json`` strictly (one error naming the file and field when malformed)."""
    data = read_json_document(path, "exported model", MODEL_SCHEMA_VERSION, hint="run `autounet export` first")
    try:
        doc = from_plain(ModelDocument, data, str(path))
    except AutounetError as exc:
        raise AutounetError(f"malformed exported model: {exc}") from None
    if doc.format != MODEL_FORMAT:
        raise AutounetError(f"{path}: not an autounet export (format {doc.format!r})")
    return doc


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _fold_and_kind(source: Path) -> tuple[str, str]:
    """The fold name and checkpoint kind of a checkpoint file of a fold folder."""
    fold_dir = source.parent
    folds = fold_dirs(fold_dir)
    fold = next(iter(folds)) if len(folds) == 1 and folds[next(iter(folds))] == fold_dir else fold_dir.name
    kind = next((k for k in CHECKPOINT_KINDS if checkpoint_path(fold_dir, k) == source), source.stem)
    return fold, kind


def _member_document(stage: StageModel, step: float) -> Member:
    plan = stage.plan
    rs = plan.resampling
    preprocessing = Preprocessing(
        transpose_forward=list(plan.transpose_forward),
        transpose_backward=list(plan.transpose_backward),
        target_spacing=[float(s) for s in plan.spacing],
        crop=CropRule(
            kind="nonzero",
            background=list(plan.background) if plan.background is not None else None,
            tolerance=BACKGROUND_TOLERANCE,
        ),
        resampling=ResamplingRule(
            anisotropy_threshold=float(rs.anisotropy_threshold),
            image_order=int(rs.image_order),
            image_order_separate_axis=int(rs.image_order_low_res_axis),
        ),
        normalization=[replace(n) for n in plan.normalization],
        zero_outside_mask=plan.background is not None,
        foreground_channel=bool(plan.foreground_channel),
    )
    tiling = Tiling(
        network_dims=plan.network_dims,
        patch_size=[int(p) for p in plan.patch_size],
        step=float(step),
        gaussian_sigma_fraction=GAUSSIAN_SIGMA_FRACTION,
        mirror_axes=[int(a) for a in stage.mirror_axes],
    )
    return Member(stage.configuration, stage.spec.in_channels, stage.num_outputs, preprocessing, tiling, [])


def _versions(formats: Sequence[str]) -> dict[str, str]:
    import autounet

    out = {
        "autounet": autounet.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "onnx_opset": str(ONNX_OPSET),
    }
    try:
        import onnx

        out["onnx"] = onnx.__version__
    except Exception:
        pass
    if "openvino" in formats:
        out["openvino"] = engine_version("openvino")
    return out


def _check_formats(formats: Sequence[str]) -> list[str]:
    chosen = list(dict.fromkeys(formats))
    if not chosen:
        raise AutounetError(f"give at least one export format ({', '.join(FORMATS)})")
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        raise AutounetError(f"unknown export format(s) {', '.join(unknown)}: use {', '.join(FORMATS)}")
    if "onnx" in chosen and not onnx_exporter_available():
        raise AutounetError(
            "the onnx package is not installed (PyTorch's exporter needs it): pip install 'autounet[onnx]'"
        )
    if "openvino" in chosen:
        try:
            engine_version("openvino")
        except AutounetError:
            raise AutounetError(
                "OpenVINO is not installed: pip install 'autounet[openvino]', or export --format onnx"
            ) from None
    return chosen


def _dataset_name(stage: StageModel) -> str:
    try:
        return str(load_checkpoint(stage.sources[0], mmap=True).get("dataset") or "")
    except AutounetError:
        return ""


@dataclass
class _Planned:
    """One network to export: where it comes from and the stem of its files."""

    member: StageModel
    network: torch.nn.Module
    fold: str
    kind: str
    stem: str


def _file_names(plan: _Planned, chosen: Sequence[str]) -> list[str]:
    """The files one network becomes in the export folder, in the order they are moved there."""
    names = [f"{plan.stem}.onnx"] if "onnx" in chosen else []
    return names + ([f"{plan.stem}.bin", f"{plan.stem}.xml"] if "openvino" in chosen else [])


def _check_targets(out_dir: Path, names: Sequence[str], overwrite: bool) -> None:
    """Refuse to replace anything in ``out_dir`` unless ``overwrite``, and a folder where a file goes."""
    folders = [out_dir / n for n in names if (out_dir / n).is_dir() and not (out_dir / n).is_symlink()]
    if folders:
        raise AutounetError(f"{folders[0]}: a folder, where the export writes a file: choose another output folder")
    there = [n for n in names if (out_dir / n).exists() or (out_dir / n).is_symlink()]
    if there and not overwrite:
        listed = ", ".join(there[:6]) + (f" and {len(there) - 6} more" if len(there) > 6 else "")
        raise AutounetError(
            f"{out_dir}: {listed} {'exists' if len(there) == 1 else 'exist'} already and would be replaced: "
            "choose another folder, or give --overwrite to replace them"
        )


def _export_network(plan: _Planned, chosen: Sequence[str], staging: Path, shape: tuple[int, ...]) -> None:
    """Write one network's files for ``chosen`` formats into ``staging``; an exporter's failure
    (anything but a file-system error) becomes one :class:`AutounetError` naming the network."""
    onnx_path = staging / f"{plan.stem}.onnx"
    via_onnx = onnx_exporter_available()
    step = "ONNX"
    try:
        if via_onnx:
            write_onnx(plan.network, onnx_path, shape)
        if "openvino" in chosen:
            step = "OpenVINO"
            if via_onnx:
                write_openvino_ir(onnx_path, staging / f"{plan.stem}.xml")
            else:  # OpenVINO's PyTorch frontend
                write_openvino_ir_from_network(plan.network, staging / f"{plan.stem}.xml", shape)
    except (AutounetError, OSError):
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise AutounetError(
            f"cannot export {plan.member.configuration} fold {plan.fold} ({plan.kind} checkpoint) to {step}: "
            f"{type(exc).__name__}{': ' + first if first else ''}"
        ) from None


def export_model(
    model: str | Path,
    out_dir: str | Path,
    formats: Sequence[str] = FORMATS,
    *,
    folds: Sequence[int | str] | None = None,
    checkpoints: Sequence[str] | None = None,
    postprocess: bool = True,
    step: float = 0.5,
    overwrite: bool = False,
) -> Path:
    """Export ``model`` (as ``autounet predict -m`` takes it) into ``out_dir``; returns the path
    of the ``model.json`` written.

    ``formats``: ``onnx`` and/or ``openvino``. ``folds``, ``checkpoints`` and ``postprocess`` as
    for ``autounet predict``; ``step`` is recorded as the tiling step. Every file is written into
    a temporary folder inside ``out_dir`` and moved into place when all are written, ``model.json``
    last; a failure leaves nothing behind. A file of ``out_dir`` that the export would replace is
    refused (all of them named, before anything is written) unless ``overwrite``; no other file
    of ``out_dir`` is touched. A cascade raises :class:`AutounetError`.
    """
    chosen = _check_formats(formats)
    if not 0 < step <= 1:
        raise AutounetError(f"step must be in (0, 1], got {step}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AutounetError(f"{out_dir}: a file, not a folder: the export goes into a folder")
    members, postprocessing = resolve_model(model, folds, checkpoints, postprocess)
    for m in members:
        if m.previous is not None or m.plan.previous_stage:
            raise AutounetError(
                f"{m.configuration} is a cascade stage (it needs {m.plan.previous_stage}'s prediction as input): "
                "exporting cascades is not supported; export another configuration (e.g. 3d_fullres or 2d)"
            )
    planned = []
    for m in members:
        for network, source in zip(m.networks, m.sources):
            fold, kind = _fold_and_kind(Path(source))
            planned.append(_Planned(m, network.to("cpu").eval(), fold, kind, f"{m.configuration}.fold{fold}.{kind}"))
    names = [n for p in planned for n in _file_names(p, chosen)] + [MODEL_FILE]
    _check_targets(out_dir, names, overwrite)

    first = members[0]
    member_docs = {id(m): _member_document(m, step) for m in members}
    for p in planned:
        files = {fmt: f"{p.stem}.{'xml' if fmt == 'openvino' else 'onnx'}" for fmt in FORMATS if fmt in chosen}
        member_docs[id(p.member)].networks.append(NetworkFile(p.fold, p.kind, files, network_digest(p.network)))
    if postprocessing is not None and postprocessing.decision is not None:
        postprocessing = replace(postprocessing, decision=replace(postprocessing.decision, evidence={}))
    document = ModelDocument(
        format=MODEL_FORMAT,
        dataset=_dataset_name(first),
        source=str(Path(model)),
        labels=dict(first.labels),
        channel_names=list(first.channel_names),
        image_channels=first.image_channels,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        formats=chosen,
        output=Output(first.activation, list(first.label_values), first.regions),
        members=[member_docs[id(m)] for m in members],
        ensemble=ENSEMBLE_RULE,
        postprocessing=postprocessing,
        versions=_versions(chosen),
    )
    _write_export(out_dir, planned, chosen, names, document)
    return out_dir / MODEL_FILE


def _write_export(
    out_dir: Path, planned: Sequence[_Planned], chosen: Sequence[str], names: Sequence[str], document: ModelDocument
) -> None:
    """Write everything into a temporary folder in ``out_dir``, then move it into place."""
    created = not out_dir.exists()
    try:
        make_folder(out_dir)
        remove_stale_temporaries(out_dir)  # what an export killed half-way left
        staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(), suffix=".export", dir=out_dir))
    except OSError as exc:
        raise AutounetError(f"{out_dir}: cannot write the export there ({exc.strerror or exc})") from None
    try:
        for p in planned:
            _export_network(p, chosen, staging, (2, p.member.spec.in_channels, *p.member.plan.patch_size))
        atomic_write_json(staging / MODEL_FILE, to_plain(document))
        (out_dir / MODEL_FILE).unlink(missing_ok=True)  # no model.json naming a mix of old and new files
        for name in names:  # model.json last: the export is complete when it is there
            os.replace(staging / name, out_dir / name)
    except OSError as exc:
        name = Path(exc.filename).name if exc.filename else ""
        where = out_dir / name if name and name in names else out_dir
        raise AutounetError(f"{where}: cannot write the export ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not (out_dir / MODEL_FILE).exists():
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only when empty: the folder this export made and could not fill
