"""The export's kernels on a clinical-sized class map (issue 22), old against new, interleaved. One JSON line.

    python benchmarks/export_speed.py [--source 400 273 273] [--target 600 512 512] [--repeats 2]
                                      [--threads 1] [--separate-axis AXIS] [--no-write]

One class map of ``--source`` voxels (a smooth random field turned into a probability, float16 as
the sliding window's accumulators hold it; by default a 512 x 512 x 600 CT at 0.8 x 0.8 x 1.0 mm
planned at 1.5 mm) is reverted to ``--target`` (the crop box on the input grid), with:

* ``numpy_whole``: the CPU resampler before this change (``resample_volume`` of the whole volume,
  each pass allocating its result, axes in ratio order);
* ``numpy_slabs``: the slabbed NumPy export (in-plane ``resample_volume`` of each slab's source
  rows, then ``np.take`` along axis 0), slabs of ``--slab-voxels``;
* ``torch_rows``: :func:`~autounet.inference.linear_resample.resample_rows` writing into one
  reused buffer (what the export does), and ``torch_rows_new_out`` into a new array each time.

The runs alternate (A, B, C, D, A, B, ...) ``--repeats`` times, so that a machine shared with
other work slows them alike; the JSON gives each run's times, the ratios of the medians to
``torch_rows``, and the largest difference from ``numpy_whole``. It also times, once each, the
other steps the export takes per class and once per case on the target grid: adding a member's map
to the members' sum, the running argmax update (as the export does it, and with preallocated
masks), pasting the labels into the input grid, and writing the ``.nii.gz`` (and ``.nii``).
Set ``OMP_NUM_THREADS`` to ``--threads`` as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def probability_map(shape: list[int], seed: int = 0) -> np.ndarray:
    """A smooth map in [0, 1] (a logistic of low-frequency noise), float16."""
    from autounet.preprocessing.resample import resample_volume

    coarse = np.random.default_rng(seed).normal(0, 4, [max(2, s // 16) for s in shape]).astype(np.float32)
    field = resample_volume(coarse, shape, 1)
    return (1 / (1 + np.exp(-field))).astype(np.float16)


def numpy_slabs(source: np.ndarray, target: list[int], slab_voxels: int) -> np.ndarray:
    """The slabbed NumPy export: in-plane resampling of each slab's source rows, then axis 0."""
    from autounet.inference.linear_resample import axis_map, source_rows
    from autounet.preprocessing.resample import resample_volume

    out = np.empty(target, np.float32)
    rows = max(1, slab_voxels // (target[1] * target[2]))
    m = axis_map(source.shape[0], target[0], 1)
    for o0 in range(0, target[0], rows):
        o1 = min(o0 + rows, target[0])
        lo, hi = source_rows(source.shape[0], target, None, o0, o1)
        block = resample_volume(source[lo:hi].astype(np.float32), [hi - lo, *target[1:]], 1)
        part = np.take(block, m.i0[o0:o1] - lo, axis=0)
        part *= 1 - m.w1[o0:o1, None, None]
        part += np.take(block, m.i1[o0:o1] - lo, axis=0) * m.w1[o0:o1, None, None]
        out[o0:o1] = part
    return out


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def other_steps(target: list[int], classes: int, write: bool) -> dict:
    """Seconds of the export's other steps on the target grid (once each)."""
    from autounet.data.geometry import Geometry
    from autounet.data.image_io import save_image

    rng = np.random.default_rng(1)
    total = rng.random(target, dtype=np.float32)
    member = rng.random(target, dtype=np.float32)
    best = rng.random(target, dtype=np.float32)
    seg = np.zeros(target, np.uint8)
    steps = {}
    steps["add_member_s"], _ = timed(lambda: np.add(total, member, out=total))
    steps["divide_members_s"], _ = timed(lambda: np.multiply(total, 0.5, out=total))

    def argmax_as_export():  # streaming._Decision.add
        better = total > best
        np.copyto(best, total, where=better)
        seg[better] = 3

    mask = np.empty(target, bool)

    def argmax_preallocated():
        np.greater(total, best, out=mask)
        np.maximum(best, total, out=best)
        np.putmask(seg, mask, 4)

    steps["argmax_update_s"], _ = timed(argmax_as_export)
    steps["argmax_update_preallocated_s"], _ = timed(argmax_preallocated)
    labels_full = np.zeros([t + 8 for t in target], np.uint8)
    lut = np.arange(classes, dtype=np.uint8)
    inside = tuple(slice(4, 4 + t) for t in target)
    steps["paste_labels_s"], _ = timed(lambda: labels_full.__setitem__(inside, lut[seg]))
    if write:
        # a label map with structure: the argmax of smooth fields of a few classes
        fields = [probability_map(target, seed).astype(np.float32) for seed in range(3)]
        labels = np.argmax(np.stack(fields), axis=0).astype(np.uint8)
        del fields
        geometry = Geometry((1.0, 0.8, 0.8), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("seg.nii.gz", "seg.nii"):
                seconds, path = timed(lambda n=name: save_image(Path(tmp) / n, labels, geometry))
                steps[f"write_{name.replace('.', '_')}_s"] = seconds
                steps[f"write_{name.replace('.', '_')}_mb"] = round(path.stat().st_size / 1e6, 1)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=int, nargs=3, default=[400, 273, 273])
    parser.add_argument("--target", type=int, nargs=3, default=[600, 512, 512])
    parser.add_argument("--separate-axis", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slab-voxels", type=int, default=256 * 1024**2 // 24)
    parser.add_argument("--classes", type=int, default=15)
    parser.add_argument("--no-write", action="store_true", help="skip timing the NIfTI writes")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from autounet.inference.linear_resample import resample_rows
    from autounet.preprocessing.resample import resample_volume

    torch.set_num_threads(args.threads)
    source, target, sep = probability_map(args.source), list(args.target), args.separate_axis
    block = torch.from_numpy(source)
    reused = torch.empty(target, dtype=torch.float32)
    runs = {
        "numpy_whole": lambda: resample_volume(source.astype(np.float32), target, 1, sep, 0),
        "torch_rows": lambda: resample_rows(block, source.shape[0], target, sep, out=reused).numpy(),
        "torch_rows_new_out": lambda: resample_rows(block, source.shape[0], target, sep).numpy(),
    }
    if sep is None:
        runs["numpy_slabs"] = lambda: numpy_slabs(source, target, args.slab_voxels)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    reference = None
    max_diff = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            s, result = timed(fn)
            seconds[name].append(round(s, 3))
            if name == "numpy_whole":
                reference = result
            elif reference is not None and name not in max_diff:
                max_diff[name] = float(np.abs(result - reference).max())
            del result
    median = {name: statistics.median(v) for name, v in seconds.items()}
    report = {
        "source": args.source,
        "target": target,
        "separate_axis": sep,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "ratio_to_torch_rows": {n: round(m / median["torch_rows"], 2) for n, m in median.items()},
        "max_abs_diff_vs_numpy_whole": max_diff,
        "other_steps": other_steps(target, args.classes, not args.no_write),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
