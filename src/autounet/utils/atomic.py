"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A reader (or a re-run after a crash) therefore sees either the old file, the new file, or no
file, never a truncated one.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autounet.utils.temporary import temporary_prefix, write_failure


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_MODE = _file_mode()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` in one rename.

    The temporary is ``.autounet-tmp.<host>-<pid>.<random>.<name>`` beside ``path`` (see
    :mod:`autounet.utils.temporary`), removed if anything fails. A file-system error is raised as
    an :class:`OSError` naming ``path`` (not the temporary), with the reason (e.g. disk full).
    """
    path = Path(path)
    make_folder(path.parent)
    try:
        # The temporary name ends with the target's name so writers that pick a format from the
        # file ending (SimpleITK, numpy) still do; the prefix marks it as unfinished and whose.
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(), suffix="." + path.name, dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, _MODE)  # mkstemp creates 0600; give the file the usual permissions
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.filename is not None and Path(exc.filename) != tmp_path:
            raise  # about another file (e.g. a source the writer reads): as it is
        raise _naming(exc, path) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` about ``path`` instead of a temporary (an errno-less one gets the probable reason)."""
    if exc.errno is None:
        return write_failure(path, str(exc))
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def make_folder(folder: str | Path) -> Path:
    """Create ``folder`` (and its parents); a clear error when a file stands where a folder must be."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise NotADirectoryError(errno.ENOTDIR, "a file, where a folder is needed", str(blocking)) from None
    return folder


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _is_flat(value: Any) -> bool:
    """Lists of scalars, or of short lists of scalars, are written on one line."""
    scalar = (str, int, float, bool, type(None))
    if not isinstance(value, list):
        return False
    return all(isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(x, scalar) for x in v)) for v in value)


def dumps_json(data: Any, indent: int = 2, _level: int = 0) -> str:
    """Indented JSON with flat lists kept on one line (plans and fingerprints stay readable)."""
    pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
    if isinstance(data, dict) and data:
        items = [f"{inner}{json.dumps(str(k))}: {dumps_json(v, indent, _level + 1)}" for k, v in data.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(data, list) and data and not _is_flat(data):
        items = [f"{inner}{dumps_json(v, indent, _level + 1)}" for v in data]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(data, allow_nan=False, separators=(", ", ": "))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON; NaN and infinity are refused (they are not JSON)."""
    return atomic_write_text(path, dumps_json(data) + "\n")


def read_json(path: str | Path, expect: type | None = None) -> Any:
    """The content of a JSON file; a damaged one raises an error naming it (see
    :func:`autounet.utils.loaders.read_json`, the one JSON loader)."""
    from autounet.utils.loaders import read_json as load

    return load(path, expect)
