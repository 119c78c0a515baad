"""An exclusive lock on a workspace step, so that two runs cannot write the same files at once."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from autounet.errors import AutounetError


@contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) or fail at once naming ``what``.

    The lock is released by the operating system when the process ends, however it ends.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AutounetError(
                f"another {what} is running on {path.parent} (lock {path.name}); wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)
