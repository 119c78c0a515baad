"""What a package carries of its training data: a fingerprint without anything per case.

A workspace's ``fingerprint.json`` lists every training case (its id, crop box, intensities,
label counts). A package carries only its dataset-level summary (:class:`FingerprintSummary`:
channels, labels, pooled foreground intensities, the number of cases) under the same name;
packages made before that carry the full fingerprint, which is still read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from autounet.errors import AutounetError
from autounet.planning.fingerprint import (
    FINGERPRINT_SCHEMA_VERSION,
    Fingerprint,
    IntensityStats,
    load_fingerprint,
)
from autounet.utils.loaders import read_json
from autounet.utils.plain_data import from_plain, to_plain

SUMMARY_KIND = "autounet-fingerprint-summary"


@dataclass
class FingerprintSummary:
    """A fingerprint's dataset-level fields, without its per-case entries."""

    dataset_name: str
    layout: str
    channel_names: list[str]
    labels: dict[str, str]  # label value -> name
    component_connectivity: int
    foreground_intensity_per_channel: list[IntensityStats]  # pooled over every case
    num_cases: int
    regions: dict[str, list[int]] = field(default_factory=dict)
    kind: str = SUMMARY_KIND
    schema_version: int = FINGERPRINT_SCHEMA_VERSION


def summarize(fp: Fingerprint) -> FingerprintSummary:
    """The summary a package carries of the workspace's fingerprint ``fp``."""
    return FingerprintSummary(
        dataset_name=fp.dataset_name,
        layout=fp.layout,
        channel_names=list(fp.channel_names),
        labels=dict(fp.labels),
        component_connectivity=fp.component_connectivity,
        foreground_intensity_per_channel=list(fp.foreground_intensity_per_channel),
        num_cases=fp.num_cases,
        regions=dict(fp.regions),
    )


def summary_plain(fp: Fingerprint) -> dict:
    """:func:`summarize` as JSON-ready data."""
    return to_plain(summarize(fp))


def load_fingerprint_document(path: str | Path) -> Fingerprint | FingerprintSummary:
    """A package's ``fingerprint.json``: its summary, or (an older package) the full fingerprint."""
    data = read_json(path, dict)
    if data.get("kind") != SUMMARY_KIND:
        return load_fingerprint(path)
    if data.get("schema_version") != FINGERPRINT_SCHEMA_VERSION:
        raise AutounetError(f"{path}: fingerprint schema version {data.get('schema_version')} is not supported")
    summary = from_plain(FingerprintSummary, data, str(path))
    if summary.num_cases < 0 or len(summary.foreground_intensity_per_channel) != len(summary.channel_names):
        raise AutounetError(f"{path}: malformed fingerprint summary (case count or channels)")
    return summary
