"""Forward time of one planned network under each inference engine and precision. One JSON line.

    python benchmarks/engines.py W/NAME [--config 3d_fullres] [--batch 2] [--rounds 7] [--threads N]

Builds the network of ``W/NAME/plans.json``'s configuration (random weights: the speed and the
numerical agreement do not depend on training), compiles it with every engine and precision
available here (torch fp32, torch bf16, onnxruntime fp32, openvino fp32, openvino bf16; see
:mod:`autounet.inference.engines`), and times one forward pass of a batch of ``--batch`` tiles of
the plan's patch. The engines take turns (A, B, C, ..., A, B, C, ...) for ``--rounds`` rounds
after one warm-up call each, so that the load of a shared machine falls on all of them alike; the
median per engine is reported, with the largest absolute difference of its softmax from torch
fp32 on the same input (a smooth random image, as normalised MRI looks) and the fraction of
voxels whose argmax differs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from autounet.inference.engines import EngineUnavailable, compile_network
from autounet.networks.spec import spec_from_plan
from autounet.networks.unet import UNet
from autounet.planning.plans import load_plans
from autounet.workspace import Workspace

COMBINATIONS = [
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
]


def smooth_image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    spatial = len(shape) - 2
    pool = torch.nn.functional.avg_pool3d if spatial == 3 else torch.nn.functional.avg_pool2d
    x = pool(x, 5, stride=1, padding=2)
    return (x - x.mean()) / x.std()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workspace", type=Path, help="W/NAME (planned)")
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plans = load_plans(Workspace.of(args.workspace).plans_json)
    plan = plans.configuration(args.config)
    torch.manual_seed(0)
    spec = spec_from_plan(plan, deep_supervision_heads=0)
    network = UNet(spec).eval()
    shape = (args.batch, spec.in_channels, *plan.patch_size)
    x = smooth_image(shape)
    report: dict = {
        "workspace": str(args.workspace),
        "config": args.config,
        "tiles": list(shape),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "engines": {},
    }
    engines = {}
    with tempfile.TemporaryDirectory() as cache:
        for name, precision in COMBINATIONS:
            label = f"{name} {precision}"
            t = time.perf_counter()
            try:
                engines[label] = compile_network(
                    network, engine=name, precision=precision, example_shape=shape, cache_dir=cache
                )
            except EngineUnavailable as exc:
                report["engines"][label] = {"unavailable": exc.reason}
                continue
            report["engines"][label] = {"compile_s": round(time.perf_counter() - t, 2)}
        with torch.no_grad():
            reference = torch.softmax(network(x), 1)
            outputs = {label: torch.softmax(e(x), 1) for label, e in engines.items()}  # warm-up
            times: dict[str, list[float]] = {label: [] for label in engines}
            for _ in range(args.rounds):
                for label, e in engines.items():
                    t = time.perf_counter()
                    e(x)
                    times[label].append(time.perf_counter() - t)
    base = statistics.median(times["torch fp32"]) if "torch fp32" in times else None
    for label, e in engines.items():
        median = statistics.median(times[label])
        diff = (outputs[label] - reference).abs().max().item()
        flips = (outputs[label].argmax(1) != reference.argmax(1)).float().mean().item()
        report["engines"][label].update(
            {
                "runs": e.describe(),
                "median_s": round(median, 4),
                "min_s": round(min(times[label]), 4),
                "speedup_vs_torch_fp32": round(base / median, 2) if base else None,
                "max_abs_softmax_diff": float(f"{diff:.3g}"),
                "argmax_differs": float(f"{flips:.3g}"),
            }
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
