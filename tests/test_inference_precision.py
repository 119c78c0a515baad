"""Precision of inference (issue 22): float16 accumulators change a segmentation only where two
classes tie in float32, and a bf16 network's logits are not rounded before the argmax."""

from __future__ import annotations

import numpy as np
import torch

from autounet.inference.engines import TorchEngine
from autounet.inference.sliding_window import HALF_ACCUMULATION_TIE, accumulator_bytes, predict_volume
from autounet.networks.spec import NetworkSpec
from autounet.networks.unet import UNet


def small_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(NetworkSpec(3, 1, 3, [4, 8], [[3, 3, 3]] * 2, [[2, 2, 2]])).eval()


def test_half_accumulators_change_the_argmax_only_at_float32_ties():
    net = small_unet()
    image = np.random.default_rng(3).normal(size=(1, 22, 26, 19)).astype(np.float32)
    args = (net, image, (8, 12, 8), 3)
    full = predict_volume(*args, mirror_axes=(0, 1, 2), accumulate_dtype=torch.float32)
    half = predict_volume(*args, mirror_axes=(0, 1, 2))
    assert full.dtype == torch.float32 and half.dtype == torch.float16
    assert (half.float() - full).abs().max().item() < HALF_ACCUMULATION_TIE
    top2 = torch.sort(full, dim=0).values[-2:]
    tie = (top2[1] - top2[0]) < HALF_ACCUMULATION_TIE
    differ = half.float().argmax(0) != full.argmax(0)
    assert not (differ & ~tie).any()
    assert (half.float().sum(0) - 1).abs().max().item() < HALF_ACCUMULATION_TIE  # still probabilities


def test_the_accumulators_take_half_the_memory_of_float32():
    spatial = (100, 200, 200)
    float32_budget = 4 * 100 * 200 * 200 * (2 + 2 * 3 + 1)
    assert accumulator_bytes(2, 3, spatial) < 0.8 * float32_budget


def test_bf16_logits_are_not_rounded_before_the_argmax():
    """10.0 and 10.03 are one bf16 value (its step at 10 is 1/16): rounded, the tie went to class 0."""
    net = small_unet()
    with torch.no_grad():
        net.heads[0].weight.zero_()
        net.heads[0].bias.copy_(torch.tensor([10.0, 10.03, -5.0]))
    x = torch.randn(2, 1, 8, 8, 8)
    out = TorchEngine(net, "bf16")(x)
    assert out.dtype == torch.float32
    assert torch.all(out[:, 1] > out[:, 0])
    assert torch.all(torch.softmax(out, 1).argmax(1) == 1)


def test_the_bf16_head_runs_in_float32_on_the_features():
    net = small_unet(1)
    seen = {}
    net.heads[0].register_forward_hook(lambda module, inputs, output: seen.update(features=inputs[0]))
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        out = TorchEngine(net, "bf16")(x)
        expected = torch.nn.functional.conv3d(seen["features"].float(), net.heads[0].weight, net.heads[0].bias)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # training and float32 runs keep the plain head (what ONNX export traces)
    plain = net(x)
    assert plain.dtype == torch.float32
