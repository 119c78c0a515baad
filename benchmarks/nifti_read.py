"""Time and peak memory of reading a CT-sized .nii.gz for prediction (issue 22). One JSON line.

    python benchmarks/nifti_read.py [--shape 300 512 512] [--rounds 3] [--file F]

Writes a synthetic int16 CT-like volume (``--shape`` z y x, air around a noisy body, through
SimpleITK) to ``--file`` (default: a temporary file, removed afterwards), then, in a fresh process
each, alternating (A, B, A, B, ...) for ``--rounds`` rounds:

* ``before``: what predict did before (issue 22, item 4): the file verified by a pass of its own
  (:func:`~autounet.data.image_verify.verify_image_file`: decompressed to its end), then read by
  SimpleITK (decompressed again);
* ``after``: :func:`~autounet.inference.inputs.verify_inputs` and
  :func:`~autounet.inference.inputs.read_input` as predict calls them for its first case: the file
  verified in the one pass that reads it.

Each reports the seconds (wall and CPU) from the discovered case to its array and the process's
peak RSS above its RSS before; the medians of each variant and what the one pass saves close the
line. Run with ``OMP_NUM_THREADS=1``; on a shared machine the CPU seconds are the steadier number.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_volume(path: Path, shape: tuple[int, int, int]) -> None:
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    z, y, x = shape
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) / (0.4 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1
    volume = np.full(shape, -1024, np.int16)
    for k in range(z):
        volume[k][body] = rng.normal(40, 60, size=int(body.sum())).astype(np.int16)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.8, 1.5))
    sitk.WriteImage(image, str(path), useCompression=True)


def _rss_mib() -> float:
    from autounet.inference.memory import resident_bytes

    return resident_bytes() / 2**20


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(variant: str, path: Path) -> dict:
    from autounet.inference.inputs import discover_cases, read_input, verify_inputs

    (case,) = discover_cases([path], 1)
    base = _rss_mib()
    t, cpu = time.perf_counter(), _cpu_seconds()
    if variant == "before":
        import SimpleITK as sitk

        from autounet.data.image_verify import verify_image_file

        verify_image_file(path, count_nonfinite=True)
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    else:
        verify_inputs([case])
        image, _, _ = read_input(case, verified=True)
    seconds, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "peak_above_mib": round(peak - base, 1),
        "dtype": str(image.dtype),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--file", type=Path, default=None)
    parser.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.file)))
        return 0
    folder = None if args.file else tempfile.TemporaryDirectory(prefix="autounet-nifti-")
    path = args.file or Path(folder.name) / "ct.nii.gz"
    try:
        if not path.exists():
            write_volume(path, tuple(args.shape))
        runs = []
        for _ in range(args.rounds):
            for variant in ("before", "after"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", variant, "--file", str(path)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        median = {
            f"{v}_{key}": statistics.median(r[key] for r in runs if r["variant"] == v)
            for v in ("before", "after")
            for key in ("seconds", "cpu_seconds")
        }
        print(
            json.dumps(
                {
                    "shape": args.shape,
                    "file_mb": round(path.stat().st_size / 1e6, 1),
                    "median": median,
                    "saved_seconds": round(median["before_seconds"] - median["after_seconds"], 3),
                    "saved_cpu_seconds": round(median["before_cpu_seconds"] - median["after_cpu_seconds"], 3),
                    "runs": runs,
                }
            )
        )
    finally:
        if folder is not None:
            folder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
