"""A model package's ``manifest.json``: what made it, what it is, and the checksum of every file.

The manifest lies beside the packaged workspace files (``NAME/manifest.json`` in the zip) and
lists every other file of the package with its size and SHA-256; a package whose files differ
from it in any way is refused. Its fields are described in docs/how-to/deploy.md (`autounet package`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import IO, Any

from autounet.errors import AutounetError
from autounet.utils.loaders import parse_json
from autounet.utils.plain_data import from_plain

PACKAGE_FORMAT = "autounet-model-package"
# Version 2: the fingerprint is a summary without per-case data, the report is optional, and the
# manifest names the workspace's model (``workspace_model``). Version 1 packages are still read.
PACKAGE_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
# The kinds of file a package may hold: checkpoints (tensors and plain data, loaded with
# weights_only=True), JSON documents, report.md and its pictures. Anything else is refused.
ALLOWED_SUFFIXES = (".pt", ".json", ".md", ".png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MANIFEST_LIMIT_BYTES = 16 * 1024 * 1024


@dataclass
class PackagedFile:
    """One file of the package (path relative to the package's ``NAME/`` folder)."""

    size: int
    sha256: str


@dataclass
class WorkspaceModel:
    """The model `autounet select` chose in the packaged workspace (its cross-validation scores
    are of these configurations and folds, which the package may run fewer of)."""

    name: str
    members: list[str]
    folds: list[int]


@dataclass
class PackageManifest:
    """The content of a package's ``manifest.json``."""

    format: str
    format_version: int
    autounet_version: str
    torch_version: str
    created: str  # ISO 8601, UTC
    dataset: str  # the workspace name: the package's top folder
    description: str
    license: str
    files: dict[str, PackagedFile]  # every file but the manifest -> its size and checksum
    workspace_model: WorkspaceModel | None = None  # format 2 on


def sha256_of_stream(stream: IO[bytes], chunk: int = 1 << 20) -> tuple[str, int]:
    """The SHA-256 (hex) and size of everything ``stream`` still holds."""
    digest, size = hashlib.sha256(), 0
    while True:
        block = stream.read(chunk)
        if not block:
            return digest.hexdigest(), size
        digest.update(block)
        size += len(block)


def parse_manifest(data: Any, where: str) -> PackageManifest:
    """The manifest from its JSON content; one error naming ``where`` and the field if it is malformed,
    of another format, or of a format version this autounet does not read."""
    if not isinstance(data, dict):
        raise AutounetError(f"{where}: expected a JSON object, found {type(data).__name__}")
    if data.get("format") != PACKAGE_FORMAT:
        raise AutounetError(f"{where}: not an autounet model package manifest (format {data.get('format')!r})")
    version = data.get("format_version")
    if isinstance(version, bool) or version not in READABLE_FORMAT_VERSIONS:
        raise AutounetError(
            f"{where}: package format version {version!r} is not supported: this autounet reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))} (a newer autounet may read it)"
        )
    manifest = from_plain(PackageManifest, data, where)
    for name, entry in manifest.files.items():
        if len(entry.sha256) != 64 or any(c not in "0123456789abcdef" for c in entry.sha256):
            raise AutounetError(f"{where}.files.{name}.sha256: not a SHA-256 in hex ({entry.sha256!r})")
        if entry.size < 0:
            raise AutounetError(f"{where}.files.{name}.size: negative ({entry.size})")
    return manifest


def read_manifest_bytes(raw: bytes, where: str) -> PackageManifest:
    """:func:`parse_manifest` of a manifest's bytes (UTF-8 JSON)."""
    return parse_manifest(parse_json(raw, where), where)
