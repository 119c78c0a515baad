"""The images to predict: folders or files, in MSD naming (one file per case, multi-channel
images 4D) or nnU-Net v2 naming (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... one file per
channel), or DICOM series (a folder tree of them: one case per series, one channel; see
:mod:`autounet.data.dicom`). Everything is checked from the file headers before any prediction
starts, so a bad input stops the command before it writes anything.

A folder is a folder of image files (the files at its top) or, when it holds none, a DICOM folder
tree; image files and DICOM files side by side in one folder are refused as ambiguous.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autounet.data.dicom import DicomSeries, find_dicom_series, looks_like_dicom, read_dicom_series
from autounet.data.geometry import Geometry
from autounet.data.image_io import IMAGE_SUFFIXES, image_suffix, read_image_scanned
from autounet.data.image_verify import ImageReadError, name_problem, verify_image_file, verify_image_header
from autounet.data.nifti_scan import is_nifti_name
from autounet.errors import AutounetError

_CHANNEL = re.compile(r"^(.+)_(\d{4})$")
NAME_BY = ("series", "patientid")  # what names the case of a DICOM series
# A DICOM UID (PS3.5 §9.1): digits in dot-separated components, at most 64 characters.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # matched whole (fullmatch: no trailing newline)
UID_MAX_LENGTH = 64
# What a case name made from DICOM data may be: ASCII letters, digits, "-", "_" and ".", no
# leading dot; never a path.
_SAFE_CASE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
DICOM_OUTPUT_SUFFIX = ".nii.gz"


@dataclass(frozen=True)
class InputCase:
    case_id: str
    files: tuple[Path, ...]  # one multi-channel file, or one file per channel in channel order
    suffix: str  # file ending of the input, used for the output
    series: DicomSeries | None = None  # a DICOM series (``files`` are its slices, in order)

    def output_name(self) -> str:
        return self.case_id + self.suffix


def _image_files(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """The image files named or found at the top of the folders, and the folders that hold
    none (DICOM folder trees)."""
    files, dicom_roots = [], []
    for p in map(Path, paths):
        problem = name_problem(p)
        if problem:  # SimpleITK would abort the process on it
            raise AutounetError(problem)
        if p.is_dir():
            named = [q for q in p.iterdir() if not q.name.startswith(".") and image_suffix(q) in IMAGE_SUFFIXES]
            # a folder (or a dangling link) named like an image looks like a case: never skip it silently
            odd = sorted(q for q in named if not q.is_file())
            if odd:
                what = ", ".join(f"{q.name} ({'a folder' if q.is_dir() else 'not a readable file'})" for q in odd[:5])
                raise AutounetError(
                    f"{p}: {len(odd)} entr{'y is' if len(odd) == 1 else 'ies are'} named like an image but not a file: {what}"
                )
            found = sorted(q for q in named if q.is_file())
            bad = [name_problem(q) for q in found if name_problem(q)]
            if bad:
                raise AutounetError("\n  ".join([f"{p}: {len(bad)} input file name(s) are not valid UTF-8:", *bad]))
            if not found:
                dicom_roots.append(p)
                continue
            others = (q for q in sorted(p.iterdir()) if not q.name.startswith(".") and q not in named)
            dicom = [q for q in others if q.is_file() and looks_like_dicom(q)]
            if dicom:
                raise AutounetError(
                    f"{p}: holds image files ({found[0].name}, ...) and DICOM files ({dicom[0].name}, ...): "
                    "give a folder of image files or a folder of DICOM series, not both"
                )
            files += found
        elif p.is_file():
            if image_suffix(p) not in IMAGE_SUFFIXES and looks_like_dicom(p):
                raise AutounetError(f"{p}: a DICOM file: give the folder that holds its series (-i FOLDER)")
            if image_suffix(p) not in IMAGE_SUFFIXES:
                raise AutounetError(f"{p}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
            files.append(p)
        else:
            raise AutounetError(f"{p}: file or folder not found")
    return files, dicom_roots


def _dicom_series(roots: Sequence[Path]) -> list[DicomSeries]:
    """The series under ``roots``; the non-image DICOM objects beside them are skipped with one note."""
    out: list[DicomSeries] = []
    skipped: list[tuple[Path, str]] = []
    for root in roots:
        before = len(skipped)
        found = find_dicom_series([root], skipped)
        if not found:
            others = len(skipped) - before
            raise AutounetError(
                f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder, and no DICOM series in it or "
                "its subfolders" + (f" (only {others} DICOM object(s) that are not images)" if others else "")
            )
        out += found
    if skipped:
        shown = ", ".join(f"{p} ({kind})" for p, kind in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        print(f"note: skipped {len(skipped)} DICOM object(s) that are not images: {shown}{more}", file=sys.stderr)
    return out


def _file_name_part(text: str) -> str:
    """``text`` usable as (part of) a file name: characters other than ASCII letters, digits,
    ``-``, ``_`` and ``.`` become ``_``; no leading dot; at most 64 characters (a PatientID's
    longest)."""
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in text[:64])
    return "_" + safe[1:] if safe.startswith(".") else safe


def series_case_name(series: DicomSeries) -> str:
    """The case name of a series named by its SeriesInstanceUID, which must be a valid UID: a
    name from the data never becomes a path (``../x`` or ``/abs`` would write outside ``-o``)."""
    uid = series.series_uid
    if len(uid) > UID_MAX_LENGTH or not _UID.fullmatch(uid):
        where = ", ".join(str(f) for f in series.folders)
        raise AutounetError(
            f"DICOM series in {where}: its SeriesInstanceUID (0020,000E) {uid!r} is not a valid UID (digits and "
            f"dots, at most {UID_MAX_LENGTH} characters) and cannot name an output file; use --name-by patientid"
        )
    return uid


def dicom_case_names(series: Sequence[DicomSeries], name_by: str) -> list[str]:
    """Case names of DICOM series: the SeriesInstanceUID (refused unless it is a valid UID), or
    (``patientid``) the PatientID, made file-name safe (``../a/b`` becomes ``_._a_b``); a patient
    with several series gets ``_1``, ``_2``, ... in the order of the series' SeriesNumber, then
    SeriesInstanceUID (the same names on every run)."""
    if name_by not in NAME_BY:
        raise AutounetError(f"--name-by {name_by}: expected one of {', '.join(NAME_BY)}")
    if name_by == "series":
        return [series_case_name(s) for s in series]
    by_patient: dict[str, list[int]] = {}
    for i, s in enumerate(series):
        if not s.patient_id:
            raise AutounetError(f"{s.describe()}: no PatientID (0010,0020) to name the case by; use --name-by series")
        by_patient.setdefault(s.patient_id, []).append(i)
    names = [""] * len(series)
    for patient, members in by_patient.items():
        base = _file_name_part(patient)
        if len(members) == 1:
            names[members[0]] = base
            continue
        ordered = sorted(
            members, key=lambda i: (series[i].series_number is None, series[i].series_number or 0, series[i].series_uid)
        )
        for k, i in enumerate(ordered, 1):
            names[i] = f"{base}_{k}"
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            a, b = series[first[name]], series[i]
            raise AutounetError(
                f"two DICOM series would both be named {name} (PatientID {a.patient_id!r} of {a.describe()} and "
                f"{b.patient_id!r} of {b.describe()}); use --name-by series"
            )
        first[name] = i
        if not _SAFE_CASE_ID.fullmatch(name):  # cannot happen after _file_name_part; a name is never a path
            raise AutounetError(f"{series[i].describe()}: PatientID {series[i].patient_id!r} gives no usable case name")
    return names


def _stem(path: Path) -> str:
    return path.name[: -len(image_suffix(path))]


def discover_cases(paths: Sequence[str | Path], num_channels: int, name_by: str = "series") -> list[InputCase]:
    """Group input files into cases.

    Files named ``CASE_NNNN`` are read as nnU-Net v2 channel files when any of them is a channel
    ``_0000``; each group must then have exactly channels ``0 .. num_channels - 1``. Other files
    are one case each (MSD naming; multi-channel images are 4D files). Each DICOM series in a
    folder without image files is a case named as :func:`dicom_case_names` says (``name_by``).
    """
    if name_by not in NAME_BY:
        raise AutounetError(f"--name-by {name_by}: expected one of {', '.join(NAME_BY)}")
    files, dicom_roots = _image_files(paths)
    series = _dicom_series(dicom_roots)
    if name_by != "series" and not series:
        raise AutounetError(f"--name-by {name_by} names the cases of DICOM series, and the inputs hold none")
    if series and num_channels != 1:
        raise AutounetError(
            f"{series[0].describe()}: a DICOM series is one image channel, the model expects {num_channels}; "
            "give multi-channel cases as image files (one 4D file or one file per channel)"
        )
    groups: dict[str, dict[int, Path]] = {}
    singles: list[Path] = []
    for f in files:
        m = _CHANNEL.match(_stem(f))
        if m:
            groups.setdefault(m.group(1), {})[int(m.group(2))] = f
        else:
            singles.append(f)
    # nnU-Net v2 naming as soon as one CASE_0000 file is there; groups without one are then errors.
    v2 = any(0 in g for g in groups.values())
    if not v2:
        singles = files
        groups = {}
    cases = [InputCase(_stem(f), (f,), image_suffix(f)) for f in singles]
    for case_id, channels in groups.items():
        expected = set(range(num_channels))
        if set(channels) != expected:
            missing = sorted(expected - set(channels))
            extra = sorted(set(channels) - expected)
            what = []
            if missing:
                what.append("missing channel file(s) " + ", ".join(f"{case_id}_{c:04d}" for c in missing))
            if extra:
                what.append(
                    "channel file(s) beyond the model's "
                    + str(num_channels)
                    + ": "
                    + ", ".join(f"{case_id}_{c:04d}" for c in extra)
                )
            raise AutounetError(f"{case_id}: " + "; ".join(what))
        ordered = tuple(channels[c] for c in range(num_channels))
        cases.append(InputCase(case_id, ordered, image_suffix(ordered[0])))
    for name, s in zip(dicom_case_names(series, name_by), series):
        cases.append(InputCase(name, s.files, DICOM_OUTPUT_SUFFIX, s))
    cases.sort(key=lambda c: c.case_id)
    seen: dict[str, InputCase] = {}
    for c in cases:
        if c.case_id in seen:
            raise AutounetError(f"{c.case_id}: given twice ({seen[c.case_id].files[0]} and {c.files[0]})")
        seen[c.case_id] = c
    for c in cases:
        if c.series is None:  # a series' headers were checked when it was found
            check_header(c, num_channels)
    return cases


def read_input(case: InputCase, verified: bool = False) -> tuple[np.ndarray, Geometry, list[int]]:
    """A case's image ``(C, Z, Y, X)``, its geometry and the NaN/infinite voxels per channel
    (see :func:`~autounet.data.image_io.read_image_scanned`). A NIfTI file is verified in the pass
    that reads it (one decompression of a ``.nii.gz``); ``verified``: :func:`verify_inputs` has
    checked the other files' bytes already, so they are not decompressed again for that. A DICOM
    series is decoded here, once, in its stored type (:func:`~autounet.data.dicom.read_dicom_series`)."""
    if case.series is not None:
        image, geometry = read_dicom_series(case.series)  # refuses non-finite values itself
        return image, geometry, [0]
    return read_image_scanned(case.files, verified=verified)


def verify_inputs(cases: Sequence[InputCase]) -> None:
    """Every input file's data that its read does not verify itself, before any prediction starts,
    in the order the cases are read: a file cut short, corrupt compressed data (see
    :mod:`autounet.data.image_verify`) or NaN/infinite voxels stop the command naming the case.

    The first case's NIfTI files are left to its read, which verifies them in the one pass that
    decompresses them (:func:`read_input`) and comes before anything is written: a one-case
    prediction decompresses each file once. The later cases' files are verified here, so that a
    damaged one stops the command before the first case's outputs are written (their read then
    decompresses them a second time). A DICOM series is not decoded here (its headers were
    checked when it was found): it is decoded once, when its case is read, and damaged pixel
    data stop the command then, naming the series."""
    for i, case in enumerate(cases):
        if case.series is not None:
            continue
        for f in case.files:
            if i == 0 and is_nifti_name(f):
                continue
            try:
                nonfinite = verify_image_file(f, count_nonfinite=True)
            except ImageReadError as exc:
                raise AutounetError(f"{case.case_id}: {exc}") from None
            if nonfinite and any(nonfinite):
                raise AutounetError(
                    f"{case.case_id}: the image holds NaN or infinite intensities ({sum(nonfinite)} voxel(s) in {f})"
                )


def case_grid(case: InputCase) -> tuple[list[int], list[float], int]:
    """``(shape z, y, x)``, ``spacing`` (mm) and channels of a case from its header(s) alone: a
    DICOM series from the slice headers read when it was found, an image file from the first
    bytes SimpleITK reads of it (:func:`header_of`)."""
    if case.series is not None:
        shape, spacing = case.series.grid
        return shape, spacing, 1
    reader = header_of(case, case.files[0])
    size, spacing = list(reader.GetSize()), list(reader.GetSpacing())
    if len(size) == 2:
        size, spacing = [*size, 1], [*spacing, 1.0]
    channels = size[3] if len(size) == 4 else reader.GetNumberOfComponents() * len(case.files)
    return size[2::-1], spacing[2::-1], channels


def header_of(case: InputCase, path: Path) -> sitk.ImageFileReader:
    """A reader holding ``path``'s header (no voxel data read); one error naming the case otherwise."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise AutounetError(f"{case.case_id}: {path}: cannot read the image header") from None
    return reader


def check_header(case: InputCase, num_channels: int) -> None:
    """Channels and dimensions from the headers alone (no voxel data is read)."""
    total, shape = 0, None
    for f in case.files:
        try:
            verify_image_header(f)  # the name, a NIfTI spacing of 0, an uncompressed file cut short
        except ImageReadError as exc:
            raise AutounetError(f"{case.case_id}: {exc}") from None
        reader = header_of(case, f)
        size = list(reader.GetSize())
        dim = reader.GetDimension()
        if dim not in (2, 3, 4):
            raise AutounetError(f"{case.case_id}: {f}: {dim}-dimensional image (expected 2D, 3D or 4D)")
        components = reader.GetNumberOfComponents()
        channels = size[3] if dim == 4 else components
        spatial = size[:3] if dim >= 3 else size[:2]
        if shape is not None and spatial != shape:
            raise AutounetError(f"{case.case_id}: {f}: size {spatial} differs from {case.files[0]} {shape}")
        shape = spatial
        total += channels
    if total != num_channels:
        raise AutounetError(
            f"{case.case_id}: {total} image channel(s) in {', '.join(str(f) for f in case.files)}, the model expects {num_channels}"
        )
