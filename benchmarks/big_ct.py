"""Clinical-scale inference (issue 22): one whole-body CT, many classes, an ensemble, bounded memory.

    python benchmarks/big_ct.py [--classes 15 104] [--shape 600 512 512] [--spacing 1.0 0.8 0.8]
                                [--width-multiplier 0.125] [--runs single ensemble probabilities]
                                [--legacy] [--tta] [--device cpu]

A synthetic CT dataset (one input channel, CT normalisation) is planned with the project's
planner at a 1.5 mm target spacing (the median spacing of its fingerprint) for each ``--classes``;
its 2d and 3d_fullres networks are untrained U-Nets of the planned architecture with every
stage's features scaled by ``--width-multiplier`` (narrow, so that a CPU run stays short: what is
measured is memory and the export, not accuracy). One synthetic volume of ``--shape`` voxels at
``--spacing`` mm (default 600 x 512 x 512 at 1.0 x 0.8 x 0.8 mm, see benchmarks/predict.py's
``synthetic_ct``) is predicted, each run in a fresh process so that its peak memory is its own:

* ``single``: one 3d_fullres fold;
* ``ensemble``: the 2d + 3d_fullres ensemble (one fold each);
* ``probabilities``: the ensemble with ``--save-probabilities``.

Each run prints one JSON line: peak RSS (``ru_maxrss``), the memory estimate of
:mod:`autounet.inference.memory`, seconds per phase (``read`` and ``preprocess`` together as
``preprocess_s``: the predictor reads and preprocesses in one step; ``network_s``; ``export_s``:
revert, ensemble, post-processing and writing), tiles per second and the export's share of the
network time. ``--tile-timing`` instead times one tile of each network at ``--width-multiplier``
(e.g. 1, as planned) and the network seconds of the CT they make, with and without mirroring.
``--legacy`` also runs each with the export of before issue 22 (every member's
``K × input grid`` float32 probabilities in memory), skipped with a note where its own estimate
(``K × N × 4`` bytes per member plus their sum) exceeds the machine's free memory.
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

sys.path.insert(0, str(Path(__file__).parent))

TARGET_SPACING = 1.5


def ct_plans(classes: int, shape: list[int], spacing: list[float]):
    """The planner's plans for a CT dataset whose cases are ``shape`` at ``spacing`` resampled to
    1.5 mm (so that the target spacing is 1.5 mm), with ``classes`` classes."""
    from autounet.planning.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
    from autounet.planning.planner import plan_experiment

    at_target = [max(1, round(n * s / TARGET_SPACING)) for n, s in zip(shape, spacing)]
    stats = IntensityStats(
        mean=40.0, std=60.0, min=-1000.0, max=1500.0, median=40.0, percentile_00_5=-200.0,
        percentile_99_5=300.0, num_samples=1000,
    )  # fmt: skip
    labels = {"0": "background", **{str(k): f"organ{k}" for k in range(1, classes)}}
    cases = [
        CaseFingerprint(
            case_id=f"ct{i}",
            spacing=[TARGET_SPACING] * 3,
            shape_before_crop=at_target,
            shape_after_crop=at_target,
            crop_bbox=[[0, s] for s in at_target],
            crop_voxel_fraction=1.0,
            label_voxel_counts={"0": 1, "1": 1},
            components_per_class={"1": 1},
            foreground_source="label",
            foreground_intensity=[{"mean": 40.0, "std": 60.0, "min": -1000.0, "max": 1500.0}],
            orientation="RAS",
        )
        for i in range(40)
    ]
    fp = Fingerprint(
        dataset_name="BigCT",
        layout="msd",
        channel_names=["CT"],
        labels=labels,
        component_connectivity=26,
        foreground_intensity_per_channel=[stats],
        cases=cases,
    )
    return plan_experiment(fp), labels


def untrained_stage(plan, labels: dict[str, str], width: float):
    """A stage of ``plan`` with one untrained, narrow U-Net."""
    import torch

    from autounet.inference.model import StageModel
    from autounet.networks.spec import spec_from_plan
    from autounet.networks.unet import UNet

    spec = spec_from_plan(plan, width_multiplier=width)
    torch.manual_seed(0)
    network = UNet(spec).eval()
    return StageModel(
        configuration=plan.name,
        plan=plan,
        spec=spec,
        labels=labels,
        channel_names=["CT"],
        networks=[network],
        sources=["untrained"],
        mirror_axes=tuple(range(plan.network_dims)),
    )


def run_once(spec: dict) -> dict:
    """One run (in a child process): predict the volume, report phases, tiles and peak memory."""
    import torch

    from autounet.inference.inputs import discover_cases
    from autounet.inference.memory import GB, estimate_case, input_grid, resident_bytes
    from autounet.inference.predictor import Predictor
    from autounet.inference.sliding_window import tile_starts
    from autounet.preprocessing.resample import resampled_shape

    plans, labels = ct_plans(spec["classes"], spec["shape"], spec["spacing"])
    configs = ["3d_fullres"] if spec["run"] == "single" else ["2d", "3d_fullres"]
    members = [untrained_stage(plans.configurations[c], labels, spec["width"]) for c in configs]
    predictor = Predictor(
        members=members, device=spec["device"], tta=spec["tta"], engine="torch", precision="fp32", quiet=True
    )
    predictor.legacy_export = spec["legacy"]
    case = discover_cases([spec["image"]], 1)[0]
    shape, spacing, channels = input_grid(case)
    save = spec["run"] == "probabilities"
    estimate = estimate_case(members, case.case_id, shape, spacing, channels, resident_bytes(), save)
    with tempfile.TemporaryDirectory(dir=spec["scratch"]) as out:
        start = time.perf_counter()
        timings = predictor.predict(
            [spec["image"]], out, save_probabilities=save, overwrite=True, memory_limit=spec["memory_limit"]
        )
        wall = time.perf_counter() - start
        written = sum(f.stat().st_size for f in Path(out).iterdir())
    t = timings[0]
    tiles = 0
    for m in members:
        tf = m.plan.transpose_forward
        v = resampled_shape([shape[a] for a in tf], [spacing[a] for a in tf], m.plan.spacing)
        window = list(m.plan.patch_size) if m.plan.network_dims == 3 else [1, *m.plan.patch_size]
        n = math.prod(len(tile_starts(max(a, b), b, predictor.step)) for a, b in zip(v, window))
        tiles += n * (2 ** len(m.mirror_axes) if spec["tta"] else 1)
    return {
        "run": spec["run"],
        "classes": spec["classes"],
        "export": "legacy" if spec["legacy"] else "streaming",
        "members": configs,
        "shape": shape,
        "spacing": spacing,
        "width_multiplier": spec["width"],
        "tta": spec["tta"],
        "device": str(predictor.device),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "estimate_gb": round(estimate.alone / GB, 2),
        "seconds": round(wall, 1),
        "preprocess_s": round(t.preprocess_s, 1),
        "network_s": round(t.network_s, 1),
        "export_s": round(t.export_s, 1),
        "export_share_of_network": round(t.export_s / t.network_s, 3) if t.network_s else None,
        "tile_evaluations": tiles,
        "tiles_per_s": round(tiles / t.network_s, 2) if t.network_s else None,
        "written_mb": round(written / 2**20, 1),
    }


def tile_timing(classes: int, width: float, repeats: int = 3) -> dict:
    """Seconds per tile of the planned 2d and 3d_fullres networks at ``width`` (PyTorch fp32 on the
    CPU, no mirroring; the median of ``repeats`` after a warm-up), and the network seconds of the
    default ``--shape`` CT that they make, without and with mirroring: what the export's share is
    measured against when the networks are as wide as the planner makes them."""
    import statistics

    import numpy as np
    import torch

    from autounet.inference.sliding_window import predict_slices, predict_volume, tile_starts, tiles_per_batch_for
    from autounet.preprocessing.resample import resampled_shape

    shape, spacing = [600, 512, 512], [1.0, 0.8, 0.8]
    plans, labels = ct_plans(classes, shape, spacing)
    out: dict = {"classes": classes, "width_multiplier": width, "torch_threads": torch.get_num_threads()}
    for name in ("2d", "3d_fullres"):
        stage = untrained_stage(plans.configurations[name], labels, width)
        three_d = stage.plan.network_dims == 3
        patch = list(stage.plan.patch_size)
        window = patch if three_d else [1, *patch]
        batch = tiles_per_batch_for(three_d, stage.num_outputs, window)
        volume = [window[0] * (batch if three_d else 1), *window[1:]] if three_d else [batch, *window[1:]]
        image = np.random.default_rng(0).normal(size=(1, *volume)).astype(np.float32)
        fn = predict_volume if three_d else predict_slices
        run = (fn, stage, image, patch, batch)
        _seconds_per_tile(*run)  # warm-up
        per_tile = statistics.median(_seconds_per_tile(*run) for _ in range(repeats))
        v = resampled_shape(shape, spacing, stage.plan.spacing)
        tiles = math.prod(len(tile_starts(max(a, b), b, 0.5)) for a, b in zip(v, window))
        out[name] = {
            "patch": patch,
            "seconds_per_tile": round(per_tile, 3),
            "tiles": tiles,
            "network_s": round(tiles * per_tile, 1),
            "network_s_tta": round(tiles * per_tile * 2 ** len(stage.mirror_axes), 1),
        }
    return out


def _seconds_per_tile(fn, stage, image, patch, batch) -> float:
    start = time.perf_counter()
    fn(stage.networks[0], image, patch, stage.num_outputs, step=1.0, tiles_per_batch=batch)
    return (time.perf_counter() - start) / batch


def _child(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=os.environ.copy()
    )
    if done.returncode != 0:
        return {"run": spec["run"], "classes": spec["classes"], "legacy": spec["legacy"], "error": done.stderr[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def legacy_fits(classes: int, shape: list[int], run: str) -> bool:
    """Whether the old export's float32 ``K × N`` per member plus their sum fits in free memory."""
    from autounet.inference.memory import available_bytes

    members = 1 if run == "single" else 2
    buffers = members + (1 if members > 1 else 0)
    return buffers * classes * math.prod(shape) * 4 < 0.9 * available_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[15, 104])
    parser.add_argument("--shape", type=int, nargs=3, default=[600, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.8, 0.8], metavar=("z", "y", "x"))
    parser.add_argument("--width-multiplier", type=float, default=0.125)
    parser.add_argument("--runs", nargs="+", choices=["single", "ensemble", "probabilities"], default=None)
    parser.add_argument("--legacy", action="store_true", help="also run the export of before issue 22")
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (default: off)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="GB")
    parser.add_argument(
        "--tile-timing", action="store_true", help="only time one tile of each network (see tile_timing)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tile_timing:
        for classes in args.classes:
            print(json.dumps(tile_timing(classes, args.width_multiplier)), flush=True)
        return 0
    if args.child:
        print(json.dumps(run_once(json.loads(args.child))))
        return 0
    from predict import synthetic_ct

    runs = args.runs or ["single", "ensemble", "probabilities"]
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "ct.nii.gz"
        synthetic_ct(image, tuple(args.shape), tuple(args.spacing))
        for classes in args.classes:
            for run in runs:
                for legacy in (False, True) if args.legacy else (False,):
                    if legacy and not legacy_fits(classes, args.shape, run):
                        print(
                            json.dumps(
                                {
                                    "run": run,
                                    "classes": classes,
                                    "export": "legacy",
                                    "skipped": "does not fit in memory",
                                }
                            )
                        )
                        continue
                    spec = {
                        "run": run, "classes": classes, "legacy": legacy, "shape": args.shape, "spacing": args.spacing,
                        "width": args.width_multiplier, "tta": args.tta, "device": args.device, "image": str(image),
                        "scratch": tmp, "memory_limit": args.memory_limit,
                    }  # fmt: skip
                    print(json.dumps(_child(spec)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
