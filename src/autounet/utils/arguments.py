"""Checks of the numbers and names a command (or its API function) is given, each failing with one clear
:class:`~autounet.errors.AutounetError` that names the option by its command-line spelling.

None always passes (it means "the default"); booleans are not numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path

from autounet.errors import AutounetError


def whole(option: str, value: object, minimum: int = 0, maximum: int | None = None) -> int | None:
    """``value`` as an int in ``[minimum, maximum]``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise AutounetError(f"{option} must be a whole number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise AutounetError(f"{option} must be {allowed}, got {value}")
    return int(value)


def real(
    option: str,
    value: object,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> float | None:
    """``value`` as a finite float with the given bounds (``above``/``below`` exclusive)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise AutounetError(f"{option} must be a number, got {value!r}")
    x = float(value)
    parts = []
    if above is not None:
        parts.append(f"> {above:g}")
    if at_least is not None:
        parts.append(f">= {at_least:g}")
    if below is not None:
        parts.append(f"< {below:g}")
    if at_most is not None:
        parts.append(f"<= {at_most:g}")
    ok = (
        math.isfinite(x)
        and (above is None or x > above)
        and (at_least is None or x >= at_least)
        and (below is None or x < below)
        and (at_most is None or x <= at_most)
    )
    if not ok:
        bounds = " and ".join(parts)
        raise AutounetError(f"{option} must be a finite number{' ' + bounds if bounds else ''}, got {value}")
    return x


def workers(value: object) -> int | None:
    """``-j/--workers``: at least one process."""
    return whole("-j/--workers", value, 1)


def step(value: object) -> float:
    """``--step``: the sliding window's tile step as a fraction of the patch, in (0, 1]."""
    return real("--step", value, above=0, at_most=1)


def sizes(option: str, values: Sequence[object] | None, count: int | None = None, minimum: int = 1) -> list[int] | None:
    """A list of whole numbers, each at least ``minimum`` (``count`` of them, if given)."""
    if values is None:
        return None
    values = list(values)
    if count is not None and len(values) != count:
        raise AutounetError(f"{option} needs {count} values, got {len(values)}")
    if not values:
        raise AutounetError(f"{option} needs at least one value")
    return [whole(option, v, minimum) for v in values]


def folds(values: Sequence[object] | None) -> None:
    """``-f/--folds`` of predict / export: fold numbers (or 'all'); whether they are trained is checked when loading."""
    for f in values or []:
        if str(f) != "all" and not (isinstance(f, int) and not isinstance(f, bool) and f >= 0) and not str(f).isdigit():
            raise AutounetError(f"-f/--folds: {f!r} is not a fold number (0, 1, ...) or 'all'")


def part(values: Sequence[object] | None) -> tuple[int, int] | None:
    """``--part I N``: 0 <= I < N."""
    if values is None:
        return None
    if len(values) != 2:
        raise AutounetError(f"--part takes two numbers I N (the I-th of N shares), got {list(values)}")
    count = whole("--part N", values[1], 1)
    return whole("--part I", values[0], 0, count - 1), count


EXECUTORS = ("local", "ray")


def executor(value: str, address: str | None) -> None:
    """``--executor local|ray`` (``--address`` only with ray)."""
    if value not in EXECUTORS:
        raise AutounetError(f"--executor must be one of {', '.join(EXECUTORS)}, got {value!r}")
    if value == "local" and address is not None:
        raise AutounetError("--address needs --executor ray")


def folder_or_new(option: str, path: str | Path) -> None:
    """A path that names a folder (``option``'s): an existing file there is refused."""
    if Path(path).exists() and not Path(path).is_dir():
        raise AutounetError(f"{path}: a file, where a folder should be ({option} names a folder)")
