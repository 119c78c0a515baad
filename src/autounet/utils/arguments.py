"""Checks of the numbers a command (or its API function) is given, each failing with one clear
:class:`~autounet.errors.AutounetError` that names the option by its command-line spelling.

None always passes (it means "the default"); booleans are not numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

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
