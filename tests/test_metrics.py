import math

import numpy as np
import pytest
from scipy import ndimage

from autounet.evaluation.metrics import binary_metrics, case_metrics, surface, surface_distances


def box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing)) <= radius**2


def brute_force(pred, ref, spacing, tolerance):
    """HD95 and surface Dice from distance transforms of the whole arrays (no crop, no k-d tree)."""
    ps, rs = surface(pred), surface(ref)
    d_pred = ndimage.distance_transform_edt(~rs, sampling=spacing)[ps]
    d_ref = ndimage.distance_transform_edt(~ps, sampling=spacing)[rs]
    both = np.concatenate([d_pred, d_ref])
    return np.percentile(both, 95), np.count_nonzero(both <= tolerance + 1e-6) / both.size


def test_dice_and_iou_of_overlapping_boxes():
    pred = box((10, 10, 10), (0, 0, 0), (4, 5, 5))  # 100 voxels
    ref = box((10, 10, 10), (2, 0, 0), (6, 5, 5))  # 100 voxels, 50 shared
    m = binary_metrics(pred, ref, (1, 1, 1))
    assert (m["tp"], m["fp"], m["fn"], m["n_pred"], m["n_ref"]) == (50, 50, 50, 100, 100)
    assert m["dice"] == pytest.approx(0.5)
    assert m["iou"] == pytest.approx(50 / 150)
    assert all(isinstance(m[k], int) for k in ("tp", "fp", "fn", "n_pred", "n_ref"))
    assert all(type(m[k]) is float for k in ("dice", "iou", "hd95", "surface_dice"))


def test_identical_masks_score_perfectly():
    m = binary_metrics(ball((20, 20, 20), (10, 10, 10), 6), ball((20, 20, 20), (10, 10, 10), 6), (2, 1, 0.5))
    assert (m["dice"], m["iou"], m["hd95"], m["surface_dice"]) == (1.0, 1.0, 0.0, 1.0)


def test_hd95_of_a_cube_shifted_along_an_anisotropic_axis_is_the_shift_in_mm():
    pred = box((20, 20, 20), (4, 5, 5), (12, 15, 15))
    ref = box((20, 20, 20), (6, 5, 5), (14, 15, 15))  # 2 voxels along z, 3 mm each
    m = binary_metrics(pred, ref, (3.0, 1.0, 1.0), tolerance_mm=1.0)
    assert m["hd95"] == pytest.approx(6.0)
    # the shifted cube's top and bottom faces are 6 mm from the other surface, the side faces touch it
    hd95, nsd = brute_force(pred, ref, (3.0, 1.0, 1.0), 1.0)
    assert m["hd95"] == pytest.approx(hd95) and m["surface_dice"] == pytest.approx(nsd)
    assert 0 < m["surface_dice"] < 1
    assert binary_metrics(pred, ref, (3.0, 1.0, 1.0), tolerance_mm=6.0)["surface_dice"] == 1.0


def test_surface_dice_of_a_shift_beyond_the_tolerance():
    # two 1-voxel-thick plates, 3 voxels apart: every surface voxel is 3 mm from the other surface
    pred = box((10, 12, 12), (2, 2, 2), (3, 10, 10))
    ref = box((10, 12, 12), (5, 2, 2), (6, 10, 10))
    m = binary_metrics(pred, ref, (1, 1, 1), tolerance_mm=2.0)
    assert m["surface_dice"] == 0.0 and m["hd95"] == pytest.approx(3.0) and m["dice"] == 0.0
    assert binary_metrics(pred, ref, (1, 1, 1), tolerance_mm=3.0)["surface_dice"] == 1.0


def test_cropped_computation_equals_distance_transforms_of_the_whole_volume():
    rng = np.random.default_rng(0)
    spacing = (2.5, 0.8, 1.1)
    for _ in range(5):
        pred = ball((18, 22, 20), rng.uniform(5, 13, 3), rng.uniform(2, 6), spacing) & (rng.random((18, 22, 20)) > 0.1)
        ref = ball((18, 22, 20), rng.uniform(5, 13, 3), rng.uniform(2, 6), spacing)
        m = binary_metrics(pred, ref, spacing, tolerance_mm=2.0)
        hd95, nsd = brute_force(pred, ref, spacing, 2.0)
        assert m["hd95"] == pytest.approx(hd95) and m["surface_dice"] == pytest.approx(nsd)
        # the k-d tree's distances are the distance transform's
        d_pred, d_ref = surface_distances(pred, ref, spacing)
        assert np.allclose(d_pred, ndimage.distance_transform_edt(~surface(ref), sampling=spacing)[surface(pred)])
        assert np.allclose(d_ref, ndimage.distance_transform_edt(~surface(pred), sampling=spacing)[surface(ref)])


def test_masks_touching_the_array_border_have_surfaces_there():
    pred = np.ones((4, 5, 6), bool)
    assert surface(pred).sum() == pred.size - 2 * 3 * 4
    m = binary_metrics(pred, box((4, 5, 6), (0, 0, 0), (4, 5, 3)), (1, 1, 1))
    assert m["dice"] == pytest.approx(2 * 60 / 180) and m["hd95"] > 0


def test_a_single_slice_is_evaluated_as_2d():
    pred = np.zeros((1, 20, 20), bool)
    pred[0, 5:15, 5:15] = True
    ref = np.roll(pred, 2, axis=2)
    m = binary_metrics(pred, ref, (999.0, 0.5, 0.5), tolerance_mm=0.5)
    assert m["hd95"] == pytest.approx(1.0)  # 2 voxels of 0.5 mm, not 999 mm of slice thickness
    hd95, nsd = brute_force(pred[0], ref[0], (0.5, 0.5), 0.5)
    assert m["hd95"] == pytest.approx(hd95) and m["surface_dice"] == pytest.approx(nsd) and nsd < 1


@pytest.mark.parametrize("empty", ["nan", "one"])
def test_empty_masks_follow_the_chosen_convention(empty):
    shape, spacing = (155, 24, 24), (1.0, 10.0, 10.0)  # extent 155 x 240 x 240 mm
    none, some = np.zeros(shape, bool), box(shape, (5, 5, 5), (8, 9, 9))
    both = binary_metrics(none, none, spacing, empty=empty)
    one_a = binary_metrics(some, none, spacing, empty=empty)
    one_b = binary_metrics(none, some, spacing, empty=empty)
    assert both["tp"] == both["n_pred"] == both["n_ref"] == 0
    for m in (one_a, one_b):
        assert m["dice"] == m["iou"] == m["surface_dice"] == 0.0
    if empty == "nan":
        assert all(math.isnan(both[k]) for k in ("dice", "iou", "hd95", "surface_dice"))
        assert math.isnan(one_a["hd95"]) and math.isnan(one_b["hd95"])
    else:
        assert (both["dice"], both["iou"], both["surface_dice"], both["hd95"]) == (1.0, 1.0, 1.0, 0.0)
        assert one_a["hd95"] == one_b["hd95"] == pytest.approx(373.13, abs=0.01)  # the BraTS toolkit's value


def test_bad_arguments_are_refused():
    a = np.zeros((3, 3, 3), bool)
    with pytest.raises(ValueError, match="empty"):
        binary_metrics(a, a, (1, 1, 1), empty="zero")
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(a, a[:2], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(a, a, (1, 1))


def test_case_metrics_per_class_and_default_labels():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[6:9, 6:9, 6:9] = 2
    pred = ref.copy()
    pred[6:9, 6:9, 6:9] = 0
    pred[0, 0, 0] = 5  # a value only in the prediction
    out = case_metrics(pred, ref, (1, 1, 1))
    assert list(out) == ["1", "2", "5"]
    assert out["1"]["dice"] == 1.0
    assert out["2"]["dice"] == 0.0 and out["2"]["fn"] == 27
    assert out["5"]["fp"] == 1
    only = case_metrics(pred, ref, (1, 1, 1), labels=[2, 3])
    assert list(only) == ["2", "3"] and math.isnan(only["3"]["dice"])
    assert binary_metrics(pred == 1, ref == 1, (1, 1, 1)) == out["1"]


def test_regions_are_unions_of_labels():
    ref = np.zeros((12, 12, 12), np.int16)
    ref[2:10, 2:10, 2:10] = 2  # edema
    ref[4:8, 4:8, 4:8] = 1  # necrosis
    ref[5:7, 5:7, 5:7] = 4  # enhancing
    pred = ref.copy()
    pred[pred == 1] = 4  # necrosis predicted as enhancing: the tumour core is still right
    regions = {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}
    out = case_metrics(pred, ref, (1, 1, 1), regions=regions)
    assert list(out) == ["WT", "TC", "ET"]
    assert out["WT"]["dice"] == 1.0 and out["TC"]["dice"] == 1.0
    assert out["ET"]["dice"] == pytest.approx(2 * 8 / (64 + 8))
    assert out["TC"] == binary_metrics(np.isin(pred, [1, 4]), np.isin(ref, [1, 4]), (1, 1, 1))
    both = case_metrics(pred, ref, (1, 1, 1), labels=[2], regions={"TC": [1, 4]})
    assert list(both) == ["2", "TC"]


def test_background_as_a_class_is_computed_on_the_whole_image():
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[2:4, 2:4, 2:4] = 1
    out = case_metrics(ref, ref, (1, 1, 1), labels=[0, 1])
    assert out["0"]["tp"] == 512 - 8 and out["0"]["dice"] == 1.0


def test_speed_on_a_large_volume():
    shape = (150, 256, 256)
    pred = ball(shape, (75, 128, 128), 30)
    ref = ball(shape, (77, 126, 129), 30)
    import time

    start = time.perf_counter()
    m = binary_metrics(pred, ref, (1.0, 0.8, 0.8))
    assert time.perf_counter() - start < 3.0
    assert 0.8 < m["dice"] < 1 and 0 < m["hd95"] < 5
