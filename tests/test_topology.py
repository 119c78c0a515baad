import math

import pytest

from autounet.planning.topology import features_per_stage, fit_patch, pools_for_size, round_up_to_pools, stage_kernels


@pytest.mark.parametrize(
    "size, max_pools, pools",
    [
        (7, 5, 0),
        (8, 5, 1),
        (15, 5, 1),
        (16, 5, 2),
        (36, 5, 3),
        (56, 5, 3),
        (64, 5, 4),
        (232, 6, 5),
        (256, 6, 6),
        (512, 6, 6),
        (512, 5, 5),
    ],
)
def test_pooling_stops_when_the_feature_map_is_below_8(size, max_pools, pools):
    assert pools_for_size(size, max_pools) == pools


@pytest.mark.parametrize(
    "target, expected", [(36, 40), (50, 56), (35, 40), (169, 192), (138, 160), (232, 256), (319, 320), (20, 20)]
)
def test_patch_edges_round_up_to_their_own_pooling_multiple(target, expected):
    out = round_up_to_pools(target, 6)
    assert out == expected
    assert out % 2 ** pools_for_size(out, 6) == 0


def test_fit_patch_respects_the_volume_cap_and_divisibility():
    for target in ([72.0, 200.4, 145.3], [41.9, 223.6, 223.6], [300.0, 20.0, 20.0], [5.0, 500.0, 500.0]):
        patch = fit_patch(target, 128**3, 5)
        assert math.prod(patch) <= 128**3
        assert all(p % 2 ** pools_for_size(p, 5) == 0 for p in patch)


def test_isotropic_data_pools_every_axis_from_the_first_step():
    pools, convs = stage_kernels([1.0, 1.0, 1.0], [3, 3, 3])
    assert pools == [[2, 2, 2]] * 3
    assert convs == [[3, 3, 3]] * 4


def test_axes_with_fewer_pools_stop_pooling_last():
    pools, _ = stage_kernels([1.37, 1.25, 1.25], [4, 5, 5])
    assert pools == [[2, 2, 2]] * 4 + [[1, 2, 2]]


def test_coarse_axis_waits_and_gets_in_plane_kernels_until_spacing_catches_up():
    # Prostate-like: 3.6 mm slices, 0.62 mm in plane, pools 2, 5, 5
    pools, convs = stage_kernels([3.6, 0.62, 0.62], [2, 5, 5])
    assert pools == [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert convs[:3] == [[1, 3, 3], [1, 3, 3], [3, 3, 3]]
    assert sum(k[0] == 2 for k in pools) == 2 and sum(k[1] == 2 for k in pools) == 5


def test_a_coarse_axis_still_gets_its_pools_when_steps_run_out():
    pools, _ = stage_kernels([10.0, 1.0, 1.0], [3, 3, 3])
    assert [sum(k[a] == 2 for k in pools) for a in range(3)] == [3, 3, 3]


def test_features_double_per_stage_up_to_the_cap():
    assert features_per_stage(6, 30, 320) == [30, 60, 120, 240, 320, 320]
    assert features_per_stage(7, 30, 480) == [30, 60, 120, 240, 480, 480, 480]
