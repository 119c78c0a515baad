"""Crop, normalisation and class locations."""

import numpy as np
import pytest

from autounet.data.crop import bounding_box, box_slices, nonzero_mask, uncrop
from autounet.errors import AutounetError
from autounet.planning.plans import ChannelNormalization
from autounet.preprocessing.locations import SAMPLES_PER_CLASS, sample_class_locations
from autounet.preprocessing.normalize import normalize


def test_nonzero_mask_is_the_union_of_channels_with_holes_filled():
    image = np.zeros((2, 9, 9, 9), np.float32)
    image[0, 2:7, 2:7, 2:7] = 1
    image[0, 4, 4, 4] = 0  # a hole inside the body
    image[1, 0, 0, 0] = 5  # only in channel 1
    mask = nonzero_mask(image)
    assert mask[4, 4, 4] and mask[0, 0, 0]
    assert not nonzero_mask(image, fill_holes=False)[4, 4, 4]
    assert bounding_box(mask) == ((0, 7), (0, 7), (0, 7))


def test_uncrop_inverts_the_crop():
    full = np.random.default_rng(0).normal(size=(2, 10, 11, 12))
    box = ((2, 8), (0, 11), (3, 5))
    cropped = full[(slice(None), *box_slices(box))]
    back = uncrop(cropped, box, (10, 11, 12), fill=0)
    np.testing.assert_array_equal(back[(slice(None), *box_slices(box))], cropped)
    assert back[:, :2].sum() == 0


def plan(scheme: str, mask: bool = False, **ct) -> ChannelNormalization:
    return ChannelNormalization(channel=0, name="x", scheme=scheme, use_nonzero_mask=mask, **ct)


def test_zscore_per_case_and_inside_the_mask():
    rng = np.random.default_rng(1)
    img = rng.normal(50, 7, (1, 10, 10, 10)).astype(np.float32)
    normalize(img, None, [plan("zscore")])
    assert abs(img.mean()) < 1e-5 and abs(img.std() - 1) < 1e-5
    img = rng.normal(50, 7, (1, 10, 10, 10)).astype(np.float32)
    mask = np.zeros((10, 10, 10), bool)
    mask[2:8] = True
    applied = normalize(img, mask, [plan("zscore", mask=True)])
    assert abs(img[0][mask].mean()) < 1e-5 and abs(img[0][mask].std() - 1) < 1e-5
    assert (img[0][~mask] == 0).all()
    assert applied[0]["scheme"] == "zscore" and applied[0]["subtracted"] == pytest.approx(50, abs=1)


def test_ct_clips_to_the_dataset_percentiles_and_uses_dataset_statistics():
    img = np.array([-2000.0, 0.0, 100.0, 5000.0], np.float32).reshape(1, 1, 1, 4)
    normalize(img, None, [plan("ct", clip_low=-100.0, clip_high=300.0, mean=50.0, std=100.0)])
    np.testing.assert_allclose(img.ravel(), [-1.5, -0.5, 0.5, 2.5])


def test_rescale_and_none():
    img = np.array([2.0, 4.0, 6.0], np.float32).reshape(1, 1, 1, 3)
    normalize(img, None, [plan("rescale_0_1")])
    np.testing.assert_allclose(img.ravel(), [0, 0.5, 1])
    img = np.array([2.0, 4.0], np.float32).reshape(1, 1, 1, 2)
    normalize(img, None, [plan("none")])
    np.testing.assert_allclose(img.ravel(), [2, 4])


def test_channel_count_must_match_the_plan():
    with pytest.raises(AutounetError, match="channel"):
        normalize(np.zeros((2, 2, 2, 2), np.float32), None, [plan("zscore")])


def test_every_location_points_at_its_class_and_small_components_are_reached():
    seg = np.zeros((40, 60, 60), np.uint8)
    seg[5:35, 5:55, 5:55] = 1  # a large structure
    seg[38, 58, 58] = 1  # a single-voxel component of the same class
    seg[20:22, 20:22, 20:22] = 2
    table, info = sample_class_locations(seg, 3, "case")
    assert table.dtype == np.int32 and table.shape[1] == 4
    assert (seg[tuple(table[:, 1:].T)] == table[:, 0]).all()
    n1 = 30 * 50 * 50 + 1 - 8  # class 2 overwrote 8 voxels
    assert info[1]["voxels"] == n1 and SAMPLES_PER_CLASS <= info[1]["stored"] < n1
    assert info[1]["components"] == 2
    assert ((table[:, 0] == 1) & (table[:, 1] == 38)).any()
    assert info[2] == {"voxels": 8, "stored": 8}  # few voxels: all kept
    again, _ = sample_class_locations(seg, 3, "case")
    np.testing.assert_array_equal(table, again)
    assert (np.diff(table[:, 0]) >= 0).all()  # sorted by class


def test_absent_class_has_no_locations():
    table, info = sample_class_locations(np.zeros((4, 4, 4), np.uint8), 3, "x")
    assert table.shape == (0, 4) and info[1] == {"voxels": 0, "stored": 0}
