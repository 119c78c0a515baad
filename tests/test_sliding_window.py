import numpy as np
import pytest
import torch

from autounet.inference.sliding_window import (
    HALF_ACCUMULATION_TIE,
    gaussian_importance,
    mirror_combinations,
    predict_slices,
    predict_volume,
    tile_starts,
)


class PointwiseNet(torch.nn.Module):
    """A 1x1 convolution: tiling, padding and mirroring must not change its prediction."""

    def __init__(self, dims: int, channels: int = 2, classes: int = 3):
        super().__init__()
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        self.conv = conv(channels, classes, 1)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("shape", [(7, 9, 8), (20, 30, 18), (16, 16, 16)])
def test_tiles_merge_back_to_the_whole_volume_prediction(shape):
    net = PointwiseNet(3)
    image = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    expected = torch.softmax(net(torch.from_numpy(image)[None]), 1)[0]
    fp32 = torch.float32
    probs = predict_volume(net, image, (8, 10, 8), 3, tiles_per_batch=3, accumulate_dtype=fp32)
    assert probs.shape == (3, *shape)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    mirrored = predict_volume(net, image, (8, 10, 8), 3, mirror_axes=(0, 1, 2), accumulate_dtype=fp32)
    torch.testing.assert_close(mirrored, expected, atol=1e-5, rtol=1e-5)
    half = predict_volume(net, image, (8, 10, 8), 3, mirror_axes=(0, 1, 2))  # float16 accumulators
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), expected, atol=HALF_ACCUMULATION_TIE, rtol=0)


def test_two_dimensional_networks_run_slice_by_slice():
    net = PointwiseNet(2)
    image = np.random.default_rng(2).normal(size=(2, 5, 12, 14)).astype(np.float32)
    probs = predict_slices(net, image, (8, 8), 3, accumulate_dtype=torch.float32)
    expected = torch.softmax(net(torch.from_numpy(image).permute(1, 0, 2, 3)), 1).permute(1, 0, 2, 3)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)


def test_tiles_overlap_by_half_a_patch_and_cover_the_volume():
    for size, patch in [(100, 40), (40, 40), (41, 40), (7, 40)]:
        starts = tile_starts(size, patch, 0.5)
        assert starts[0] == 0 and starts[-1] == max(0, size - patch)
        assert all(b - a <= patch // 2 for a, b in zip(starts, starts[1:]))
    w = gaussian_importance((9, 11))
    assert w[4, 5] == w.max() and w.min() > 0
    assert len(mirror_combinations((0, 1, 2))) == 8
