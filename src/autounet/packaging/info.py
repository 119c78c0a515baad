"""`autounet info FILE.zip|W/NAME`: what a trained model is, read from its documents.

Labels and channels (``plans.json``), the model `predict` runs (``selection.json``: its
configurations, folds and post-processing), the training data (``fingerprint.json`` and the
plans' median spacing and shape), the cross-validation Dice (the selection's ranking) and, for a
package, its manifest (versions, description, license) and what it contains. A package is
verified and unpacked into the cache first (:func:`~autounet.packaging.open.open_package`), as
`predict` does. The cross-validation Dice is the workspace's: for a package of other folds or
configurations than the workspace's model it is labelled as that model's, not the package's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from autounet.errors import AutounetError
from autounet.packaging.contents import load_fingerprint_document
from autounet.packaging.create import predicted_checkpoints
from autounet.packaging.manifest import PackageManifest, WorkspaceModel, read_manifest_bytes
from autounet.packaging.open import open_package
from autounet.planning.plans import Plans, load_plans
from autounet.planning.summary import network_description
from autounet.selection_document import Selection, load_selection
from autounet.training.checkpoint import load_checkpoint
from autounet.utils.loaders import read_json
from autounet.workspace import Workspace, checkpoint_path, fold_folders


@dataclass
class ConfigurationInfo:
    """One configuration of the model (or, without a selection, one trained configuration)."""

    name: str
    network_dims: int
    spacing: list[float]  # mm, network order
    transpose_forward: list[int]  # raw (Z, Y, X) axis -> network axis
    patch_size: list[int]
    folds: list[str]  # trained folds present (the model's folds when there is a selection)
    checkpoints: list[str]  # the checkpoint kinds `predict` loads for each fold
    previous_stage: str | None  # a cascade's first stage (part of the model too)
    initialised_from: str | None = None  # `train --pretrained`: the source run its first fold started from
    network: str = ""  # the network in words (blocks per stage, estimated memory): planning.summary


@dataclass
class PackageDetails:
    """A package's manifest, with the file's checksum and size."""

    path: Path | None  # the .zip (None: an unpacked package folder given directly)
    sha256: str | None
    size: int | None
    format_version: int
    autounet_version: str
    torch_version: str
    created: str
    description: str
    license: str
    files: int
    contents: list[str] = field(default_factory=list)  # what the package holds, in words
    workspace_model: WorkspaceModel | None = None  # what its workspace's `select` chose (format 2 on)


@dataclass
class ModelInfo:
    """What :func:`model_info` found."""

    source: Path  # what was given
    workspace: Path  # the W/NAME folder read (the unpacked copy, for a package)
    dataset: str
    labels: dict[str, str]  # label value -> name
    channels: list[str]
    normalization: list[str]  # per channel: its scheme (ct, zscore, ...)
    recipe: str
    model: str | None  # what `predict -m` runs (the selection's winner); None: no selection yet
    folds: list[int]
    configurations: list[ConfigurationInfo]
    postprocessing: str | None  # what is applied after prediction (None: nothing)
    training_cases: int | None
    median_spacing: list[float]  # mm, (z, y, x) of the raw images
    median_shape: list[int]  # after cropping, at the median spacing
    cv_cases: int | None  # cross-validation cases behind the scores
    cv_dice: float | None  # the model's mean foreground Dice in cross-validation
    cv_dice_postprocessed: float | None  # ... after its post-processing
    cv_dice_per_class: dict[str, float | None] = field(default_factory=dict)
    # None: the scores are of this model; else what they are of (the workspace's model, when the
    # package runs other folds or configurations: then they are not this package's accuracy)
    cv_of: str | None = None
    ranking: dict[str, float | None] = field(default_factory=dict)  # every candidate -> its Dice, best first
    package: PackageDetails | None = None


def model_info(target: str | Path) -> ModelInfo:
    """Describe the model package ``target`` (``.zip``) or the workspace folder ``W/NAME``."""
    target = Path(target)
    details = None
    if target.is_file() or target.suffix.lower() == ".zip":
        root = open_package(target)
        size = target.stat().st_size if target.is_file() else None
        details = _details(Workspace.of(root), target, root.parent.name, size)  # the entry's key: its SHA-256
    else:
        root = target
        if not root.is_dir():
            raise AutounetError(f"{target}: not found (give a model package FILE.zip or a workspace folder W/NAME)")
        ws = Workspace.of(root)
        if not ws.plans_json.is_file():
            raise AutounetError(f"{target}: not a workspace folder W/NAME ({ws.plans_json.name} not found)")
        if ws.package_manifest_json.is_file():  # an unpacked package
            details = _details(ws, None, None, None)
    ws = Workspace.of(root)
    plans = load_plans(ws.plans_json)
    selection = load_selection(ws.selection_json) if ws.selection_json.is_file() else None
    first = next(iter(plans.configurations.values()))
    info = ModelInfo(
        source=target,
        workspace=root,
        dataset=plans.dataset_name,
        labels=dict(plans.labels),
        channels=list(plans.channel_names),
        normalization=[n.scheme for n in first.normalization],
        recipe=plans.recipe,
        model=selection.winner.name if selection else None,
        folds=list(selection.winner.folds) if selection else [],
        configurations=_configurations(ws, plans, selection),
        postprocessing=None,
        training_cases=_training_cases(ws),
        median_spacing=list(plans.original_median_spacing),
        median_shape=list(plans.original_median_shape),
        cv_cases=None,
        cv_dice=None,
        cv_dice_postprocessed=None,
        package=details,
    )
    if selection is not None:
        _scores(info, selection)
        if details is not None and details.workspace_model is not None:
            info.cv_of = _scores_of(details.workspace_model, selection)
    return info


def _scores_of(workspace: WorkspaceModel, selection: Selection) -> str | None:
    """What the scores of a package's selection describe when it is not the packaged model."""
    winner = selection.winner
    if sorted(workspace.members) == sorted(winner.members) and sorted(workspace.folds) == sorted(winner.folds):
        return None
    return (
        f"the workspace's model {workspace.name} with folds {', '.join(map(str, workspace.folds))}; "
        f"this package runs {winner.name} with folds {', '.join(map(str, winner.folds))}, whose own accuracy "
        "was not measured"
    )


def _details(ws: Workspace, path: Path | None, sha256: str | None, size: int | None) -> PackageDetails:
    try:
        raw = ws.package_manifest_json.read_bytes()
    except OSError as exc:
        raise AutounetError(f"{ws.package_manifest_json}: cannot read the file ({exc.strerror or exc})") from None
    manifest = read_manifest_bytes(raw, str(ws.package_manifest_json))
    return PackageDetails(
        path=path,
        sha256=sha256,
        size=size,
        format_version=manifest.format_version,
        autounet_version=manifest.autounet_version,
        torch_version=manifest.torch_version,
        created=manifest.created,
        description=manifest.description,
        license=manifest.license,
        files=len(manifest.files) + 1,
        contents=_contents(manifest),
        workspace_model=manifest.workspace_model,
    )


def _contents(manifest: PackageManifest) -> list[str]:
    """What a package holds, in words, from its manifest's file list."""
    names = list(manifest.files)
    layout = Workspace(Path("."), "package")  # the package's files keep their workspace names

    def held(path: Path) -> bool:
        return path.relative_to(layout.root).as_posix() in names

    checkpoints = [n for n in names if n.endswith(".pt")]
    pictures = [n for n in names if n.endswith(".png")]
    out = [f"{len(checkpoints)} checkpoint(s) (weights, network and plan; no training state)"]
    out += [path.name for path in (layout.plans_json, layout.selection_json) if held(path)]
    if held(layout.dataset_json):
        out.append(f"{layout.dataset_json.name} (labels, channels; no case list)")
    if held(layout.fingerprint_json):
        out.append(
            f"{layout.fingerprint_json.name} (dataset summary, no per-case data)"
            if manifest.format_version >= 2
            else f"{layout.fingerprint_json.name} (with every training case's id and statistics)"
        )
    if held(layout.report_md) or pictures:
        out.append(f"{layout.report_md.name} and {len(pictures)} picture(s) (an example training case with its labels)")
    else:
        out.append("no report")
    return out


def _configurations(ws: Workspace, plans: Plans, selection: Selection | None) -> list[ConfigurationInfo]:
    """The model's configurations (a cascade's first stage included), else every trained one."""
    if selection is not None:
        names, seen = [], set()
        for member in selection.winner.members:
            chain = [member]
            while plans.configuration(chain[-1]).previous_stage:
                chain.append(plans.configuration(chain[-1]).previous_stage)
            for name in reversed(chain):
                if name not in seen:
                    seen.add(name)
                    names.append(name)
        members = set(selection.winner.members)
    else:
        names, members = list(plans.configurations), set()
    out = []
    for name in names:
        plan = plans.configuration(name)
        if name in members:
            folds = [str(f) for f in selection.winner.folds]
        else:
            folds = _trained_folds(ws, name)
        if not folds:
            continue
        present = [f for f in folds if checkpoint_path(ws.fold_dir(name, f), "final").is_file()]
        out.append(
            ConfigurationInfo(
                name=name,
                network_dims=plan.network_dims,
                spacing=list(plan.spacing),
                transpose_forward=list(plan.transpose_forward),
                patch_size=list(plan.patch_size),
                folds=folds,
                checkpoints=predicted_checkpoints(ws.fold_dir(name, present[0])) if present else [],
                previous_stage=plan.previous_stage,
                initialised_from=_initialised_from(ws.fold_dir(name, present[0])) if present else None,
                network=network_description(plan),
            )
        )
    return out


def _initialised_from(fold_dir: Path) -> str | None:
    """What a fold's training started from (``--pretrained``), from its final checkpoint's record."""
    content = load_checkpoint(checkpoint_path(fold_dir, "final"), mmap=True)  # the tensors stay on disk
    record = content.get("initialised_from")
    if not isinstance(record, dict):
        return None
    origin = ", ".join(
        f"{k} {record[k]}" for k in ("dataset", "configuration", "fold", "epoch") if record.get(k) is not None
    )
    return f"{record.get('source')} ({origin})" if origin else str(record.get("source"))


def _trained_folds(ws: Workspace, configuration: str) -> list[str]:
    folds = fold_folders(ws.results_dir(configuration))
    return [f for f, folder in folds.items() if checkpoint_path(folder, "final").is_file()]


def _training_cases(ws: Workspace) -> int | None:
    if ws.fingerprint_json.is_file():
        return load_fingerprint_document(ws.fingerprint_json).num_cases
    if ws.dataset_json.is_file():
        count = read_json(ws.dataset_json, dict).get("numTraining")
        return count if isinstance(count, int) and not isinstance(count, bool) else None
    return None


def _scores(info: ModelInfo, selection: Selection) -> None:
    info.ranking = {c.name: c.foreground_dice for c in selection.ranking}
    mine = next((c for c in selection.ranking if c.name == selection.winner.name), None)
    if mine is None:  # a package of configurations `select` did not rank together
        mine = next((c for c in selection.ranking if sorted(c.members) == sorted(selection.winner.members)), None)
    if mine is not None:
        info.cv_cases = mine.n_cases
        info.cv_dice = mine.foreground_dice
        info.cv_dice_per_class = dict(mine.per_class)
    pp = selection.postprocessing
    if pp is not None:
        info.postprocessing = pp.to_postprocessing().describe()
        info.cv_dice_postprocessed = pp.dice_after


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _x(values: list) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def format_info(info: ModelInfo) -> str:
    """The description `autounet info` prints."""
    lines = []
    p = info.package
    if p is not None:
        where = str(p.path) if p.path is not None else str(info.workspace)
        size = f", {p.size / 1e6:.1f} MB" if p.size is not None else ""
        digest = f", SHA-256 {p.sha256}" if p.sha256 else ""
        lines.append(f"model package {where} ({p.files} files{size}{digest})")
        lines.append(
            f"  made by autounet {p.autounet_version} with torch {p.torch_version} on {p.created} (package format {p.format_version})"
        )
        lines.append(f"  description: {p.description or '(none given)'}")
        lines.append(f"  license: {p.license or '(none given)'}")
        if p.contents:
            lines.append(f"  contents: {'; '.join(p.contents)}")
        lines.append(f"  unpacked in {info.workspace}")
    else:
        lines.append(f"workspace {info.workspace}")
    labels = ", ".join(f"{k} {v}" for k, v in sorted(info.labels.items(), key=lambda kv: int(kv[0])))
    channels = ", ".join(f"{c} ({n})" for c, n in zip(info.channels, info.normalization))
    lines.append(f"dataset {info.dataset}")
    lines.append(f"  labels: {labels}")
    lines.append(f"  channels: {channels}")
    cases = f"{info.training_cases} training cases" if info.training_cases is not None else "training cases unknown"
    lines.append(
        f"  training data: {cases}, median spacing {_x([round(s, 4) for s in info.median_spacing])} mm, "
        f"median shape {_x(info.median_shape)} (after cropping)"
        + (f"; planning recipe {info.recipe}" if info.recipe != "nnunet" else "")
    )
    if info.model is None:
        lines.append("model: no selection yet (run `autounet select`); trained configurations:")
    else:
        lines.append(f"model: {info.model}, folds {', '.join(map(str, info.folds))}")
    for c in info.configurations:
        role = (
            f" (first stage of the cascade, folds {', '.join(c.folds)})"
            if info.model and c.name not in info.model.split("+")
            else ""
        )
        if info.model is None:
            role = f" (folds {', '.join(c.folds)})"
        lines.append(
            f"  {c.name}{role}: {c.network_dims}D U-Net, spacing {_x([round(s, 4) for s in c.spacing])} mm, "
            f"patch {_x(c.patch_size)}"
            + (
                f" (network axes: raw axes {c.transpose_forward})"
                if c.transpose_forward != sorted(c.transpose_forward)
                else ""
            )
            + f", checkpoint(s) {', '.join(c.checkpoints) or '-'}"
        )
        if c.network:
            lines.append(f"    network: {c.network}")
        if c.initialised_from:
            lines.append(f"    fine-tuned: initialised from {c.initialised_from}")
    if info.model is not None:
        lines.append(f"post-processing: {info.postprocessing or 'none'}")
        if info.cv_dice is not None or info.cv_cases is not None:
            per_class = ", ".join(f"{info.labels.get(k, k)} {_fmt(v)}" for k, v in info.cv_dice_per_class.items())
            after = f" ({_fmt(info.cv_dice_postprocessed)} after post-processing)" if info.postprocessing else ""
            lines.append(
                f"cross-validation ({info.cv_cases} cases): mean foreground Dice {_fmt(info.cv_dice)}{after}; "
                f"per class: {per_class}"
            )
            if info.cv_of:
                lines.append(f"  (these scores are of {info.cv_of})")
        else:
            lines.append("cross-validation: these configurations were not ranked together by `autounet select`")
        if len(info.ranking) > 1:
            lines.append("  ranking: " + ", ".join(f"{name} {_fmt(d)}" for name, d in info.ranking.items()))
    return "\n".join(lines)
