"""nnU-Net v2's residual-encoder U-Net as a NetworkSpec variant: structure, parameter counts equal
to nnU-Net's own networks, old specs loading unchanged, ONNX export agreeing with PyTorch."""

from __future__ import annotations

import pytest
import torch

from autounet.errors import AutounetError
from autounet.inference import engines
from autounet.inference.engines import compile_network
from autounet.networks.spec import NetworkSpec, spec_from_plan
from autounet.networks.unet import BasicResidualBlock, ResidualStage, UNet
from autounet.planning.feature_maps import feature_map_voxels
from autounet.utils.plain_data import from_plain, to_plain

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Parameter counts of nnU-Net's ResidualEncoderUNet / PlainConvUNet (dynamic_network_architectures
# 0.4.4, nnunetv2 2.8.1) for the topology of `spec` below, deep supervision on every level:
# in 2 channels, 3 outputs, features 4, 8, 16, 32, blocks 1, 3, 4, 6, decoder convs 1 (ResEnc) / 2.
NNUNET_PARAMETERS = {(3, "resenc"): 404793, (3, "plain"): 86513, (2, "resenc"): 137545, (2, "plain"): 30081}


def spec(dims: int, kind: str) -> NetworkSpec:
    strides = [[2] * dims, [1] + [2] * (dims - 1), [2] * dims]
    kernels = [[1] + [3] * (dims - 1), [3] * dims, [3] * dims, [3] * dims]
    extra = {"encoder_blocks_per_stage": [1, 3, 4, 6], "decoder_convs_per_stage": 1} if kind == "resenc" else {}
    return NetworkSpec(
        dims, 2, 3, [4, 8, 16, 32], kernels, strides, downsampling="strided_conv", deep_supervision_heads=2, **extra
    )


@pytest.mark.parametrize("dims", [3, 2])
@pytest.mark.parametrize("kind", ["resenc", "plain"])
def test_parameter_count_equals_nnunet(dims, kind):
    net = UNet(spec(dims, kind))
    assert sum(p.numel() for p in net.parameters()) == NNUNET_PARAMETERS[(dims, kind)]


def test_residual_encoder_structure_and_outputs():
    net = UNet(spec(3, "resenc"))
    assert [len(stage) for stage in net.encoder] == [1, 3, 4, 6]
    assert all(isinstance(stage, ResidualStage) for stage in net.encoder)
    assert all(isinstance(b, BasicResidualBlock) for stage in net.encoder for b in stage)
    assert all(len(level) == 1 for level in net.decoder)  # one conv block per decoder level
    first = net.encoder[1][0]  # strided, channels change: average pooling then a 1x1 projection
    assert isinstance(first.skip[0], torch.nn.AvgPool3d) and first.body[0][0].stride == (2, 2, 2)
    assert isinstance(net.encoder[0][0].skip, torch.nn.Identity)  # stem -> stage 0: same channels and size
    x = torch.randn(1, 2, 16, 16, 16)
    outputs = net.train()(x)
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 16, 16, 16), (1, 3, 8, 8, 8), (1, 3, 8, 4, 4)]
    assert tuple(net.eval()(x).shape) == (1, 3, 16, 16, 16)


def test_specs_without_the_new_fields_load_as_plain_unets():
    stored = to_plain(spec(3, "plain"))
    for key in ("encoder_blocks_per_stage", "decoder_convs_per_stage"):
        stored.pop(key)
    loaded = from_plain(NetworkSpec, stored)
    assert loaded.encoder_blocks_per_stage == [] and loaded.decoder_convs_per_stage == 2
    assert not hasattr(UNet(loaded), "stem")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"encoder_blocks_per_stage": [1, 3, 4]}, "one count >= 1 per stage"),
        ({"encoder_blocks_per_stage": [1, 3, 0, 6]}, "one count >= 1 per stage"),
        ({"encoder_blocks_per_stage": [1, 3, 4, 6], "downsampling": "pool"}, "strided_conv"),
        ({"encoder_blocks_per_stage": [1, 3, 4, 6], "residual_encoder": True}, "cannot be combined"),
        ({"decoder_convs_per_stage": 0}, "decoder_convs_per_stage"),
        ({"decoder_convs_per_stage": 1, "residual_decoder": True}, "residual_decoder"),
    ],
)
def test_bad_residual_settings_are_refused(change, message):
    base = to_plain(spec(3, "plain"))
    with pytest.raises(AutounetError, match=message):
        from_plain(NetworkSpec, {**base, **change}).validate()


def test_spec_from_plan_takes_the_blocks_from_the_plan():
    from test_unet import hippocampus_plans

    plan = hippocampus_plans().configurations["3d_fullres"]
    n = len(plan.features_per_stage)
    plan.network = {"downsampling": "strided_conv", "encoder_blocks_per_stage": [1, 3, 4, 6, 6, 6][:n]}
    plan.network["decoder_convs_per_stage"] = 1
    s = spec_from_plan(plan)
    assert s.encoder_blocks_per_stage == [1, 3, 4, 6, 6, 6][:n] and s.decoder_convs_per_stage == 1


def test_feature_map_estimate_counts_every_convolution_output():
    # plain 2D, two stages, patch 8x8: encoder 2x4x64 + 2x8x16; decoder level: 2 convs x 4 x 64,
    # transposed conv 4 x 64, output 3 x 64.
    plain = feature_map_voxels([8, 8], [[1, 1], [2, 2]], [4, 8], None, [2, 2], [2], 3)
    assert plain == 2 * 4 * 64 + 2 * 8 * 16 + 2 * 4 * 64 + 4 * 64 + 3 * 64
    # residual: stem 4x64; stage 0 one block (2 convs, no projection); stage 1 two blocks, the
    # first strided and widening (2 convs + projection), then 2 convs; decoder 1 conv.
    res = feature_map_voxels([8, 8], [[1, 1], [2, 2]], [4, 8], [1, 2], [1, 2], [1], 3)
    assert res == 4 * 64 + 2 * 4 * 64 + 3 * 8 * 16 + 2 * 8 * 16 + 4 * 64 + 4 * 64 + 3 * 64


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("dims", [3, 2])
def test_a_converted_residual_encoder_matches_pytorch(engine, dims, tmp_path):
    for package in engines.ENGINE_PACKAGES[engine]:
        pytest.importorskip(package)
    torch.manual_seed(0)
    net = UNet(spec(dims, "resenc")).eval()
    shape = (2, 2, 16, 16, 16) if dims == 3 else (2, 2, 32, 24)
    compiled = compile_network(net, engine=engine, precision="fp32", example_shape=shape, cache_dir=tmp_path)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = net(x), compiled(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


# nnU-Net's compute_conv_feature_map_size for the topology of `spec` (no deep supervision) on a
# 20x48x40 (3D) / 48x40 (2D) patch: the planner's memory estimate.
NNUNET_FEATURE_MAPS = {(3, "resenc"): 1502400, (3, "plain"): 1180800, (2, "resenc"): 145920, (2, "plain"): 86400}


@pytest.mark.parametrize("dims", [3, 2])
@pytest.mark.parametrize("kind", ["resenc", "plain"])
def test_feature_map_estimate_equals_nnunet(dims, kind):
    s = spec(dims, kind)
    strides = [[1] * dims, *s.pool_kernel_sizes]
    patch = [20, 48, 40] if dims == 3 else [48, 40]
    blocks = s.encoder_blocks_per_stage or None
    convs = [2] * s.num_stages
    decoder = [s.decoder_convs_per_stage] * (s.num_stages - 1)
    got = feature_map_voxels(patch, strides, s.features_per_stage, blocks, convs, decoder, 3)
    assert got == NNUNET_FEATURE_MAPS[(dims, kind)]
