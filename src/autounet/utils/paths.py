"""Names that come from data (a DICOM UID, a PatientID, a file name) turned into paths only after
a check that the result stays inside its folder."""

from __future__ import annotations

import os
from pathlib import Path

from autounet.errors import AutounetError


def inside(folder: str | Path, name: str, what: str = "output folder") -> Path:
    """``folder / name``, refused (:class:`AutounetError`) unless ``name`` is one plain file name
    and the path still lies in ``folder`` once every link is resolved (a link placed in the folder
    that points elsewhere is refused too, so nothing outside ``folder`` is ever written through it).
    """
    folder = Path(folder)
    if not name or name in (".", "..") or "/" in name or "\0" in name or (os.altsep and os.altsep in name):
        raise AutounetError(f"{folder}: {name!r} is not a file name (a name from the data may not be a path)")
    path = folder / name
    try:
        base = folder.resolve()
        target = path.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        raise AutounetError(f"{path}: cannot resolve the path ({exc})") from None
    if target.parent != base:
        raise AutounetError(f"{path}: resolves outside the {what} {folder} (to {target}); nothing was written")
    return path
