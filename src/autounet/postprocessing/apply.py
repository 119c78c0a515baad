"""The post-processing chosen by `autounet select`, as one object the predictor applies.

Two kinds, both plain data (stored in ``selection.json``, see :mod:`autounet.selection_document`):

* ``components`` (seed 001 §2.5): keep the largest foreground component and/or the largest
  component of some classes, as decided on the cross-validation predictions;
* ``brats_et`` (seed 004 §2.5): region probabilities -> labels with the chosen ET threshold,
  then small or uncertain enhancing tumour becomes necrosis. It needs the probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autounet.errors import AutounetError
from autounet.postprocessing.brats_et import EtRule, brats_postprocess
from autounet.postprocessing.components import PostprocessingDecision, apply_postprocessing
from autounet.regions import RegionSet
from autounet.utils.plain_data import to_plain

KINDS = ("components", "brats_et")


@dataclass
class Postprocessing:
    kind: str
    decision: PostprocessingDecision | None = None  # kind "components"
    rule: EtRule | None = None  # kind "brats_et"
    regions: RegionSet | None = None  # kind "brats_et"

    @property
    def needs_probabilities(self) -> bool:
        return self.kind == "brats_et"

    @property
    def does_something(self) -> bool:
        if self.kind == "brats_et":
            return True
        d = self.decision
        return d is not None and (d.keep_largest_foreground or bool(d.keep_largest_classes))

    def apply(self, segmentation: np.ndarray, probabilities: np.ndarray | None = None) -> np.ndarray:
        """Post-process a label map (``probabilities``: the region maps, for ``brats_et``)."""
        if self.kind == "components":
            return apply_postprocessing(segmentation, self.decision) if self.decision is not None else segmentation
        if probabilities is None:
            raise AutounetError("the ET post-processing needs the region probabilities")
        return brats_postprocess(probabilities, self.regions, self.rule)

    def describe(self) -> str:
        if self.kind == "brats_et":
            r = self.rule
            steps = [f"ET threshold {r.et_threshold:g}"]
            if r.component_voxels > 0:
                steps.append(
                    f"ET components < {r.component_voxels} voxels with mean probability < {r.min_mean_probability:g} become necrosis"
                )
            if r.total_voxels > 0:
                steps.append(
                    f"all ET becomes necrosis when < {r.total_voxels} voxels with mean probability < {r.min_mean_probability:g} remain"
                )
            if len(steps) == 1:
                steps.append("no ET removal (the grid search preferred none)")
            return "; ".join(steps)
        d = self.decision
        steps = []
        if d is not None and d.keep_largest_foreground:
            steps.append("keep the largest foreground component")
        if d is not None and d.keep_largest_classes:
            steps.append("keep the largest component of class(es) " + ", ".join(map(str, d.keep_largest_classes)))
        return "; ".join(steps) or "none"

    def to_plain(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "decision": to_plain(self.decision) if self.decision is not None else None,
            "rule": to_plain(self.rule) if self.rule is not None else None,
            "regions": to_plain(self.regions) if self.regions is not None else None,
        }


def _brats_file(pair: tuple[Path, Path, Path], pp: Postprocessing) -> Path:
    from autounet.data.image_io import read_label, save_image
    from autounet.data.probabilities import load_probability_file

    seg_path, probs_path, out = pair
    seg, geometry = read_label(seg_path)
    probs, _, kind = load_probability_file(probs_path)
    if kind != "sigmoid" or probs.shape[1:] != seg.shape:
        raise AutounetError(f"{probs_path}: not region probabilities on the grid of {seg_path}")
    result = pp.apply(seg, probs)
    return save_image(out, result, geometry)


def segmentation_files(in_dir: str | Path, out_dir: str | Path | None = None, overwrite: bool = False) -> list[Path]:
    """The segmentations `autounet postprocess` works on (image files, not hidden ones) in
    ``in_dir``; a clear error for a missing or empty folder, an ``out_dir`` that is a file, or
    (unless ``overwrite``, or OUT is IN: in place) an ``out_dir`` already holding a file of a case."""
    from autounet.data.image_io import IMAGE_SUFFIXES, image_suffix

    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise AutounetError(
            f"{in_dir}: " + ("a file, not a folder of segmentations" if in_dir.exists() else "folder not found")
        )
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise AutounetError(f"{out_dir}: a file, not a folder: OUT names the folder the segmentations go to")
    files = sorted(
        p for p in in_dir.iterdir() if p.is_file() and not p.name.startswith(".") and image_suffix(p) in IMAGE_SUFFIXES
    )
    if not files:
        raise AutounetError(f"no segmentations in {in_dir} (image endings: {', '.join(IMAGE_SUFFIXES)})")
    if out_dir is not None and not overwrite:
        _refuse_existing(files, in_dir, Path(out_dir))
    return files


def _refuse_existing(files: list[Path], in_dir: Path, out_dir: Path) -> None:
    """Refuse an OUT (other than IN) holding files a case would write: the image and, for a
    header such as ``.mhd`` / ``.nhdr``, its data file."""
    from autounet.data.image_io import image_suffix

    if not out_dir.is_dir() or out_dir.resolve() == in_dir.resolve():
        return
    names = set()
    for f in files:
        stem = f.name[: -len(image_suffix(f))]
        names |= {f.name, *(stem + data for data in (".zraw", ".raw", ".raw.gz"))}
    there = sorted(p.name for p in out_dir.iterdir() if p.name in names)
    if there:
        few = ", ".join(there[:3]) + (f" and {len(there) - 3} more" if len(there) > 3 else "")
        raise AutounetError(f"{out_dir}: already holds {few}; give --overwrite to replace them, or another OUT")


def apply_to_folder(
    in_dir: str | Path,
    out_dir: str | Path,
    pp: Postprocessing | None,
    workers: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """`autounet postprocess IN OUT --from W/NAME`: apply ``pp`` (the selected post-processing,
    None: none) to every segmentation in a folder; ``brats_et`` reads each one's saved probabilities.
    Files of the cases already in an OUT other than IN are refused unless ``overwrite``."""
    import functools

    from autounet.data.image_io import image_suffix
    from autounet.postprocessing.components import postprocess_folder
    from autounet.utils.atomic import make_folder
    from autounet.utils.parallel import default_workers, map_cases
    from autounet.utils.temporary import remove_stale_temporaries

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    files = segmentation_files(in_dir, out_dir, overwrite)
    items = []
    for f in files if pp is not None and pp.kind == "brats_et" else []:
        probs = f.parent / (f.name[: -len(image_suffix(f))] + ".npz")
        if not probs.is_file():
            raise AutounetError(f"{f}: the ET post-processing needs {probs.name} (predict with --save-probabilities)")
        items.append((f, probs, out_dir / f.name))
    make_folder(out_dir)
    remove_stale_temporaries(out_dir)  # of a killed run
    if pp is None or pp.kind == "components":
        decision = pp.decision if pp is not None else None
        if decision is None:
            decision = PostprocessingDecision(False, [], [], {})
        return postprocess_folder(in_dir, out_dir, decision, workers)
    fn = functools.partial(_brats_file, pp=pp)
    return map_cases(fn, items, default_workers() if workers is None else workers, "post-processing")
