"""Named recipes as plain data: JSON files in the sub-folders of this package (one per kind)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TypeVar

from autounet.errors import AutounetError
from autounet.utils.plain_data import load_json_dataclass

T = TypeVar("T")


def names(kind: str) -> list[str]:
    """Built-in presets of a kind (``augmentation``, ``training``)."""
    folder = resources.files("autounet.presets") / kind
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load(kind: str, name_or_path: str | Path, cls: type[T], schema_version: int) -> T:
    """A built-in preset by name, or a JSON file by path, read strictly into ``cls`` and validated."""
    path = Path(name_or_path)
    if not path.suffix:
        if str(name_or_path) not in names(kind):
            raise AutounetError(
                f"unknown {kind} preset {name_or_path!r}; built in: {', '.join(names(kind))}, or give a .json file"
            )
        path = Path(str(resources.files("autounet.presets") / kind / f"{name_or_path}.json"))
    preset = load_json_dataclass(cls, path, f"{kind} preset", schema_version)
    preset.validate()
    return preset
