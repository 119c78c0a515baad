"""Problems and warnings found in a raw dataset, each tied to the case (or file) it is about."""

from __future__ import annotations

from dataclasses import dataclass

ERROR = "error"
WARNING = "warning"

# Kinds of finding. Errors make `autounet check` exit 2; warnings do not.
ERROR_KINDS = {
    "malformed_descriptor": "dataset.json is missing, not JSON, or lacks required fields",
    "path_outside_dataset": "a path in dataset.json leaves the dataset folder",
    "missing_file": "an image or label file does not exist",
    "unreadable_file": "a file exists but cannot be read as an image",
    "truncated_file": "an image file (or its compressed data) ends before the voxel data its header declares",
    "invalid_header": "an image header holds an impossible value (a zero, negative or non-finite spacing)",
    "invalid_file_name": "a file name is not valid UTF-8 (the image library cannot open it)",
    "empty_image": "an image has no voxels or no nonzero voxel",
    "shape_mismatch": "image and label (or channel files) differ in shape",
    "geometry_mismatch": "image and label (or channel files) differ in spacing, origin or direction",
    "undeclared_label": "a label value is not declared in dataset.json",
    "non_integer_label": "a label map has non-integer (or non-finite) values",
    "nonfinite_intensity": "an image has NaN or infinite intensities",
    "channel_count": "a case has a different number of channels than dataset.json declares",
    "duplicate_case": "two entries share one case identifier",
}
WARNING_KINDS = {
    "float_label": "a label map is stored as floats with whole-number values",
    "empty_label": "a label map contains background only",
    "mixed_dtypes": "cases store their images (or labels) in different data types",
    "unusual_spacing": "a spacing is implausible or far from the dataset's median",
    "small_case": "a case is shorter than a quarter of the dataset's median shape along some axis",
    "mixed_orientation": "cases have different orientations",
    "label_outside_nonzero": "labelled voxels lie outside the bounding box of the nonzero image voxels",
    "class_never_present": "a declared class occurs in no case",
    "count_mismatch": "numTraining differs from the number of training cases listed",
    "nonzero_background": "the background is a constant other than 0, so cropping to the nonzero region keeps it",
    "no_annotation": "a label map is the `ignore` label everywhere: the case has no annotated voxel to train on",
}


@dataclass(frozen=True)
class Finding:
    """One problem (``severity == "error"``) or warning, about ``case`` (None: the whole dataset)."""

    severity: str
    kind: str
    case: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.case}: {self.message}" if self.case else self.message


def error(kind: str, case: str | None, message: str) -> Finding:
    assert kind in ERROR_KINDS, kind
    return Finding(ERROR, kind, case, message)


def warning(kind: str, case: str | None, message: str) -> Finding:
    assert kind in WARNING_KINDS, kind
    return Finding(WARNING, kind, case, message)
