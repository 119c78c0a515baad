"""DICOM series as images: find the series in a folder tree, check their geometry, read them.

A series (one SeriesInstanceUID) is one case and one image channel. Each file's header is read
once, with pydicom when it is installed (the header alone: the pixel data are skipped, their
length checked against the file), else with SimpleITK's GDCM series scan and reader (which read
whole files); each series' pixels are then decoded once, by SimpleITK's GDCM series reader
(:func:`read_dicom_series`). That reader places the volume from the first
slice's position, the orientation of the slices and the mean gap between them, so a series
whose slices are not one regular stack would be read into the wrong place without a word (ITK
only prints a warning). Every file's header is therefore read first (ImagePositionPatient,
ImageOrientationPatient, size, pixel spacing) and a series is refused, naming it and its folder,
when its slices differ in size, pixel spacing or orientation, when two slices share a position,
when the slices are not stacked along their normal (gantry tilt), when a gap is twice the others
(a missing slice) or when the gaps differ by more than 1 % (at least 0.01 mm). A single slice,
a multi-frame (enhanced) file and colour images are refused too.

Objects that are not images (structured reports and key-object selections, presentation
states, RT structure sets and plans, encapsulated documents, waveforms, registrations: what
PACS exports put beside the images) are skipped with a note instead (:func:`non_image_object`):
told apart by their SOP Class UID and Modality, read with pydicom when it is installed, else
from the file meta header's bytes, so reading series needs nothing but SimpleITK.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autounet.data.geometry import Geometry
from autounet.data.image_verify import name_problem
from autounet.errors import AutounetError

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
GAP_TOLERANCE_RELATIVE = 0.01  # of the median gap between slices
GAP_TOLERANCE_MM = 0.01  # at least: IPP values are often rounded to 2-6 decimals
OFF_AXIS_TOLERANCE_VOXELS = 0.1  # of the smallest in-plane pixel spacing
ORIENTATION_TOLERANCE = 1e-3  # direction cosines, as for NIfTI geometry (data/geometry.py)

_SERIES_UID = "0020|000e"
_PATIENT_ID = "0010|0020"
_SERIES_NUMBER = "0020|0011"
_MODALITY = "0008|0060"
_PIXEL_SPACING = "0028|0030"
_IMAGER_PIXEL_SPACING = "0018|1164"
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DEFER_BYTES = 1024  # values longer than this are skipped by pydicom, not read
_POSITION = "0020|0032"
_ORIENTATION = "0020|0037"
_FRAMES = "0028|0008"
_SLOPE = "0028|1053"
_INTERCEPT = "0028|1052"
_ITK_PREFIX = re.compile(r"^.*ITK ERROR: \w+\(0x[0-9a-fA-F]+\):\s*")
# SOP classes of objects without an image (PS3.4 Annex B), as UID prefixes: structured reports
# and key objects (.88), presentation states (.11), RT structure set, treatment records, plans
# (.481.3-.9), encapsulated documents (.104), waveforms (.9), raw data and registrations (.66,
# .66.1-.3), surface segmentation (.66.5); a DICOM SEG (.66.4) is refused by name instead.
_STORAGE = "1.2.840.10008.5.1.4.1.1."
NON_IMAGE_SOP_CLASSES = tuple(
    _STORAGE + c for c in ("88.", "11.", "481.3", "481.4", "481.5", "481.6", "481.7", "481.8", "481.9", "104.", "9.")
) + tuple(_STORAGE + c for c in ("66", "66.1", "66.2", "66.3", "66.5"))
NON_IMAGE_MODALITIES = ("SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTRECORD", "DOC", "REG", "FID", "ECG", "AU", "HD")
# modalities of image objects: a file of one of these without pixel data is a damaged image (cut
# off before its pixels), never a non-image object to skip
IMAGE_MODALITIES = ("CT", "MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "OT", "RTIMAGE", "IO", "PX", "XC", "SM")
_META_SOP_CLASS = b"\x02\x00\x02\x00UI"  # (0002,0002) MediaStorageSOPClassUID, explicit VR little endian


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """GDCM's scan prints warnings of its own on standard error ("No Series were found"); what
    matters is reported by the caller, in one line."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _itk_reason(exc: RuntimeError) -> str:
    """The last line of an ITK exception, without ITK's source location and object address."""
    text = str(exc).strip()
    return _ITK_PREFIX.sub("", text.splitlines()[-1]) if text else "unknown error"


@dataclass(frozen=True)
class DicomSlice:
    """What one file's header says about where its pixels are."""

    path: Path
    series_uid: str
    position: tuple[float, float, float]  # ImagePositionPatient (mm, LPS)
    orientation: tuple[float, ...]  # ImageOrientationPatient: row then column direction cosines
    size: tuple[int, int]  # columns, rows
    pixel_spacing: tuple[float, float]  # x (between columns), y (between rows), mm
    patient_id: str
    series_number: int | None
    rescale: tuple[float, float] = (1.0, 0.0)  # RescaleSlope, RescaleIntercept


@dataclass(frozen=True)
class DicomSeries:
    """One series: its files in slice order (along the slice normal) and what names it."""

    series_uid: str
    files: tuple[Path, ...]
    folders: tuple[Path, ...]
    patient_id: str
    series_number: int | None
    # every slice's pixel values map to integers the same way (one slope and intercept, both
    # whole numbers): the series is read in the type GDCM gives it, not float32
    integer_rescale: bool = False
    # the headers of the first and last slice and the gap between slices (mm), as found: the
    # geometry read with the pixels is checked against them, and the memory estimate reads the
    # grid from them, without opening a file again
    first: DicomSlice | None = None
    last: DicomSlice | None = None
    slice_gap: float = 0.0

    @property
    def grid(self) -> tuple[list[int], list[float]]:
        """``(shape z, y, x)`` and ``spacing`` (mm) of the series, from its headers."""
        if self.first is None:
            raise ValueError("a series made without its headers")
        columns, rows = self.first.size
        x, y = self.first.pixel_spacing
        return [len(self.files), rows, columns], [self.slice_gap, y, x]

    def describe(self) -> str:
        where = ", ".join(str(f) for f in self.folders)
        return f"DICOM series {shown_uid(self.series_uid)} (in {where})"


def shown_uid(uid: str) -> str:
    """A UID for a message: as it is when it is digits and dots, else quoted with escapes (a UID
    from a stranger's file may hold line breaks or anything else)."""
    return uid if uid and all(c.isdigit() or c == "." for c in uid) and uid.isascii() else repr(uid)


def looks_like_dicom(path: Path) -> bool:
    """A DICOM ending or the ``DICM`` mark of a DICOM file (after its 128-byte preamble)."""
    if path.name.upper() == "DICOMDIR":  # the index of a DICOM medium, not an image
        return False
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise AutounetError(f"{path}: cannot read ({exc.strerror})") from None
    return len(head) == 132 and head[128:] == b"DICM"


def _non_image_class(sop_class: str) -> bool:
    return any(sop_class == c or (c.endswith(".") and sop_class.startswith(c)) for c in NON_IMAGE_SOP_CLASSES)


def non_image_object(path: Path) -> str | None:
    """What kind of non-image DICOM object ``path`` is (``"SR"``, ``"KO"``, its SOP class UID),
    or None when it is (or may be) an image, or is not DICOM. With pydicom: its SOP class,
    modality, and (for classes not listed) the absence of both pixel data and Rows; without
    pydicom: the SOP class in its file meta header."""
    pydicom = _pydicom()
    if pydicom is None:
        return _non_image_from_bytes(path)
    try:
        ds = _dataset(path, pydicom)
    except AutounetError:  # not known to be a non-image
        return None
    return _non_image_kind(ds)


def _non_image_kind(ds) -> str | None:
    """:func:`non_image_object` of a data set read with pydicom."""
    try:
        sop_class = _text(ds, "0008|0016") or str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
        modality = _text(ds, _MODALITY).upper()
        pixels = any(_element(ds, t) is not None for t in _PIXEL_TAGS)
        rows = "Rows" in ds
    except MemoryError:
        raise
    except Exception:  # pydicom raises many kinds on damaged files: then not known to be a non-image
        return None
    if modality == "SEG":
        return None
    pixel_less = sop_class and not pixels and not rows and modality not in IMAGE_MODALITIES
    if modality in NON_IMAGE_MODALITIES or _non_image_class(sop_class) or pixel_less:
        return modality or sop_class
    return None


def _non_image_from_bytes(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return None
    at = head.find(_META_SOP_CLASS, 132)
    if head[128:132] != b"DICM" or at < 0 or at + 8 > len(head):
        return None
    length = int.from_bytes(head[at + 6 : at + 8], "little")
    sop_class = head[at + 8 : at + 8 + length].rstrip(b"\0 ").decode("ascii", "replace")
    return sop_class if _non_image_class(sop_class) else None


def _folders_with_files(root: Path) -> list[Path]:
    """``root`` and its subfolders (hidden ones skipped; links to folders not followed) that hold files."""
    out = []
    for folder, dirs, files in os.walk(root, onerror=_walk_error):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in [folder, *(os.path.join(folder, f) for f in files)]:
            problem = name_problem(name)
            if problem:  # SimpleITK would abort the process on it
                raise AutounetError(problem)
        if any(not f.startswith(".") for f in files):
            out.append(Path(folder))
    return out


def _walk_error(exc: OSError) -> None:
    raise AutounetError(f"{exc.filename}: cannot list the folder ({exc.strerror})")


def _numbers(text: str, count: int, what: str, path: Path) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.strip().split("\\"))
    except ValueError:
        values = ()
    if len(values) != count or not all(np.isfinite(values)):
        raise AutounetError(f"{path}: invalid {what} {text.strip()!r} (expected {count} numbers)")
    return values


def read_slice_header(path: Path) -> DicomSlice:
    """One file's header (no pixel data), checked to describe one grey-value slice placed in
    space: read with pydicom when it is installed (the header only), else with SimpleITK (GDCM,
    which reads the whole file)."""
    pydicom = _pydicom()
    if pydicom is None:
        return _slice_header_sitk(path)
    return _slice_of_dataset(path, _dataset(path, pydicom))


def _slice_header_sitk(path: Path) -> DicomSlice:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(path, _itk_reason(exc)) from None

    def tag(key: str) -> str:
        return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

    size = reader.GetSize()
    frames = size[2] if len(size) > 2 else 1
    spacing = reader.GetSpacing()
    return _checked_slice(path, tag, (size[0], size[1], frames), spacing[:2], reader.GetNumberOfComponents())


def _unreadable(path: Path, reason: str) -> AutounetError:
    return AutounetError(
        f"{path}: cannot read this DICOM file as an image ({reason}): damaged, cut short, or not an image"
    )


def _checked_slice(
    path: Path, tag, size: tuple[int, int, int], spacing: Sequence[float], components: int
) -> DicomSlice:
    """The checks of :func:`read_slice_header` on what a header says: ``tag(key)`` gives the text
    of a tag (``"0020|0032"``), ``size`` (columns, rows, frames), ``spacing`` (x, y)."""
    modality = tag(_MODALITY)
    if modality == "SEG":
        raise AutounetError(f"{path}: a DICOM SEG (a segmentation, not an image): keep segmentations out of the inputs")
    frames = tag(_FRAMES)
    if (frames and frames.isdigit() and int(frames) > 1) or size[2] > 1:
        raise AutounetError(
            f"{path}: a multi-frame (enhanced) DICOM file ({frames or size[2]} frames): not supported; "
            "convert the series to NIfTI (e.g. with dcm2niix) and predict that"
        )
    if components != 1:
        raise AutounetError(
            f"{path}: a colour DICOM image ({components} samples per pixel); only grey-value series are read"
        )
    if not tag(_POSITION) or not tag(_ORIENTATION):
        raise AutounetError(
            f"{path}: no ImagePositionPatient (0020,0032) or ImageOrientationPatient (0020,0037) "
            f"(modality {modality or 'unknown'}): its slice cannot be placed in space"
        )
    position = _numbers(tag(_POSITION), 3, "ImagePositionPatient (0020,0032)", path)
    orientation = _numbers(tag(_ORIENTATION), 6, "ImageOrientationPatient (0020,0037)", path)
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    if (
        abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE
        or abs(np.linalg.norm(col) - 1) > ORIENTATION_TOLERANCE
        or abs(float(row @ col)) > ORIENTATION_TOLERANCE
    ):
        raise AutounetError(
            f"{path}: invalid ImageOrientationPatient (0020,0037) {tag(_ORIENTATION)!r}: not two orthogonal unit vectors"
        )
    if not all(np.isfinite(spacing[:2])) or min(spacing[:2]) <= 0:
        raise AutounetError(f"{path}: invalid pixel spacing {tuple(spacing[:2])}")
    number = tag(_SERIES_NUMBER)
    slope = _numbers(tag(_SLOPE), 1, "RescaleSlope (0028,1053)", path)[0] if tag(_SLOPE) else 1.0
    intercept = _numbers(tag(_INTERCEPT), 1, "RescaleIntercept (0028,1052)", path)[0] if tag(_INTERCEPT) else 0.0
    return DicomSlice(
        path=path,
        series_uid=tag(_SERIES_UID),
        position=position,
        orientation=orientation,
        size=(int(size[0]), int(size[1])),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        patient_id=tag(_PATIENT_ID),
        series_number=int(number) if number.lstrip("-").isdigit() else None,
        rescale=(slope, intercept),
    )


# --- headers with pydicom (optional): the header alone, the pixel data skipped -------------------


def _pydicom():
    """The pydicom module, or None when it is not installed (it comes with the dicom extra)."""
    try:
        import pydicom
    except ImportError:
        return None
    return pydicom


def _dataset(path: Path, pydicom):
    """``path``'s data set with its pixel data (and any other long value) left unread: pydicom
    notes where they lie and skips them."""
    try:
        with warnings.catch_warnings():  # pydicom warns about odd values; what matters is checked after
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=True)
    except MemoryError:
        raise
    except OSError as exc:
        raise AutounetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # pydicom raises many kinds on damaged files
        raise _unreadable(
            path, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        ) from None


def _element(ds, tag: int):
    """The element ``tag`` as read, without loading a skipped (deferred) value; None if absent."""
    try:
        return ds.get_item(tag, keep_deferred=True)
    except TypeError:  # pydicom 2: get_item never loads a deferred value
        return ds.get_item(tag)


def _text(ds, key: str) -> str:
    """The text of a string tag (``"0020|0032"``) as stored, like GDCM's metadata."""
    element = _element(ds, int(key.replace("|", ""), 16))
    if element is None or element.value is None:
        return ""
    value = element.value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").strip(" \0")  # as SimpleITK gives GDCM's text
    if isinstance(value, Sequence) and not isinstance(value, str):  # pydicom's MultiValue
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _number(ds, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword, default)
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _slice_of_dataset(path: Path, ds) -> DicomSlice:
    """:func:`read_slice_header` from a pydicom data set: its pixel data must be there, whole."""
    columns, rows = _number(ds, "Columns"), _number(ds, "Rows")
    pixels = next((e for e in map(lambda t: _element(ds, t), _PIXEL_TAGS) if e is not None), None)
    if columns is None or rows is None or pixels is None:
        raise _unreadable(path, "no pixel data" if pixels is None else "no Rows or Columns")
    frames = _text(ds, _FRAMES)
    components = _number(ds, "SamplesPerPixel", 1) or 1
    if pixels.length != _UNDEFINED_LENGTH:  # native (not encapsulated) pixel data: its length is known
        bits = _number(ds, "BitsAllocated", 0) or 0
        count = int(frames) if frames.isdigit() and int(frames) > 0 else 1
        needed = rows * columns * components * count * bits // 8
        end = (pixels.value_tell or 0) + pixels.length
        if end > path.stat().st_size or pixels.length < needed:
            raise _unreadable(
                path,
                f"its pixel data hold {min(pixels.length, path.stat().st_size - (pixels.value_tell or 0))} bytes"
                f" of {max(needed, pixels.length)}",
            )
    spacing_text = _text(ds, _PIXEL_SPACING) or _text(ds, _IMAGER_PIXEL_SPACING)
    spacing = (1.0, 1.0)
    if spacing_text:
        row_gap, column_gap = _numbers(spacing_text, 2, "PixelSpacing (0028,0030)", path)
        spacing = (column_gap, row_gap)  # (x, y)
    return _checked_slice(path, lambda key: _text(ds, key), (columns, rows, 1), spacing, components)


def find_dicom_series(roots: Sequence[Path], skipped: list[tuple[Path, str]] | None = None) -> list[DicomSeries]:
    """Every DICOM series under the folders ``roots`` (subfolders included), checked to be one
    regular stack of slices (see the module's docstring), in SeriesInstanceUID order.

    A series whose files lie in several folders is one series. A non-image object
    (:func:`non_image_object`) is skipped and added to ``skipped`` as (path, kind). Any other
    file that looks like DICOM (a DICOM ending or the ``DICM`` mark) but is no readable slice is
    an error naming it. With pydicom, the files that look like DICOM are the ones read; without
    it, GDCM's scan finds the series.
    """
    skipped = [] if skipped is None else skipped
    by_uid: dict[str, dict[Path, DicomSlice]] = {}
    folders_of: dict[str, list[Path]] = {}
    pydicom = _pydicom()
    if pydicom is None:
        _scan_with_gdcm(roots, skipped, by_uid, folders_of)
    else:
        _scan_with_pydicom(pydicom, roots, skipped, by_uid, folders_of)
    return [_checked_series(uid, list(by_uid[uid].values()), folders_of[uid]) for uid in sorted(by_uid)]


def _scan_with_pydicom(pydicom, roots, skipped, by_uid, folders_of) -> None:
    """:func:`find_dicom_series`'s scan with pydicom: each file that looks like DICOM read once,
    its header alone (the pixel data skipped, their length checked)."""
    for root in roots:
        for folder in _folders_with_files(root):
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or not path.is_file() or not looks_like_dicom(path):
                    continue
                ds = _dataset(path, pydicom)
                kind = _non_image_kind(ds)
                if kind is not None:
                    skipped.append((path, kind))
                    continue
                header = _slice_of_dataset(path, ds)
                by_uid.setdefault(header.series_uid, {})[path.resolve()] = header
                if folder not in folders_of.setdefault(header.series_uid, []):
                    folders_of[header.series_uid].append(folder)


def _scan_with_gdcm(roots, skipped, by_uid, folders_of) -> None:
    """:func:`find_dicom_series`'s scan without pydicom: GDCM's series scan of each folder, then
    each file's header read by SimpleITK (which reads the whole file)."""
    for root in roots:
        for folder in _folders_with_files(root):
            claimed: set[Path] = set()  # resolved paths
            try:
                with _itk_warnings_off():
                    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
            except RuntimeError as exc:
                raise AutounetError(f"{folder}: cannot scan for DICOM series ({str(exc).strip()[-200:]})") from None
            for series_id in series_ids:
                with _itk_warnings_off():
                    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
                for name in names:
                    path = Path(name)
                    claimed.add(path.resolve())
                    try:
                        header = read_slice_header(path)
                    except AutounetError:
                        kind = non_image_object(path)
                        if kind is None:
                            raise
                        skipped.append((path, kind))
                        continue
                    uid = header.series_uid or series_id
                    by_uid.setdefault(uid, {})[path.resolve()] = header
                    if folder not in folders_of.setdefault(uid, []):
                        folders_of[uid].append(folder)
            strays = [p for p in sorted(folder.iterdir()) if p.is_file() and p.resolve() not in claimed]
            for stray in strays:
                if not stray.name.startswith(".") and looks_like_dicom(stray):
                    kind = non_image_object(stray)
                    if kind is not None:
                        skipped.append((stray, kind))
                        continue
                    read_slice_header(stray)  # names what is wrong with it, when ITK can tell
                    raise AutounetError(
                        f"{stray}: a DICOM file that belongs to no readable series (damaged or cut short?)"
                    )


def _checked_series(uid: str, slices: list[DicomSlice], folders: list[Path]) -> DicomSeries:
    where = f"DICOM series {shown_uid(uid)} (in {', '.join(map(str, folders))})"
    first = slices[0]
    for s in slices[1:]:
        if s.size != first.size:
            raise AutounetError(
                f"{where}: slices of different sizes ({s.path.name}: {s.size[0]}x{s.size[1]}, "
                f"{first.path.name}: {first.size[0]}x{first.size[1]})"
            )
        if np.max(np.abs(np.subtract(s.orientation, first.orientation))) > ORIENTATION_TOLERANCE:
            raise AutounetError(
                f"{where}: slices of different orientations ({s.path.name} and {first.path.name}): "
                "several stacks in one series (e.g. a localizer)?"
            )
        if np.max(np.abs(np.subtract(s.pixel_spacing, first.pixel_spacing))) > 1e-3 * min(first.pixel_spacing):
            raise AutounetError(
                f"{where}: slices of different pixel spacings ({s.path.name}: {s.pixel_spacing}, "
                f"{first.path.name}: {first.pixel_spacing})"
            )
    if len(slices) == 1:
        raise AutounetError(
            f"{where}: a single slice ({first.path.name}); DICOM input is for volumes (series of at least 2 slices). "
            "Predict a 2D image as a NIfTI file with a model trained on 2D images"
        )
    row, col = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    slices = sorted(slices, key=lambda s: (float(np.dot(s.position, normal)), str(s.path)))
    along = np.array([float(np.dot(s.position, normal)) for s in slices])
    gaps = np.diff(along)
    median = float(np.median(gaps))
    tolerance = max(GAP_TOLERANCE_RELATIVE * median, GAP_TOLERANCE_MM)
    for i, gap in enumerate(gaps):
        if gap <= tolerance:
            raise AutounetError(
                f"{where}: {slices[i].path.name} and {slices[i + 1].path.name} lie at the same position "
                f"({along[i]:.3f} mm along the slice normal): duplicate slices, or several time points, echoes or "
                "b-values in one series; give one stack per series"
            )
    offsets = np.asarray([s.position for s in slices]) - np.asarray(first.position)
    in_plane = np.abs(offsets @ np.stack([row, col]).T).max(axis=1)
    limit = max(OFF_AXIS_TOLERANCE_VOXELS * min(first.pixel_spacing), GAP_TOLERANCE_MM)
    if in_plane.max() > limit:
        worst = int(np.argmax(in_plane))
        raise AutounetError(
            f"{where}: the slices are not stacked along their normal ({slices[worst].path.name} is shifted by "
            f"{in_plane[worst]:.3f} mm within its plane): a tilted gantry or sheared acquisition, which a volume "
            "cannot represent; resample the series first"
        )
    odd = [i for i, gap in enumerate(gaps) if abs(gap - median) > tolerance]
    if odd:
        i = odd[0]
        ratio = gaps[i] / median
        missing = round(ratio) - 1
        if missing >= 1 and abs(gaps[i] - round(ratio) * median) <= tolerance:
            raise AutounetError(
                f"{where}: incomplete: a gap of {gaps[i]:.3f} mm between {slices[i].path.name} and "
                f"{slices[i + 1].path.name} where the others are {median:.3f} mm ({missing} slice(s) missing)"
            )
        raise AutounetError(
            f"{where}: irregular slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm (first odd one "
            f"{gaps[i]:.3f} mm, between {slices[i].path.name} and {slices[i + 1].path.name}); autounet reads "
            "regular stacks only: resample the series first"
        )
    return DicomSeries(
        series_uid=uid,
        files=tuple(s.path for s in slices),
        folders=tuple(folders),
        patient_id=first.patient_id,
        series_number=first.series_number,
        integer_rescale=len({s.rescale for s in slices}) == 1 and all(float(v).is_integer() for v in first.rescale),
        first=slices[0],
        last=slices[-1],
        slice_gap=median,
    )


def read_dicom_series(series: DicomSeries) -> tuple[np.ndarray, Geometry]:
    """The series as ``(1, Z, Y, X)`` (rescale slope and intercept applied) with its geometry; Z
    in the order of :attr:`DicomSeries.files`. Each file is decoded once, into the integer type
    GDCM gives the rescaled values (int16 for most CT and MR: 2 bytes a voxel, not 4) when every
    slice shares one whole-number slope and intercept, else into float32 (each file's own slope can
    give fractions, e.g. PET). Non-finite values (float data only) are refused. The geometry
    SimpleITK derives is checked against the files' positions."""
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(f) for f in series.files])
    if not series.integer_rescale:
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise AutounetError(f"{series.describe()}: cannot read the series ({_itk_reason(exc)})") from None
    if image.GetDimension() != 3 or image.GetSize()[2] != len(series.files):
        raise AutounetError(
            f"{series.describe()}: read as size {image.GetSize()} from {len(series.files)} files (expected one slice each)"
        )
    spacing = image.GetSpacing()
    geometry = Geometry(
        spacing=(float(spacing[2]), float(spacing[1]), float(spacing[0])),
        origin_xyz=tuple(float(v) for v in image.GetOrigin()),
        direction_xyz=tuple(float(v) for v in image.GetDirection()),
    )
    _check_read_geometry(series, geometry)
    array = _array_of(image)[None]
    if array.dtype.kind == "f":
        bad = nonfinite_count(array)
        if bad:
            raise AutounetError(f"{series.describe()}: the series holds NaN or infinite intensities ({bad} voxel(s))")
    return array, geometry


class _ImageBuffer:
    """The pixel buffer of a SimpleITK image as numpy sees it, holding the image alive: an array
    made from it shares the image's memory (no copy of a whole series), for as long as it lives."""

    def __init__(self, image: sitk.Image):
        self.image = image
        view = sitk.GetArrayViewFromImage(image)
        pointer, _ = view.__array_interface__["data"]
        self.__array_interface__ = {**view.__array_interface__, "data": (pointer, False)}


def _array_of(image: sitk.Image) -> np.ndarray:
    """``image``'s pixels as a writable array without copying them (see :class:`_ImageBuffer`)."""
    return np.asarray(_ImageBuffer(image))


def nonfinite_count(array: np.ndarray, slab: int = 1 << 22) -> int:
    """NaN and infinite values of ``array``, counted a slab at a time (no full-size mask)."""
    flat = array.reshape(-1)
    return sum(int(np.count_nonzero(~np.isfinite(flat[i : i + slab]))) for i in range(0, flat.size, slab))


def _check_read_geometry(series: DicomSeries, geometry: Geometry) -> None:
    """The first slice's position is the origin, the normal the third axis, the gap the spacing
    (what the headers say): a disagreement would put the segmentation in the wrong place."""
    first, last = series.first, series.last
    if first is None or last is None:
        first, last = read_slice_header(series.files[0]), read_slice_header(series.files[-1])
    direction = np.asarray(geometry.direction_xyz).reshape(3, 3)
    expected_axis = (np.asarray(last.position) - np.asarray(first.position)) / (len(series.files) - 1)
    problems = []
    if np.max(np.abs(np.subtract(geometry.origin_xyz, first.position))) > GAP_TOLERANCE_MM:
        problems.append(f"origin {geometry.origin_xyz} vs ImagePositionPatient {first.position}")
    if np.max(np.abs(direction[:, 0] - first.orientation[:3])) > ORIENTATION_TOLERANCE or (
        np.max(np.abs(direction[:, 1] - first.orientation[3:])) > ORIENTATION_TOLERANCE
    ):
        problems.append("in-plane directions differ from ImageOrientationPatient")
    read_axis = direction[:, 2] * geometry.spacing[0]
    if np.max(np.abs(read_axis - expected_axis)) > max(GAP_TOLERANCE_RELATIVE * geometry.spacing[0], GAP_TOLERANCE_MM):
        problems.append(f"slice step {read_axis.round(4).tolist()} mm vs {expected_axis.round(4).tolist()} mm")
    if problems:
        raise AutounetError(
            f"{series.describe()}: SimpleITK read another geometry than the files declare: " + "; ".join(problems)
        )
