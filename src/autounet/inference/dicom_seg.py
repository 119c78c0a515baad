"""DICOM SEG output (`autounet predict --dicom-seg`): the segmentation of a DICOM series as a
DICOM Segmentation object that references the series, written with highdicom (the optional
``dicom`` extra; imported only here, when asked for).

One binary segment per foreground label value of the model (label 0 is the background), in
label order, labelled with the model's label name; its coded category and type are SNOMED CT
"Tissue" (autounet does not know what a label depicts). The algorithm is identified as
``autounet`` with its version (family: artificial intelligence). Frame ``k`` of a segment
derives from the ``k``-th slice of the series (along the slice normal) and carries its position;
(slice, segment) frames without any voxel of the segment are omitted, as highdicom does by
default, except in an empty segmentation, which keeps every frame (a SEG needs at least one).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from autounet.data.dicom import DicomSeries
from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write

DICOM_SEG_SUFFIX = ".dcm"
SERIES_NUMBER_OFFSET = 1000  # the SEG's series number: the source's plus this (viewers list it beside it)


def require_highdicom() -> None:
    """Refuse at once when highdicom is not installed."""
    if importlib.util.find_spec("highdicom") is None:
        raise AutounetError("--dicom-seg needs highdicom, which is not installed: pip install autounet[dicom]")


def segment_values(labels: Mapping[str, str]) -> list[int]:
    """The label values that become segments 1, 2, ... (every value but the background 0)."""
    return sorted(int(v) for v in labels if int(v) != 0)


def segmentation_dataset(series: DicomSeries, segmentation: np.ndarray, labels: Mapping[str, str]) -> Any:
    """A DICOM SEG (a pydicom dataset) of ``segmentation`` ``(Z, Y, X)`` label values, on the grid
    of ``series`` (slice ``k`` = ``series.files[k]``); ``labels``: label value (text) -> name."""
    require_highdicom()
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from autounet import __version__

    sources = []
    for f in series.files:
        try:
            sources.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise AutounetError(f"{f}: cannot read the DICOM file for the DICOM SEG ({exc})") from None
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if segmentation.shape != (len(sources), rows, columns):
        raise AutounetError(
            f"{series.describe()}: segmentation of shape {segmentation.shape} for {len(sources)} slices of "
            f"{rows}x{columns}: not the series' grid"
        )
    values = segment_values(labels)
    if not values:
        raise AutounetError(f"{series.describe()}: the model has no foreground label to write as a DICOM SEG segment")
    lookup = np.zeros(int(max(values, default=0)) + 1, dtype=np.uint16)
    lookup[values] = np.arange(1, len(values) + 1)
    if segmentation.max(initial=0) >= len(lookup):
        raise AutounetError(f"{series.describe()}: label value {int(segmentation.max())} is not one of the model's")
    segment_numbers = lookup[segmentation]
    dtype = np.uint8 if len(values) < 256 else np.uint16
    algorithm = hd.AlgorithmIdentificationSequence(
        name="autounet", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=(labels.get(str(value)) or f"label {value}")[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, value in enumerate(values, 1)
    ]
    try:
        return hd.seg.Segmentation(
            source_images=sources,
            pixel_array=segment_numbers.astype(dtype),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=(series.series_number or 0) + SERIES_NUMBER_OFFSET,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="autounet",
            manufacturer_model_name="autounet",
            software_versions=__version__,
            device_serial_number="none",
            omit_empty_frames=bool(segment_numbers.any()),
            series_description="autounet segmentation",
            content_description="autounet segmentation",
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise AutounetError(f"{series.describe()}: cannot make a DICOM SEG of it ({exc})") from None


def write_dicom_seg(path: str | Path, dataset: Any) -> Path:
    """Write a DICOM SEG dataset atomically, as a DICOM file (preamble, ``DICM`` and file meta
    header) with pydicom 3 (``enforce_file_format``) or pydicom 2 (``write_like_original=False``),
    whichever is installed (highdicom >= 0.22 accepts both)."""
    return atomic_write(Path(path), lambda tmp: _save_as_file(dataset, tmp))


def _save_as_file(dataset: Any, path: Path) -> None:
    try:
        parameters = inspect.signature(dataset.save_as).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "enforce_file_format" in parameters:  # pydicom 3
        dataset.save_as(path, enforce_file_format=True)
    else:  # pydicom 2
        dataset.save_as(path, write_like_original=False)
