"""Time `autounet preprocess` per configuration, each in a fresh process (so peak memory is its own).

    python benchmarks/preprocess.py ../shared/data/hippocampus [-j N]
    python benchmarks/preprocess.py --ct [-j N]

DATASET is planned into a temporary workspace. ``--ct`` instead builds one CT-sized case,
200 x 512 x 512 int16 voxels at 2.5 x 0.8 x 0.8 mm, in a dataset whose median spacing is
1.5 x 0.8 x 0.8 mm, so the case is resampled to 333 x 512 x 512 (and to the low-resolution stage).
Prints one JSON line: per configuration, cases, seconds, seconds per case and peak RSS (MB) of
the preprocessing process and of its workers; and the same for all configurations in one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _child(work: str, name: str, configs: list[str], workers: int | None) -> None:
    from autounet.api import preprocess

    start = time.perf_counter()
    summary = preprocess(name, work=work, configurations=configs, workers=workers, force=True)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "cases": summary.cases,
                "failures": len(summary.failures),
                "seconds": round(seconds, 2),
                "seconds_per_case": round(seconds / max(1, summary.cases), 3),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "peak_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            }
        )
    )


def _ct_workspace(root: Path) -> tuple[Path, str]:
    """One CT-sized raw case and a plan whose median spacing forces resampling it."""
    from autounet.data.geometry import Geometry
    from autounet.data.image_io import write_image
    from autounet.planning.fingerprint import CaseFingerprint, Fingerprint, IntensityStats, save_fingerprint
    from autounet.planning.planner import plan_experiment
    from autounet.planning.plans import save_plans
    from autounet.utils.atomic import atomic_write_json

    shape, spacing = (200, 512, 512), (2.5, 0.8, 0.8)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - 256) / 220.0) ** 2 + ((x - 256) / 180.0) ** 2 <= 1
    organ = ((z - 100) / 60.0) ** 2 + ((y - 230) / 90.0) ** 2 + ((x - 300) / 80.0) ** 2 <= 1
    lesion = ((z - 110) / 6.0) ** 2 + ((y - 220) / 15.0) ** 2 + ((x - 310) / 15.0) ** 2 <= 1
    rng = np.random.default_rng(0)
    image = np.where(body, 40, -1000).astype(np.int16) + rng.normal(0, 15, shape).astype(np.int16)
    image[np.broadcast_to(organ, shape)] += 60
    label = np.zeros(shape, np.uint8)
    label[np.broadcast_to(organ, shape)] = 1
    label[np.broadcast_to(lesion, shape)] = 2
    raw = root / "raw"
    geo = Geometry(spacing=spacing, origin_xyz=(0.0, 0.0, 0.0), direction_xyz=tuple(np.eye(3).ravel()))
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    write_image(raw / "imagesTr" / "ct_000.nii.gz", image, geo)
    write_image(raw / "labelsTr" / "ct_000.nii.gz", label, geo)
    desc = {
        "name": "ct",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ", "2": "lesion"},
        "numTraining": 1,
        "training": [{"image": "./imagesTr/ct_000.nii.gz", "label": "./labelsTr/ct_000.nii.gz"}],
    }
    (raw / "dataset.json").write_text(json.dumps(desc))
    stats = IntensityStats(
        mean=100.0,
        std=30.0,
        min=-100.0,
        max=300.0,
        median=100.0,
        percentile_00_5=0.0,
        percentile_99_5=200.0,
        num_samples=1,
    )
    cases = [
        CaseFingerprint(
            f"c{i}", [s, 0.8, 0.8], list(shape), list(shape), [[0, n] for n in shape], 1.0, {}, {}, "label", [], "RAS"
        )
        for i, s in enumerate((2.5, 1.5, 1.0))
    ]
    fp = Fingerprint("ct", "msd", ["CT"], desc["labels"], 26, [stats], cases)
    ws = root / "W" / "ct"
    save_fingerprint(fp, ws / "fingerprint.json")
    save_plans(plan_experiment(fp), ws / "plans.json")
    atomic_write_json(ws / "dataset.json", {**desc, "raw_path": str(raw.resolve()), "layout": "msd"})
    return root / "W", "ct"


def _run(work: Path, name: str, configs: list[str], workers: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(work), name, ",".join(configs), str(workers or 0)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        work, name, configs, workers = sys.argv[2:6]
        _child(work, name, configs.split(","), int(workers) or None)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", type=Path)
    parser.add_argument("--ct", action="store_true", help="benchmark one CT-sized case instead")
    parser.add_argument("-j", "--workers", type=int, default=None)
    args = parser.parse_args()
    if not args.ct and args.dataset is None:
        parser.error("give DATASET or --ct")
    from autounet.api import plan
    from autounet.planning.plans import load_plans

    with tempfile.TemporaryDirectory() as tmp:
        if args.ct:
            work, name = _ct_workspace(Path(tmp))
        else:
            work, name = Path(tmp) / "W", "bench"
            plan(args.dataset, work=work, name=name, workers=args.workers)
        configs = list(load_plans(work / name / "plans.json").configurations)
        data_configs = [c for c in configs if c != "3d_cascade_fullres"]  # it shares 3d_fullres's data
        result = {
            "dataset": "ct 200x512x512 @ 2.5x0.8x0.8 -> 1.5x0.8x0.8 mm" if args.ct else str(args.dataset),
            "workers": args.workers,
        }
        result["configurations"] = {c: _run(work, name, [c], args.workers) for c in data_configs}
        result["all_together"] = _run(work, name, data_configs, args.workers)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
