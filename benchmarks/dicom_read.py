"""Peak memory and time of reading a large DICOM series for prediction (issue 22). One JSON line.

    python benchmarks/dicom_read.py [--slices 1000] [--size 512] [--rounds 2] [--folder F] [--predict]

Writes a synthetic int16 CT-like series (``--slices`` files of ``--size``² pixels, through
SimpleITK's GDCM writer) into ``--folder`` (default: a temporary folder, removed afterwards),
then, in a fresh process each, alternating (A, B, A, B, ...) for ``--rounds`` rounds:

* ``before``: what predict did before issue 22: the series decoded in full by ``verify_inputs``
  (float32), then decoded again by the case's read (float32, a copy, a full-size ``isfinite`` mask);
* ``after``: :func:`~autounet.inference.inputs.verify_inputs` (no decoding) and
  :func:`~autounet.inference.inputs.read_input`: each file decoded once, in an integer type.

Each reports the process's peak RSS above its RSS after finding the series (the headers), the
read's seconds, and the array's dtype. Then, alternating the same way, the header scan that finds
the series (:func:`~autounet.data.dicom.find_dicom_series`), in milliseconds per file:

* ``scan_simpleitk``: without pydicom: GDCM's series scan, then each file's header read by
  SimpleITK (which reads the whole file);
* ``scan_pydicom``: each file's header read once by pydicom, its pixel data skipped.

``--predict`` also predicts the series once (a fresh process) with benchmarks/big_ct.py's narrow
untrained 3d_fullres U-Net (15 classes), and reports its peak RSS beside the memory estimate's
terms (:mod:`autounet.inference.memory`): what the network needs and what the read needs. Run
with ``OMP_NUM_THREADS=1``.
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
    from autounet.inference.memory import resident_bytes

    return resident_bytes() / 2**20


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


def scan(variant: str, folder: Path) -> dict:
    """The header scan that finds the series, with pydicom or (``scan_simpleitk``) without it."""
    from autounet.data import dicom

    if variant == "scan_simpleitk":
        dicom._pydicom = lambda: None
    elif dicom._pydicom() is None:
        raise SystemExit("pydicom is not installed")
    t, cpu = time.perf_counter(), _cpu_seconds()
    (series,) = dicom.find_dicom_series([folder])
    seconds, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
    return {
        "variant": variant,
        "ms_per_file": round(1000 * seconds / len(series.files), 3),
        "cpu_ms_per_file": round(1000 * cpu / len(series.files), 3),
        "seconds": round(seconds, 2),
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def predict(folder: Path) -> dict:
    """Predict the series with big_ct.py's narrow untrained network; its peak RSS and the estimate."""
    sys.path.insert(0, str(Path(__file__).parent))
    import big_ct

    from autounet.inference.inputs import discover_cases
    from autounet.inference.memory import GB, estimate_case, input_grid, resident_bytes
    from autounet.inference.predictor import Predictor

    (case,) = discover_cases([folder], 1)
    shape, spacing, channels = input_grid(case)
    plans, labels = big_ct.ct_plans(15, shape, spacing)
    members = [big_ct.untrained_stage(plans.configurations["3d_fullres"], labels, 0.125)]
    predictor = Predictor(members=members, device="cpu", tta=False, engine="torch", precision="fp32", quiet=True)
    estimate = estimate_case(members, case.case_id, shape, spacing, channels, resident_bytes(), False)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        (timing,) = predictor.predict([folder], out)
        seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": "predict",
        "shape": shape,
        "seconds": round(seconds, 1),
        "read_and_preprocess_s": round(timing.preprocess_s, 1),
        "peak_rss_gb": round(peak / GB, 2),
        "estimate": {k: round(getattr(estimate, k) / GB, 2) for k in ("base", "read", "network", "export", "alone")},
        "peak_above_base_and_network_gb": round((peak - estimate.base - estimate.network) / GB, 2),
    }


def child(variant: str, folder: Path) -> dict:
    if variant.startswith("scan_"):
        return scan(variant, folder)
    if variant == "predict":
        return predict(folder)
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


def _run(variant: str, folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--folder", str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--predict", action="store_true", help="also predict the series once")
    parser.add_argument(
        "--child", choices=["before", "after", "scan_simpleitk", "scan_pydicom", "predict"], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.folder)))
        return 0
    folder = args.folder or Path(tempfile.mkdtemp(prefix="autounet-dicom-"))
    try:
        if not any(folder.glob("*.dcm")):
            write_series(folder, args.slices, args.size)
        runs = []
        variants = [("before", "after"), ("scan_simpleitk", "scan_pydicom")]
        for pair in variants:
            for _ in range(args.rounds):
                runs += [_run(variant, folder) for variant in pair]
        if args.predict:
            runs.append(_run("predict", folder))
        print(json.dumps({"slices": args.slices, "size": args.size, "runs": runs}))
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
