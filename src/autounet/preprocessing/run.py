"""`autounet preprocess`: preprocess every case of a planned dataset, resumably and in parallel.

A case already complete for a configuration (same preprocessing key, files intact) is skipped;
an interrupted one is redone. Configurations whose data are identical (2d and 3d_fullres share
the target spacing and normalisation) are computed once per case and linked. A failing case is
reported with its reason while the others finish.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from autounet.data.dataset import CaseFiles, load_raw_dataset
from autounet.data.image_io import read_image, read_label
from autounet.errors import AutounetError
from autounet.planning.fingerprint import dataset_signature, load_fingerprint
from autounet.planning.plans import ConfigurationPlan, Plans, load_plans
from autounet.preprocessing.case import PreprocessOptions, label_values, preprocess_case, preprocess_key
from autounet.preprocessing.store import (
    case_paths,
    is_complete,
    link_case,
    read_properties,
    remove_temporaries,
    write_case,
)
from autounet.utils.atomic import atomic_write_json
from autounet.utils.lock import exclusive
from autounet.utils.parallel import default_workers, map_cases
from autounet.workspace import Workspace, manifest_path


@dataclass(frozen=True)
class Target:
    """One preprocessed folder to fill: its data identifier, key and plan."""

    data_identifier: str
    folder: Path
    key: str
    plan: ConfigurationPlan


@dataclass(frozen=True)
class CaseJob:
    case: CaseFiles
    targets: tuple[Target, ...]  # only those still incomplete for this case
    values: tuple[int, ...]
    options: PreprocessOptions
    complete: tuple[Target, ...] = ()  # folders already holding this case, usable as link sources


@dataclass
class CaseOutcome:
    case_id: str
    written: list[str] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class PreprocessSummary:
    workspace: Workspace
    configurations: list[str]
    cases: int
    processed: int  # cases read and preprocessed in this run (the others were complete)
    written: dict[str, int]
    skipped: dict[str, int]
    failures: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failures


def _process(job: CaseJob) -> CaseOutcome:
    out = CaseOutcome(job.case.case_id)
    try:
        image, geometry = read_image(job.case.images)
        label = read_label(job.case.label)[0] if job.case.label is not None else None
        done = {t.key: t for t in job.complete}  # key -> target whose folder holds that key's files
        for t in job.targets:
            t.folder.mkdir(parents=True, exist_ok=True)
            if t.key in done:
                props = read_properties(done[t.key].folder, out.case_id)
                props.configuration = t.data_identifier
                link_case(done[t.key].folder, t.folder, props)
                out.linked.append(t.data_identifier)
                continue
            pre = preprocess_case(out.case_id, image, geometry, label, t.plan, list(job.values), job.options)
            write_case(t.folder, pre.properties, pre.image, pre.seg, pre.locations)
            del pre  # free this configuration's arrays before computing the next
            done[t.key] = t
            out.written.append(t.data_identifier)
    except AutounetError as exc:
        out.error = str(exc)
    except MemoryError:
        out.error = "out of memory (try fewer workers, -j 1)"
    except OSError as exc:  # disk full, read-only folder: the file and the reason
        out.error = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
    except Exception as exc:  # report any failure by case, never lose the others
        where = traceback.extract_tb(exc.__traceback__)[-1]
        out.error = f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})"
    return out


def _targets(
    ws: Workspace, plans: Plans, configurations: list[str] | None, values: list[int], options: PreprocessOptions
) -> list[Target]:
    names = configurations or list(plans.configurations)
    targets: dict[str, Target] = {}
    for name in names:
        plan = plans.configuration(name)
        ident = plan.data_identifier
        if ident not in targets:
            targets[ident] = Target(ident, ws.preprocessed_dir(ident), preprocess_key(plan, values, options), plan)
    return sorted(targets.values(), key=lambda t: (t.key, t.data_identifier))


def _raw_dataset(ws: Workspace):
    raw_path = ws.raw_path()
    dataset = load_raw_dataset(raw_path)
    if ws.fingerprint_json.is_file():
        signature = load_fingerprint(ws.fingerprint_json).source_signature
        if signature and signature != dataset_signature(dataset):
            raise AutounetError(
                f"the raw dataset {raw_path} changed since it was planned; run `autounet plan {raw_path} --work {ws.work}` again"
            )
    return dataset


def _remove_stale(folder: Path, keep: set[str]) -> int:
    """Delete preprocessed files of cases no longer in the dataset."""
    removed = 0
    for p in folder.glob("*.json"):
        if p == manifest_path(folder) or p.stem in keep:
            continue
        for q in case_paths(folder, p.stem).values():
            q.unlink(missing_ok=True)
        removed += 1
    return removed


def preprocess_dataset(
    ws: Workspace,
    configurations: list[str] | None = None,
    workers: int | None = None,
    options: PreprocessOptions = PreprocessOptions(),
    force: bool = False,
) -> PreprocessSummary:
    """Preprocess the planned dataset ``W/NAME`` for ``configurations`` (default: all planned)."""
    options.validate()
    start = time.perf_counter()
    plans = load_plans(ws.plans_json)
    dataset = _raw_dataset(ws)
    values = label_values(plans.labels, plans.ignore_label)
    targets = _targets(ws, plans, configurations, values, options)

    with exclusive(ws.preprocess_lock, "`autounet preprocess`"):
        jobs, skipped = [], {t.data_identifier: 0 for t in targets}
        for t in targets:
            remove_temporaries(t.folder)
        for case in dataset.cases:
            todo, complete = [], []
            for t in targets:
                if not force and is_complete(t.folder, case.case_id, t.key):
                    skipped[t.data_identifier] += 1
                    complete.append(t)
                else:
                    todo.append(t)
            if todo:
                jobs.append(CaseJob(case, tuple(todo), tuple(values), options, tuple(complete)))
        for t in targets:
            if any(t in j.targets for j in jobs):
                manifest_path(t.folder).unlink(missing_ok=True)

        workers = default_workers() if workers is None else workers
        outcomes = map_cases(_process, jobs, workers, desc="preprocessing") if jobs else []
        written = {t.data_identifier: 0 for t in targets}
        failures = []
        for o in outcomes:
            for ident in o.written + o.linked:
                written[ident] += 1
            if o.error:
                failures.append(f"{o.case_id}: {o.error}")

        keep = {c.case_id for c in dataset.cases}
        for t in targets:
            _remove_stale(t.folder, keep)
            if all(is_complete(t.folder, c, t.key) for c in keep):
                atomic_write_json(
                    manifest_path(t.folder),
                    {
                        "configuration": t.data_identifier,
                        "preprocess_key": t.key,
                        "image_dtype": options.image_dtype,
                        "label_interpolation": options.label_interpolation,
                        "cases": sorted(keep),
                    },
                )
        return PreprocessSummary(
            workspace=ws,
            configurations=[t.data_identifier for t in targets],
            cases=len(dataset.cases),
            processed=len(outcomes),
            written=written,
            skipped=skipped,
            failures=failures,
            seconds=time.perf_counter() - start,
        )
