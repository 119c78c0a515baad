"""The images to predict: folders or files, in MSD naming (one file per case, multi-channel
images 4D) or nnU-Net v2 naming (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... one file per
channel). Everything is checked from the file headers before any prediction starts, so a bad
input stops the command before it writes anything.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from autounet.data.image_io import IMAGE_SUFFIXES, image_suffix
from autounet.data.image_verify import ImageReadError, name_problem, verify_image_file, verify_image_header
from autounet.errors import AutounetError

_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


@dataclass(frozen=True)
class InputCase:
    case_id: str
    files: tuple[Path, ...]  # one multi-channel file, or one file per channel in channel order
    suffix: str  # file ending of the input, used for the output

    def output_name(self) -> str:
        return self.case_id + self.suffix


def _image_files(paths: Sequence[str | Path]) -> list[Path]:
    files = []
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
                raise AutounetError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif p.is_file():
            if image_suffix(p) not in IMAGE_SUFFIXES:
                raise AutounetError(f"{p}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
            files.append(p)
        else:
            raise AutounetError(f"{p}: file or folder not found")
    return files


def _stem(path: Path) -> str:
    return path.name[: -len(image_suffix(path))]


def discover_cases(paths: Sequence[str | Path], num_channels: int) -> list[InputCase]:
    """Group input files into cases.

    Files named ``CASE_NNNN`` are read as nnU-Net v2 channel files when any of them is a channel
    ``_0000``; each group must then have exactly channels ``0 .. num_channels - 1``. Other files
    are one case each (MSD naming; multi-channel images are 4D files).
    """
    files = _image_files(paths)
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
    cases.sort(key=lambda c: c.case_id)
    seen: dict[str, InputCase] = {}
    for c in cases:
        if c.case_id in seen:
            raise AutounetError(f"{c.case_id}: given twice ({seen[c.case_id].files[0]} and {c.files[0]})")
        seen[c.case_id] = c
    for c in cases:
        check_header(c, num_channels)
    return cases


def verify_inputs(cases: Sequence[InputCase]) -> None:
    """Every input file's data, before any prediction starts (one pass over each file): a file
    cut short, corrupt compressed data (see :mod:`autounet.data.image_verify`) or NaN/infinite
    voxels of a float NIfTI file (which SimpleITK would read as 0) stop the command naming the case."""
    for case in cases:
        for f in case.files:
            try:
                nonfinite = verify_image_file(f, count_nonfinite=True)
            except ImageReadError as exc:
                raise AutounetError(f"{case.case_id}: {exc}") from None
            if nonfinite and any(nonfinite):
                raise AutounetError(
                    f"{case.case_id}: the image holds NaN or infinite intensities ({sum(nonfinite)} voxel(s) in {f})"
                )


def check_header(case: InputCase, num_channels: int) -> None:
    """Channels and dimensions from the headers alone (no voxel data is read)."""
    total, shape = 0, None
    for f in case.files:
        try:
            verify_image_header(f)  # the name, a NIfTI spacing of 0, an uncompressed file cut short
        except ImageReadError as exc:
            raise AutounetError(f"{case.case_id}: {exc}") from None
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(f))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise AutounetError(f"{case.case_id}: {f}: cannot read the image header") from None
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
