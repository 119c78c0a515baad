"""The first thing to run on a new GPU machine: every CUDA path of autounet once, timed. One JSON line.

    python benchmarks/gpu_smoke.py                      # on the GPU (cuda), a few minutes
    python benchmarks/gpu_smoke.py --real ../shared/data/hippocampus   # + the hippocampus plan's network
    python benchmarks/gpu_smoke.py --device cpu         # dry mode: the same code paths on the CPU
                                                        # (fewer steps, no mirroring; the test suite runs it)

It exercises, on a small synthetic dataset (and the real one with ``--real``):

* ``amp_steps``: the trainer's own step (:func:`autounet.training.step.train_step`) with
  on-device augmentation, in the precision the device gets (bf16 from Ampere on, else fp16 with
  the gradient scaler) and with fp16 + scaler forced;
* ``train_resume``: ``autounet.train`` (one epoch, full validation) and ``--resume`` for a second;
* ``cascade``: a cascade's first stage writing its next stage's inputs from its validation;
* ``predict``: ``autounet predict`` with mirroring, accumulators on the device, then forced into
  host memory, then with an injected out-of-memory error (it must recover, and agree);
* ``ddp``: two processes (NCCL) training one fold, when two GPUs are present;
* ``engines``: each installed inference engine (PyTorch, OpenVINO, ONNX Runtime) on the device,
  in its ``auto`` precision, against PyTorch fp32 (OpenVINO and ONNX Runtime: CPU only here).

Any failure ends the run with exit code 1 and the failing check's traceback in the JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

TINY_WIDTH = 0.25  # the planned networks at a quarter of their features (--full-size: as planned)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _dataset(root: Path, device: torch.device) -> Path:
    from autounet import api
    from autounet.planning.planner import PlannerOptions

    raw = api.make_synthetic(root / "raw" / "smoke", cases=6, test_cases=2, shape=(24, 28, 26), seed=5)
    # a small 3D patch makes the planner add the low-resolution cascade
    api.plan(raw, work=root / "W", workers=1, options=PlannerOptions(patch_edge_3d=12))
    api.preprocess("smoke", work=root / "W", workers=1)
    return raw


def check_amp_steps(ws, device: torch.device, steps: int, width: float | None, configuration: str) -> dict:
    """Seconds per step of the trainer's step, in the device's precision and with fp16 + scaler forced."""
    from autounet.runtime import training_precision
    from autounet.training.assemble import assemble_run
    from autounet.training.loader import BatchLoader
    from autounet.training.options import TrainOptions
    from autounet.training.step import train_step

    out = {}
    auto_dtype, _ = training_precision(device)
    modes = {"auto": None, "fp16_scaler": torch.float16}
    for mode, forced in modes.items():
        run, _ = assemble_run(ws, TrainOptions(configuration, "all", device=str(device), width_multiplier=width))
        if mode == "fp16_scaler":
            # fp16 autocast needs CUDA; on the CPU the scaler's code path still runs (in fp32)
            run.amp_dtype = forced if device.type == "cuda" else None
            run.scaler = torch.amp.GradScaler(device.type)
        run.model.train()
        lr = run.preset.optimizer.lr
        loader = BatchLoader(run.train_sampler, count=steps + 1, threads=run.threads, pin_memory=device.type == "cuda")
        times, waited = [], 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        for i, (batch, image, seg) in enumerate(loader):
            waited += time.perf_counter() - t
            start = time.perf_counter()
            image, seg = run.augmenter(image, seg, batch.augmentation_seed)
            loss = train_step(run, image, seg, lr)
            _sync(device)
            if i:  # the first step includes cuDNN's kernel search
                times.append(time.perf_counter() - start)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{mode}: non-finite loss {float(loss)}")
            t = time.perf_counter()
        s = sum(times) / len(times)
        out[mode] = {
            "dtype": str(run.amp_dtype or torch.float32).replace("torch.", ""),
            "scaler": run.scaler is not None,
            "s_per_step": round(s, 4),
            "iterations_per_s": round(1 / s, 2),
            "batch": run.batch_size,
            "patch": list(run.plan.patch_size),
            "peak_mb": _peak_mb(device),
        }
    out["auto"]["expected_dtype"] = str(auto_dtype or torch.float32).replace("torch.", "")
    return out


def check_train_resume(work: Path, device: torch.device, width: float | None) -> dict:
    from autounet import api
    from autounet.workspace import Workspace, training_log_path

    common = dict(
        work=work, device=str(device), iterations_per_epoch=6, validation_iterations=2, width_multiplier=width
    )
    first = api.train("smoke", "3d_fullres", 0, epochs=1, **common)
    second = api.train("smoke", "3d_fullres", 0, epochs=2, resume=True, **common)
    log = [json.loads(line) for line in training_log_path(first.training.fold_dir).read_text().splitlines()]
    if [e["epoch"] for e in log] != [1, 2] or second.training.epochs != 2:
        raise RuntimeError(f"resume did not continue the run: epochs {[e['epoch'] for e in log]}")
    if first.validation is None:
        raise RuntimeError("no end-of-training validation")
    last = log[-1]
    return {
        "iterations_per_s": round(last["iterations_per_s"], 2),
        "data_wait_fraction": round(last["data_wait_fraction"], 3),
        "validation_s": round(first.validation.seconds, 2),
        "validation_dice": first.validation.evaluation.foreground_mean.get("dice"),
        "fold": str(Workspace.at(work, "smoke").fold_dir("3d_fullres", 0)),
    }


def check_cascade(work: Path, device: torch.device, width: float | None) -> dict:
    from autounet import api
    from autounet.planning.plans import load_plans
    from autounet.validation.fold import validation_cases
    from autounet.workspace import Workspace, previous_stage_path

    ws = Workspace.at(work, "smoke")
    plans = load_plans(ws.plans_json)
    if "3d_lowres" not in plans.configurations:
        return {"skipped": "the planner made no cascade for this dataset"}
    start = time.perf_counter()
    api.train(
        "smoke",
        "3d_lowres",
        0,
        work=work,
        device=str(device),
        epochs=1,
        iterations_per_epoch=4,
        validation_iterations=1,
        width_multiplier=width,
    )
    cases = validation_cases(ws, plans.configuration("3d_lowres").data_identifier, 0)
    written = [c for c in cases if previous_stage_path(ws.next_stage_dir("3d_lowres"), c).is_file()]
    if len(written) != len(cases):
        raise RuntimeError(f"next-stage inputs written for {len(written)} of {len(cases)} validation cases")
    return {"seconds": round(time.perf_counter() - start, 2), "next_stage_cases": len(written)}


class _OutOfMemoryOnce(torch.nn.Module):
    """Wraps a network; its first forward raises the out-of-memory error CUDA raises."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network, self.raised = network, False

    def forward(self, x: torch.Tensor):
        if not self.raised:
            self.raised = True
            raise torch.OutOfMemoryError("CUDA out of memory (injected by gpu_smoke)")
        return self.network(x)


def check_predict(raw: Path, work: Path, out: Path, device: torch.device, tta: bool) -> dict:
    import numpy as np

    from autounet.data.image_io import read_label
    from autounet.inference import predictor as predictor_module
    from autounet.inference.predictor import Predictor
    from autounet.workspace import Workspace

    model = Workspace.at(work, "smoke").results_dir("3d_fullres")
    images = raw / "imagesTs"
    n = len(list(images.glob("*.nii.gz")))
    result: dict = {}

    def timed(name: str, predictor: Predictor) -> dict[str, np.ndarray]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        predictor.predict(images, out / name)
        _sync(device)
        result[name] = {"s_per_case": round((time.perf_counter() - start) / n, 3), "peak_mb": _peak_mb(device)}
        return {p.name: read_label(p)[0] for p in sorted((out / name).glob("*.nii.gz"))}

    suffix = "_tta" if tta else ""
    on_device = timed("device_accumulation" + suffix, Predictor(model, device=str(device), tta=tta))
    original = predictor_module.accumulation_attempts
    try:
        predictor_module.accumulation_attempts = lambda dev, fits: [torch.device("cpu")]
        on_host = timed("host_accumulation" + suffix, Predictor(model, device=str(device), tta=tta))
        # the budget says "fits", the first try runs out of memory, the case is redone in host memory
        predictor_module.accumulation_attempts = lambda dev, fits: [dev, torch.device("cpu")]
        injected = Predictor(model, device=str(device), tta=tta)
        for stage in injected.members:
            stage.networks[0] = _OutOfMemoryOnce(stage.networks[0])
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            recovered = timed("injected_oom", injected)
        if "out of memory" not in err.getvalue():
            raise RuntimeError("the injected out-of-memory error was not reported")
    finally:
        predictor_module.accumulation_attempts = original
    for name, seg in on_device.items():
        for other, label in ((on_host, "host accumulation"), (recovered, "the out-of-memory retry")):
            agree = float((other[name] == seg).mean())
            if agree < 0.999:
                raise RuntimeError(f"{name}: {label} agrees with device accumulation on only {agree:.4f} of voxels")
    return result


def check_ddp(work: Path, device: torch.device, width: float | None) -> dict:
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs, this machine has {torch.cuda.device_count()}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", "-m", "autounet"]
    cmd += ["train", "smoke", "-c", "3d_fullres", "-f", "1", "--work", str(work), "--epochs", "1"]
    cmd += ["--iters-per-epoch", "6", "--val-iters", "2", "--device", "cuda"]
    if width:
        cmd += ["--width-multiplier", str(width)]
    start = time.perf_counter()
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "AUTOUNET_PROGRESS": "0"}
    )
    if done.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{done.stderr[-3000:]}")
    return {"seconds": round(time.perf_counter() - start, 2), "processes": 2}


def check_engines(ws, device: torch.device) -> dict:
    """Every installed engine on this device, on a trained fold's network, against PyTorch fp32:
    seconds per batch and the largest logit difference (engines that run on the CPU only say so)."""
    from autounet.inference.engines import EngineUnavailable, available_engines, compile_network, resolve_precision
    from autounet.inference.model import load_stage

    stage = load_stage(ws.fold_dir("3d_fullres", 0)).to(device)
    network = stage.networks[0].eval()
    shape = (2, stage.spec.in_channels, *stage.plan.patch_size)
    x = torch.randn(shape, device=device)
    with torch.no_grad():
        reference = network(x).float()
    out = {}
    for name in available_engines():
        try:
            precision = resolve_precision("auto", name, device)
            engine = compile_network(network, engine=name, precision=precision, example_shape=shape, device=device)
            with torch.no_grad():
                engine(x)
                _sync(device)
                start = time.perf_counter()
                got = engine(x).float()
                _sync(device)
            seconds = time.perf_counter() - start
            diff = float((got.to(reference.device) - reference).abs().max())
            bound = 1e-3 if precision == "fp32" else 0.5
            if not diff <= bound:
                raise RuntimeError(f"{name} {precision}: logits differ from PyTorch fp32 by {diff:.3g}")
            out[name] = {"precision": precision, "s_per_batch": round(seconds, 4), "max_logit_diff": round(diff, 6)}
        except EngineUnavailable as exc:
            out[name] = {"skipped": str(exc)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--real", type=Path, help="also time the training step of this dataset's 3d_fullres plan")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per precision (default 20; 3 on the CPU)")
    parser.add_argument("--full-size", action="store_true", help="the planned networks, not tiny ones")
    args = parser.parse_args(argv)

    from autounet.runtime import resolve_device

    device = resolve_device(args.device)
    cpu = device.type == "cpu"
    steps = args.steps or (3 if cpu else 20)
    width = None if args.full_size else TINY_WIDTH
    os.environ.setdefault("AUTOUNET_PROGRESS", "0")
    report: dict = {"device": str(device), "torch": torch.__version__, "checks": {}, "ok": False}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report["capability"] = list(torch.cuda.get_device_capability(device))
        report["gpus"] = torch.cuda.device_count()
    started = time.perf_counter()
    tmp = None if args.work else tempfile.TemporaryDirectory()
    root = args.work or Path(tmp.name)
    checks = []
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the stages' own lines; stdout keeps the JSON line
            raw = _dataset(root, device)
            from autounet.workspace import Workspace

            ws = Workspace.at(root / "W", "smoke")
            checks = [
                ("amp_steps", lambda: check_amp_steps(ws, device, steps, width, "3d_fullres")),
                ("train_resume", lambda: check_train_resume(root / "W", device, width)),
                ("cascade", lambda: check_cascade(root / "W", device, width)),
                ("predict", lambda: check_predict(raw, root / "W", root / "pred", device, tta=not cpu)),
                ("ddp", lambda: check_ddp(root / "W", device, width)),
                ("engines", lambda: check_engines(ws, device)),
            ]
            if args.real:
                from autounet import api

                real = api.plan(args.real, work=root / "real", workers=2)
                api.preprocess(real.workspace.name, work=root / "real", configurations=["3d_fullres"], workers=2)
                checks.append(
                    ("amp_steps_real", lambda: check_amp_steps(real.workspace, device, steps, None, "3d_fullres"))
                )
            for name, check in checks:
                start = time.perf_counter()
                try:
                    report["checks"][name] = {**check(), "check_s": round(time.perf_counter() - start, 2)}
                except Exception as exc:  # noqa: BLE001 - every failure is reported, loudly
                    report["checks"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                    raise
        report["ok"] = True
    except Exception:  # noqa: BLE001 - reported in the JSON line and by the exit code
        report["error"] = traceback.format_exc()[-4000:]
    finally:
        report["seconds"] = round(time.perf_counter() - started, 1)
        if device.type == "cuda":
            report["peak_mb"] = _peak_mb(device)
        if tmp is not None:
            tmp.cleanup()
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
