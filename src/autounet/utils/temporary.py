"""Temporary files of unfinished writes, named so that a later run can tell whose they are.

Every file (or folder) that autounet writes atomically is first written under the name
``.autounet-tmp.<host>-<pid>.<random>.<final name>`` beside its target. ``host`` is 8 hex digits
of this machine's name, its boot and its PID namespace (so that containers sharing a host name
but not their processes, or a machine after a reboot, have another); ``pid`` is the writing
process. A process killed in the middle of a write leaves that temporary behind; a later command
that writes into the same folder removes it (:func:`remove_stale_temporaries`) when its process
is gone (no process of that id, or one started after the temporary was last written: the id was
reused), or, when the owner cannot be checked (another machine, container or boot), when the
temporary has not changed for :data:`STALE_AFTER_S`. It never removes a live process's temporary
or any file whose name is not an autounet temporary's.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import psutil

PREFIX = ".autounet-tmp."
_NAME = re.compile(r"^\.autounet-tmp\.([0-9a-f]{8})-(\d+)\.")
# A temporary whose owner cannot be checked is taken as abandoned after a day without change (an
# atomic write takes seconds; an unpack or a package, minutes).
STALE_AFTER_S = 24 * 3600


@functools.cache
def _host_token() -> str:
    """8 hex digits of this host name, boot and PID namespace: equal exactly where pids are comparable."""
    parts = [socket.gethostname(), "", ""]
    try:  # Linux: the boot and the PID namespace; elsewhere the host name alone
        parts[1] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        parts[2] = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pass
    return hashlib.sha1("\n".join(parts).encode("utf-8", "replace")).hexdigest()[:8]


def temporary_prefix() -> str:
    """``.autounet-tmp.<host>-<pid>.``: the start of this process's temporary names."""
    return f"{PREFIX}{_host_token()}-{os.getpid()}."


def is_temporary(name: str) -> bool:
    """Whether ``name`` is an autounet temporary (of any process or machine)."""
    return _NAME.match(name) is not None


def process_alive(pid: int, since: float | None = None) -> bool:
    """Whether process ``pid`` runs on this machine (True when it cannot be told); with ``since``
    (a time stamp of something it wrote), a process of that id started later is not it."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        if not psutil.pid_exists(pid):
            return False
        if since is not None and psutil.Process(pid).create_time() > since + 1.0:
            return False  # the id was reused by a process started after the write
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # access denied and the like: it exists
        return True
    return True


def is_stale(name: str, modified: float | None = None) -> bool:
    """Whether ``name`` (last changed at ``modified``) is a temporary whose writer is gone: a dead
    process of this machine, or one that cannot be checked and left it unchanged for a day."""
    m = _NAME.match(name)
    if m is None:
        return False
    if m.group(1) == _host_token():
        return not process_alive(int(m.group(2)), modified)
    return modified is not None and time.time() - modified > STALE_AFTER_S


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the stale temporaries (:func:`is_stale`) directly in ``folder``; returns them.

    Files of live processes, recent ones of other machines and every other file are left alone;
    a missing folder has none.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if not is_temporary(entry.name):
            continue
        try:
            modified = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if not is_stale(entry.name, modified):
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
