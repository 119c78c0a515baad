"""Seed 004 §3.3 ablation switches: attention gates, DropBlock, residual blocks, deep supervision, width."""

import json

import pytest
import torch
import torch.nn.functional as F

from autounet.errors import AutounetError
from autounet.networks.attention import AttentionGate
from autounet.networks.dropblock import DropBlock, drop_block_gamma, set_drop_block_prob
from autounet.networks.spec import NetworkSpec, spec_from_plan, with_overrides
from autounet.networks.unet import UNet
from autounet.planning.planner import plan_experiment
from autounet.planning.topology import NVIDIA_FEATURES
from autounet.utils.plain_data import from_plain, to_plain
from test_planner_table1 import DATASETS, fingerprint
from test_unet import hippocampus_plans, outputs_on_meta

NEW_FIELDS = ("residual_decoder", "attention_gates", "drop_block_prob", "drop_block_size")
SWITCHES = {
    "baseline": {},
    "attention": {"attention_gates": True},
    "drop_block": {"drop_block_prob": 0.1, "drop_block_size": 3},
    "residual": {"residual_encoder": True, "residual_decoder": True},
    "all": {
        "attention_gates": True,
        "drop_block_prob": 0.1,
        "drop_block_size": 3,
        "residual_encoder": True,
        "residual_decoder": True,
    },
}


def tiny_spec(dims: int, heads: int = 1, **switches) -> NetworkSpec:
    pools = [[2] * dims, [2] * dims, [1] + [2] * (dims - 1)]  # one anisotropic step
    spec = NetworkSpec(
        dims=dims,
        in_channels=2,
        num_outputs=3,
        features_per_stage=[4, 8, 8, 16],
        conv_kernel_sizes=[[3] * dims] * 4,
        pool_kernel_sizes=pools,
        deep_supervision_heads=heads,
        **switches,
    )
    spec.validate()
    return spec


def count(net: torch.nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in net.modules())


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_each_switch_builds_a_network_with_the_right_output_shapes(dims, switch):
    spec = tiny_spec(dims, heads=2, **SWITCHES[switch])
    torch.manual_seed(0)
    net = UNet(spec).train()
    patch = [16] * dims
    x = torch.randn(2, 2, *patch)
    outputs = net(x)
    assert isinstance(outputs, list) and len(outputs) == 3
    for out, stride in zip(outputs, spec.output_strides()):
        assert list(out.shape) == [2, 3, *[p // s for p, s in zip(patch, stride)]]
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 3, *patch)
    n = spec.num_stages
    assert count(net, AttentionGate) == (n - 1 if spec.attention_gates else 0)
    assert count(net, DropBlock) == (2 * (2 * n - 1) if spec.drop_block_prob else 0)
    residual = n * spec.residual_encoder + (n - 1) * spec.residual_decoder
    assert sum(type(m).__name__ == "ResidualBlock" for m in net.modules()) == residual


@pytest.mark.parametrize("dims", [2, 3])
def test_deep_supervision_can_be_switched_off(dims):
    x = torch.randn(1, 2, *[16] * dims)
    net = UNet(tiny_spec(dims, heads=0)).train()
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, *[16] * dims) and len(net.heads) == 1
    on = UNet(tiny_spec(dims, heads=2)).train()
    assert [o.shape[2] for o in on(x)] == [16, 8, 4]
    assert set(on.state_dict()) - set(net.state_dict()) == {
        "heads.1.weight",
        "heads.1.bias",
        "heads.2.weight",
        "heads.2.bias",
    }


@pytest.mark.parametrize("dims", [2, 3])
def test_attention_gates_modulate_the_skip_connections(dims):
    torch.manual_seed(0)
    net = UNet(tiny_spec(dims, attention_gates=True)).eval()
    seen = []

    def record(gate, inputs, output):
        skip, g = inputs
        alpha = gate.gate(skip, g)
        seen.append(alpha)
        assert alpha.shape == (skip.shape[0], 1, *skip.shape[2:])
        assert torch.allclose(output, skip * alpha)  # the skip is multiplied by its gate

    for gate in net.attention:
        gate.register_forward_hook(record)
    assert [g.w_x.out_channels for g in net.attention] == [4, 4, 2]  # skip channels // 2: 8, 8, 4
    with torch.no_grad():
        net(torch.randn(2, 2, *[16] * dims))
    assert len(seen) == 3
    for alpha in seen:
        assert 0 < alpha.min() and alpha.max() < 1
        assert alpha.std() > 1e-3  # not a constant scaling: voxels are gated differently


def test_drop_block_gamma_follows_the_paper():
    assert drop_block_gamma(0.1, [5, 5], [20, 20]) == pytest.approx(0.1 / 25 * 400 / 16**2)
    assert drop_block_gamma(0.1, [3, 3, 1], [12, 12, 4]) == pytest.approx(0.1 / 9 * 144 / 100)
    assert drop_block_gamma(0.3, [8, 8], [8, 8]) == pytest.approx(0.3)  # one place for the block: one seed


def only_whole_blocks(dropped: torch.Tensor, block: int) -> bool:
    """Morphological opening with a ``block`` cube leaves ``dropped`` unchanged: it is a union of whole blocks."""
    dims = dropped.dim() - 2
    pool = F.max_pool3d if dims == 3 else F.max_pool2d
    eroded = -pool(-dropped, kernel_size=block, stride=1)  # where a whole block is dropped
    opened = pool(F.pad(eroded, [block - 1] * (2 * dims)), kernel_size=block, stride=1)
    return torch.equal(opened, dropped)


@pytest.mark.parametrize(("dims", "size", "prob", "block"), [(2, 64, 0.2, 5), (3, 24, 0.1, 3), (2, 30, 0.15, 4)])
def test_drop_block_zeros_contiguous_blocks_at_the_expected_rate(dims, size, prob, block):
    torch.manual_seed(1234)
    x = torch.ones(4, 8, *[size] * dims)
    drop = DropBlock(prob, block).train()
    out = drop(x)
    dropped = (out == 0).float()
    assert abs(dropped.mean().item() - prob) < 0.04  # overlapping blocks make it a little below prob
    assert only_whole_blocks(dropped, block)
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, x.numel() / kept.numel()))  # renormalised
    assert out.mean().item() == pytest.approx(1.0)
    assert not torch.equal(dropped[0, 0], dropped[0, 1])  # one mask per sample and channel
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(DropBlock(0.0, block).train()(x), x)


def test_drop_block_clips_the_block_to_small_feature_maps():
    torch.manual_seed(0)
    x = torch.ones(64, 4, 3, 2, 8)
    out = DropBlock(0.3, 5).train()(x)
    assert out.shape == x.shape and (out == 0).any() and torch.isfinite(out).all()


def test_drop_block_probability_can_be_scheduled():
    net = UNet(tiny_spec(2, drop_block_prob=0.1)).train()
    assert set_drop_block_prob(net, 0.0) == 2 * 7
    x = torch.randn(1, 2, 16, 16)
    torch.manual_seed(0)
    a = net(x)
    net.eval()
    with torch.no_grad():
        b = net(x)
    assert torch.allclose(a[0], b, atol=1e-6)  # prob 0 in training == eval


def all_switches_spec() -> NetworkSpec:
    plan = hippocampus_plans().configurations["3d_fullres"]
    return spec_from_plan(
        plan,
        num_outputs=3,
        features_per_stage=[4, 8, 8, 16],
        deep_supervision_heads=2,
        downsampling="strided_conv",
        residual_encoder=True,
        residual_decoder=True,
        attention_gates=True,
        drop_block_prob=0.1,
        drop_block_size=3,
    )


def test_spec_from_plan_exposes_every_switch():
    spec = all_switches_spec()
    assert spec.num_stages == 4 and spec.deep_supervision_heads == 2 and spec.downsampling == "strided_conv"
    assert spec.residual_encoder and spec.residual_decoder and spec.attention_gates
    assert (spec.drop_block_prob, spec.drop_block_size) == (0.1, 3)
    plan = hippocampus_plans().configurations["3d_fullres"]
    wide = spec_from_plan(plan, width_multiplier=1.5)
    assert wide.features_per_stage == [45, 90, 180, 360] and "features x1.5" in wide.notes
    thin = spec_from_plan(plan, features_per_stage=[4, 8, 8, 16], width_multiplier=0.1)
    assert thin.features_per_stage == [1, 1, 1, 2]


def test_a_spec_with_every_switch_round_trips_and_rebuilds_the_same_network():
    spec = all_switches_spec()
    again = from_plain(NetworkSpec, json.loads(json.dumps(to_plain(spec))))
    assert again == spec
    a, b = UNet(spec), UNet(again)
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 40, 56, 40)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_an_old_spec_without_the_new_fields_loads_with_defaults():
    spec = spec_from_plan(hippocampus_plans().configurations["3d_fullres"])
    stored = to_plain(spec)
    for name in NEW_FIELDS:
        del stored[name]
    old = from_plain(NetworkSpec, json.loads(json.dumps(stored)))
    assert old == spec
    assert not (old.attention_gates or old.residual_decoder) and old.drop_block_prob == 0.0


def test_all_switches_off_is_the_unchanged_network():
    plan = hippocampus_plans().configurations["3d_fullres"]
    default = spec_from_plan(plan)
    explicit = spec_from_plan(
        plan,
        residual_encoder=False,
        residual_decoder=False,
        attention_gates=False,
        drop_block_prob=0.0,
        drop_block_size=5,
        width_multiplier=1.0,
    )
    assert explicit == default and default.notes == []
    with torch.device("meta"):
        a, b = UNet(default), UNet(explicit)
    shapes = [(k, v.shape) for k, v in a.state_dict().items()]
    assert shapes == [(k, v.shape) for k, v in b.state_dict().items()]
    assert count(a, AttentionGate) == count(a, DropBlock) == 0 and not hasattr(a, "attention")
    # the parameter layout before these switches existed (4 stages: 66 entries)
    assert len(shapes) == 66
    assert not any(k.startswith("attention") or "drop_block" in k for k, _ in shapes)
    assert shapes[0] == ("encoder.0.0.0.weight", torch.Size([30, 1, 3, 3, 3]))
    assert shapes[-1] == ("heads.1.bias", torch.Size([3]))


def test_every_switch_on_the_nvidia_brats_network_builds_at_full_size():
    plan = plan_experiment(fingerprint(*DATASETS["BrainTumour"][:3])).configurations["3d_fullres"]
    spec = spec_from_plan(
        plan,
        num_outputs=3,
        in_channels=5,
        features_per_stage=list(NVIDIA_FEATURES),
        deep_supervision_heads=2,
        downsampling="strided_conv",
        attention_gates=True,
        drop_block_prob=0.1,
        residual_encoder=True,
        residual_decoder=True,
    )
    shapes = outputs_on_meta(spec, 1, plan.patch_size)
    assert [list(s) for s in shapes] == [[1, 3, 128, 128, 128], [1, 3, 64, 64, 64], [1, 3, 32, 32, 32]]


def test_invalid_switches_are_refused():
    spec = tiny_spec(2)
    for prob in (1.0, -0.1, True):
        with pytest.raises(AutounetError, match="drop_block_prob"):
            with_overrides(spec, drop_block_prob=prob)
    for size in (0, 2.5):
        with pytest.raises(AutounetError, match="drop_block_size"):
            with_overrides(spec, drop_block_size=size)
    with pytest.raises(AutounetError, match="features_per_stage"):
        with_overrides(spec, features_per_stage=[4, 0, 8, 8])
    with pytest.raises(AutounetError, match="cannot be down-sampled 4 times"):  # 40x56x40 / 8: odd sizes
        spec_from_plan(hippocampus_plans().configurations["3d_fullres"], features_per_stage=[4, 8, 8, 16, 16])
    with pytest.raises(AutounetError, match="width_multiplier"):
        spec_from_plan(hippocampus_plans().configurations["2d"], width_multiplier=0)
    with pytest.raises(AutounetError, match="drop_block_prob"):
        from_plain(NetworkSpec, {**to_plain(spec), "drop_block_prob": 1.5}).validate()
