"""Progress bars (rate and ETA) on standard error, shown when it is a terminal.

Set ``AUTOUNET_PROGRESS=1`` to force bars on (e.g. in a log file) or ``=0`` to turn them off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    forced = os.environ.get("AUTOUNET_PROGRESS")
    if forced is not None:
        return forced not in ("", "0", "false", "no")
    return sys.stderr.isatty()


def progress_bar(
    items: Iterable[T] | None = None, total: int | None = None, desc: str = "", unit: str = "case"
) -> tqdm:
    """A bar with rate and ETA on standard error, shown only when progress is enabled."""
    return tqdm(
        items,
        total=total,
        desc=desc,
        unit=unit,
        disable=not progress_enabled(),
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "case") -> Iterator[T]:
    """Wrap ``items`` in a progress bar with rate and ETA when progress is enabled."""
    return iter(progress_bar(items, total, desc, unit))
