"""Raw dataset layouts: Medical Segmentation Decathlon (MSD) and nnU-Net v2.

MSD: ``dataset.json`` with ``modality`` ({"0": "CT"}), ``labels`` ({"0": "background", ...}) and a
``training`` list of ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``;
multi-modal images are 4D files.

nnU-Net v2: ``dataset.json`` with ``channel_names``, ``labels`` ({"background": 0, ...}; a list of
values declares a region), ``numTraining`` and ``file_ending``; one file per channel,
``imagesTr/CASE_0000{file_ending}``, and ``labelsTr/CASE{file_ending}``. An explicit
``"dataset": {CASE: {"images": [...], "label": ...}}`` mapping is honoured too.

Sparse annotations (nnU-Net v2's ignore label): a label named exactly ``ignore``, in either layout
(``"ignore": 3`` in v2, ``"3": "ignore"`` in MSD), marks unannotated voxels. It must be a single
value above every other declared value; it is no class (no network output, never predicted,
left out of losses and metrics).

Parsing never stops at the first problem: :func:`parse_raw_dataset` returns every problem of the
descriptor as :class:`~autounet.data.findings.Finding` objects beside what could be parsed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from autounet.data.findings import Finding, error, warning
from autounet.data.image_io import IMAGE_SUFFIXES, image_suffix
from autounet.data.image_verify import name_problem
from autounet.errors import AutounetError, DatasetInvalid
from autounet.utils.loaders import read_json

MSD = "msd"
NNUNET_V2 = "nnunetv2"
# The name of the label that marks unannotated voxels (nnU-Net v2's convention, case-sensitive).
IGNORE_LABEL_NAME = "ignore"
Key = TypeVar("Key", int, str)


def ignore_label_of(labels: Mapping[int, str] | Mapping[str, str]) -> int | None:
    """The value of the label named ``ignore`` in a value -> name mapping, or None."""
    for value, name in labels.items():
        if name == IGNORE_LABEL_NAME:
            return int(value)
    return None


def without_ignore(labels: Mapping[Key, str]) -> dict[Key, str]:
    """The classes of a value -> name mapping: every label but ``ignore``."""
    return {k: v for k, v in labels.items() if v != IGNORE_LABEL_NAME}


@dataclass(frozen=True)
class CaseFiles:
    """The files of one training case: one multi-channel image file or one file per channel."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass(frozen=True)
class RawDataset:
    """A parsed raw dataset descriptor and its training cases."""

    root: Path
    layout: str
    name: str
    channel_names: tuple[str, ...]
    labels: dict[int, str]
    cases: tuple[CaseFiles, ...]
    descriptor: dict
    regions: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def ignore_label(self) -> int | None:
        """The value of the ``ignore`` label (unannotated voxels), or None."""
        return ignore_label_of(self.labels)


def _is_outside(rel: str) -> bool:
    """Whether a path written in dataset.json leaves the dataset folder (judged on the text)."""
    if os.path.isabs(rel) or re.match(r"^[A-Za-z]:[\\/]", rel):
        return True
    norm = os.path.normpath(rel.replace("\\", "/"))
    return norm == ".." or norm.startswith("../")


def _case_id_from_file(path: str) -> str:
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else Path(name).stem


def _parse_channels(d: dict, key: str, findings: list[Finding]) -> tuple[str, ...]:
    raw = d.get(key)
    if not isinstance(raw, dict) or not raw:
        findings.append(error("malformed_descriptor", None, f"dataset.json: '{key}' must be a non-empty mapping"))
        return ()
    try:
        by_index = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        findings.append(error("malformed_descriptor", None, f"dataset.json: '{key}' keys must be 0, 1, 2, ..."))
        return ()
    if sorted(by_index) != list(range(len(raw))):
        findings.append(
            error(
                "malformed_descriptor", None, f"dataset.json: '{key}' keys must be 0..{len(raw) - 1}, got {sorted(raw)}"
            )
        )
        return ()
    return tuple(by_index[i] for i in range(len(raw)))


def _parse_msd_labels(raw: object, findings: list[Finding]) -> dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        findings.append(error("malformed_descriptor", None, "dataset.json: 'labels' must be a non-empty mapping"))
        return {}
    labels = {}
    for k, v in raw.items():
        try:
            value = int(k)
            if str(value) != str(k).strip():
                raise ValueError
        except (TypeError, ValueError):
            findings.append(error("malformed_descriptor", None, f"dataset.json: label key {k!r} is not an integer"))
            continue
        if value < 0:
            findings.append(error("malformed_descriptor", None, f"dataset.json: label value {value} is negative"))
            continue
        labels[value] = str(v)
    if labels and 0 not in labels:
        findings.append(error("malformed_descriptor", None, "dataset.json: 'labels' must declare 0 (background)"))
    return dict(sorted(labels.items()))


def _parse_v2_labels(raw: object, findings: list[Finding]) -> tuple[dict[int, str], dict[str, tuple[int, ...]]]:
    if not isinstance(raw, dict) or not raw:
        findings.append(error("malformed_descriptor", None, "dataset.json: 'labels' must be a non-empty mapping"))
        return {}, {}
    labels: dict[int, str] = {}
    regions: dict[str, tuple[int, ...]] = {}
    for name, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, (int, list, tuple)):
            findings.append(
                error(
                    "malformed_descriptor",
                    None,
                    f"dataset.json: label {name!r} must be an integer or a list of integers",
                )
            )
            continue
        if name == IGNORE_LABEL_NAME and not isinstance(v, int):
            findings.append(
                error(
                    "malformed_descriptor",
                    None,
                    f"dataset.json: label {IGNORE_LABEL_NAME!r} must be one integer (the highest label value), got {v!r}",
                )
            )
            continue
        values = [v] if isinstance(v, int) else list(v)
        if not values or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in values):
            findings.append(
                error("malformed_descriptor", None, f"dataset.json: label {name!r} has invalid value(s) {v!r}")
            )
            continue
        if isinstance(v, int):
            if v in labels:
                findings.append(
                    error(
                        "malformed_descriptor", None, f"dataset.json: labels {labels[v]!r} and {name!r} share value {v}"
                    )
                )
            labels[v] = str(name)
        else:
            regions[str(name)] = tuple(values)
    for name, values in regions.items():
        for x in values:
            labels.setdefault(x, f"{name}:{x}")
    if labels and 0 not in labels:
        findings.append(error("malformed_descriptor", None, "dataset.json: 'labels' must declare background = 0"))
    return dict(sorted(labels.items())), regions


def _check_ignore(labels: dict[int, str], regions: dict[str, tuple[int, ...]], findings: list[Finding]) -> None:
    """The ``ignore`` label must be declared once, above every other value, and in no region."""
    named = [v for v, n in labels.items() if n == IGNORE_LABEL_NAME]
    if not named:
        return
    if len(named) > 1:
        findings.append(
            error(
                "malformed_descriptor",
                None,
                f"dataset.json: label {IGNORE_LABEL_NAME!r} is declared {len(named)} times",
            )
        )
        return
    value = named[0]
    higher = {v: n for v, n in labels.items() if v > value}
    if value == 0 or higher:
        shown = ", ".join(f"{v} ({n!r})" for v, n in sorted(higher.items())) or "0 is background"
        findings.append(
            error(
                "malformed_descriptor",
                None,
                f"dataset.json: label {IGNORE_LABEL_NAME!r} ({value}) must have the highest label value "
                f"(as in nnU-Net v2); higher: {shown}",
            )
        )
    for name, values in regions.items():
        if value in values:
            findings.append(
                error(
                    "malformed_descriptor",
                    None,
                    f"dataset.json: region {name!r} contains the {IGNORE_LABEL_NAME!r} label ({value}); "
                    "unannotated voxels belong to no region",
                )
            )


def _resolve(root: Path, rel: object, what: str, case: str | None, findings: list[Finding]) -> Path | None:
    if not isinstance(rel, str) or not rel.strip():
        findings.append(
            error("malformed_descriptor", case, f"dataset.json: {what} path must be a non-empty string, got {rel!r}")
        )
        return None
    if _is_outside(rel):
        findings.append(
            error("path_outside_dataset", case, f"dataset.json: {what} path {rel!r} leaves the dataset folder")
        )
        return None
    problem = name_problem(rel)
    if problem:
        findings.append(error("invalid_file_name", None, f"dataset.json: {what} path {problem}"))
        return None
    return root / os.path.normpath(rel)


def _parse_msd(
    root: Path, d: dict, findings: list[Finding]
) -> tuple[tuple[str, ...], dict[int, str], dict, list[CaseFiles]]:
    channels = _parse_channels(d, "modality", findings)
    labels = _parse_msd_labels(d.get("labels"), findings)
    training = d.get("training")
    cases: list[CaseFiles] = []
    if not isinstance(training, list) or not training:
        findings.append(error("malformed_descriptor", None, "dataset.json: 'training' must be a non-empty list"))
        return channels, labels, {}, cases
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            findings.append(
                error("malformed_descriptor", None, f"dataset.json: training entry {i} must have 'image' and 'label'")
            )
            continue
        image_rel = entry["image"]
        case_id = (
            _case_id_from_file(image_rel)
            if isinstance(image_rel, str) and name_problem(image_rel) is None
            else f"training[{i}]"
        )
        image = _resolve(root, image_rel, "image", case_id, findings)
        label = _resolve(root, entry["label"], "label", case_id, findings)
        if image is not None and label is not None:
            cases.append(CaseFiles(case_id, (image,), label))
    n = d.get("numTraining")
    if isinstance(n, int) and n != len(training):
        findings.append(
            warning(
                "count_mismatch", None, f"dataset.json: numTraining is {n} but 'training' lists {len(training)} cases"
            )
        )
    return channels, labels, {}, cases


def _valid_names(folder: Path, findings: list[Finding]) -> list[Path]:
    """The entries of ``folder``; one whose name is not valid UTF-8 is a finding instead (SimpleITK
    would abort the process on it)."""
    out = []
    for p in sorted(folder.iterdir()):
        problem = name_problem(p)
        if problem is None:
            out.append(p)
        elif p.name.lower().endswith(IMAGE_SUFFIXES):
            findings.append(error("invalid_file_name", None, problem))
    return out


def _v2_cases(root: Path, d: dict, num_channels: int, ending: str, findings: list[Finding]) -> list[CaseFiles]:
    explicit = d.get("dataset")
    cases: list[CaseFiles] = []
    if explicit is not None:
        if not isinstance(explicit, dict):
            findings.append(error("malformed_descriptor", None, "dataset.json: 'dataset' must map case names to files"))
            return cases
        for case_id, entry in explicit.items():
            if name_problem(case_id):
                findings.append(error("invalid_file_name", None, f"dataset.json: case name {name_problem(case_id)}"))
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("images"), list) or "label" not in entry:
                findings.append(
                    error("malformed_descriptor", case_id, "dataset.json: entry needs 'images' (a list) and 'label'")
                )
                continue
            images = [_resolve(root, p, "image", case_id, findings) for p in entry["images"]]
            label = _resolve(root, entry["label"], "label", case_id, findings)
            if label is not None and all(p is not None for p in images):
                cases.append(CaseFiles(str(case_id), tuple(images), label))
        return cases

    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not labels_dir.is_dir():
        findings.append(error("missing_file", None, f"{labels_dir}: folder not found"))
        return cases
    label_ids = sorted(
        p.name[: -len(ending)]
        for p in _valid_names(labels_dir, findings)
        if p.name.endswith(ending) and not p.name.startswith(".")
    )
    image_ids: dict[str, set[int]] = {}
    if images_dir.is_dir():
        pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
        for p in _valid_names(images_dir, findings):
            m = pattern.match(p.name)
            if m:
                image_ids.setdefault(m.group(1), set()).add(int(m.group(2)))
    else:
        findings.append(error("missing_file", None, f"{images_dir}: folder not found"))
    for case_id in sorted(set(image_ids) - set(label_ids)):
        findings.append(
            error("missing_file", case_id, f"label file labelsTr/{case_id}{ending} not found (the case has images)")
        )
    for case_id in label_ids:
        extra = sorted(c for c in image_ids.get(case_id, ()) if c >= num_channels)
        if extra:
            names = ", ".join(f"{case_id}_{c:04d}{ending}" for c in extra)
            findings.append(
                error("channel_count", case_id, f"image files {names} beyond the {num_channels} declared channel(s)")
            )
        images = tuple(images_dir / f"{case_id}_{c:04d}{ending}" for c in range(num_channels))
        cases.append(CaseFiles(case_id, images, labels_dir / f"{case_id}{ending}"))
    n = d.get("numTraining")
    if isinstance(n, int) and n != len(label_ids):
        findings.append(
            error(
                "malformed_descriptor",
                None,
                f"dataset.json: numTraining is {n} but labelsTr holds {len(label_ids)} cases",
            )
        )
    return cases


def _parse_v2(
    root: Path, d: dict, findings: list[Finding]
) -> tuple[tuple[str, ...], dict[int, str], dict, list[CaseFiles]]:
    channels = _parse_channels(d, "channel_names", findings)
    labels, regions = _parse_v2_labels(d.get("labels"), findings)
    ending = d.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith(".") or ending.lower() not in IMAGE_SUFFIXES:
        findings.append(
            error(
                "malformed_descriptor",
                None,
                f"dataset.json: 'file_ending' must be one of {', '.join(IMAGE_SUFFIXES)}, got {ending!r}",
            )
        )
        return channels, labels, regions, []
    if "numTraining" not in d:
        findings.append(error("malformed_descriptor", None, "dataset.json: 'numTraining' is missing"))
    if not channels:
        return channels, labels, regions, []
    return channels, labels, regions, _v2_cases(root, d, len(channels), ending, findings)


def detect_layout(descriptor: dict) -> str | None:
    if "channel_names" in descriptor or "file_ending" in descriptor:
        return NNUNET_V2
    if "modality" in descriptor or "training" in descriptor:
        return MSD
    return None


def parse_raw_dataset(root: str | Path) -> tuple[RawDataset | None, list[Finding]]:
    """Parse ``root/dataset.json``; return the dataset (None if unusable) and every problem found."""
    root = Path(root)
    findings: list[Finding] = []
    desc_path = root / "dataset.json"
    if name_problem(root):
        return None, [error("invalid_file_name", None, str(name_problem(root)))]
    if not root.is_dir():
        return None, [error("missing_file", None, f"{root}: dataset folder not found")]
    if not desc_path.is_file():
        return None, [error("malformed_descriptor", None, f"{desc_path}: file not found")]
    try:
        descriptor = read_json(desc_path, dict)
    except AutounetError as exc:
        return None, [error("malformed_descriptor", None, str(exc))]
    layout = detect_layout(descriptor)
    if layout is None:
        return None, [
            error(
                "malformed_descriptor",
                None,
                f"{desc_path}: neither MSD ('modality', 'training') nor nnU-Net v2 ('channel_names', 'file_ending') layout",
            )
        ]
    parse = _parse_msd if layout == MSD else _parse_v2
    channels, labels, regions, cases = parse(root, descriptor, findings)
    _check_ignore(labels, regions, findings)

    seen: dict[str, int] = {}
    unique: list[CaseFiles] = []
    for c in cases:
        seen[c.case_id] = seen.get(c.case_id, 0) + 1
        if seen[c.case_id] == 2:
            findings.append(error("duplicate_case", c.case_id, "listed more than once in dataset.json"))
        if seen[c.case_id] == 1:
            unique.append(c)
    if not channels or not labels:
        return None, findings
    name = str(descriptor.get("name") or root.name)
    dataset = RawDataset(
        root=root.resolve(),
        layout=layout,
        name=name,
        channel_names=channels,
        labels=labels,
        cases=tuple(unique),
        descriptor=descriptor,
        regions=regions,
    )
    return dataset, findings


def load_raw_dataset(root: str | Path) -> RawDataset:
    """Parse a raw dataset, raising :class:`DatasetInvalid` if its descriptor has errors."""
    dataset, findings = parse_raw_dataset(root)
    errors = [str(f) for f in findings if f.severity == "error"]
    if errors or dataset is None:
        raise DatasetInvalid(errors or [f"{root}: cannot parse dataset"])
    return dataset
