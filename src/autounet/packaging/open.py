"""Opening a model package: verify it, unpack it once into the cache, and hand back its workspace folder.

:func:`open_package` keys the unpacked copy by the SHA-256 of the package file
(``package_cache_dir()/SHA256/NAME``, a ``W/NAME`` folder that ``predict -m`` takes as it is).

One read: the package is copied into a private temporary file in the cache while it is hashed,
and listed, checked and unpacked from that copy, so the key and the unpacked content come from
the same bytes even if the file is replaced meanwhile. It is unpacked into a temporary folder
beside the entry and renamed into place only when every check passed, with the marker
``SHA256/complete`` written last: an interrupted or concurrent unpack never leaves a half-written
copy in use, and a refused package leaves nothing behind.

Reuse: every later open hashes the package, reads its manifest from the same open file, and checks
every unpacked file's size and SHA-256 against it (no symbolic link anywhere in the entry). An
entry that fails is rebuilt from the package in hand; one this user cannot replace (another
user's, in a shared ``$AUTOUNET_CACHE``) is an error saying so.

Refused, with one :class:`~autounet.errors.AutounetError` naming the package: any package or
checkpoint when this torch's weights-only loader is unsafe (before torch 2.10); a file that is not
a zip archive or is truncated; entries that overlap one another or the archive's directory,
entries that would land outside the folder (absolute paths, ``..``, backslashes), links and other
special entries, encrypted entries; declared sizes over the caps (:data:`MEMBER_LIMITS`,
:data:`TOTAL_LIMIT_BYTES`) or compressed more than :data:`MAX_RATIO` to one; a missing or
malformed ``manifest.json`` or one of another format version; a file missing from the package,
an extra one, or one whose size or SHA-256 differs from the manifest; any file but checkpoints
(``.pt``, read with ``torch.load(weights_only=True)`` and holding the fields `predict` needs),
JSON, Markdown and PNG pictures; documents that do not parse (plans, selection, fingerprint) or
a selection naming checkpoints the package lacks.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from autounet.errors import AutounetError
from autounet.packaging.contents import load_fingerprint_document
from autounet.packaging.manifest import (
    ALLOWED_SUFFIXES,
    MANIFEST_LIMIT_BYTES,
    PNG_SIGNATURE,
    PackageManifest,
    read_manifest_bytes,
    sha256_of_stream,
)
from autounet.planning.plans import load_plans
from autounet.selection_document import load_selection
from autounet.training.checkpoint import check_inference_content, load_checkpoint, require_safe_torch
from autounet.utils.loaders import read_json, read_text, regular_file
from autounet.utils.temporary import remove_stale_temporaries, temporary_prefix
from autounet.workspace import (
    Workspace,
    checkpoint_path,
    package_cache_dir,
    package_cache_entry,
    package_complete_marker,
    validate_name,
)

_CHUNK = 1 << 20
# Caps on what a package may declare, per kind of file (uncompressed bytes), and in all: far above
# what autounet writes (JSON documents of kilobytes, checkpoints of megabytes to a few GB).
MEMBER_LIMITS = {".pt": 16 << 30, ".json": 16 << 20, ".md": 4 << 20, ".png": 32 << 20}
TOTAL_LIMIT_BYTES = 64 << 30
# Deflate reaches about 1000:1 on runs of one byte; autounet's JSON compresses about 10:1 and its
# checkpoints and pictures are stored. A member of over a megabyte beyond this ratio is a bomb.
MAX_RATIO = 100
_RATIO_FREE_BYTES = 1 << 20
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


@dataclass
class _Listing:
    """A package's entries after the checks that read no file content but the manifest."""

    top: str  # the package's folder, the dataset name
    manifest: PackageManifest
    manifest_sha256: str  # of manifest.json's bytes
    members: dict[str, zipfile.ZipInfo]  # path under ``top/`` -> entry, the manifest included


def package_sha256(path: str | Path) -> str:
    """The SHA-256 of the package file (the key of its unpacked copy)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return sha256_of_stream(fh)[0]
    except OSError as exc:
        raise AutounetError(f"{path}: cannot read the package ({exc.strerror or exc})") from None


def open_package(path: str | Path) -> Path:
    """The workspace folder (``W/NAME``) of the model package ``path`` (a ``.zip`` made by
    `autounet package`), verified and unpacked into the cache on first use, re-verified and
    reused after (rebuilt from ``path`` when the cached copy was changed)."""
    path = regular_file(path, "model package", "cannot read the package")
    require_safe_torch(path)
    try:
        with open(path, "rb") as fh:
            digest = sha256_of_stream(fh)[0]
            entry = package_cache_entry(digest)
            if os.path.lexists(entry):
                fh.seek(0)
                listing = _list_package(fh, path)  # the manifest from the file just hashed
                if _cached_problem(entry, digest, listing) is None:
                    return entry / listing.top
    except OSError as exc:
        raise AutounetError(f"{path}: cannot read the package ({exc.strerror or exc})") from None
    return _unpack_private_copy(path)


def _unpack_private_copy(path: Path) -> Path:
    """Copy the package into the cache while hashing it, then list, check and unpack that copy."""
    cache = package_cache_dir()
    made = _missing_folders(cache)
    copy: Path | None = None
    try:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(cache)
            fd, name = tempfile.mkstemp(prefix=temporary_prefix(), suffix=".package.zip", dir=cache)
            copy = Path(name)
            with os.fdopen(fd, "wb") as out, open(path, "rb") as source:
                digest = hashlib.sha256()
                while block := source.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
        except OSError as exc:
            where = exc.filename if exc.filename and Path(exc.filename) == path else cache
            raise AutounetError(f"{where}: cannot copy the package {path} here ({exc.strerror or exc})") from None
        key = digest.hexdigest()
        with open(copy, "rb") as fh:
            listing = _list_package(fh, path)
        entry = package_cache_entry(key)
        problem = _cached_problem(entry, key, listing) if os.path.lexists(entry) else None
        if os.path.lexists(entry) and problem is None:
            return entry / listing.top  # another process unpacked it meanwhile
        return _unpack(path, copy, listing, key, problem)
    except BaseException:
        if copy is not None:
            copy.unlink(missing_ok=True)
            copy = None
        _remove_made(made)
        raise
    finally:
        if copy is not None:
            copy.unlink(missing_ok=True)


def _list_package(source: IO[bytes], path: Path) -> _Listing:
    """Every check that needs no file content but the manifest's: the archive, its entries'
    layout, names, kinds and declared sizes, the manifest, and that the files are exactly those
    the manifest lists, with its sizes. ``source``: the open package (named ``path`` in errors)."""
    try:
        archive = zipfile.ZipFile(source)
    except zipfile.BadZipFile as exc:
        raise AutounetError(
            f"{path}: not a model package: not a zip archive, or a damaged or truncated one ({exc})"
        ) from None
    except OSError as exc:
        raise AutounetError(f"{path}: cannot read the package ({exc.strerror or exc})") from None
    with archive:
        infos = archive.infolist()
        if not infos:
            raise AutounetError(f"{path}: an empty zip archive, not a model package")
        _check_layout(archive, source, path)
        tops, members, folders = set(), {}, set()
        for info in infos:
            parts = _entry_parts(path, info)
            tops.add(parts[0])
            relative = "/".join(parts[1:])
            if info.is_dir():
                folders.add(relative)
                continue
            if not relative:
                raise AutounetError(f"{path}: entry {info.filename!r} lies outside the package's folder")
            if relative in members:
                raise AutounetError(f"{path}: entry {info.filename!r} appears twice")
            suffix = PurePosixPath(relative).suffix.lower()
            if suffix not in ALLOWED_SUFFIXES:
                raise AutounetError(
                    f"{path}: refused: entry {info.filename!r} is not a kind of file a package may hold "
                    f"(only checkpoints, JSON, Markdown and PNG: {', '.join(ALLOWED_SUFFIXES)})"
                )
            _check_size(path, info, MEMBER_LIMITS[suffix])
            members[relative] = info
        total = sum(i.file_size for i in members.values())
        if total > TOTAL_LIMIT_BYTES:
            raise AutounetError(
                f"{path}: refused: its files declare {total} bytes in all, over the cap of {TOTAL_LIMIT_BYTES}"
            )
        if len(tops) != 1:
            raise AutounetError(
                f"{path}: entries lie in {len(tops)} top folders ({', '.join(sorted(tops))}); a package has one, NAME/"
            )
        top = tops.pop()
        try:
            validate_name(top)
        except AutounetError:
            raise AutounetError(f"{path}: the package's folder {top!r} is not a usable dataset name") from None
        manifest_name = _relative(Workspace.of(top).package_manifest_json, top)
        info = members.get(manifest_name)
        if info is None:
            raise AutounetError(f"{path}: no {top}/{manifest_name}: not a model package made by `autounet package`")
        if info.file_size > MANIFEST_LIMIT_BYTES:
            raise AutounetError(f"{path}: {top}/{manifest_name} is {info.file_size} bytes, too large for a manifest")
        raw = _read(archive, info, path)
        manifest = read_manifest_bytes(raw, f"{path}: {top}/{manifest_name}")
    if manifest.dataset != top:
        raise AutounetError(
            f"{path}: the manifest names the dataset {manifest.dataset!r}, the package's folder is {top!r}"
        )
    files = {name for name in members if name != manifest_name}
    missing = sorted(set(manifest.files) - files)
    if missing:
        raise AutounetError(
            f"{path}: checksum mismatch: {_few(missing)} listed in the manifest but missing from the package"
        )
    extra = sorted(files - set(manifest.files))
    if extra:
        raise AutounetError(f"{path}: checksum mismatch: {_few(extra)} in the package but not in its manifest")
    parents = {str(PurePosixPath(name).parent) for name in files} | {""}
    parents |= {str(p) for name in files for p in PurePosixPath(name).parents}
    stray = sorted(f for f in folders if f.rstrip("/") not in parents and f)
    if stray:
        raise AutounetError(f"{path}: folder entry {stray[0]!r} holds no file of the manifest")
    for name in sorted(files):
        if members[name].file_size != manifest.files[name].size:
            raise AutounetError(
                f"{path}: checksum mismatch: {top}/{name} holds {members[name].file_size} bytes, the manifest says "
                f"{manifest.files[name].size}"
            )
    return _Listing(top, manifest, hashlib.sha256(raw).hexdigest(), members)


def _check_size(path: Path, info: zipfile.ZipInfo, limit: int) -> None:
    """Refuse an entry that declares more than ``limit`` bytes or is compressed like a zip bomb."""
    if info.file_size > limit:
        raise AutounetError(
            f"{path}: refused: entry {info.filename!r} declares {info.file_size} bytes, over the cap of {limit} "
            "for its kind of file"
        )
    if info.file_size > _RATIO_FREE_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise AutounetError(
            f"{path}: refused: entry {info.filename!r} is compressed {info.file_size / max(info.compress_size, 1):.0f} "
            f"to 1 (over {MAX_RATIO} to 1: a zip bomb, not a package autounet wrote)"
        )


def _check_layout(archive: zipfile.ZipFile, source: IO[bytes], path: Path) -> None:
    """Refuse entries whose data overlap another entry or the central directory (one stored byte
    range unpacked several times, a zip bomb; checked here since Python fixed it only in 3.11.8)."""
    spans = []
    try:
        for info in archive.infolist():
            source.seek(info.header_offset)
            header = source.read(_LOCAL_HEADER.size)
            if len(header) != _LOCAL_HEADER.size:
                raise AutounetError(f"{path}: entry {info.filename!r} lies beyond the end of the file (truncated)")
            signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
            if signature != b"PK\x03\x04":
                raise AutounetError(f"{path}: entry {info.filename!r} has no local header: a damaged zip archive")
            end = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length + info.compress_size
            spans.append((info.header_offset, end, info.filename))
    except OSError as exc:
        raise AutounetError(f"{path}: cannot read the package ({exc.strerror or exc})") from None
    spans.sort()
    directory = getattr(archive, "start_dir", None)
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if end > start:
            raise AutounetError(f"{path}: refused: entries {name!r} and {other!r} overlap (a zip bomb)")
    if directory is not None and spans and spans[-1][1] > directory:
        raise AutounetError(f"{path}: refused: entry {spans[-1][2]!r} overlaps the archive's directory")


def _entry_parts(path: Path, info: zipfile.ZipInfo) -> list[str]:
    """The path components of an entry; refused when it could land outside the target folder, is
    not a plain file or folder (a link, a device), or is encrypted."""
    name = info.filename
    if not name or name.startswith("/") or "\\" in name or "\x00" in name or (len(name) > 1 and name[1] == ":"):
        raise AutounetError(f"{path}: refused: entry {name!r} has an absolute or unsafe path")
    parts = name.rstrip("/").split("/") if info.is_dir() else name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise AutounetError(f"{path}: refused: entry {name!r} would leave the package's folder or has an empty part")
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        raise AutounetError(f"{path}: refused: entry {name!r} is a symbolic link")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR) or (kind != 0 and (kind == stat.S_IFDIR) != info.is_dir()):
        raise AutounetError(f"{path}: refused: entry {name!r} is not a regular file or folder")
    if info.flag_bits & 0x1:
        raise AutounetError(f"{path}: refused: entry {name!r} is encrypted")
    return parts


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bytes:
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, ValueError) as exc:
        raise AutounetError(f"{path}: entry {info.filename!r} is damaged ({exc})") from None
    except Exception as exc:  # zlib.error and the like: damaged compressed data
        raise AutounetError(f"{path}: entry {info.filename!r} is damaged ({exc})") from None


def _unpack(path: Path, copy: Path, listing: _Listing, digest: str, problem: str | None) -> Path:
    """Unpack the private ``copy`` of ``path`` into a temporary folder in the cache, checking every
    file's size and SHA-256 as it is written and its content after; rename it into place when all
    passed. ``problem``: why the entry already there is being replaced (None: there is none)."""
    cache = package_cache_dir()
    entry = package_cache_entry(digest)
    needed = sum(f.size for f in listing.manifest.files.values())
    try:
        free = shutil.disk_usage(cache).free
        if needed > free:
            raise AutounetError(
                f"{path}: unpacking needs {needed / 1e6:.1f} MB in {cache}, which has {free / 1e6:.1f} MB free "
                "(set $AUTOUNET_CACHE to a folder with room)"
            )
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(), suffix=f".{digest[:16]}", dir=cache))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the entry from a shared cache's users
    except OSError as exc:
        raise AutounetError(f"{cache}: cannot unpack the package {path} here ({exc.strerror or exc})") from None
    try:
        root = tmp / listing.top
        _write_files(copy, path, listing, root)
        _check_content(path, listing, root)
        with open(package_complete_marker(tmp), "x", encoding="utf-8") as fh:
            fh.write(digest + "\n")
        if problem is not None:
            _move_aside(entry, path, problem)
        try:
            os.rename(tmp, entry)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) and not os.path.lexists(entry):
                raise
            # another process unpacked the same package first: use its copy if it is sound
            again = _cached_problem(entry, digest, listing)
            if again is not None:
                raise AutounetError(_damaged(entry, path, again)) from None
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        where = exc.filename if exc.filename else cache
        raise AutounetError(f"{where}: cannot unpack the package {path} ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry / listing.top


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _damaged(entry: Path, path: Path, problem: str) -> str:
    return (
        f"{entry}: the unpacked copy of {path} was changed ({problem}) and cannot be replaced: it belongs to "
        "another user of this cache (ask them to delete it), or set $AUTOUNET_CACHE to a folder of your own"
    )


def _move_aside(entry: Path, path: Path, problem: str) -> None:
    """Take the damaged ``entry`` out of use (renamed to a temporary, then deleted)."""
    aside = entry.with_name(f"{temporary_prefix()}{os.urandom(4).hex()}.damaged")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AutounetError(_damaged(entry, path, f"{problem}; {exc.strerror or exc}")) from None
    if aside.is_symlink() or not aside.is_dir():
        aside.unlink(missing_ok=True)
    else:
        shutil.rmtree(aside, ignore_errors=True)  # what is left (another user's files) a later run removes


def _write_files(copy: Path, path: Path, listing: _Listing, root: Path) -> None:
    with zipfile.ZipFile(copy) as archive:
        for name, info in listing.members.items():
            target = root.joinpath(*name.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            digest, size = hashlib.sha256(), 0
            try:
                with archive.open(info) as source, open(target, "xb") as out:
                    while block := source.read(_CHUNK):
                        digest.update(block)
                        size += len(block)
                        if size > info.file_size:  # never more than declared (and capped)
                            raise AutounetError(f"{path}: entry {info.filename!r} holds more than it declares")
                        out.write(block)
            except (OSError, AutounetError):
                raise
            except Exception as exc:  # a bad CRC, truncated or undecodable data
                raise AutounetError(f"{path}: entry {info.filename!r} is damaged ({exc})") from None
            expected = listing.manifest.files.get(name)
            if expected is not None and (size != expected.size or digest.hexdigest() != expected.sha256):
                raise AutounetError(
                    f"{path}: checksum mismatch: {listing.top}/{name} differs from the manifest "
                    f"(SHA-256 {digest.hexdigest()[:12]}..., expected {expected.sha256[:12]}...)"
                )
            if expected is None and digest.hexdigest() != listing.manifest_sha256:
                raise AutounetError(f"{path}: {listing.top}/{name} differs from the manifest read before")


def _check_content(path: Path, listing: _Listing, root: Path) -> None:
    """Each file is what its kind says (checkpoints read as tensors and plain data only, with
    the fields `predict` reads), and the documents `predict` reads parse and agree with the
    checkpoints the package holds."""
    for name in listing.manifest.files:
        file = root.joinpath(*name.split("/"))
        suffix = file.suffix.lower()
        with _naming(path, root, listing.top):
            if suffix == ".pt":
                check_inference_content(load_checkpoint(file, mmap=True), file)
            elif suffix == ".json":
                read_json(file, limit=MEMBER_LIMITS[".json"])
            elif suffix == ".md":
                read_text(file, limit=MEMBER_LIMITS[".md"])
            elif suffix == ".png":
                with open(file, "rb") as fh:
                    if fh.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                        raise AutounetError(f"{file}: not a PNG picture")
    ws = Workspace.of(root)
    with _naming(path, root, listing.top):
        for document in (ws.dataset_json, ws.plans_json, ws.selection_json):
            if not document.is_file():
                raise AutounetError(f"{document}: missing; every package holds it")
        read_json(ws.dataset_json, dict)
        load_plans(ws.plans_json)
        if ws.fingerprint_json.is_file():
            load_fingerprint_document(ws.fingerprint_json)
        winner = load_selection(ws.selection_json).winner
        for configuration in winner.members:
            for fold in winner.folds:
                final = checkpoint_path(ws.fold_dir(configuration, fold), "final")
                if not final.is_file():
                    raise AutounetError(
                        f"{ws.selection_json}: its model {winner.name} needs {configuration} fold {fold}, whose "
                        "checkpoint is not in the package"
                    )


@contextmanager
def _naming(package: Path, root: Path, top: str) -> Iterator[None]:
    """Re-raise an error about an unpacked file as a refusal of the package, naming its entry."""
    try:
        yield
    except AutounetError as exc:
        raise AutounetError(f"{package}: refused: {str(exc).replace(str(root), top)}") from None


def _cached_problem(entry: Path, digest: str, listing: _Listing) -> str | None:
    """What is wrong with the unpacked copy ``entry`` of the package ``listing`` describes, or None:
    the completion marker holds the package's SHA-256, and the manifest and every file it lists are
    plain files (no symbolic link on the way) with the package's sizes and SHA-256 checksums."""
    expected = {name: (f.size, f.sha256) for name, f in listing.manifest.files.items()}
    manifest = _relative(Workspace.of(listing.top).package_manifest_json, listing.top)
    expected[manifest] = (listing.members[manifest].file_size, listing.manifest_sha256)
    try:
        if stat.S_ISLNK(os.lstat(entry).st_mode):
            return "it is a symbolic link"
        marker = _plain_file(entry, [package_complete_marker(entry).name])
        with _open_plain(marker) as fh:
            if fh.read(128).decode("utf-8", "replace").strip() != digest:
                return "its completion marker does not name the package"
        for name, (size, sha256) in expected.items():
            file = _plain_file(entry, [listing.top, *name.split("/")])
            with _open_plain(file) as fh:
                found, found_size = sha256_of_stream(fh)
            if (found_size, found) != (size, sha256):
                return f"{listing.top}/{name} differs from the package"
    except _NotPlain as exc:
        return str(exc)
    except FileNotFoundError as exc:
        return f"{_inside(entry, exc.filename)} is missing"
    except OSError as exc:
        return f"{_inside(entry, exc.filename)} cannot be read ({exc.strerror or exc})"
    return None


class _NotPlain(Exception):
    """A path in a cache entry that is a symbolic link or not a plain file or folder."""


def _plain_file(entry: Path, parts: list[str]) -> Path:
    """``entry/parts...``, refused (:class:`_NotPlain`) if any step is a link or not a folder/file."""
    current = entry
    for i, part in enumerate(parts):
        current = current / part
        mode = os.lstat(current).st_mode
        if stat.S_ISLNK(mode):
            raise _NotPlain(f"{current.relative_to(entry).as_posix()} is a symbolic link")
        wanted = stat.S_ISREG if i == len(parts) - 1 else stat.S_ISDIR
        if not wanted(mode):
            raise _NotPlain(f"{current.relative_to(entry).as_posix()} is not a plain file or folder")
    return current


def _open_plain(file: Path) -> IO[bytes]:
    """``file`` opened without following a link put there after it was checked."""
    return os.fdopen(os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb")


def _inside(entry: Path, filename: str | None) -> str:
    if not filename:
        return "a file"
    try:
        return Path(filename).relative_to(entry).as_posix()
    except ValueError:
        return str(filename)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    out = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        out.append(p)
    return out


def _remove_made(folders: list[Path]) -> None:
    """Remove the folders this unpack created, if they are still empty (nothing left behind)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _relative(path: Path, top: str) -> str:
    return path.relative_to(top).as_posix()


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
