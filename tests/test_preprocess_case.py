"""One case forward through preprocessing and back (revert)."""

import numpy as np
import pytest

from autounet.data.geometry import Geometry
from autounet.errors import AutounetError
from autounet.planning.plans import ChannelNormalization, ConfigurationPlan, ResamplingPlan
from autounet.preprocessing.case import (
    PreprocessOptions,
    preprocess_case,
    preprocess_key,
    revert_probabilities,
    revert_segmentation,
)


def make_plan(spacing, transpose=(0, 1, 2), scheme="zscore", mask=False, channels=1) -> ConfigurationPlan:
    back = [list(transpose).index(a) for a in range(3)]
    return ConfigurationPlan(
        name="3d_fullres",
        network_dims=3,
        data_identifier="3d_fullres",
        transpose_forward=list(transpose),
        transpose_backward=back,
        spacing=list(spacing),
        median_shape=[1, 1, 1],
        patch_size=[8, 8, 8],
        batch_size=2,
        num_pool_per_axis=[1, 1, 1],
        pool_op_kernel_sizes=[[2, 2, 2]],
        conv_kernel_sizes=[[3, 3, 3]] * 2,
        features_per_stage=[8, 16],
        batch_dice=False,
        in_plane_augmentation=False,
        normalization=[ChannelNormalization(c, f"ch{c}", scheme, mask) for c in range(channels)],
        resampling=ResamplingPlan(),
        num_input_channels=channels,
        num_classes=3,
    )


def make_case(shape=(12, 20, 16), spacing=(1.0, 1.0, 1.0), pad=2, seed=0):
    """A body with two labelled blobs, zero padding of ``pad`` voxels around it."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    z, y, x = shape
    label[pad + 2 : z - pad - 2, pad + 2 : y // 2, pad + 2 : x - pad - 2] = 1
    label[pad + 3 : z - pad - 3, y // 2 + 1 : y - pad - 2, pad + 3 : x - pad - 3] = 4  # values need not be consecutive
    image = np.zeros((1, *shape), np.float32)
    image[0, pad : z - pad, pad : y - pad, pad : x - pad] = rng.normal(100, 10, (z - 2 * pad, y - 2 * pad, x - 2 * pad))
    image[0][label == 1] += 60
    image[0][label == 4] -= 40
    geo = Geometry(spacing=tuple(spacing), origin_xyz=(1.0, 2.0, 3.0), direction_xyz=tuple(np.eye(3).ravel()))
    return image, label, geo


VALUES = [0, 1, 4]


def test_no_resampling_round_trip_is_exact_and_maps_labels_to_class_indices():
    image, label, geo = make_case()
    pre = preprocess_case("c", image, geo, label, make_plan([1.0, 1.0, 1.0]), VALUES)
    p = pre.properties
    assert p.crop_bbox == [[2, 10], [2, 18], [2, 14]] and p.shape_after_crop == [8, 16, 12]
    assert list(pre.image.shape) == [1, 8, 16, 12] and p.shape_after_resampling == [8, 16, 12]
    assert set(np.unique(pre.seg)) == {0, 1, 2}  # label 4 is class index 2
    back = revert_segmentation(pre.seg, p)
    np.testing.assert_array_equal(np.asarray(VALUES)[back], label)
    assert abs(pre.image.mean()) < 1e-5 and abs(pre.image.std() - 1) < 1e-5


def test_transposed_network_order_round_trips_exactly():
    image, label, geo = make_case(spacing=(1.0, 1.0, 3.0))  # x is the coarse axis
    plan = make_plan([3.0, 1.0, 1.0], transpose=(2, 0, 1))
    pre = preprocess_case("c", image, geo, label, plan, VALUES)
    assert pre.properties.spacing_after_crop == [3.0, 1.0, 1.0]
    assert list(pre.image.shape[1:]) == [12, 8, 16]
    np.testing.assert_array_equal(np.asarray(VALUES)[revert_segmentation(pre.seg, pre.properties)], label)


def test_resampled_shapes_follow_the_target_spacing_and_anisotropic_axis_is_separate():
    image, label, geo = make_case(shape=(10, 40, 40), spacing=(5.0, 1.0, 1.0))
    pre = preprocess_case("c", image, geo, label, make_plan([2.5, 2.0, 2.0]), VALUES)
    p = pre.properties
    assert p.separate_axis == 0  # 5 / 1 > 3
    assert p.shape_after_resampling == [round(6 * 5 / 2.5), round(36 / 2), round(36 / 2)]
    assert p.spacing_after_resampling == pytest.approx([2.5, 2.0, 2.0])
    # nearest along the coarse axis: output slices z = 2k and 2k+1 come from input slice k
    seg = pre.seg
    np.testing.assert_array_equal(seg[0], seg[1])
    back = revert_segmentation(seg, p)
    assert back.shape == label.shape


def test_revert_probabilities_gives_argmax_and_background_outside_the_crop():
    image, label, geo = make_case()
    pre = preprocess_case("c", image, geo, label, make_plan([0.7, 0.7, 0.9]), VALUES)
    onehot = np.stack([(pre.seg == k).astype(np.float32) for k in range(3)])
    seg, probs = revert_probabilities(onehot, pre.properties, keep_probabilities=True)
    assert seg.shape == label.shape and probs.shape == (3, *label.shape)
    assert probs[0, 0, 0, 0] == 1.0 and probs[1:, 0, 0, 0].sum() == 0
    np.testing.assert_array_equal(seg, probs.argmax(0))
    for k, v in ((1, 1), (2, 4)):
        a, b = seg == k, label == v
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9
    with pytest.raises(AutounetError, match="does not match the preprocessed shape"):
        revert_probabilities(onehot[:, :-1], pre.properties)


def test_nonzero_mask_normalisation_zeroes_outside_and_fills_holes():
    image, label, geo = make_case(pad=0)
    image[0, :, 8:10, :] = 0  # a zero slab reaching the border: outside the mask
    image[0, 5, 14, 7] = 0  # an enclosed zero voxel: a hole, inside the mask
    pre = preprocess_case("c", image, geo, label, make_plan([1.0, 1.0, 1.0], mask=True), VALUES)
    y0 = pre.properties.crop_bbox[1][0]
    assert (pre.image[0, :, 8 - y0 : 10 - y0] == 0).all()
    hole = pre.image[0, 5, 14 - y0, 7]
    assert hole != 0 and hole == pytest.approx(
        -pre.properties.normalization[0]["subtracted"] / pre.properties.normalization[0]["divided_by"]
    )
    inside = np.delete(pre.image[0], np.s_[8 - y0 : 10 - y0], axis=1)
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-4


def test_options_float16_and_linear_labels():
    image, label, geo = make_case()
    plan = make_plan([0.8, 0.8, 0.8])
    pre = preprocess_case("c", image, geo, label, plan, VALUES, PreprocessOptions("float16", "linear"))
    assert pre.image.dtype == np.float16 and pre.properties.image_dtype == "float16"
    assert set(np.unique(pre.seg)) == {0, 1, 2}
    assert preprocess_key(plan, VALUES, PreprocessOptions()) != preprocess_key(
        plan, VALUES, PreprocessOptions("float16")
    )
    with pytest.raises(AutounetError):
        PreprocessOptions("int8").validate()


def test_locations_index_the_stored_segmentation():
    image, label, geo = make_case()
    pre = preprocess_case("c", image, geo, label, make_plan([0.9, 1.1, 1.0]), VALUES)
    assert (pre.seg[tuple(pre.locations[:, 1:].T)] == pre.locations[:, 0]).all()
    assert pre.properties.classes["2"].voxels == int((pre.seg == 2).sum())


def test_images_without_labels_preprocess_for_inference():
    image, _, geo = make_case()
    pre = preprocess_case("c", image, geo, None, make_plan([1.0, 1.0, 1.0]), VALUES)
    assert pre.seg is None and pre.locations.shape == (0, 4) and not pre.properties.has_label
    assert pre.properties.crop_bbox == [[2, 10], [2, 18], [2, 14]]


def test_undeclared_label_values_and_wrong_channel_count_are_errors():
    image, label, geo = make_case()
    label[0, 0, 0] = 3
    with pytest.raises(AutounetError, match=r"\[3\] are not declared"):
        preprocess_case("c", image, geo, label, make_plan([1.0, 1.0, 1.0]), VALUES)
    with pytest.raises(AutounetError, match="channel"):
        preprocess_case("c", np.concatenate([image, image]), geo, None, make_plan([1.0, 1.0, 1.0]), VALUES)
