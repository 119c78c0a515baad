"""An exclusive lock on a workspace step, so that two runs cannot write the same files at once.

Built on the ``filelock`` package (``flock`` on POSIX, ``LockFileEx`` on Windows), so the lock
is released by the operating system when the process ends, however it ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from autounet.errors import AutounetError
from autounet.utils.atomic import make_folder


@contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) or fail at once naming ``what``
    (e.g. "`autounet preprocess`") and the folder it guards."""
    from filelock import FileLock, Timeout

    path = Path(path)
    make_folder(path.parent)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise AutounetError(
            f"another {what} is running on {path.parent} (lock {path.name}); wait for it to finish"
        ) from None
    try:
        yield
    finally:
        lock.release()
