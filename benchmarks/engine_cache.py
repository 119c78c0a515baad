"""What the engine cache's check on load costs (issue 21): the SHA-256 of a cached conversion's
files against its record, beside the network digest (the cache key's input) and the whole load
of the cached conversion. One line per network size and engine.

    OMP_NUM_THREADS=1 python benchmarks/engine_cache.py

The networks are U-Nets of the planner's shape for a small (hippocampus: 4 stages, 32 to 256
features) and a large (BraTS: 6 stages, 32 to 320 features) 3d_fullres plan.
"""

from __future__ import annotations

import tempfile
import time

import torch

from autounet.inference import engine_cache, engines
from autounet.networks.spec import NetworkSpec
from autounet.networks.unet import UNet
from autounet.workspace import engine_cache_path

NETWORKS = {
    "hippocampus-sized": (NetworkSpec(3, 1, 3, [32, 64, 128, 256], [[3, 3, 3]] * 4, [[2, 2, 2]] * 3), (40, 56, 40)),
    "brats-sized": (
        NetworkSpec(3, 4, 4, [32, 64, 128, 256, 320, 320], [[3, 3, 3]] * 6, [[2, 2, 2]] * 5),
        (128, 128, 128),
    ),
}


def main() -> None:
    torch.set_num_threads(1)
    for name, (spec, patch) in NETWORKS.items():
        net = UNet(spec).eval()
        params = sum(p.numel() for p in net.parameters())
        shape = (1, spec.in_channels, *patch)
        for engine in ("onnxruntime", "openvino"):
            if not engines.engine_installed(engine):
                continue
            with tempfile.TemporaryDirectory() as folder:
                engines.compile_network(net, engine=engine, precision="fp32", example_shape=shape, cache_dir=folder)
                runs = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    inputs = engines.conversion_inputs(
                        engines.network_digest(engines.converted_network(net, engine)), engine, shape
                    )
                    t1 = time.perf_counter()
                    key = engines.conversion_key(net, engine, shape)
                    target = engine_cache_path(folder, key, ".xml" if engine == "openvino" else ".onnx")
                    files = engine_cache.entry_files(target)
                    t2 = time.perf_counter()
                    assert (
                        engine_cache.entry_problem(engine_cache_path(folder, key, ".json"), key, inputs, files) is None
                    )
                    t3 = time.perf_counter()
                    cached = engines.compile_network(
                        net, engine=engine, precision="fp32", example_shape=shape, cache_dir=folder
                    )
                    t4 = time.perf_counter()
                    assert cached.cached
                    runs.append((t1 - t0, t3 - t2, t4 - t3))
                digest, check, load = (min(r[i] for r in runs) * 1e3 for i in range(3))
                size = sum(p.stat().st_size for p in files) / 1e6
                print(
                    f"{name} ({params / 1e6:.1f} M parameters) {engine}: files {size:.1f} MB; network digest "
                    f"{digest:.0f} ms; record check {check:.0f} ms; whole cached load {load:.0f} ms (best of 3)"
                )


if __name__ == "__main__":
    main()
