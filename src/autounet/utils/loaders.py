"""One loader per kind of file the project reads back: JSON, ``.npy`` and ``.npz``.

Each turns a damaged file (truncated, not JSON, of the wrong type, a bad zip archive, an array
of Python objects) into one :class:`~autounet.errors.AutounetError` naming the file and what is
wrong, never a traceback. Arrays are never unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

import json
import math
import stat
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autounet.errors import AutounetError

_JSON_TYPES = {dict: "a JSON object", list: "a JSON list"}


def regular_file(path: str | Path, kind: str, unreadable: str) -> Path:
    """``path`` if it is a regular file; else one error: ``PATH: KIND not found``, ``PATH:
    UNREADABLE (reason)`` or ``PATH: not a KIND file (a folder or a special file)``."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise AutounetError(f"{path}: {kind} not found") from None
    except OSError as exc:
        raise AutounetError(f"{path}: {unreadable} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise AutounetError(f"{path}: not a {kind} file (a folder or a special file)")
    return path


# Larger than any document autounet writes (a fingerprint of 10 000 cases is about 20 MB): a
# bigger file is not one of ours, and is refused before it is read whole into memory.
JSON_LIMIT_BYTES = 256 * 1024 * 1024


def parse_json(text: str | bytes, where: str | Path) -> Any:
    """The JSON value of ``text``; one error naming ``where`` when it is not JSON (truncated, not
    UTF-8, or nested too deeply for the parser)."""
    try:
        return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AutounetError(f"{where}: not valid JSON, the file is damaged or truncated ({exc})") from None
    except RecursionError:
        raise AutounetError(f"{where}: refused: JSON nested too deeply to be one of autounet's documents") from None


def read_json(path: str | Path, expect: type | None = None, limit: int = JSON_LIMIT_BYTES) -> Any:
    """The content of the JSON file ``path``.

    Raises :class:`AutounetError` naming the file when it is missing or unreadable, larger than
    ``limit`` bytes, is not valid JSON (a truncated file is not; nor is one nested too deeply),
    or, with ``expect`` (``dict`` or ``list``), holds another type.
    """
    path = Path(path)
    data = parse_json(_read_capped(path, limit), path)
    if expect is not None and not isinstance(data, expect):
        raise AutounetError(f"{path}: expected {_JSON_TYPES.get(expect, expect.__name__)}, found {type(data).__name__}")
    return data


def _read_capped(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, refused when it holds more than ``limit``."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except FileNotFoundError:
        raise AutounetError(f"{path}: file not found") from None
    except OSError as exc:
        raise AutounetError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise AutounetError(f"{path}: refused: larger than {limit} bytes, more than such a document can hold")
    return raw


def read_text(path: str | Path, limit: int = JSON_LIMIT_BYTES) -> str:
    """The UTF-8 text of ``path`` (at most ``limit`` bytes), with the same errors as :func:`read_json`."""
    path = Path(path)
    try:
        return _read_capped(path, limit).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AutounetError(f"{path}: not UTF-8 text, the file is damaged ({exc})") from None


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file, one per non-blank line (NaN allowed); a line that is not
    a JSON object raises :class:`AutounetError` naming the file and line."""
    entries = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise AutounetError(f"{path}: line {n} is not JSON ({exc})") from None
            except RecursionError:
                raise AutounetError(f"{path}: line {n} is JSON nested too deeply") from None
            if not isinstance(entry, dict):
                raise AutounetError(f"{path}: line {n} is not a JSON object")
            entries.append(entry)
    return entries


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` file's header declares."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int  # bytes before the data

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def npy_header(path: str | Path) -> NpyHeader:
    """The header of a ``.npy`` file (reads only its first bytes); :class:`AutounetError` if there is none."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = fh.tell()
    except FileNotFoundError:
        raise AutounetError(f"{path}: file not found") from None
    except OSError as exc:
        raise AutounetError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    except (ValueError, EOFError, SyntaxError, TypeError) as exc:
        raise AutounetError(f"{path}: not a .npy array file, or its header is damaged ({exc})") from None
    return NpyHeader(tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran), offset)


def npy_problem(path: str | Path, header: NpyHeader | None = None) -> str | None:
    """What is wrong with the ``.npy`` file ``path`` judged from its header and size (no data are
    read), or None: not an array file, an array of Python objects, or a size that differs from
    what the header declares (truncated)."""
    path = Path(path)
    try:
        header = header or npy_header(path)
        size = path.stat().st_size
    except AutounetError as exc:
        return str(exc).removeprefix(f"{path}: ")
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or exc})"
    if header.dtype.hasobject:
        return "holds Python objects (dtype object), which are never loaded"
    expected = header.offset + header.data_bytes
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        return f"{what}: {size} bytes, its header ({header.dtype} {header.shape}) needs {expected}"
    return None


def load_npy(path: str | Path, mmap_mode: str | None = None) -> np.ndarray:
    """A ``.npy`` array (memory-mapped with ``mmap_mode``), checked first (see :func:`npy_problem`)."""
    path = Path(path)
    problem = npy_problem(path)
    if problem:
        raise AutounetError(f"{path}: {problem}")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except OSError as exc:
        raise AutounetError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    except (ValueError, EOFError) as exc:
        raise AutounetError(f"{path}: damaged array file ({exc})") from None


def load_npz(path: str | Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` archive (only ``keys``, each required, when given), fully read.

    A bad zip archive, a truncated or corrupt member, an array of Python objects or a missing
    key raise :class:`AutounetError` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if fh.read(2) != b"PK":  # numpy would take anything else for a pickle
                raise AutounetError(f"{path}: not a .npz archive (damaged, or another kind of file)")
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys or () if k not in data.files]
            if missing:
                raise AutounetError(
                    f"{path}: lacks the array(s) {', '.join(missing)} (holds {', '.join(data.files) or 'none'})"
                )
            return {k: data[k] for k in (keys if keys is not None else data.files)}
    except FileNotFoundError:
        raise AutounetError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise AutounetError(f"{path}: damaged or truncated .npz archive ({exc})") from None
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise AutounetError(f"{path}: holds Python objects (dtype object), which are never loaded") from None
        raise AutounetError(f"{path}: damaged or truncated .npz archive ({exc})") from None
    except OSError as exc:
        raise AutounetError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
