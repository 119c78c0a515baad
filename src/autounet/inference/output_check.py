"""Outputs of an earlier prediction checked before `predict --continue` keeps them: a file cut
short or damaged by something other than autounet (whose writes are atomic) is predicted again,
never kept as a result (ITK would read a truncated image with its missing voxels as 0).

Each kind of output is read back with the loader used for inputs: images through
:func:`~autounet.data.image_verify.verify_image_file` (the gzip stream to its end with its CRC,
the voxel data as long as the header declares) and their header through SimpleITK; probabilities
``CASE.npz`` through :func:`~autounet.data.probabilities.load_probability_file` (every member
decompressed, CRC-checked); a DICOM SEG through pydicom (every element, the pixel data as long as
the frames need); a PNG decoded in full.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import SimpleITK as sitk

from autounet.data.image_io import IMAGE_SUFFIXES, image_suffix
from autounet.data.image_verify import verify_image_file
from autounet.data.probabilities import load_probability_file
from autounet.errors import AutounetError
from autounet.inference.dicom_seg import DICOM_SEG_SUFFIX

PROBABILITIES_SUFFIX = ".npz"


def output_problem(path: Path) -> str | None:
    """Why the existing output ``path`` cannot be kept (one line naming it), or None when it
    reads back completely. Files that belong to another's header (``.raw`` of ``.mhd``) are
    checked with that header."""
    try:
        name = path.name.lower()
        if name.endswith(PROBABILITIES_SUFFIX):
            load_probability_file(path)
        elif name.endswith(DICOM_SEG_SUFFIX):
            _check_dicom(path)
        elif name.endswith(".png"):
            _check_png(path)
        elif image_suffix(path) in IMAGE_SUFFIXES:
            verify_image_file(path)
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            try:
                reader.ReadImageInformation()
            except RuntimeError:
                return f"{path}: cannot read the image header"
    except AutounetError as exc:
        text = str(exc)
        return text if str(path) in text else f"{path}: {text}"
    except OSError as exc:
        return f"{path}: cannot read the file ({exc.strerror or exc})"
    return None


def _check_dicom(path: Path) -> None:
    import pydicom  # a DICOM SEG is only written with the dicom extra (highdicom brings pydicom)

    try:
        with warnings.catch_warnings():  # a damaged file is reported below, not warned about
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated) * int(ds.Rows) * int(ds.Columns) * frames
        data = ds.PixelData
    except MemoryError:
        raise
    except Exception as exc:  # pydicom's parser raises many kinds on damaged bytes (struct.error, ...)
        raise AutounetError(f"{path}: not a complete DICOM SEG ({type(exc).__name__}: {exc})") from None
    if len(data) * 8 < bits:
        raise AutounetError(f"{path}: its pixel data are cut short ({len(data)} bytes, {frames} frame(s) need more)")


def _check_png(path: Path) -> None:
    from PIL import Image  # matplotlib's own dependency

    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise AutounetError(f"{path}: damaged PNG ({exc})") from None
