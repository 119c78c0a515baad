"""Opening a model package: verify it, unpack it once into the cache, and hand back its workspace folder.

:func:`open_package` keys the unpacked copy by the SHA-256 of the package file
(``package_cache_dir()/SHA256/NAME``, a ``W/NAME`` folder that ``predict -m`` takes as it is). A
package is unpacked into a temporary folder beside it and renamed into place only when every
check passed, with the marker ``SHA256/complete`` written last: an interrupted or concurrent
unpack never leaves a half-written copy in use, and a refused package leaves nothing behind.

Refused, with one :class:`~autounet.errors.AutounetError` naming the package: a file that is not
a zip archive or is truncated; entries that would land outside the folder (absolute paths,
``..``, backslashes), links and other special entries, encrypted entries; a missing or malformed
``manifest.json`` or one of another format version; a file missing from the package, an extra
one, or one whose size or SHA-256 differs from the manifest; any file but checkpoints (``.pt``,
read with ``torch.load(weights_only=True)``), JSON, Markdown and PNG pictures; documents that do
not parse (plans, selection) or a selection naming checkpoints the package lacks.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from autounet.errors import AutounetError
from autounet.packaging.manifest import (
    ALLOWED_SUFFIXES,
    MANIFEST_LIMIT_BYTES,
    PNG_SIGNATURE,
    PackageManifest,
    read_manifest_bytes,
    sha256_of_stream,
)
from autounet.planning.fingerprint import load_fingerprint
from autounet.planning.plans import load_plans
from autounet.selection_document import load_selection
from autounet.training.checkpoint import load_checkpoint
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


@dataclass
class _Listing:
    """A package's entries after the checks that read no file content."""

    top: str  # the package's folder, the dataset name
    manifest: PackageManifest
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
    `autounet package`), verified and unpacked into the cache on first use, reused after."""
    path = regular_file(path, "model package", "cannot read the package")
    digest = package_sha256(path)
    entry = package_cache_entry(digest)
    if entry.exists():
        return _cached_root(entry, digest, path)
    listing = _list_package(path)
    return _unpack(path, listing, digest)


def _list_package(path: Path) -> _Listing:
    """Every check that needs no file content: the archive, its entries' names and kinds, the
    manifest, and that the files are exactly those the manifest lists, with its sizes."""
    try:
        archive = zipfile.ZipFile(path)
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
            if PurePosixPath(relative).suffix.lower() not in ALLOWED_SUFFIXES:
                raise AutounetError(
                    f"{path}: refused: entry {info.filename!r} is not a kind of file a package may hold "
                    f"(only checkpoints, JSON, Markdown and PNG: {', '.join(ALLOWED_SUFFIXES)})"
                )
            members[relative] = info
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
        manifest = read_manifest_bytes(_read(archive, info, path), f"{path}: {top}/{manifest_name}")
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
    return _Listing(top, manifest, members)


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


def _unpack(path: Path, listing: _Listing, digest: str) -> Path:
    """Unpack into a temporary folder in the cache, checking every file's size and SHA-256 as it
    is written and its content after; rename it into place when all passed."""
    cache = package_cache_dir()
    entry = package_cache_entry(digest)
    made = _missing_folders(cache)
    needed = sum(f.size for f in listing.manifest.files.values())
    try:
        cache.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(cache)
        free = shutil.disk_usage(cache).free
        if needed > free:
            raise AutounetError(
                f"{path}: unpacking needs {needed / 1e6:.1f} MB in {cache}, which has {free / 1e6:.1f} MB free "
                "(set $AUTOUNET_CACHE to a folder with room)"
            )
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(), suffix=f".{digest[:16]}", dir=cache))
    except OSError as exc:
        _remove_made(made)
        raise AutounetError(f"{cache}: cannot unpack the package {path} here ({exc.strerror or exc})") from None
    except BaseException:
        _remove_made(made)
        raise
    try:
        root = tmp / listing.top
        _write_files(path, listing, root)
        _check_content(path, listing, root)
        package_complete_marker(tmp).write_text(digest + "\n", encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) and not entry.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process unpacked the same package first
            return _cached_root(entry, digest, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        where = exc.filename if exc.filename else cache
        raise AutounetError(f"{where}: cannot unpack the package {path} ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise
    return entry / listing.top


def _write_files(path: Path, listing: _Listing, root: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        for name, info in listing.members.items():
            target = root.joinpath(*name.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            digest, size = hashlib.sha256(), 0
            try:
                with archive.open(info) as source, open(target, "xb") as out:
                    while block := source.read(_CHUNK):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
            except OSError:
                raise
            except Exception as exc:  # a bad CRC, truncated or undecodable data
                raise AutounetError(f"{path}: entry {info.filename!r} is damaged ({exc})") from None
            expected = listing.manifest.files.get(name)
            if expected is not None and (size != expected.size or digest.hexdigest() != expected.sha256):
                raise AutounetError(
                    f"{path}: checksum mismatch: {listing.top}/{name} differs from the manifest "
                    f"(SHA-256 {digest.hexdigest()[:12]}..., expected {expected.sha256[:12]}...)"
                )


def _check_content(path: Path, listing: _Listing, root: Path) -> None:
    """Each file is what its kind says (checkpoints read as tensors and plain data only), and the
    documents `predict` reads parse and agree with the checkpoints the package holds."""
    for name in listing.manifest.files:
        file = root.joinpath(*name.split("/"))
        suffix = file.suffix.lower()
        with _naming(path, root, listing.top):
            if suffix == ".pt":
                load_checkpoint(file, mmap=True)
            elif suffix == ".json":
                read_json(file)
            elif suffix == ".md":
                read_text(file)
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
            load_fingerprint(ws.fingerprint_json)
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


def _cached_root(entry: Path, digest: str, path: Path) -> Path:
    """The unpacked copy's workspace folder, after a cheap check: the completion marker holds
    the package's SHA-256 and every file of the manifest is there with its size."""
    marker = package_complete_marker(entry)
    try:
        complete = marker.read_text(encoding="utf-8").strip() == digest
        roots = [p for p in entry.iterdir() if p.is_dir()]
    except OSError:
        complete, roots = False, []
    damaged = f"{entry}: the unpacked copy of {path} is incomplete or was changed; delete this folder to unpack the package again"
    if not complete or len(roots) != 1:
        raise AutounetError(damaged)
    ws = Workspace.of(roots[0])
    try:
        manifest = read_manifest_bytes(ws.package_manifest_json.read_bytes(), str(ws.package_manifest_json))
        for name, f in manifest.files.items():
            if ws.root.joinpath(*name.split("/")).stat().st_size != f.size:
                raise AutounetError(damaged)
    except (OSError, AutounetError):
        raise AutounetError(damaged) from None
    return ws.root


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
