"""`autounet package W/NAME -o FILE.zip`: one file holding everything `predict` needs.

The zip holds, under ``NAME/``, the workspace files prediction reads, laid out as in the
workspace (so that, unpacked, the folder is a ``W/NAME`` that ``predict -m`` takes as it is):
``dataset.json`` (labels and channels; without the raw data's paths and case list),
``plans.json``, ``fingerprint.json`` (its dataset-level summary only: no case ids, crop boxes
or per-case statistics), ``selection.json`` (the model to run and its post-processing), and
the inference checkpoints of every packaged configuration and fold, without their training
state (optimiser, gradient scaler, schedule and random states). ``report.md``, its pictures
(which show a training image with its labels) and the folds' ``progress.png`` only with
``with_report``. ``manifest.json`` names the versions, the description and license, and the
size and SHA-256 of every other file.

Which checkpoints: those `predict -m W/NAME` loads, as :func:`autounet.inference.model.load_stage`
chooses them (``checkpoint_final.pt``, which names the training preset's
``inference_checkpoints``, and those of them that exist); a cascade's second stage brings every
fold of its first stage (as `predict` uses them), also when that stage is itself a member of the
model packaged with fewer folds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from autounet import __version__
from autounet.errors import AutounetError
from autounet.packaging.contents import summary_plain
from autounet.packaging.manifest import (
    PACKAGE_FORMAT,
    PACKAGE_FORMAT_VERSION,
    PackagedFile,
    PackageManifest,
    WorkspaceModel,
    sha256_of_stream,
)
from autounet.planning.fingerprint import load_fingerprint
from autounet.planning.plans import Plans, load_plans
from autounet.selection_document import Selection, Winner, load_selection
from autounet.training.checkpoint import load_checkpoint
from autounet.utils.atomic import atomic_write, dumps_json
from autounet.utils.loaders import read_json
from autounet.utils.plain_data import to_plain
from autounet.utils.temporary import is_stale
from autounet.workspace import (
    CHECKPOINT_KINDS,
    Workspace,
    checkpoint_path,
    fold_folders,
    progress_plot_path,
    validate_name,
)

# The training state a checkpoint carries for resuming, which inference never reads.
TRAINING_STATE = ("optimizer", "scaler", "schedule", "rng")
# dataset.json entries that describe the raw dataset on the packaging machine, not the model.
RAW_DATASET_KEYS = ("raw_path", "training", "test")


@dataclass
class CreatedPackage:
    """What :func:`create_package` wrote."""

    path: Path
    sha256: str  # of the whole file: the key of its unpacked copy in the cache
    size: int  # bytes
    configurations: list[str]
    folds: list[int]
    checkpoints: int  # checkpoint files, a cascade's first stage included
    postprocessing: bool  # the selection's post-processing is packaged (False: none applies)
    selection_changed: bool  # the package runs other configurations or folds than `select` chose


def create_package(
    root: str | Path,
    output: str | Path,
    configurations: list[str] | None = None,
    folds: list[int] | None = None,
    description: str = "",
    license: str = "",
    overwrite: bool = False,
    with_report: bool = False,
) -> CreatedPackage:
    """Write the model package of the workspace folder ``root`` (``W/NAME``) to ``output`` (a ``.zip``).

    Default: the model `autounet select` chose (its configurations, folds and post-processing).
    ``configurations`` / ``folds``: package those instead; the package's ``selection.json`` then
    names them as its model, with no post-processing unless the configurations are the selected
    ones (the post-processing was decided on their cross-validation predictions).
    ``with_report``: add ``report.md``, its pictures and the folds' ``progress.png`` (they show
    training data: an example case with its labels, per-case results).
    """
    root, output = Path(root), Path(output)
    ws = Workspace.of(root)
    if not root.is_dir():
        raise AutounetError(f"{root}: not a workspace folder (give W/NAME, the folder `autounet run` wrote)")
    validate_name(ws.name)
    if output.suffix.lower() != ".zip":
        raise AutounetError(f"{output}: a package is a .zip file; give -o NAME.zip")
    if output.is_dir():
        raise AutounetError(f"{output}: a folder, where the package file should be written")
    if output.exists() and not overwrite:
        raise AutounetError(f"{output} already exists; add --overwrite to replace it")
    plans = load_plans(ws.plans_json)
    if not ws.selection_json.is_file():
        raise AutounetError(
            f"{root}: no {ws.selection_json.name} yet: run `autounet select {ws.name} --work {ws.work}` first "
            "(the package's selection.json says what `predict` runs, also with --configs)"
        )
    selection = load_selection(ws.selection_json)
    packaged, changed = _packaged_selection(selection, plans, configurations, folds, output.name)

    documents: dict[str, bytes] = {}
    documents[_relative(ws, ws.dataset_json)] = _dataset_json(ws)
    documents[_relative(ws, ws.plans_json)] = ws.plans_json.read_bytes()
    if ws.fingerprint_json.is_file():
        summary = summary_plain(load_fingerprint(ws.fingerprint_json))
        documents[_relative(ws, ws.fingerprint_json)] = _json_bytes(summary, ws.fingerprint_json)
    documents[_relative(ws, ws.selection_json)] = _json_bytes(packaged.to_plain(), ws.selection_json)
    pictures: list[Path] = []
    if with_report and ws.report_md.is_file():
        documents[_relative(ws, ws.report_md)] = ws.report_md.read_bytes()
        if ws.report_figures_dir.is_dir():
            pictures += sorted(p for p in ws.report_figures_dir.glob("*.png") if p.is_file())

    checkpoints: list[Path] = []
    for configuration, fold_names in _stages_to_package(ws, plans, packaged.winner).items():
        for fold in fold_names:
            fold_dir = ws.fold_dir(configuration, fold)
            checkpoints += _inference_checkpoints(fold_dir)
            if with_report and progress_plot_path(fold_dir).is_file():
                pictures.append(progress_plot_path(fold_dir))

    created = datetime.now(timezone.utc).replace(microsecond=0)
    stamp = created.timetuple()[:6]
    files: dict[str, PackagedFile] = {}

    def add(archive: zipfile.ZipFile, name: str, data: bytes, compress: bool) -> None:
        info = zipfile.ZipInfo(f"{ws.name}/{name}", date_time=stamp)
        info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
        info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        archive.writestr(info, data)
        if name in files:
            raise AssertionError(f"{name} packaged twice")
        files[name] = PackagedFile(size=len(data), sha256=_sha256(data))

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w") as archive:
            for name, data in documents.items():
                add(archive, name, data, compress=True)
            for path in pictures:
                add(archive, _relative(ws, path), path.read_bytes(), compress=False)
            for path in checkpoints:
                add(archive, _relative(ws, path), _stripped_checkpoint(path), compress=False)
            manifest = PackageManifest(
                format=PACKAGE_FORMAT,
                format_version=PACKAGE_FORMAT_VERSION,
                autounet_version=__version__,
                torch_version=str(torch.__version__),
                created=created.isoformat(),
                dataset=ws.name,
                description=description,
                license=license,
                files=dict(files),
                workspace_model=WorkspaceModel(
                    name=selection.winner.name,
                    members=list(selection.winner.members),
                    folds=list(selection.winner.folds),
                ),
            )
            add(archive, _relative(ws, ws.package_manifest_json), _json_bytes(to_plain(manifest), output), True)
            files.pop(_relative(ws, ws.package_manifest_json))

    _remove_abandoned(output)
    atomic_write(output, write)
    with open(output, "rb") as fh:
        digest, size = sha256_of_stream(fh)
    return CreatedPackage(
        path=output,
        sha256=digest,
        size=size,
        configurations=list(packaged.winner.members),
        folds=list(packaged.winner.folds),
        checkpoints=len(checkpoints),
        postprocessing=packaged.postprocessing is not None,
        selection_changed=changed,
    )


def _packaged_selection(
    selection: Selection,
    plans: Plans,
    configurations: list[str] | None,
    folds: list[int] | None,
    package_name: str,
) -> tuple[Selection, bool]:
    """The package's ``selection.json``: the workspace's, or one whose winner is the configurations
    and folds asked for (post-processing only when they are the selected configurations)."""
    winner = selection.winner
    members = list(configurations) if configurations else list(winner.members)
    if len(set(members)) != len(members):
        raise AutounetError(f"--configs: a configuration is named twice ({' '.join(members)})")
    for name in members:
        plans.configuration(name)  # an unplanned one is an error naming the planned ones
    same_members = sorted(members) == sorted(winner.members)
    if same_members:
        members = list(winner.members)
    chosen = list(winner.folds)
    if folds:
        chosen = []
        for f in folds:
            if isinstance(f, bool) or not isinstance(f, int) or f < 0:
                raise AutounetError(f"--folds: {f!r} is not a fold number (0, 1, ...)")
            if f in chosen:
                raise AutounetError(f"--folds: fold {f} is named twice")
            chosen.append(f)
    changed = not same_members or chosen != list(winner.folds)
    packaged = dataclasses.replace(
        selection,
        winner=Winner(name="+".join(members), members=members, folds=chosen) if changed else winner,
        postprocessing=selection.postprocessing if same_members else None,
        predict_command=f"autounet predict -i IMAGES -o OUT -m {package_name}",
    )
    return packaged, changed


def _stages_to_package(ws: Workspace, plans: Plans, winner: Winner) -> dict[str, list[str]]:
    """Configuration -> the folds to package: the winner's folds of each member, and every fold of
    a cascade's earlier stages (what `predict` loads for them: each numbered fold, else ``all``)."""
    out: dict[str, list[str]] = {}
    for member in winner.members:
        names = [str(f) for f in winner.folds]
        for name in names:
            if not ws.fold_dir(member, name).is_dir():
                raise AutounetError(f"{ws.fold_dir(member, name)}: not found ({member} fold {name} is not trained)")
        out[member] = sorted(set(out.get(member, [])) | set(names), key=_fold_key)
        previous, needed_by = plans.configuration(member).previous_stage, member
        while previous:
            every = _trained_fold_names(ws, previous, needed_by)
            out[previous] = sorted(set(out.get(previous, [])) | set(every), key=_fold_key)
            previous, needed_by = plans.configuration(previous).previous_stage, previous
    return out


def _fold_key(name: str) -> tuple[int, int]:
    return (1, 0) if name == "all" else (0, int(name))


def _remove_abandoned(output: Path) -> None:
    """Delete the temporaries of earlier writes of ``output`` whose process was killed
    (``.autounet-tmp.*.NAME.zip`` beside it, as large as a package); nothing else."""
    try:
        entries = list(output.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.endswith("." + output.name):
            continue
        try:
            if entry.is_file() and not entry.is_symlink() and is_stale(entry.name, entry.lstat().st_mtime):
                entry.unlink()
        except OSError:
            continue


def _trained_fold_names(ws: Workspace, configuration: str, needed_by: str) -> list[str]:
    results = ws.results_dir(configuration)
    found = list(fold_folders(results))
    numbered = [f for f in found if f != "all"]
    if numbered:
        return numbered
    if "all" in found:
        return ["all"]
    raise AutounetError(
        f"{results}: the cascade stage {needed_by} needs its first stage {configuration}, which holds no trained folds"
    )


def predicted_checkpoints(fold_dir: Path) -> list[str]:
    """The checkpoint kinds `predict` loads for a fold by default, as
    :func:`autounet.inference.model.load_stage` chooses them: those its training preset names
    (``inference_checkpoints``, stored in ``checkpoint_final.pt``) that exist, else ``final``."""
    final = checkpoint_path(fold_dir, "final")
    if not final.is_file():
        raise AutounetError(
            f"{final}: not found (this fold's training has not finished; resume it, or leave the fold out)"
        )
    preset = load_checkpoint(final, mmap=True).get("training_preset") or {}
    wanted = [str(k) for k in preset.get("inference_checkpoints") or ["final"]]
    found = [k for k in dict.fromkeys(wanted) if k in CHECKPOINT_KINDS and checkpoint_path(fold_dir, k).is_file()]
    return found or ["final"]


def _inference_checkpoints(fold_dir: Path) -> list[Path]:
    """The checkpoints `predict` loads for the fold, and ``checkpoint_final.pt``, which names them."""
    kinds = ["final", *(k for k in predicted_checkpoints(fold_dir) if k != "final")]
    return [checkpoint_path(fold_dir, k) for k in kinds]


def _stripped_checkpoint(path: Path) -> bytes:
    """The checkpoint's bytes without its training state (weights, network spec, plan and presets kept)."""
    content = load_checkpoint(path, mmap=True)
    training = content.get("training")
    if isinstance(training, dict):
        content = {**content, "training": {k: (None if k in TRAINING_STATE else v) for k, v in training.items()}}
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


def _dataset_json(ws: Workspace) -> bytes:
    """The workspace's ``dataset.json`` (labels, channels, description) without the raw dataset's paths."""
    descriptor = read_json(ws.dataset_json, dict)
    return _json_bytes({k: v for k, v in descriptor.items() if k not in RAW_DATASET_KEYS}, ws.dataset_json)


def _json_bytes(data: Any, where: Path) -> bytes:
    try:
        return (dumps_json(data) + "\n").encode("utf-8")
    except ValueError as exc:  # NaN or infinity: not JSON
        raise AutounetError(f"{where}: cannot be written as JSON ({exc})") from None


def _relative(ws: Workspace, path: Path) -> str:
    return path.relative_to(ws.root).as_posix()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
