"""The workspace ``W/NAME/`` of one dataset (DESIGN §3): where every stage reads and writes.

This module is the only one that knows the layout: every path of the workspace (plans, splits,
preprocessed data and its manifest, fold folders, checkpoints, logs, validation results,
next-stage inputs, selection, ensembles, report) is built here. ::

    W/NAME/
      dataset.json  fingerprint.json  plans.json  splits.json  selection.json  report.md  report.html  report/
      trackers/                  tensorboard/ mlflow/ wandb/ (`train --logger`)
      preprocessed/DATA_ID/      CASE.npy CASE_seg.npy CASE.json ... manifest.json
      results/CONFIG/            cv_summary.json  next_stage/CASE_previous.npy
      results/CONFIG/fold_K/     checkpoint_{latest,best,second_best,final}.pt log.jsonl progress.png console.log
      results/CONFIG/fold_K/validation/   CASE.nii.gz CASE.npz summary.json
      results/CONFIG/fold_K/engines/      KEY.onnx KEY.xml KEY.bin KEY.json KEY.lock (conversions for other engines; .json: their SHA-256 record)
      results/ensembles/A+B/     a pair ensemble's cross-validation predictions
      manifest.json              only in a model package's folder (`autounet package`): versions and checksums

A model package (`autounet package`) is a zip of the files `predict` needs under ``NAME/``; it is
unpacked once into ``package_cache_dir()/SHA256/NAME`` (a workspace folder) beside the marker
``SHA256/complete``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from autounet.errors import AutounetError

DEFAULT_WORK = "autounet_work"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_work_dir() -> Path:
    """``$AUTOUNET_WORK`` if set, else ``./autounet_work``."""
    return Path(os.environ.get("AUTOUNET_WORK") or DEFAULT_WORK)


def validate_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise AutounetError(
            f"dataset name {name!r} is not usable as a folder name: use letters, digits, '.', '_' and '-' (pass --name)"
        )
    return name


CHECKPOINT_KINDS = ("latest", "best", "second_best", "final")


def checkpoint_path(fold_dir: str | Path, kind: str) -> Path:
    """``fold_K/checkpoint_KIND.pt`` (kind: latest, best, second_best or final)."""
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(kind)
    return Path(fold_dir) / f"checkpoint_{kind}.pt"


def fold_of(folder: str | Path) -> str | None:
    """The fold a folder ``fold_K`` holds (``"all"`` or the number as text), or None for another folder."""
    match = re.fullmatch(r"fold_(all|\d+)", Path(folder).name)
    return match.group(1) if match else None


def fold_folders(results_dir: str | Path) -> dict[str, Path]:
    """The fold folders of a configuration's results folder ``results/CONFIG``, by fold (``"0"``,
    ``"1"``, ... then ``"all"``); empty when the folder does not exist. The one listing of a
    configuration's folds: what each fold holds (a checkpoint, a validation) the caller checks."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return {}
    found = {fold: p for p in results_dir.iterdir() if (fold := fold_of(p)) is not None and p.is_dir()}
    return {f: found[f] for f in sorted(found, key=lambda f: (f == "all", int(f) if f != "all" else 0))}


def training_log_path(fold_dir: str | Path) -> Path:
    return Path(fold_dir) / "log.jsonl"


def progress_plot_path(fold_dir: str | Path) -> Path:
    return Path(fold_dir) / "progress.png"


def fold_console_path(fold_dir: str | Path) -> Path:
    """What a fold trained on a cluster printed (every attempt, appended): ``fold_K/console.log``."""
    return Path(fold_dir) / "console.log"


def shared_check_path(folder: str | Path, token: str) -> Path:
    """The token file a cluster run writes into ``folder`` and reads back on every node, to make
    sure they all see the same files: ``FOLDER/.autounet-shared-TOKEN``."""
    if not token.isalnum():
        raise ValueError(f"not a usable token: {token!r}")
    return Path(folder) / f".autounet-shared-{token}"


def validation_dir(fold_dir: str | Path) -> Path:
    """Where a fold's full validation predictions and their scores go."""
    return Path(fold_dir) / "validation"


def validation_summary_path(fold_dir: str | Path) -> Path:
    return validation_dir(fold_dir) / "summary.json"


def cv_summary_path(results_dir: str | Path) -> Path:
    """A configuration's folds pooled: ``results/CONFIG/cv_summary.json``."""
    return Path(results_dir) / "cv_summary.json"


def manifest_path(preprocessed_dir: str | Path) -> Path:
    """Written last by `autounet preprocess`: the folder is complete when it exists."""
    return Path(preprocessed_dir) / "manifest.json"


def engine_cache_dir(fold_dir: str | Path) -> Path:
    """Where a fold's networks converted for another inference engine are kept: ``fold_K/engines/``."""
    return Path(fold_dir) / "engines"


def engine_cache_path(fold_dir: str | Path, key: str, suffix: str) -> Path:
    """One cached conversion: ``fold_K/engines/KEY.SUFFIX`` (``suffix`` with its dot, e.g. ``.onnx``)."""
    if not key or "/" in key or "\\" in key or key.startswith("."):
        raise ValueError(f"not a usable cache key: {key!r}")
    return engine_cache_dir(fold_dir) / f"{key}{suffix}"


def previous_stage_path(next_stage_dir: str | Path, case_id: str) -> Path:
    """A cascade's first-stage prediction of a case, as its second stage reads it."""
    return Path(next_stage_dir) / f"{case_id}_previous.npy"


def package_cache_dir() -> Path:
    """Where model packages are unpacked, one folder per package's SHA-256: ``$AUTOUNET_CACHE/packages``,
    else ``$XDG_CACHE_HOME/autounet/packages``, else ``~/.cache/autounet/packages``."""
    if os.environ.get("AUTOUNET_CACHE"):
        return Path(os.environ["AUTOUNET_CACHE"]) / "packages"
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "autounet" / "packages"


def package_cache_entry(sha256: str) -> Path:
    """The unpacked copy of the package whose SHA-256 is ``sha256``: ``package_cache_dir()/SHA256``."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a SHA-256: {sha256!r}")
    return package_cache_dir() / sha256


def package_complete_marker(entry: str | Path) -> Path:
    """Written last into an unpacked package's folder (holding its SHA-256): ``SHA256/complete``."""
    return Path(entry) / "complete"


@dataclass(frozen=True)
class Workspace:
    work: Path
    name: str

    @classmethod
    def at(cls, work: str | Path | None, name: str) -> Workspace:
        ws = cls(Path(work) if work else default_work_dir(), validate_name(name))
        for folder in (ws.work, ws.root):
            if folder.exists() and not folder.is_dir():
                raise AutounetError(f"{folder}: a file, where the workspace folder should be (--work W names a folder)")
        return ws

    @classmethod
    def of(cls, root: str | Path) -> Workspace:
        """The workspace whose folder is ``root`` (``W/NAME``)."""
        root = Path(root)
        return cls(root.parent, root.name)

    @classmethod
    def of_results_dir(cls, results_dir: str | Path) -> Workspace:
        """The workspace of a configuration's folder ``W/NAME/results/CONFIG``."""
        return cls.of(Path(results_dir).parent.parent)

    def is_planned(self) -> bool:
        return self.plans_json.is_file()

    @property
    def root(self) -> Path:
        return self.work / self.name

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    @property
    def fingerprint_json(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def plans_json(self) -> Path:
        return self.root / "plans.json"

    @property
    def splits_json(self) -> Path:
        return self.root / "splits.json"

    @property
    def selection_json(self) -> Path:
        return self.root / "selection.json"

    def raw_path(self) -> Path:
        """The raw dataset folder this workspace was planned from (``dataset.json``'s ``raw_path``)."""
        from autounet.utils.atomic import read_json

        if not self.dataset_json.is_file():
            raise AutounetError(f"{self.dataset_json} not found: run `autounet plan RAW --work {self.work}` first")
        raw_path = read_json(self.dataset_json, dict).get("raw_path")
        if not raw_path:
            raise AutounetError(
                f"{self.dataset_json} does not name the raw dataset (raw_path); run `autounet plan` again"
            )
        return Path(raw_path)

    def preprocessed_dir(self, data_identifier: str) -> Path:
        return self.root / "preprocessed" / data_identifier

    def results_dir(self, configuration: str) -> Path:
        return self.root / "results" / configuration

    def fold_dir(self, configuration: str, fold: int | str) -> Path:
        return self.results_dir(configuration) / f"fold_{fold}"

    def ensemble_dir(self, members: list[str] | tuple[str, ...]) -> Path:
        """A pair ensemble's cross-validation predictions: ``results/ensembles/A+B``."""
        return self.root / "results" / "ensembles" / "+".join(members)

    @property
    def package_manifest_json(self) -> Path:
        """A model package's manifest (versions, description, license, checksums); only in a package."""
        return self.root / "manifest.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        """The report as one self-contained page (reporting/html.py)."""
        return self.root / "report.html"

    @property
    def trackers_dir(self) -> Path:
        """Local stores of the experiment trackers (``train --logger``): tensorboard/, mlflow/, wandb/."""
        return self.root / "trackers"

    def tensorboard_dir(self, configuration: str, fold: int | str) -> Path:
        """A fold's TensorBoard event files: ``trackers/tensorboard/CONFIG/fold_K``."""
        return self.trackers_dir / "tensorboard" / configuration / f"fold_{fold}"

    @property
    def report_figures_dir(self) -> Path:
        return self.root / "report"

    @property
    def preprocess_lock(self) -> Path:
        return self.root / "preprocessed" / ".lock"

    def fold_lock(self, configuration: str, fold: int | str) -> Path:
        """Held by the process training (or validating) a fold: ``results/CONFIG/.fold_K.lock``
        (beside the fold's folder, so that a refused fold number leaves no folder behind)."""
        return self.results_dir(configuration) / f".fold_{fold}.lock"

    def next_stage_dir(self, configuration: str) -> Path:
        """Where a cascade's first stage leaves its predictions of the training cases for the next stage."""
        return self.results_dir(configuration) / "next_stage"
