"""Inference speed and memory of a trained model. Prints one JSON line.

    python benchmarks/predict.py MODEL_DIR IMAGES [--device D] [--cases N] [--out JSON]
    python benchmarks/predict.py MODEL_DIR --ct [--ct-shape Z Y X] [--ct-spacing z y x] [--no-tta] [--device D]
    python benchmarks/predict.py MODEL_DIR IMAGES --engines torch:fp32 auto:auto [--compete 1] [--repeats 2]

``MODEL_DIR`` is ``W/NAME/results/CONFIG`` (or one ``fold_K`` folder); ``IMAGES`` a folder (or
files) in MSD or nnU-Net v2 naming, as for ``autounet predict``; the first ``--cases`` cases
(default 3) are predicted.

Four runs, each in a fresh process (so that peak memory is its own): the first fold with and
without mirroring test-time augmentation (TTA), and every trained fold (up to 5) with and without
it (skipped when only one fold is trained). Per run: seconds per case (wall clock of
``Predictor.predict`` over the cases) and the per-case means of its three phases from the
``CaseTiming`` it returns: preprocessing (read, crop, resample, normalise), network (sliding window
over every stage, fold and mirror) and export (revert to the input grid, write). Preprocessing
and export run in background threads beside the network, so the phases overlap and their sum
exceeds the wall time when there are several cases. ``tiles_per_case`` counts the sliding-window
tiles of a case (with :func:`autounet.inference.sliding_window.tile_starts` and the plan's patch,
on the preprocessed shape, summed over a cascade's stages); ``tile_evaluations`` multiplies each
tile by the networks (folds) and mirror combinations that see it; ``tiles_per_s`` is tile
evaluations per second of network time. ``peak_rss_mb`` is the process's peak resident set
(``ru_maxrss``), ``cuda_peak_mb`` CUDA's peak allocation (``torch.cuda.max_memory_allocated``).

``--ct`` writes one synthetic CT-sized volume to a temporary folder: 300 x 512 x 512 int16 voxels
(``--ct-shape``) at 2.5 x 0.8 x 0.8 mm (``--ct-spacing``), a body ellipse of about -50..50 HU in
air at -1000 HU with a few blobs of 60..140 HU, and predicts it with the first fold of the model
(which must take one input channel), with TTA unless ``--no-tta``, reporting the phases, tiles
and peak memory the same way. The volume is resampled to the model's target spacing first: a
plan trained on hippocampus has 1 mm target spacing, so the default volume becomes about
750 x 410 x 410 voxels (126 M, 0.5 GB as float32, with about 2 GB of class-probability
accumulators for 3 classes); with its 40 x 56 x 40 patch that is about 10 000 tiles, 80 000
network evaluations with TTA, which takes hours on a CPU: use a GPU, or a smaller ``--ct-shape``
on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MAX_FOLDS = 5


# ------------------------------------------------------------------ one run (in a child process)


def _tiles(shape, patch, dims: int, step: float) -> int:
    """Tiles of one preprocessed volume ``(z, y, x)`` for a patch (2D networks: every slice)."""
    from autounet.inference.sliding_window import tile_starts

    window = list(patch) if dims == 3 else [1, *patch]
    return math.prod(len(tile_starts(max(s, p), p, step)) for s, p in zip(shape, window))


def _stage_chain(stage):
    chain = []
    while stage is not None:
        chain.insert(0, stage)
        stage = stage.previous
    return chain


def run_once(
    model: str,
    files: list[str],
    device: str | None,
    folds: list[str],
    tta: bool,
    engine: str = "torch",
    precision: str = "fp32",
    keep: str | None = None,
) -> dict:
    """Predict ``files`` with ``folds`` of ``model``; timings, tiles and peak memory (the outputs
    are kept in ``keep`` when given)."""
    import torch

    import autounet.inference.predictor as predictor_module
    from autounet.inference.predictor import Predictor

    predictor = Predictor(model, folds=folds, device=device, tta=tta, engine=engine, precision=precision, quiet=True)
    dev = predictor.device
    step = predictor.step
    shapes: list[tuple[object, list[tuple[int, ...]]]] = []  # (stage, preprocessed shape per stage)
    original_prepare = predictor_module.prepare

    def recording_prepare(stage, case_id, image, geometry):
        prepared = original_prepare(stage, case_id, image, geometry)
        shapes.append((stage, [tuple(im.shape[1:]) for im in prepared.images]))
        return prepared

    predictor_module.prepare = recording_prepare
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = keep or tmp
            start = time.perf_counter()
            timings = predictor.predict(files, out, overwrite=True)
            wall = time.perf_counter() - start
    finally:
        predictor_module.prepare = original_prepare

    tiles = evaluations = 0
    preprocessed = []
    for stage, stage_shapes in shapes:
        preprocessed.append([list(s) for s in stage_shapes])
        for s, shape in zip(_stage_chain(stage), stage_shapes):
            n = _tiles(shape, s.plan.patch_size, s.plan.network_dims, step)
            mirrors = 2 ** len(s.mirror_axes) if tta else 1
            tiles += n
            evaluations += n * mirrors * len(s.networks)
    n = max(1, len(timings))
    network_total = sum(t.network_s for t in timings)
    members = getattr(predictor, "members", [predictor.stage])
    result = {
        "device": str(dev),
        "engine": predictor.engines,
        "folds": list(folds),
        "tta": tta,
        "networks": sum(len(s.networks) for m in members for s in _stage_chain(m)),
        "cases": len(timings),
        "seconds_per_case": round(wall / n, 3),
        "preprocess_s": round(sum(t.preprocess_s for t in timings) / n, 3),
        "network_s": round(network_total / n, 3),
        "export_s": round(sum(t.export_s for t in timings) / n, 3),
        "original_shapes": [t.shape for t in timings],
        "preprocessed_shapes": preprocessed,
        "tiles_per_case": round(tiles / n, 1),
        "tile_evaluations": evaluations,
        "tiles_per_s": round(evaluations / network_total, 1) if network_total > 0 else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if dev.type == "cuda":
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return result


def _in_child(spec: dict, env_extra: dict | None = None) -> dict:
    """Run :func:`run_once` in a fresh interpreter; its JSON result."""
    env = {**os.environ, "AUTOUNET_PROGRESS": "0", **(env_extra or {})}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark run {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the model and its inputs


def available_folds(model: Path) -> list[str]:
    from autounet.inference.model import fold_dirs

    found = fold_dirs(model)
    numbered = sorted((f for f in found if f != "all"), key=int)
    return numbered[:MAX_FOLDS] or (["all"] if "all" in found else [])


def model_channels(model: Path, fold: str) -> int:
    from autounet.inference.model import load_stage

    return load_stage(model, [fold]).image_channels


def synthetic_ct(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0) -> None:
    """A CT-like int16 volume: body ellipse (-50..50 HU) in air (-1000 HU), a few 60..140 HU blobs."""
    from autounet.data.geometry import Geometry
    from autounet.data.image_io import write_image

    rng = np.random.default_rng(seed)
    z, y, x = shape
    image = np.full(shape, -1000, np.int16)
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) / (0.43 * y)) ** 2 + ((xx - x / 2) / (0.35 * x)) ** 2 <= 1
    for k in range(z):  # slice by slice: memory stays near the int16 volume
        image[k][body] = rng.integers(-50, 51, int(body.sum()), dtype=np.int16)
    for _ in range(4):
        centre = rng.uniform(0.3, 0.7, 3) * np.asarray(shape)
        radii_mm = rng.uniform(10, 30, 3)
        radii = radii_mm / np.asarray(spacing)
        lo = np.maximum(0, np.floor(centre - radii)).astype(int)
        hi = np.minimum(shape, np.ceil(centre + radii) + 1).astype(int)
        gz, gy, gx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        blob = ((gz - centre[0]) / radii[0]) ** 2 + ((gy - centre[1]) / radii[1]) ** 2 + (
            (gx - centre[2]) / radii[2]
        ) ** 2 <= 1
        region = image[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        region[blob] = rng.integers(60, 141, int(blob.sum()), dtype=np.int16)
    geometry = Geometry(
        spacing=tuple(float(s) for s in spacing),
        origin_xyz=(0.0, 0.0, 0.0),
        direction_xyz=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
    )
    write_image(path, image, geometry)


# ------------------------------------------------------------------ main


def _busy() -> subprocess.Popen:
    """A competing process that keeps one core busy (as another user's job would)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _dice_agreement(reference: Path, other: Path) -> dict[str, float]:
    """Per label value, the Dice between two folders of segmentations (over all their cases)."""
    from autounet.data.image_io import read_label

    inter: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for ref_file in sorted(reference.glob("*.nii.gz")):
        a, _ = read_label(ref_file)
        b, _ = read_label(other / ref_file.name)
        for v in np.union1d(np.unique(a), np.unique(b)):
            if v == 0:
                continue
            inter[int(v)] = inter.get(int(v), 0) + int(np.sum((a == v) & (b == v)))
            sizes[int(v)] = sizes.get(int(v), 0) + int(np.sum(a == v) + np.sum(b == v))
    return {str(v): round(2 * inter[v] / sizes[v], 5) if sizes[v] else 1.0 for v in sorted(inter)}


def compare_engines(args, folds: list[str], channels: int) -> dict:
    """Engines and precisions side by side (one fold), interleaved, with optional competing load."""
    import statistics

    from autounet.inference.inputs import discover_cases

    if args.ct:
        tmp_ct = tempfile.TemporaryDirectory()
        path = Path(tmp_ct.name) / "ct_000.nii.gz"
        synthetic_ct(path, tuple(args.ct_shape), tuple(args.ct_spacing))
        files = [str(path)]
    else:
        cases = discover_cases(args.images, channels)[: args.cases]
        files = [str(f) for c in cases for f in c.files]
    variants = []
    for text in args.engines:
        parts = text.split(":")
        engine, precision = parts[0], parts[1] if len(parts) > 1 else "auto"
        env = {"OMP_WAIT_POLICY": parts[2]} if len(parts) > 2 else {}
        variants.append((text, engine, precision, env))
    outputs = tempfile.TemporaryDirectory()
    runs: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    busy = [_busy() for _ in range(args.compete)]
    try:
        for _ in range(args.repeats):
            for name, engine, precision, env in variants:
                keep = str(Path(outputs.name) / name.replace(":", "_"))
                spec = {"model": str(args.model), "files": files, "device": args.device, "folds": folds[:1]}
                spec.update({"tta": not args.no_tta, "engine": engine, "precision": precision, "keep": keep})
                runs[name].append(_in_child(spec, env))
    finally:
        for b in busy:
            b.kill()
    reference = Path(outputs.name) / variants[0][0].replace(":", "_")
    out = {}
    for name, *_ in variants:
        rs = runs[name]
        out[name] = {
            "engine": rs[-1]["engine"],
            "seconds_per_case": round(statistics.median(r["seconds_per_case"] for r in rs), 3),
            "preprocess_s": round(statistics.median(r["preprocess_s"] for r in rs), 3),
            "network_s": round(statistics.median(r["network_s"] for r in rs), 3),
            "export_s": round(statistics.median(r["export_s"] for r in rs), 3),
            "network_s_runs": [r["network_s"] for r in rs],
            "tiles_per_s": round(statistics.median(r["tiles_per_s"] or 0 for r in rs), 1),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "dice_vs_reference": _dice_agreement(reference, Path(outputs.name) / name.replace(":", "_")),
        }
    base = out[variants[0][0]]["network_s"]
    for name in out:
        out[name]["network_speedup"] = round(base / out[name]["network_s"], 2) if out[name]["network_s"] else None
    return {
        "mode": "engines",
        "model": str(args.model),
        "files": files,
        "tta": not args.no_tta,
        "competing_processes": args.compete,
        "repeats": args.repeats,
        "reference": variants[0][0],
        "runs": out,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="W/NAME/results/CONFIG or one fold_K folder")
    parser.add_argument("images", nargs="*", help="folder(s) or image files (not with --ct)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--cases", type=int, default=3, help="cases to predict (default 3)")
    parser.add_argument("--out", type=Path, help="also write the JSON result to this file")
    parser.add_argument("--ct", action="store_true", help="predict one synthetic CT-sized volume instead")
    parser.add_argument("--ct-shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--ct-spacing", type=float, nargs=3, default=[2.5, 0.8, 0.8], metavar=("z", "y", "x"))
    parser.add_argument("--no-tta", action="store_true", help="--ct and --engines: without mirroring")
    parser.add_argument(
        "--engines",
        nargs="+",
        metavar="ENGINE:PRECISION[:WAIT]",
        help="compare engines side by side on 1 fold (the first is the reference; WAIT: the OpenMP wait policy, "
        "e.g. torch:fp32:ACTIVE auto:auto:PASSIVE); runs interleaved A, B, A, B",
    )
    parser.add_argument("--repeats", type=int, default=2, help="--engines: rounds of interleaved runs (default 2)")
    parser.add_argument("--compete", type=int, default=0, help="--engines: busy competing processes during the runs")
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        keys = ("engine", "precision", "keep")
        extra = {k: spec[k] for k in keys if k in spec}
        print(json.dumps(run_once(spec["model"], spec["files"], spec["device"], spec["folds"], spec["tta"], **extra)))
        return 0
    args = parser.parse_args()

    from autounet.errors import AutounetError
    from autounet.inference.inputs import discover_cases

    try:
        folds = available_folds(args.model)
        if not folds:
            raise AutounetError(f"{args.model}: no trained folds (fold_K folders)")
        channels = model_channels(args.model, folds[0])
        if args.engines:
            result = compare_engines(args, folds, channels)
        elif args.ct:
            if args.images:
                raise AutounetError("give either IMAGES or --ct")
            if channels != 1:
                raise AutounetError(f"--ct needs a model with one input channel; this one takes {channels}")
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "ct_000.nii.gz"
                start = time.perf_counter()
                synthetic_ct(path, tuple(args.ct_shape), tuple(args.ct_spacing))
                write_s = time.perf_counter() - start
                spec = {"model": str(args.model), "files": [str(path)], "device": args.device}
                run = _in_child({**spec, "folds": folds[:1], "tta": not args.no_tta})
            result = {
                "mode": "ct",
                "model": str(args.model),
                "ct_shape": args.ct_shape,
                "ct_spacing": args.ct_spacing,
                "write_volume_s": round(write_s, 2),
                **run,
            }
        else:
            if not args.images:
                raise AutounetError("give IMAGES (a folder or files), or --ct")
            cases = discover_cases(args.images, channels)[: args.cases]
            files = [str(f) for c in cases for f in c.files]
            spec = {"model": str(args.model), "files": files, "device": args.device}
            variants = {"1_fold_tta": (folds[:1], True), "1_fold_no_tta": (folds[:1], False)}
            if len(folds) > 1:
                variants[f"{len(folds)}_folds_tta"] = (folds, True)
                variants[f"{len(folds)}_folds_no_tta"] = (folds, False)
            runs = {name: _in_child({**spec, "folds": f, "tta": tta}) for name, (f, tta) in variants.items()}
            first = next(iter(runs.values()))
            result = {
                "mode": "images",
                "model": str(args.model),
                "images": [str(i) for i in args.images],
                "cases": [c.case_id for c in cases],
                "folds_available": folds,
                "original_shapes": first["original_shapes"],
                "preprocessed_shapes": first["preprocessed_shapes"],
                "runs": {
                    name: {k: v for k, v in run.items() if k not in ("original_shapes", "preprocessed_shapes")}
                    for name, run in runs.items()
                },
            }
    except AutounetError as exc:
        print(f"benchmarks/predict.py: error: {exc}", file=sys.stderr)
        return 2
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
