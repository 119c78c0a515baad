"""Does predicting from a package cost more than from its workspace? Prints one JSON line.

    OMP_NUM_THREADS=1 python benchmarks/package_predict.py W/NAME IMAGES [--rounds 3] [--package FILE.zip]

Packages ``W/NAME`` (unless ``--package`` names one made from it), then runs ``autounet predict
-i IMAGES -m W/NAME`` and ``autounet predict -i IMAGES -m FILE.zip`` alternately (A, B, A, B, ...,
``--rounds`` each, every run a fresh process with ``--engine torch --precision fp32``, after one
untimed run of each), and reports the wall time of each run, the medians, the package's overhead
in percent, and whether both wrote byte-identical segmentations. Every package run verifies the
cached entry (it hashes the package and every unpacked file; see ``autounet.packaging.open``);
that cost is measured on its own too, in this process: hashing the package, listing it and
re-hashing the entry (``--checks`` times, median).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _predict(model: Path, images: Path, out: Path) -> float:
    command = [sys.executable, "-m", "autounet", "predict", "-i", str(images), "-o", str(out), "-m", str(model)]
    command += ["--engine", "torch", "--precision", "fp32", "--overwrite"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _same_outputs(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    return names == sorted(p.name for p in b.iterdir() if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--package", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checks", type=int, default=5)
    args = parser.parse_args()

    from autounet import api
    from autounet.packaging import open as package_open

    with tempfile.TemporaryDirectory(prefix="autounet-package-bench-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("AUTOUNET_CACHE", str(tmp / "cache"))
        package = args.package or api.package(args.workspace, tmp / "model.zip").path
        start = time.perf_counter()
        root = package_open.open_package(package)
        first_open = time.perf_counter() - start

        checks, problems = [], []
        for _ in range(args.checks):  # a reuse: hash the package, list it, re-hash the entry
            start = time.perf_counter()
            package_open.open_package(package)
            checks.append(time.perf_counter() - start)
            with open(package, "rb") as fh:
                listing = package_open._list_package(fh, package)
            start = time.perf_counter()
            package_open._cached_problem(root.parent, root.parent.name, listing)
            problems.append(time.perf_counter() - start)
        entry_bytes = sum(p.stat().st_size for p in root.parent.rglob("*") if p.is_file())

        outs = {"workspace": tmp / "out_workspace", "package": tmp / "out_package"}
        models = {"workspace": args.workspace, "package": package}
        for name in models:  # untimed: file-system caches warm for both
            _predict(models[name], args.images, outs[name])
        times: dict[str, list[float]] = {"workspace": [], "package": []}
        for _ in range(args.rounds):
            for name in ("workspace", "package"):
                times[name].append(_predict(models[name], args.images, outs[name]))
        medians = {k: statistics.median(v) for k, v in times.items()}
        print(
            json.dumps(
                {
                    "cases": len([p for p in outs["workspace"].iterdir() if p.is_file()]),
                    "package_mb": round(package.stat().st_size / 1e6, 2),
                    "entry_mb": round(entry_bytes / 1e6, 2),
                    "first_open_s": round(first_open, 3),
                    "reuse_open_s": round(statistics.median(checks), 4),
                    "entry_rehash_s": round(statistics.median(problems), 4),
                    "predict_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
                    "median_s": {k: round(v, 2) for k, v in medians.items()},
                    "package_overhead_pct": round(100 * (medians["package"] / medians["workspace"] - 1), 2),
                    "identical_segmentations": _same_outputs(outs["workspace"], outs["package"]),
                }
            )
        )


if __name__ == "__main__":
    main()
