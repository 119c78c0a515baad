from pathlib import Path

import numpy as np
import pytest

from autounet.data.dataset import RawDataset
from autounet.errors import AutounetError
from autounet.regions import (
    Region,
    RegionSet,
    brats_2015,
    brats_2017,
    brats_regions_for,
    labels_to_regions,
    labels_to_regions_torch,
    msd_brain_tumour,
    region_set_for_dataset,
    regions_from_v2,
    regions_to_labels,
)
from autounet.utils.plain_data import from_plain, to_plain


def _random_labels(values, shape=(6, 7, 8), seed=0):
    return np.random.default_rng(seed).choice(np.asarray(values, dtype=np.uint8), size=shape)


def test_brats_2017_round_trip_is_exact():
    seg = _random_labels([0, 1, 2, 4])
    regions = labels_to_regions(seg, brats_2017())
    assert regions.shape == (3, *seg.shape) and regions.dtype == bool
    np.testing.assert_array_equal(regions[0], np.isin(seg, [1, 2, 4]))  # WT
    np.testing.assert_array_equal(regions[1], np.isin(seg, [1, 4]))  # TC
    np.testing.assert_array_equal(regions[2], seg == 4)  # ET
    back = regions_to_labels(regions.astype(np.float32), brats_2017())
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, seg)


def test_brats_2015_round_trip_maps_non_enhancing_to_necrosis():
    # Regions cannot tell necrosis (1) from non-enhancing tumour (3): both are "TC but not ET",
    # and TC paints 1. Every other label survives the round trip.
    seg = _random_labels([0, 1, 2, 3, 4])
    regions = labels_to_regions(seg, brats_2015())
    np.testing.assert_array_equal(regions[0], seg > 0)
    np.testing.assert_array_equal(regions[1], np.isin(seg, [1, 3, 4]))
    back = regions_to_labels(regions.astype(np.float32), brats_2015())
    expected = np.where(seg == 3, 1, seg)
    np.testing.assert_array_equal(back, expected)


def test_msd_brain_tumour_round_trip_is_exact():
    seg = _random_labels([0, 1, 2, 3])
    back = regions_to_labels(labels_to_regions(seg, msd_brain_tumour()).astype(np.float32), msd_brain_tumour())
    np.testing.assert_array_equal(back, seg)


def test_brats_regions_for_picks_the_convention():
    assert brats_regions_for({0, 1, 2, 3, 4}).regions == brats_2015().regions
    assert brats_regions_for([0, 1, 2, 4]).regions == brats_2017().regions
    assert brats_regions_for({1, 2, 3}).regions == msd_brain_tumour().regions
    with pytest.raises(AutounetError, match="not a BraTS convention"):
        brats_regions_for({0, 1, 2})


@pytest.mark.parametrize(
    "wt, tc, et, expected",
    [
        (0.44, 1.0, 1.0, 0),  # WT < 0.45 → background, whatever TC and ET say (nested rule)
        (0.45, 0.39, 1.0, 2),  # WT ≥ 0.45, TC < 0.4 → edema
        (0.45, 0.40, 0.44, 1),  # TC ≥ 0.4, ET < 0.45 → necrosis
        (0.45, 0.40, 0.45, 4),  # ET ≥ 0.45 → enhancing
        (0.9, 0.9, 0.9, 4),
        (0.0, 0.0, 0.0, 0),
    ],
)
def test_seed_004_thresholds_at_the_boundaries(wt, tc, et, expected):
    probs = np.array([wt, tc, et], dtype=np.float32).reshape(3, 1, 1, 1)
    assert regions_to_labels(probs, brats_2017())[0, 0, 0] == expected


def test_thresholds_can_be_overridden():
    probs = np.array([0.9, 0.9, 0.5], dtype=np.float32).reshape(3, 1, 1)
    assert regions_to_labels(probs, brats_2017())[0, 0] == 4
    assert regions_to_labels(probs, brats_2017(), thresholds=[0.45, 0.4, 0.6])[0, 0] == 1


def test_non_hierarchical_sets_paint_each_region_on_its_own():
    rs = regions_from_v2({"wt": [1, 2, 3], "tc": [2, 3], "et": 3}, regions_class_order=[1, 2, 3])
    assert not rs.hierarchical and rs.thresholds == [0.5, 0.5, 0.5]
    probs = np.array([0.1, 0.1, 0.9], dtype=np.float32).reshape(3, 1, 1)
    assert regions_to_labels(probs, rs)[0, 0] == 3  # nnU-Net v2: ET painted even outside WT


def test_v2_regions_paint_from_class_order_or_inner_difference():
    declared = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    rs = regions_from_v2(declared, {0: "background", 1: "a", 2: "b", 3: "c"}, regions_class_order=[1, 2, 3])
    assert [r.name for r in rs.regions] == ["whole tumor", "tumor core", "enhancing tumor"]
    assert [r.labels for r in rs.regions] == [(1, 2, 3), (2, 3), (3,)]
    assert [r.paint for r in rs.regions] == [1, 2, 3]
    inferred = regions_from_v2(declared)
    assert [r.paint for r in inferred.regions] == [1, 2, 3]  # smallest value in no inner region
    seg = _random_labels([0, 1, 2, 3])
    np.testing.assert_array_equal(regions_to_labels(labels_to_regions(seg, rs).astype(float), rs), seg)
    # partial overlaps are allowed
    regions_from_v2({"a": [1, 2], "b": [2, 3]})


@pytest.mark.parametrize(
    "declared, order, message",
    [
        ({"tc": [2, 3], "wt": [1, 2, 3]}, None, "outermost first"),
        ({"a": [1, 2], "b": [2], "c": [1]}, None, "cannot choose its paint"),
        ({"a": [1, 2], "b": [2, 1]}, None, "same labels"),
        ({"a": [], "b": [1]}, None, "empty"),
        ({"a": [0, 1]}, None, "background"),
        ({"a": [1, 2], "b": [2]}, [1], "regions_class_order has 1"),
        ({"a": [1, 7]}, None, "does not declare"),
    ],
)
def test_v2_regions_are_validated(declared, order, message):
    labels = {0: "background", 1: "x", 2: "y", 3: "z"}
    with pytest.raises(AutounetError, match=message):
        regions_from_v2(declared, labels, regions_class_order=order)


def test_region_set_for_dataset_keeps_file_order_and_integer_regions():
    descriptor = {
        "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
        "regions_class_order": [1, 2, 3],
    }
    ds = RawDataset(
        root=Path("."),
        layout="nnunetv2",
        name="brats",
        channel_names=("t1",),
        labels={0: "background", 1: "whole tumor:1", 2: "whole tumor:2", 3: "enhancing tumor"},
        cases=(),
        descriptor=descriptor,
        regions={"whole tumor": (1, 2, 3), "tumor core": (2, 3)},
    )
    rs = region_set_for_dataset(ds)
    assert rs is not None and rs.names == ["whole tumor", "tumor core", "enhancing tumor"]
    assert region_set_for_dataset(RawDataset(Path("."), "msd", "x", ("ct",), {0: "bg", 1: "a"}, (), {})) is None


def test_region_set_is_plain_data():
    rs = brats_2015()
    plain = to_plain(rs)
    assert plain["regions"][0] == {"name": "whole tumor", "labels": [1, 2, 3, 4], "paint": 2}
    assert plain["thresholds"] == [0.45, 0.4, 0.45] and plain["hierarchical"] is True
    assert from_plain(RegionSet, plain) == rs
    with pytest.raises(AutounetError, match="thresholds"):
        RegionSet([Region("a", (1,), 1)], [0.5, 0.5])


def test_torch_targets_match_numpy():
    torch = pytest.importorskip("torch")
    seg = _random_labels([0, 1, 2, 3, 4], shape=(2, 5, 6, 7), seed=3)
    seg[0, 0, 0, 0] = 9  # a value in no region
    target = labels_to_regions_torch(torch.from_numpy(seg.astype(np.int64))[:, None], brats_2015())
    assert target.shape == (2, 3, 5, 6, 7) and target.dtype == torch.float32
    for b in range(2):
        np.testing.assert_array_equal(target[b].numpy(), labels_to_regions(seg[b], brats_2015()).astype(np.float32))
    assert target[0, :, 0, 0, 0].sum() == 0
