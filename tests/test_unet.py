import pytest
import torch

from autounet.errors import AutounetError
from autounet.networks.spec import NetworkSpec, spec_from_plan, with_overrides
from autounet.networks.unet import UNet
from autounet.planning.planner import plan_experiment
from autounet.planning.topology import NVIDIA_FEATURES
from autounet.utils.plain_data import from_plain, to_plain
from test_planner_table1 import DATASETS, fingerprint


def hippocampus_plans():
    return plan_experiment(fingerprint(*DATASETS["Hippocampus"][:3]))


def outputs_on_meta(spec: NetworkSpec, batch: int, patch) -> list[torch.Size]:
    """Shapes of the outputs without computing anything (meta tensors)."""
    with torch.device("meta"):
        net = UNet(spec)
        net.train()
        out = net(torch.empty(batch, spec.in_channels, *patch))
    return [o.shape for o in (out if isinstance(out, list) else [out])]


def test_hippocampus_3d_network_outputs_and_deep_supervision_shapes():
    plan = hippocampus_plans().configurations["3d_fullres"]
    spec = spec_from_plan(plan)
    assert spec.features_per_stage == [30, 60, 120, 240] and spec.deep_supervision_heads == 1
    net = UNet(spec)
    x = torch.randn(2, 1, *plan.patch_size)
    net.train()
    full, half = net(x)
    assert full.shape == (2, 3, 40, 56, 40) and half.shape == (2, 3, 20, 28, 20)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 3, 40, 56, 40)


def test_hippocampus_2d_network():
    plan = hippocampus_plans().configurations["2d"]
    net = UNet(spec_from_plan(plan)).train()
    full, half = net(torch.randn(3, 1, *plan.patch_size))
    assert full.shape == (3, 3, 56, 40) and half.shape == (3, 3, 28, 20)


@pytest.mark.parametrize("name", ["BrainTumour", "Heart", "Liver", "Prostate", "Lung", "Pancreas"])
def test_table1_like_plans_build_networks_with_the_right_output_shapes(name):
    shape, spacing, cases, channels = DATASETS[name]
    plans = plan_experiment(fingerprint(shape, spacing, cases, channels))
    for plan in plans.configurations.values():
        spec = spec_from_plan(plan)
        assert spec.in_channels == plan.num_input_channels and spec.num_outputs == plan.num_classes
        shapes = outputs_on_meta(spec, 2, plan.patch_size)
        assert len(shapes) == 1 + spec.deep_supervision_heads == max(1, len(plan.features_per_stage) - 2)
        for out, stride in zip(shapes, spec.output_strides()):
            assert list(out) == [2, plan.num_classes, *[p // s for p, s in zip(plan.patch_size, stride)]]


def test_nvidia_variant_deeper_encoder_strided_convolutions_two_heads():
    plan = plan_experiment(fingerprint(*DATASETS["BrainTumour"][:3])).configurations["3d_fullres"]
    spec = spec_from_plan(
        plan,
        num_outputs=3,
        in_channels=5,
        features_per_stage=list(NVIDIA_FEATURES),
        deep_supervision_heads=2,
        downsampling="strided_conv",
    )
    assert spec.num_stages == 7 and spec.pool_kernel_sizes[-1] == [2, 2, 2]
    shapes = outputs_on_meta(spec, 1, plan.patch_size)
    assert [list(s) for s in shapes] == [[1, 3, 128, 128, 128], [1, 3, 64, 64, 64], [1, 3, 32, 32, 32]]
    net = UNet(with_overrides(spec, features_per_stage=[4, 6, 8, 12, 16, 24, 32]))
    assert not any(isinstance(m, torch.nn.MaxPool3d) for m in net.modules())
    assert net.encoder[1][0][0].stride == (2, 2, 2)


def test_residual_encoder_blocks_and_anisotropic_kernels():
    plan = plan_experiment(fingerprint(*DATASETS["Prostate"][:3])).configurations["3d_fullres"]
    spec = spec_from_plan(plan, residual_encoder=True)
    with torch.device("meta"):
        net = UNet(spec)
    assert sum(type(m).__name__ == "ResidualBlock" for m in net.modules()) == spec.num_stages
    assert net.encoder[0].body[0][0].kernel_size == (1, 3, 3)  # thick slices: in-plane kernels first
    small = with_overrides(spec, features_per_stage=[4, 8, 8, 8, 8, 8])
    out = UNet(small).eval()(torch.randn(1, spec.in_channels, 8, 64, 64))
    assert out.shape == (1, 3, 8, 64, 64)


def test_he_initialisation_and_zero_biases():
    spec = spec_from_plan(hippocampus_plans().configurations["3d_fullres"])
    conv = UNet(spec).encoder[1][0][0]
    fan_in = conv.weight[0].numel()
    expected = (2 / (1 + 0.01**2) / fan_in) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert torch.all(conv.bias == 0)


def test_spec_is_plain_data_that_rebuilds_the_same_network():
    spec = spec_from_plan(hippocampus_plans().configurations["3d_fullres"], downsampling="strided_conv")
    again = from_plain(NetworkSpec, to_plain(spec))
    assert again == spec
    a, b = UNet(spec), UNet(again)
    b.load_state_dict(a.state_dict())
    assert list(a.state_dict()) == list(b.state_dict())


def test_invalid_specs_are_refused():
    spec = spec_from_plan(hippocampus_plans().configurations["3d_fullres"])
    with pytest.raises(AutounetError, match="deep_supervision_heads"):
        with_overrides(spec, deep_supervision_heads=5)
    with pytest.raises(AutounetError, match="downsampling"):
        with_overrides(spec, downsampling="avgpool")
    with pytest.raises(AutounetError, match="one conv kernel per stage"):
        with_overrides(spec, features_per_stage=[8, 16])
