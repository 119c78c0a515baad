import numpy as np
import pytest
from scipy import ndimage

from autounet.preprocessing.resample import (
    _source_coordinates,
    resample_axis,
    resample_image,
    resample_labels_linear,
    resample_labels_nearest,
    resample_volume,
    resampled_shape,
    separate_axis,
)


def reference(volume: np.ndarray, new_shape, order: int, mode: str) -> np.ndarray:
    coords = np.meshgrid(*[_source_coordinates(n, m) for n, m in zip(volume.shape, new_shape)], indexing="ij")
    return ndimage.map_coordinates(volume.astype(np.float64), coords, order=order, mode=mode)


@pytest.mark.parametrize("new_shape", [(17, 8, 9), (5, 20, 4), (11, 13, 9)])
def test_separable_cubic_spline_equals_the_3d_spline(new_shape):
    vol = np.random.default_rng(0).normal(size=(11, 13, 9)).astype(np.float32)
    out = resample_volume(vol, new_shape, order=3)
    assert out.dtype == np.float32 and out.shape == new_shape
    np.testing.assert_allclose(out, reference(vol, new_shape, 3, "mirror"), atol=2e-5)


def test_linear_and_nearest_match_scipy():
    vol = np.random.default_rng(1).normal(size=(9, 10, 11)).astype(np.float32)
    np.testing.assert_allclose(
        resample_volume(vol, (14, 6, 11), 1), reference(vol, (14, 6, 11), 1, "nearest"), atol=1e-5
    )
    lab = np.random.default_rng(2).integers(0, 4, (9, 10, 11)).astype(np.uint8)
    out = resample_labels_nearest(lab, (14, 6, 11))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference(lab, (14, 6, 11), 0, "nearest").astype(np.uint8))


def test_unchanged_axes_are_not_touched():
    vol = np.random.default_rng(3).normal(size=(5, 6, 7)).astype(np.float32)
    assert resample_axis(vol, 1, 6, 3) is vol
    np.testing.assert_array_equal(resample_image(vol[None], (5, 6, 7))[0], vol)


def test_physical_extent_and_values_are_preserved():
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32)[:, None, None], (20, 4, 4)).copy()
    up = resample_volume(ramp, (40, 4, 4), 3)
    # a linear ramp stays linear (splines reproduce polynomials) away from the mirrored ends
    np.testing.assert_allclose(up[12:-12, 0, 0], (np.arange(40)[12:-12] + 0.5) / 2 - 0.5, atol=1e-3)
    assert abs(up.mean() - ramp.mean()) < 0.05


def test_coarse_axis_is_resampled_by_nearest_neighbour():
    vol = np.random.default_rng(4).normal(size=(6, 8, 8)).astype(np.float32)
    out = resample_volume(vol, (12, 16, 16), order=3, sep_axis=0, sep_order=0)
    # each output slice is an in-plane resampling of exactly one input slice
    for z in range(12):
        src = int(np.clip(np.floor((z + 0.5) / 2 - 0.5 + 0.5), 0, 5))
        np.testing.assert_allclose(out[z], resample_volume(vol[src][None], (1, 16, 16), 3)[0], atol=1e-5)


def test_linear_one_hot_labels_are_the_argmax_of_interpolated_class_maps():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[5:15, 5:15, 5:15] = 1
    lab[8:11, 8:11, 8:11] = 2
    out = resample_labels_linear(lab, (30, 27, 13), 3)
    probs = np.stack([reference((lab == k).astype(np.float32), (30, 27, 13), 1, "nearest") for k in range(3)])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, probs.argmax(0))
    assert set(np.unique(out)) == {0, 1, 2}


def test_shapes_and_anisotropy():
    assert resampled_shape((20, 512, 512), (2.5, 0.8, 0.8), (1.5, 0.8, 0.8)) == (33, 512, 512)
    assert resampled_shape((1, 10, 10), (999, 1, 1), (999, 2, 2)) == (1, 5, 5)
    assert separate_axis((5.0, 1.0, 1.0), (3.0, 1.0, 1.0), 3.0) == 0
    assert separate_axis((1.0, 1.0, 1.0), (1.0, 4.0, 1.0), 3.0) == 1
    assert separate_axis((2.0, 1.0, 1.0), (2.5, 1.0, 1.0), 3.0) is None


def test_bad_order_is_refused():
    with pytest.raises(ValueError):
        resample_axis(np.zeros((4, 4)), 0, 5, 2)
