"""Peak memory and time of reading a large DICOM series for prediction (issue 22). One JSON line.

    python benchmarks/dicom_read.py [--slices 1000] [--size 512] [--rounds 2] [--folder F]

Writes a synthetic int16 CT-like series (``--slices`` files of ``--size``² pixels, through
SimpleITK's GDCM writer) into ``--folder`` (default: a temporary folder, removed afterwards),
then, in a fresh process each, alternating (A, B, A, B, ...) for ``--rounds`` rounds:

* ``before``: what predict did before issue 22: the series decoded in full by ``verify_inputs``
  (float32), then decoded again by the case's read (float32, a copy, a full-size ``isfinite`` mask);
* ``after``: :func:`~autounet.inference.inputs.verify_inputs` (no decoding) and
  :func:`~autounet.inference.inputs.read_input`: each file decoded once, in an integer type.

Each reports the process's peak RSS above its RSS after finding the series (the headers), the
read's seconds, and the array's dtype. Run with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_series(folder: Path, slices: int, size: int) -> None:
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.8.498.77"
    for k in range(slices):
        pixels = (rng.integers(-1000, 1500, size=(1, size, size))).astype(np.int16)
        image = sitk.GetImageFromArray(pixels)
        image.SetSpacing((0.7, 0.7, 1.0))
        image.SetOrigin((0.0, 0.0, float(k)))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{uid}.{k + 1}",
            "0008|0060": "CT",
            "0010|0020": "P1",
            "0020|000d": uid + ".100",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{k}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": "0.7\\0.7",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{k:05d}.dcm"))
        writer.Execute(image)


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _old_read(series):
    """read_dicom_series as it was before issue 22 (float32, copy, full isfinite mask)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(f) for f in series.files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image)[None]
    if not np.isfinite(array).all():
        raise RuntimeError("non-finite")
    return array


def child(variant: str, folder: Path) -> dict:
    from autounet.inference.inputs import discover_cases, read_input, verify_inputs

    (case,) = discover_cases([folder], 1)
    base = _rss_mib()
    t = time.perf_counter()
    if variant == "before":
        _old_read(case.series)  # verify_inputs decoded every series in full
        image = _old_read(case.series)  # and the case's read decoded it again
    else:
        verify_inputs([case])
        image, _, _ = read_input(case, verified=True)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "peak_above_headers_mib": round(peak - base, 1),
        "seconds": round(seconds, 2),
        "dtype": str(image.dtype),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.folder)))
        return 0
    folder = args.folder or Path(tempfile.mkdtemp(prefix="autounet-dicom-"))
    try:
        if not any(folder.glob("*.dcm")):
            write_series(folder, args.slices, args.size)
        runs = []
        for _ in range(args.rounds):
            for variant in ("before", "after"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", variant, "--folder", str(folder)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps({"slices": args.slices, "size": args.size, "runs": runs}))
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
