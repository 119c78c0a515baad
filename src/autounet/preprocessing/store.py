"""Preprocessed cases on disk: ``W/NAME/preprocessed/CONFIG/``.

Per case:

* ``CASE_image.npy``: ``(C, Z, Y, X)`` float32 (or float16), network axis order;
* ``CASE_seg.npy``: ``(Z, Y, X)`` class indices (uint8, or uint16 beyond 255 classes);
* ``CASE_locations.npy``: ``(N, 4)`` int32 rows ``(class, z, y, x)``, sorted by class;
* ``CASE.json``: :class:`CaseProperties`, written **last**: its presence (with matching file
  sizes and preprocessing key) is what marks the case complete.

The ``.npy`` files open memory-mapped, so a patch is read without loading the volume. Every file
is written to a temporary name and renamed, so an interrupted run never leaves a file that looks
complete. When two configurations share identical data (2d and 3d_fullres do), the files are
hard-linked (copied where links are not supported) rather than computed twice.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autounet.data.geometry import Geometry
from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write, atomic_write_json
from autounet.utils.loaders import load_npy, npy_header, npy_problem
from autounet.utils.plain_data import load_json_dataclass, to_plain

PROPERTIES_SCHEMA_VERSION = 1
ARRAY_FILES = ("image", "seg", "locations")


@dataclass
class ClassLocationInfo:
    voxels: int
    stored: int
    components: int | None = None  # reported when the coordinates are a sample


@dataclass
class CaseProperties:
    """Everything needed to use a preprocessed case and to map results back to the original image."""

    case_id: str
    configuration: str
    preprocess_key: str  # hash of every setting that determines the stored data
    original_geometry: dict  # Geometry.to_dict(): spacing (z, y, x), origin/direction (ITK)
    original_shape: list[int]  # raw (Z, Y, X)
    crop_bbox: list[list[int]]  # raw axis order, [start, stop)
    shape_after_crop: list[int]  # raw order
    transpose_forward: list[int]
    spacing_after_crop: list[float]  # network order (the original spacing, transposed)
    target_spacing: list[float]  # network order
    spacing_after_resampling: list[float]  # network order: extent / shape, ~ target_spacing
    shape_after_resampling: list[int]  # network order; the stored arrays' spatial shape
    separate_axis: int | None  # network axis resampled on its own (anisotropic data), or None
    image_dtype: str
    seg_dtype: str
    normalization: list[dict]  # per channel: scheme, subtracted, divided_by
    classes: dict[str, ClassLocationInfo]  # class index -> voxel and coordinate counts
    file_bytes: dict[str, int] = field(default_factory=dict)  # array file -> size, checked on resume
    has_label: bool = True
    schema_version: int = PROPERTIES_SCHEMA_VERSION

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_dict(self.original_geometry)


def case_paths(folder: Path, case_id: str) -> dict[str, Path]:
    return {
        "image": folder / f"{case_id}_image.npy",
        "seg": folder / f"{case_id}_seg.npy",
        "locations": folder / f"{case_id}_locations.npy",
        "properties": folder / f"{case_id}.json",
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def write_case(folder: Path, props: CaseProperties, image: np.ndarray, seg: np.ndarray, locations: np.ndarray) -> None:
    """Write a case's arrays, then its properties (the completion marker)."""
    paths = case_paths(folder, props.case_id)
    paths["properties"].unlink(missing_ok=True)  # the case is incomplete until the end
    for name, array in (("image", image), ("seg", seg), ("locations", locations)):
        atomic_write(paths[name], lambda p, a=array: _save_npy(p, a))
        props.file_bytes[name] = paths[name].stat().st_size
    atomic_write_json(paths["properties"], to_plain(props))


def link_case(source: Path, folder: Path, props: CaseProperties) -> None:
    """Give ``folder`` the arrays of a complete case in ``source`` (hard links, else copies)."""
    src, dst = case_paths(source, props.case_id), case_paths(folder, props.case_id)
    dst["properties"].unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ARRAY_FILES:
        if dst[name].exists() and os.path.samefile(src[name], dst[name]):
            # Already the same file; renaming a link over another link to the same inode
            # does nothing (POSIX rename()) and would leave the temporary behind.
            continue

        def place(tmp: Path, s: Path = src[name]) -> None:
            tmp.unlink()
            try:
                os.link(s, tmp)
            except OSError:
                shutil.copyfile(s, tmp)

        atomic_write(dst[name], place)
    atomic_write_json(dst["properties"], to_plain(props))


def read_properties(folder: Path, case_id: str) -> CaseProperties:
    return load_json_dataclass(
        CaseProperties, case_paths(folder, case_id)["properties"], "case properties", PROPERTIES_SCHEMA_VERSION
    )


def is_complete(folder: Path, case_id: str, key: str) -> bool:
    """Whether ``case_id`` was fully written with preprocessing ``key`` (and is still intact)."""
    paths = case_paths(folder, case_id)
    if not paths["properties"].is_file():
        return False
    try:
        props = read_properties(folder, case_id)
    except Exception:  # a marker we cannot read is as good as none: redo the case
        return False
    if props.preprocess_key != key:
        return False
    return not case_problems(folder, props)


def case_problems(folder: Path, props: CaseProperties) -> list[str]:
    """What is wrong with a written case's arrays, judged from their headers and sizes only (a few
    hundred bytes read per file): missing, of another size than when written, truncated, an array
    of Python objects, or shapes and types that disagree with the properties."""
    paths = case_paths(folder, props.case_id)
    problems, headers = [], {}
    for name in ARRAY_FILES:
        p = paths[name]
        if not p.is_file():
            problems.append(f"{p.name}: missing")
            continue
        problem = npy_problem(p)  # not an array, Python objects, shorter than its header says
        if problem is None:
            size, written = p.stat().st_size, props.file_bytes.get(name)
            if size != written:
                problem = f"{size} bytes, " + (f"{written} when it was written" if written else "size not recorded")
        if problem:
            problems.append(f"{p.name}: {problem}")
        else:
            headers[name] = npy_header(p)
    shape = tuple(props.shape_after_resampling)
    if "image" in headers and (len(headers["image"].shape) != 4 or headers["image"].shape[1:] != shape):
        problems.append(
            f"{paths['image'].name}: shape {headers['image'].shape}, expected (C, {', '.join(map(str, shape))})"
        )
    if "seg" in headers and headers["seg"].shape != shape:
        problems.append(f"{paths['seg'].name}: shape {headers['seg'].shape}, expected {shape}")
    if "locations" in headers and (len(headers["locations"].shape) != 2 or headers["locations"].shape[1] != 4):
        problems.append(f"{paths['locations'].name}: shape {headers['locations'].shape}, expected (N, 4)")
    return problems


def check_preprocessed(folder: Path, case_ids: list[str], command: str) -> None:
    """Refuse to train on damaged preprocessed cases: every case of ``case_ids`` in ``folder`` is
    checked from its arrays' headers and sizes (see :func:`case_problems`); one error lists the bad
    cases and the ``command`` that redoes exactly them."""
    bad = []
    for case_id in case_ids:
        try:
            problems = case_problems(folder, read_properties(folder, case_id))
        except AutounetError as exc:
            problems = [str(exc)]
        if problems:
            bad.append(f"{case_id} ({'; '.join(problems)})")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise AutounetError(
            f"{folder}: {len(bad)} preprocessed case(s) are damaged:\n  {shown}\n"
            f"run `{command}` to redo them (it redoes only the damaged cases)"
        )


def remove_temporaries(folder: Path) -> int:
    """Delete the temporaries left by an interrupted run (of a dead process, see
    :mod:`autounet.utils.temporary`; and ``.tmp.*`` of versions before it); return how many."""
    from autounet.utils.temporary import remove_stale_temporaries

    n = len(remove_stale_temporaries(folder))
    if folder.is_dir():
        for p in folder.glob(".tmp.*"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def open_case(
    folder: Path, case_id: str, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, CaseProperties]:
    """Image, segmentation, class locations (memory-mapped by default) and properties of a case."""
    paths = case_paths(folder, case_id)
    mode = "r" if mmap else None
    image = load_npy(paths["image"], mmap_mode=mode)
    seg = load_npy(paths["seg"], mmap_mode=mode)
    locations = load_npy(paths["locations"])
    return image, seg, locations, read_properties(folder, case_id)
