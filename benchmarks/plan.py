"""Time `check` and `plan` (check + fingerprint + plans) on a raw dataset.

    python benchmarks/plan.py ../shared/data/hippocampus [-j N]

Prints one JSON line: cases, seconds for check and for plan (fingerprint recomputed), seconds for a
re-plan that reuses the fingerprint, and peak RSS of this process and of its workers.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from autounet.api import check, plan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path)
    parser.add_argument("-j", "--workers", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        report = check(args.raw, workers=args.workers)
        t1 = time.perf_counter()
        result = plan(args.raw, work=work, workers=args.workers, force=True)
        t2 = time.perf_counter()
        plan(args.raw, work=work, workers=args.workers)
        t3 = time.perf_counter()
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "dataset": str(args.raw),
                "cases": len(report.inspections),
                "workers": args.workers,
                "check_s": round(t1 - t0, 2),
                "plan_s": round(t2 - t1, 2),
                "check_plus_plan_s": round(t2 - t0, 2),
                "replan_reusing_fingerprint_s": round(t3 - t2, 2),
                "peak_rss_mb": round(peak_self, 1),
                "peak_worker_rss_mb": round(peak_children, 1),
                "configurations": {k: c.patch_size for k, c in result.plans.configurations.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
