"""The decisions of the CUDA-only paths, made pure and checked here on the CPU with the device
facts injected: precision from the compute capability, the inference memory budget and its
out-of-memory fallback, each process's own random state, the agreed stop, the loader threads,
the non-finite-loss rule, DropBlock under fp16, and augmentation without host syncs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from autounet.errors import AutounetError
from autounet.inference import predictor
from autounet.inference.model import StageModel
from autounet.inference.sliding_window import accumulator_bytes, activation_bytes, fits_in_memory
from autounet.networks.dropblock import DropBlock
from autounet.networks.spec import spec_from_plan
from autounet.runtime import autocast_dtype_for, half_precision, native_bf16, training_dtype, training_precision
from autounet.training.augmentation import intensity, spatial
from autounet.training.augmentation.preset import load_augmentation_preset
from autounet.training.checkpoint import rng_state, rng_state_for_rank, set_rng_state
from autounet.training.distributed import Distributed, agree, gather_objects
from autounet.training.loader import default_loader_threads
from autounet.training.step import FP16_TOLERATED_NONFINITE, LossTracker, must_stop
from test_unet import hippocampus_plans

CUDA = torch.device("cuda", 1)  # a descriptor only: nothing runs on it
CPU = torch.device("cpu")


def test_cuda_n_is_checked_against_the_devices_present(monkeypatch):
    """Issue 21: ``cuda:7`` on a machine with 2 GPUs was accepted and failed later, deep inside torch."""
    from autounet.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device(None) == torch.device("cuda")
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    with pytest.raises(
        AutounetError, match=r"'cuda:2' requested but this machine has 2 CUDA device\(s\) \(cuda:0 to cuda:1\)"
    ):
        resolve_device("cuda:2")
    with pytest.raises(AutounetError, match="unknown device"):
        resolve_device("cuda:-1")
    assert resolve_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AutounetError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_bf16_only_from_ampere_on_else_fp16_with_a_scaler():
    assert autocast_dtype_for((7, 5)) == torch.float16  # T4, RTX 20xx: no cuDNN bf16 convolutions
    assert autocast_dtype_for((7, 0)) == torch.float16  # V100
    assert autocast_dtype_for((8, 0)) == torch.bfloat16  # A100
    assert autocast_dtype_for((9, 0)) == torch.bfloat16  # H100
    assert autocast_dtype_for(None) is None
    assert half_precision(CPU) is None and training_precision(CPU, "fp32") == (None, None)


def test_training_precision_from_the_device_facts():
    assert training_dtype("cuda", "auto", (7, 5), False) == torch.float16
    assert training_dtype("cuda", "auto", (8, 6), False) == torch.bfloat16
    assert training_dtype("cuda", "fp32", (9, 0), False) is None
    # the CPU: bf16 by default only where it is native (measured faster at the same Dice: docs/explanation/measurements.md)
    assert training_dtype("cpu", "auto", None, cpu_bf16=True) == torch.bfloat16
    assert training_dtype("cpu", "auto", None, cpu_bf16=False) is None
    assert training_dtype("cpu", "bf16", None, cpu_bf16=False) == torch.bfloat16
    with pytest.raises(AutounetError, match="fp16 needs a CUDA GPU"):
        training_dtype("cpu", "fp16", None, cpu_bf16=True)
    assert native_bf16(frozenset({"avx512f", "avx512_bf16"})) and not native_bf16(frozenset({"avx2"}))


def test_the_budget_counts_the_fold_ensemble_and_the_activations():
    volume = (100, 200, 200)
    # input (C, float32) + one network's probabilities (K, float16) + weights (1, float32) + the
    # ensemble's running total (K, float16) + one class's float32 quotient while normalising (1)
    assert accumulator_bytes(2, 3, volume) == 100 * 200 * 200 * (4 * 2 + 2 * 2 * 3 + 4 + 4)
    assert activation_bytes((128, 128, 128), 4) > activation_bytes((128, 128, 128), 1) > 0
    gib = 2**30
    assert not fits_in_memory(5 * gib, free=4 * gib, reserved_unused=0)
    # memory PyTorch has cached but does not use counts as free (validation after training)
    assert fits_in_memory(5 * gib, free=4 * gib, reserved_unused=6 * gib)


def test_accumulation_falls_back_to_host_only_from_a_device():
    assert predictor.accumulation_attempts(CUDA, fits=True) == [CUDA, CPU]
    assert predictor.accumulation_attempts(CUDA, fits=False) == [CPU]
    assert predictor.accumulation_attempts(CPU, fits=True) == [CPU]


class _RunsOutOfMemoryOnce(torch.nn.Module):
    """A network whose first forward raises what CUDA raises when memory runs out."""

    def __init__(self, outputs: int):
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return torch.zeros((x.shape[0], self.outputs, *x.shape[2:]))


def _stage(network: torch.nn.Module) -> StageModel:
    plan = hippocampus_plans().configurations["3d_fullres"]
    return StageModel(
        configuration=plan.name,
        plan=plan,
        spec=spec_from_plan(plan),
        labels={"0": "background", "1": "a", "2": "b"},
        channel_names=["MRI"],
        networks=[network],
        sources=["injected"],
        mirror_axes=(),
    )


def test_an_out_of_memory_error_retries_the_case_in_host_memory(monkeypatch, capsys):
    net = _RunsOutOfMemoryOnce(3)
    stage = _stage(net)
    image = np.zeros((1, *stage.plan.patch_size), np.float32)
    # as on a GPU where the budget said the volume fits: the device first, then host memory
    monkeypatch.setattr(predictor, "accumulation_attempts", lambda device, fits: [CPU, CPU])
    probs = predictor.stage_probabilities(stage, image, CPU, tta=False)
    assert probs.shape == (3, *stage.plan.patch_size) and net.calls == 2
    assert "out of memory" in capsys.readouterr().err


def test_out_of_memory_in_host_memory_too_is_one_clear_error():
    stage = _stage(_RunsOutOfMemoryOnce(3))
    image = np.zeros((1, *stage.plan.patch_size), np.float32)
    with pytest.raises(AutounetError, match="out of memory .* even with the accumulators in host memory"):
        predictor.stage_probabilities(stage, image, CPU, tta=False)


def test_each_process_restores_its_own_random_state():
    torch.manual_seed(5)
    state = rng_state(CPU)
    expected = torch.rand(3)
    stored = {"per_rank": [state, {**state, "torch": torch.manual_seed(9).get_state()}]}
    set_rng_state(rng_state_for_rank(stored, 0), CPU)
    assert torch.equal(torch.rand(3), expected)
    assert rng_state_for_rank(stored, 1) is stored["per_rank"][1]
    assert rng_state_for_rank(stored, 2) is None  # more processes than the run had: no state to restore
    # a checkpoint from before per-process states: one CPU state and every visible GPU's
    legacy = {"torch": state["torch"], "cuda": [torch.zeros(8, dtype=torch.uint8)] * 4}
    own = rng_state_for_rank(legacy, 0)
    assert own["device_type"] == "cuda" and own["device"] is legacy["cuda"][0]
    assert rng_state_for_rank(legacy, 1) is None
    set_rng_state(own, CPU)  # a GPU state is not restored onto the CPU; the CPU state is
    assert torch.equal(torch.rand(3), expected)


def test_a_stop_is_agreed_and_states_gathered_in_a_single_process():
    single = Distributed()
    assert agree(True, single) and not agree(False, single)
    assert gather_objects({"a": 1}, single) == [{"a": 1}]


def test_loader_threads_share_the_node_between_processes():
    assert default_loader_threads(CPU, cores=16) == 1
    assert default_loader_threads(CUDA, cores=16, local_processes=1) == 8
    assert default_loader_threads(CUDA, cores=16, local_processes=8) == 1
    assert default_loader_threads(CUDA, cores=64, local_processes=8) == 7


def test_non_finite_losses_stop_training_except_a_few_skipped_fp16_steps():
    assert not must_stop(0, scaler_active=False)
    assert must_stop(1, scaler_active=False)
    assert not must_stop(FP16_TOLERATED_NONFINITE, scaler_active=True)
    assert must_stop(FP16_TOLERATED_NONFINITE + 1, scaler_active=True)
    tracker = LossTracker(CPU)
    for value in (1.0, float("nan"), 3.0, float("inf")):
        tracker.observe(torch.tensor(value))
    assert tracker.nonfinite(Distributed()) == 2 and tracker.mean(Distributed()) == pytest.approx(2.0)


def test_drop_block_keeps_its_scale_under_fp16():
    torch.manual_seed(0)
    x = torch.ones((1, 4, 48, 48, 48), dtype=torch.float16)  # 442,368 elements: an fp16 sum saturates
    out = DropBlock(0.1, 5).train()(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert 0.8 < float(out.float().mean()) < 1.2 and float(out.float().max()) > 1.0


def test_masked_augmentation_leaves_unchosen_samples_exactly(monkeypatch):
    """What a GPU does (no early exit, kernels sized by the preset's bound): transforms computed
    for the whole batch and masked, so samples that drew no transform come out unchanged."""
    for module in (intensity, spatial):
        monkeypatch.setattr(module, "nothing_chosen", lambda chosen: False)
        monkeypatch.setattr(module, "kernel_sigma", lambda sigmas, upper: float(upper))
    preset = load_augmentation_preset("paper")
    off = replace(
        preset,
        noise=replace(preset.noise, p=0.0),
        blur=replace(preset.blur, p=0.0),
        contrast=replace(preset.contrast, p=0.0),
        gamma=replace(preset.gamma, p=0.0),
        low_resolution=replace(preset.low_resolution, p=0.0),
    )
    x = torch.rand((3, 1, 8, 10, 12))
    gen = torch.Generator().manual_seed(1)
    for transform in (intensity.gaussian_noise, intensity.gaussian_blur, intensity.contrast, intensity.gamma):
        assert torch.equal(transform(x, off, gen), x), transform.__name__
    # elastic deformation: every sample's field is computed, the unchosen ones are zero
    deform = replace(preset, elastic=replace(preset.elastic, p=0.5))
    seed = 3
    chosen = torch.rand(8, generator=torch.Generator().manual_seed(seed)) < 0.5
    assert 0 < int(chosen.sum()) < 8
    field = spatial.elastic_displacement(8, [8, 10, 12], False, deform, torch.Generator().manual_seed(seed), CPU)
    assert field.shape == (8, 3, 8, 10, 12)
    assert torch.all(field[~chosen] == 0) and torch.all(field[chosen].abs().amax((1, 2, 3, 4)) > 0)


def test_the_gpu_smoke_test_runs_its_paths_in_cpu_dry_mode(tmp_path, capsys):
    """`benchmarks/gpu_smoke.py --device cpu`: every check that can run without a GPU runs and
    passes, and the report is one JSON line."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    code = smoke.main(["--device", "cpu", "--work", str(tmp_path), "--steps", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert code == 0 and report["ok"], report.get("error")
    checks = report["checks"]
    assert set(checks) == {"amp_steps", "train_resume", "cascade", "predict", "ddp", "engines"}
    auto = checks["amp_steps"]["auto"]
    assert checks["amp_steps"]["fp16_scaler"]["scaler"] and auto["dtype"] == auto["expected_dtype"]
    assert checks["cascade"]["next_stage_cases"] > 0
    assert {"device_accumulation", "host_accumulation", "injected_oom"} <= set(checks["predict"])
    assert "skipped" in checks["ddp"]
    engines = {k: v for k, v in checks["engines"].items() if isinstance(v, dict)}
    for name, engine in engines.items():  # every installed engine ran, or said why not
        assert "max_logit_diff" in engine or "skipped" in engine, name
    assert "max_logit_diff" in checks["engines"]["torch"]
