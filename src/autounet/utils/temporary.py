"""Temporary files of unfinished writes, named so that a later run can tell whose they are.

Every file (or folder) that autounet writes atomically is first written under the name
``.autounet-tmp.<host>-<pid>.<random>.<final name>`` beside its target (``host``: 8 hex digits
of this machine's name; ``pid``: the writing process). A process killed in the middle of a write
leaves that temporary behind; a later command that writes into the same folder removes the
temporaries whose process is no longer alive on this machine (:func:`remove_stale_temporaries`),
never those of a live process, of another machine, or any file it did not make.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import sys
from pathlib import Path

PREFIX = ".autounet-tmp."
_NAME = re.compile(r"^\.autounet-tmp\.([0-9a-f]{8})-(\d+)\.")


def _host_token() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temporary_prefix() -> str:
    """``.autounet-tmp.<host>-<pid>.``: the start of this process's temporary names."""
    return f"{PREFIX}{_host_token()}-{os.getpid()}."


def is_temporary(name: str) -> bool:
    """Whether ``name`` is an autounet temporary (of any process or machine)."""
    return _NAME.match(name) is not None


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (True when it cannot be told)."""
    if pid <= 0:
        return True
    if pid == os.getpid():
        return True
    if sys.platform == "win32":
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _windows_process_alive(pid: int) -> bool:  # pragma: no cover - Windows only
    try:
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() != 87  # ERROR_INVALID_PARAMETER: no such process
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    except Exception:
        return True


def is_stale(name: str) -> bool:
    """Whether ``name`` is a temporary left by a process of this machine that is no longer alive."""
    m = _NAME.match(name)
    return m is not None and m.group(1) == _host_token() and not process_alive(int(m.group(2)))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries of dead processes of this machine directly in ``folder``; returns them.

    Files of live processes, of other machines and every other file are left alone; a missing
    folder has none.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if not is_stale(entry.name):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def write_failure(path: str | Path, detail: str) -> OSError:
    """An :class:`OSError` for a write of ``path`` that a library reported without an errno
    (torch and ITK do): the file-system reason named in ``detail`` or found on the disk (full, a
    file size limit), else ``detail``'s last line."""
    path = Path(path)
    code = _named_errno(detail)
    if code is None:
        code = _probable_errno(path)
    if code is not None:
        return OSError(code, os.strerror(code), str(path))
    last = detail.strip().splitlines()[-1] if detail.strip() else "no reason given"
    return OSError(errno.EIO, f"write failed ({last})", str(path))


def _named_errno(detail: str) -> int | None:
    """The errno whose text (e.g. "No space left on device") ``detail`` contains."""
    found = [code for code in errno.errorcode if len(os.strerror(code)) > 8 and os.strerror(code) in detail]
    return max(found, key=lambda c: len(os.strerror(c))) if found else None


def _probable_errno(path: Path) -> int | None:
    try:
        if shutil.disk_usage(path.parent).free < 1024 * 1024:
            return errno.ENOSPC
    except OSError:
        pass
    if sys.platform != "win32":
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            return errno.EFBIG
    return None
