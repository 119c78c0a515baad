"""The record that binds a cached engine conversion to the network it came from (issue 21).

A conversion in ``fold_K/engines/`` is ``KEY.onnx`` (or ``KEY.xml`` + ``KEY.bin``) and its record
``KEY.json``, written after the files have been written, flushed and loaded once: the key, the
inputs of the key (the network's digest, engine and its version, tile shape, stored precision,
...) and the size and SHA-256 of every file. A cached conversion is used only when its record
reads, names this key and these inputs, and every file has its recorded bytes; anything else (a
file copied from another network, a block of weights zeroed, a file cut short by a crash, an entry
without its record) is a problem that :mod:`autounet.inference.engines` answers by converting again.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write_json, make_folder
from autounet.utils.plain_data import from_plain, read_json_document, to_plain

RECORD_FORMAT = "autounet-engine-cache"
RECORD_SCHEMA_VERSION = 1
MAX_RECORD_BYTES = 1 << 16  # a record is a few hundred bytes; a larger file is not one
# How long a process waits for another one converting the same network (a large 3D network
# converts in well under a minute); after that it goes on without the lock.
LOCK_WAIT_S = 600


@dataclass
class CachedFile:
    """One file of a conversion: its size in bytes and SHA-256 (hex)."""

    size: int
    sha256: str


@dataclass
class ConversionRecord:
    """``KEY.json``: what the files of ``key`` are and what they were converted from."""

    format: str
    key: str
    inputs: dict[str, str]
    files: dict[str, CachedFile]  # file name (beside the record) -> size and digest
    schema_version: int = RECORD_SCHEMA_VERSION


def entry_files(converted: Path) -> list[Path]:
    """The files of the conversion whose loadable file is ``converted`` (an ``.xml`` has its ``.bin``)."""
    return [converted, converted.with_suffix(".bin")] if converted.suffix == ".xml" else [converted]


def file_digest(path: Path, chunk: int = 1 << 20) -> CachedFile:
    """Size and SHA-256 of ``path`` (an :class:`OSError` if it cannot be read)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            size += len(block)
    return CachedFile(size, digest.hexdigest())


def write_record(record: Path, key: str, inputs: dict[str, str], files: list[Path]) -> None:
    """Record ``files`` (as they are now) as the conversion of ``key`` from ``inputs``, atomically."""
    document = ConversionRecord(RECORD_FORMAT, key, dict(inputs), {p.name: file_digest(p) for p in files})
    atomic_write_json(record, to_plain(document))


def entry_exists(record: Path, files: list[Path]) -> bool:
    """Whether anything of the entry is there (a complete entry, or what a crash or a stranger left)."""
    return any(p.exists() or p.is_symlink() for p in (record, *files))


def entry_problem(record: Path, key: str, inputs: dict[str, str], files: list[Path]) -> str | None:
    """Why the entry of ``key`` may not be used for a network converted from ``inputs`` (a few
    words), or None when its record and every file match."""
    if not record.exists() and not record.is_symlink():
        return f"no record {record.name} of its conversion"
    if not record.is_file() or record.is_symlink():
        return f"its record {record.name} is not a regular file"
    if record.stat().st_size > MAX_RECORD_BYTES:
        return f"its record {record.name} is larger than {MAX_RECORD_BYTES} bytes"
    try:
        data = read_json_document(record, "engine cache record", RECORD_SCHEMA_VERSION)
        document = from_plain(ConversionRecord, data, str(record))
    except AutounetError as exc:
        return f"its record is damaged ({str(exc).replace(str(record) + ': ', '')})"
    if document.format != RECORD_FORMAT:
        return f"its record {record.name} is not an engine cache record"
    if document.inputs.get("network_sha256") != inputs.get("network_sha256"):
        return "it was converted from another network (its record names another network digest)"
    changed = sorted(k for k in set(inputs) | set(document.inputs) if inputs.get(k) != document.inputs.get(k))
    if changed:
        return f"it was converted with other settings ({', '.join(changed)})"
    if document.key != key:
        return f"its record is of another key ({document.key})"
    if sorted(document.files) != sorted(p.name for p in files):
        return f"its record lists other files ({', '.join(sorted(document.files))})"
    for path in files:
        expected = document.files[path.name]
        if not path.is_file() or path.is_symlink():
            return f"{path.name} is missing or not a regular file"
        if path.stat().st_size != expected.size:
            return f"{path.name} has {path.stat().st_size} bytes, not the {expected.size} converted"
        found = file_digest(path)
        if found.sha256 != expected.sha256:
            return f"{path.name} differs from the file converted (SHA-256 {found.sha256[:12]}..., recorded {expected.sha256[:12]}...)"
    return None


def remove_entry(record: Path, files: list[Path]) -> None:
    """Delete the entry, its record first (so that what a failure leaves is never a valid entry);
    an :class:`OSError` when the folder cannot be changed."""
    for path in (record, *files):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def conversion_lock(path: Path) -> Iterator[None]:
    """Hold the lock file ``path`` while an entry is checked, converted and recorded, so that
    processes converting the same network at once (``predict --part``, Ray workers) convert it
    once and never write over each other's files (OpenVINO's ``.xml`` differs from run to run).
    Where no lock can be taken (a read-only cache) or another process holds it too long, it goes
    on without: the record check still refuses any mix of files."""
    from filelock import FileLock

    lock = FileLock(str(path), timeout=LOCK_WAIT_S)
    try:
        make_folder(path.parent)
        lock.acquire()
        held = True
    except OSError:  # a read-only or missing cache folder, or filelock's Timeout
        held = False
    try:
        yield
    finally:
        if held:
            lock.release()
