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


# ---------------------------------------------------------------------------------------------
# precision auto: half precision kept only where a case cannot lose Dice >= MIN_DICE by it
# ---------------------------------------------------------------------------------------------


def test_tie_risk_counts_each_class_and_the_voxels_near_a_tie_of_its_two_best():
    from autounet.inference.agreement import HALF_TIE, tie_risk

    p = np.zeros((3, 2, 2, 3), np.float32)
    close = 0.4 - HALF_TIE / 4
    p[:, 0, 0] = [[0.9, 0.5, 0.2], [0.05, 0.5 - HALF_TIE / 4, 0.4], [0.05, HALF_TIE / 4, close]]
    p[:, 0, 1] = [[0.1, 0.3, 0.3], [0.8, 0.3, 0.7], [0.1, 0.4, 0.0]]
    p[:, 1] = p[:, 0][:, ::-1]  # the other row: the same voxels, another chunk
    sizes, risks = tie_risk(p, chunk_voxels=6)  # one row per chunk
    # labels (0, 0, 1 | 1, 2, 1) twice; within the tie: 0 and 1 at x = 1, 1 and 2 at x = 2
    assert sizes.tolist() == [4, 6, 2] and risks.tolist() == [2, 4, 2]
    spilled = type("Spilled", (), {"shape": p.shape, "rows": lambda self, k, z0, z1: p[k, z0:z1]})()
    assert [a.tolist() for a in tie_risk(spilled)] == [[4, 6, 2], [2, 4, 2]]
    sig_sizes, sig_risks = tie_risk(p, "sigmoid", thresholds=[0.5, 0.5, 0.4])
    assert sig_sizes.tolist() == [4, 4, 2] and sig_risks.tolist() == [2, 2, 4]


def test_risk_problem_names_the_classes_whose_near_ties_could_cost_a_hundredth_of_their_dice():
    from autounet.inference.agreement import RISK_SHARE, risk_problem

    assert RISK_SHARE == pytest.approx(0.05)  # 1 % of Dice if a fifth of them changed
    assert risk_problem(np.array([10**6, 1000, 500]), np.array([900, 50, 25]), [0, 1, 4]) is None
    problem = risk_problem(np.array([10**6, 1000, 19]), np.array([900, 51, 1]), [0, 1, 4])
    assert "class 1: 51 of 1000 voxels" in problem and "class 4: 1 of 19 voxels" in problem
    assert "class 0" not in problem
    assert "class 4: 3 of 0" in risk_problem(np.array([100, 0]), np.array([0, 3]), [0, 4])  # a class it never labels


def _one_layer_stage(weight: float):
    """A stage whose network is one 1x1x1 convolution: logits (w x, -w x) for 2 classes."""
    from test_memory_limit import tiny_stage

    stage = tiny_stage(2, patch=(16, 16, 16))
    conv = torch.nn.Conv3d(1, 2, 1).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([weight, -weight]).view(2, 1, 1, 1, 1))
        conv.bias.zero_()
    stage.networks = [conv]
    return stage


@pytest.mark.parametrize("weight, kept", [(20.0, True), (0.0005, False)])
def test_precision_auto_keeps_bf16_for_sure_decisions_and_predicts_near_ties_in_fp32(monkeypatch, capsys, weight, kept):
    """A network whose classes are decided by wide margins keeps bf16 under precision auto; one
    whose every voxel is near a tie (a barely trained model) is predicted again in fp32, with a
    note, and its labels are fp32's exactly. An explicit bf16 is never second-guessed."""
    from autounet.data.geometry import Geometry
    from autounet.inference.predictor import Predictor

    monkeypatch.setattr(engines, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    image = volume(5, (20, 20, 20))
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))

    def run(precision):
        p = Predictor(members=[_one_layer_stage(weight)], device="cpu", tta=False, engine="torch", precision=precision)
        return p, p.predict_array(image, geometry).segmentation

    fp32, expected = run("fp32")
    capsys.readouterr()
    auto, labels = run("auto")
    err = capsys.readouterr().err
    assert "torch bf16" in err  # what it started with
    assert auto.engines == ("torch bf16" if kept else "torch fp32")
    assert ("half precision could change its segmentation" in err) is not kept
    assert {0, 1} <= set(np.unique(labels).tolist())
    if not kept:
        assert "class 0:" in err and "class 1:" in err
        np.testing.assert_array_equal(labels, expected)
    explicit, _ = run("bf16")
    assert explicit.engines == "torch bf16" and not explicit.check_half


def test_openvino_compiles_again_in_fp32_when_auto_gives_up_bf16():
    if not engines.engine_installed("openvino") or not engines.openvino_cpu_supports_bf16():
        pytest.skip("needs OpenVINO with bf16 on this CPU")
    net = unet(2)
    engine = compile_network(net, engine="openvino", precision="bf16", example_shape=TILES)
    x = torch.from_numpy(volume(4, PATCH))[None].repeat(2, 1, 1, 1, 1)
    assert engine.precision == "bf16"
    engine.full_precision()
    assert engine.precision == "fp32" and engine.describe() == "openvino fp32"
    with torch.no_grad():
        np.testing.assert_allclose(engine(x).numpy(), net(x).numpy(), atol=1e-4)


@pytest.mark.parametrize("classes", [2, 5, 104])
def test_tie_risk_equals_a_sort_of_the_classes(classes):
    from autounet.inference.agreement import HALF_TIE, tie_risk

    g = torch.Generator().manual_seed(classes)
    p = torch.softmax(torch.randn((classes, 7, 30, 20), generator=g) * (0.3 if classes < 10 else 3), 0).half()
    sizes, risks = tie_risk(p, chunk_voxels=1000)
    a = p.float().numpy()
    order = np.argsort(-a, axis=0, kind="stable")  # the first of equal values first
    top = np.take_along_axis(a, order[:2], 0)
    close = top[0] - top[1] < HALF_TIE
    assert close.sum() > 50
    assert sizes.tolist() == np.bincount(order[0].ravel(), minlength=classes).tolist()
    expected = np.bincount(order[0][close], minlength=classes) + np.bincount(order[1][close], minlength=classes)
    assert risks.tolist() == expected.tolist()
