"""Small Markdown helpers shared by the report's sections: numbers, tables, notes and class labels."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from autounet.errors import AutounetError

# What a section may run into when its input files are missing, partial or from another version.
SKIPPABLE = (AutounetError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError)


def require_workspace(root: Path, dataset_json: Path, plans_json: Path) -> None:
    """Refuse a folder that is not a workspace ``W/NAME`` (neither dataset.json nor plans.json):
    a report written there could replace someone's own ``report.md`` / ``report.html``."""
    if not root.is_dir() or not (dataset_json.is_file() or plans_json.is_file()):
        what = "no dataset.json or plans.json there" if root.is_dir() else "no such folder"
        raise AutounetError(f"{root}: workspace not found ({what}; run `autounet plan` first)")


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: Any, digits: int = 4) -> str:
    """A number with ``digits`` decimals, or '-' when it is missing or not finite."""
    return f"{float(x):.{digits}f}" if is_number(x) else "-"


def count(n: Any, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def signed(x: Any, digits: int = 4) -> str:
    return f"{float(x):+.{digits}f}" if is_number(x) else "-"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def short(x: float) -> str:
    """Up to 4 decimals without trailing zeros (spacings, shapes)."""
    text = f"{float(x):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def dims(values: Iterable[float]) -> str:
    """``1.5 x 0.8 x 0.8``."""
    return " x ".join(short(v) for v in values)


def cell(text: Any) -> str:
    """Text that is safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """A Markdown table; ``align`` has one letter per column (``l`` or ``r``), default: first left."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def note(text: str) -> list[str]:
    return [f"*{text}*", ""]


def class_key(key: str) -> tuple[int, int, str]:
    """Sort key: label values numerically, then region names."""
    try:
        return (0, int(key), "")
    except ValueError:
        return (1, 0, str(key))


def class_label(key: Any, names: Mapping[str, str]) -> str:
    """``1 (liver)`` for a named class, the key alone otherwise (regions, unnamed values)."""
    name = names.get(str(key))
    return f"{key} ({name})" if name and name != str(key) else str(key)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "case"
