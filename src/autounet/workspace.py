"""The workspace ``W/NAME/`` of one dataset (DESIGN §3): where every stage reads and writes."""

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


@dataclass(frozen=True)
class Workspace:
    work: Path
    name: str

    @classmethod
    def at(cls, work: str | Path | None, name: str) -> Workspace:
        return cls(Path(work) if work else default_work_dir(), validate_name(name))

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
        raw_path = read_json(self.dataset_json).get("raw_path")
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

    def next_stage_dir(self, configuration: str) -> Path:
        """Where a cascade's first stage leaves its predictions of the training cases for the next stage."""
        return self.results_dir(configuration) / "next_stage"
