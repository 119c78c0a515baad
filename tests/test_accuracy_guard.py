"""The accuracy guard of inference engines and precisions (issue 22, autounet.inference.agreement):
it passes engines that only round and catches one that computes something else; float16
accumulators change labels only at float32 ties; OpenVINO runs the head in float32 apart from
the converted network. Tiny networks and synthetic volumes; engines that are not installed are
skipped."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from autounet.inference import engines
from autounet.inference.agreement import (
    FP32_TIE,
    Agreement,
    agreement_for,
    decision_margin,
    guard_problem,
)
from autounet.inference.engines import compile_network
from autounet.inference.sliding_window import HALF_ACCUMULATION_TIE, predict_volume
from autounet.networks.spec import NetworkSpec
from autounet.networks.unet import NetworkBody, UNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PATCH = (8, 12, 8)
TILES = (2, 1, *PATCH)


def unet(seed: int = 0) -> UNet:
    """A tiny 3-class U-Net whose head is scaled up, so that most voxels are decided clearly and a
    few lie near a class border (as in a trained network)."""
    torch.manual_seed(seed)
    net = UNet(NetworkSpec(3, 1, 3, [4, 8], [[3, 3, 3]] * 2, [[2, 2, 2]])).eval()
    with torch.no_grad():
        net.heads[0].weight.mul_(8.0)
    return net


def volume(seed: int = 3, shape=(13, 19, 13)) -> np.ndarray:
    """Smooth blobs (a random field blurred): every axis takes three overlapping tiles of PATCH."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(1, 1, *shape)).astype(np.float32))
    x = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1) * 3
    return x[0].numpy()


def probabilities(network, image, accumulate=torch.float16) -> torch.Tensor:
    return predict_volume(network, image, PATCH, 3, mirror_axes=(0, 1, 2), accumulate_dtype=accumulate).float()


def judged(precision: str, reference: torch.Tensor, candidate: torch.Tensor) -> Agreement:
    agreement = agreement_for(precision, [1, 2])
    margin = decision_margin(reference.numpy())
    agreement.add(reference.argmax(0).numpy(), candidate.argmax(0).numpy(), margin)
    return agreement


@pytest.fixture(scope="module")
def reference():
    """PyTorch fp32 with float32 accumulators: the guard's reference."""
    net, image = unet(1), volume()
    return net, image, probabilities(net, image, torch.float32)


def test_the_margin_is_the_lead_of_the_best_class_or_the_distance_from_a_half():
    p = np.array([[0.5, 0.1], [0.3, 0.1], [0.2, 0.8]], dtype=np.float32)
    np.testing.assert_allclose(decision_margin(p), [0.2, 0.7], atol=1e-7)
    np.testing.assert_allclose(decision_margin(p, "sigmoid"), [0.0, 0.3], atol=1e-7)


def test_agreement_pools_dice_and_counts_ties():
    ref = np.array([0, 1, 1, 2, 2, 2])
    cand = np.array([0, 1, 2, 2, 2, 1])
    margin = np.array([0.5, 0.5, 0.001, 0.5, 0.5, 0.5], dtype=np.float32)
    a = Agreement(0.01, [1, 2])
    a.add(ref, cand, margin)
    a.add(ref, ref, margin)  # a second case that agrees
    assert (a.voxels, a.differing, a.differing_not_tie) == (12, 2, 1)
    assert a.dice() == {1: pytest.approx(2 * 3 / 8), 2: pytest.approx(2 * 5 / 12)}
    assert guard_problem(a, "fp32").startswith("fp32: 1 of 12 voxels differ")
    assert "class 1: 0.7500" in guard_problem(a, "bf16")


def test_the_guard_passes_the_engines_that_only_round(reference, tmp_path):
    """PyTorch with float16 accumulators, onnxruntime and OpenVINO in fp32 change only ties; PyTorch
    bf16 keeps Dice >= 0.99. The volume has voxels near class borders, so ties exist to change."""
    net, image, ref = reference
    margin = decision_margin(ref.numpy())
    assert (margin < FP32_TIE).sum() > 0 and all((ref.argmax(0) == k).sum() > 500 for k in (1, 2))
    runs = {"torch fp32": engines.TorchEngine(net, "fp32"), "torch bf16": engines.TorchEngine(net, "bf16")}
    for name in ("onnxruntime", "openvino"):
        if engines.engine_installed(name):
            runs[f"{name} fp32"] = compile_network(net, engine=name, precision="fp32", example_shape=TILES)
    for name, engine in runs.items():
        precision = name.split()[1]
        agreement = judged(precision, ref, probabilities(engine, image))
        assert guard_problem(agreement, precision) is None, (name, agreement.summary())


def test_the_guard_catches_an_engine_that_computes_something_else(reference, tmp_path):
    """A conversion of other weights (a stale cache entry of a network trained one step further,
    as the conversion key prevents) is caught both by the fp32 rule and by Dice."""
    net, image, ref = reference
    stale = copy.deepcopy(net)
    with torch.no_grad():
        for p in stale.parameters():
            p.add_(0.05 * torch.randn_like(p))
    name = "openvino" if engines.engine_installed("openvino") else "torch"
    wrong = compile_network(stale, engine=name, precision="fp32", example_shape=TILES)
    got = probabilities(wrong, image)
    fp32 = judged("fp32", ref, got)
    assert fp32.differing_not_tie > 0 and "not a tie" in guard_problem(fp32, "fp32")
    assert "Dice against the reference below 0.99" in guard_problem(judged("bf16", ref, got), "bf16")


def test_half_accumulators_change_labels_only_at_float32_ties_with_27_overlapping_tiles(reference):
    """The float16 accumulators against float32 ones, every voxel of the centre covered by 3 x 3 x 3
    tiles and 8 flips: labels differ only where the float32 margin is below HALF_ACCUMULATION_TIE."""
    net, image, ref = reference
    half = probabilities(net, image)
    assert (half - ref).abs().max().item() > 0  # the accumulators do round
    agreement = Agreement(HALF_ACCUMULATION_TIE, [1, 2])
    agreement.add(ref.argmax(0).numpy(), half.argmax(0).numpy(), decision_margin(ref.numpy()))
    assert agreement.differing_not_tie == 0, agreement.summary()
    assert (decision_margin(ref.numpy()) < HALF_ACCUMULATION_TIE).sum() > 0  # there are ties to change


def test_openvino_runs_the_head_in_float32_apart_from_the_converted_body(tmp_path):
    """10.0 and 10.03 are one bf16 value. OpenVINO converts the network without its head and the
    head runs in float32 on the features, so even features rounded to bf16 (what OpenVINO's bf16
    computes) give logits that keep class 1 ahead of class 0."""
    if not engines.engine_installed("openvino"):
        pytest.skip("OpenVINO is not installed")
    net = unet(2)
    with torch.no_grad():
        net.heads[0].weight.zero_()
        net.heads[0].bias.copy_(torch.tensor([10.0, 10.03, -5.0]))
    assert torch.tensor([10.0, 10.03]).bfloat16().unique().numel() == 1
    compiled = compile_network(net, engine="openvino", precision="fp32", example_shape=TILES, cache_dir=tmp_path)
    assert compiled.head is net.heads[0]
    features = compiled.compiled.outputs[0].get_partial_shape()[1].get_length()
    assert features == net.spec.features_per_stage[0]  # the converted file ends before the head
    x = torch.randn(TILES)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), atol=1e-4, rtol=0)
        assert torch.allclose(NetworkBody(net)(x), net.features(x)) and torch.all(compiled(x)[:, 1] > compiled(x)[:, 0])
        real = compiled._run
        compiled._run = lambda a: torch.from_numpy(np.array(real(a))).bfloat16().float().numpy()
        rounded = compiled(x)
    assert torch.all(rounded[:, 1] > rounded[:, 0]) and torch.all(torch.softmax(rounded, 1).argmax(1) == 1)
