"""The planner against seed 001 Table 1, and its other rules.

Each Table 1 row is planned from a fingerprint with that dataset's median shape, a typical MSD
spacing and its number of training cases. Cells the paper's written rules cannot produce are
pinned to what the rules give (see the planner module's docstring for why).
"""

from __future__ import annotations

import pytest

from autounet.errors import AutounetError
from autounet.planning.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from autounet.planning.planner import PlannerOptions, normalization_scheme, plan_experiment


def fingerprint(
    shape, spacing, cases, channels=("MRI",), crop_fraction=1.0, labels=None, shapes=None, spacings=None
) -> Fingerprint:
    shapes = shapes or [list(shape)] * cases
    spacings = spacings or [list(spacing)] * cases
    stats = IntensityStats(
        mean=100.0,
        std=20.0,
        min=0.0,
        max=300.0,
        median=95.0,
        percentile_00_5=10.0,
        percentile_99_5=250.0,
        num_samples=1000,
    )
    return Fingerprint(
        dataset_name="t",
        layout="msd",
        channel_names=list(channels),
        labels=labels or {"0": "background", "1": "a", "2": "b"},
        component_connectivity=26,
        foreground_intensity_per_channel=[stats] * len(channels),
        cases=[
            CaseFingerprint(
                case_id=f"c{i}",
                spacing=list(sp),
                shape_before_crop=list(sh),
                shape_after_crop=list(sh),
                crop_bbox=[[0, s] for s in sh],
                crop_voxel_fraction=crop_fraction,
                label_voxel_counts={"0": 1, "1": 1},
                components_per_class={"1": 1},
                foreground_source="label",
                foreground_intensity=[{"mean": 0.0, "std": 1.0, "min": 0.0, "max": 1.0}] * len(channels),
                orientation="RAS",
            )
            for i, (sh, sp) in enumerate(zip(shapes, spacings))
        ],
    )


# name: (median shape, spacing, MSD training cases, channels)
DATASETS = {
    "BrainTumour": ((138, 169, 138), (1.0, 1.0, 1.0), 484, ("FLAIR", "T1w", "t1gd", "T2w")),
    "Heart": ((115, 320, 232), (1.37, 1.25, 1.25), 20, ("MRI",)),
    "Liver": ((482, 512, 512), (1.0, 0.77, 0.77), 131, ("CT",)),
    "Hippocampus": ((36, 50, 35), (1.0, 1.0, 1.0), 260, ("MRI",)),
    "Prostate": ((20, 320, 319), (3.6, 0.62, 0.62), 32, ("T2", "ADC")),
    "Lung": ((252, 512, 512), (1.24, 0.79, 0.79), 63, ("CT",)),
    "Pancreas": ((96, 512, 512), (2.5, 0.8, 0.8), 281, ("CT",)),
}

# Table 1: 2D (patch, batch, pools), 3D (patch, batch, pools), low-res (median shape, patch, batch, pools) or None
TABLE1 = {
    "BrainTumour": (([192, 160], 89, [5, 5]), ([128, 128, 128], 2, [5, 5, 5]), None),
    "Heart": (([320, 256], 33, [6, 6]), ([80, 192, 128], 2, [4, 5, 5]), ([58, 160, 116], [64, 160, 128], 2, [4, 5, 5])),
    "Liver": (
        ([512, 512], 10, [6, 6]),
        ([128, 128, 128], 2, [5, 5, 5]),
        ([121, 128, 128], [128, 128, 128], 2, [5, 5, 5]),
    ),
    "Hippocampus": (([56, 40], 366, [3, 3]), ([40, 56, 40], 9, [3, 3, 3]), None),
    # 3D cells differ from Table 1 (20x192x192, batch 4): the median fits in 128^3, so it is the patch.
    "Prostate": (([320, 320], 26, [6, 6]), ([20, 320, 320], 2, [2, 5, 5]), None),
    # 3D and low-res patch cells differ from Table 1 (112x128x128): aspect ratio of the median kept.
    "Lung": (([512, 512], 10, [6, 6]), ([80, 160, 160], 2, [4, 5, 5]), ([126, 256, 256], [80, 160, 160], 2, [4, 5, 5])),
    # 3D and low-res patch cells differ from Table 1 (96x160x128).
    "Pancreas": (
        ([512, 512], 10, [6, 6]),
        ([40, 224, 224], 2, [3, 5, 5]),
        ([96, 256, 256], [80, 160, 160], 2, [4, 5, 5]),
    ),
}


@pytest.mark.parametrize("name", list(TABLE1))
def test_table1_row(name):
    shape, spacing, cases, channels = DATASETS[name]
    plans = plan_experiment(fingerprint(shape, spacing, cases, channels))
    (p2, b2, pools2), (p3, b3, pools3), low = TABLE1[name]
    c2, c3 = plans.configurations["2d"], plans.configurations["3d_fullres"]
    assert c3.median_shape == list(shape)
    assert (c2.patch_size, c2.batch_size, c2.num_pool_per_axis) == (p2, b2, pools2)
    assert (c3.patch_size, c3.batch_size, c3.num_pool_per_axis) == (p3, b3, pools3)
    if low is None:
        assert set(plans.configurations) == {"2d", "3d_fullres"}
        assert c3.batch_dice is False  # 3D U-Net without cascade sees nearly whole cases
    else:
        lo = plans.configurations["3d_lowres"]
        assert (lo.median_shape, lo.patch_size, lo.batch_size, lo.num_pool_per_axis) == low
        casc = plans.configurations["3d_cascade_fullres"]
        assert casc.previous_stage == "3d_lowres" and lo.next_stage == "3d_cascade_fullres"
        assert casc.patch_size == c3.patch_size and casc.data_identifier == "3d_fullres"
        assert casc.num_input_channels == len(channels) + 2
        assert (lo.batch_dice, c3.batch_dice, casc.batch_dice) == (False, True, True)


def test_anisotropic_low_res_stage_coarsens_the_fine_axes_first():
    plans = plan_experiment(fingerprint(*DATASETS["Pancreas"][:3]))
    assert plans.configurations["3d_lowres"].spacing == pytest.approx([2.5, 1.6, 1.6])
    plans = plan_experiment(fingerprint(*DATASETS["Liver"][:3]))
    assert plans.configurations["3d_lowres"].spacing == pytest.approx([4.0, 3.08, 3.08])


def test_target_spacing_is_the_median_and_coarse_axis_goes_first():
    spacings = [[0.8, 0.8, 3.0], [0.7, 0.7, 5.0], [0.9, 0.9, 4.0]]
    shapes = [[300, 300, 40]] * 3
    plans = plan_experiment(fingerprint(None, None, 3, shapes=shapes, spacings=spacings))
    c3 = plans.configurations["3d_fullres"]
    assert plans.original_median_spacing == [0.8, 0.8, 4.0]
    assert c3.transpose_forward == [2, 0, 1] and c3.transpose_backward == [1, 2, 0]
    assert c3.spacing == [4.0, 0.8, 0.8]
    assert plans.configurations["2d"].spacing == [4.0, 0.8, 0.8]
    # the coarse axis pools later and is convolved in-plane first
    assert c3.conv_kernel_sizes[0][0] == 1 and c3.pool_op_kernel_sizes[0][0] == 1


def test_nonzero_mask_is_used_when_cropping_shrinks_the_mean_case_by_a_quarter():
    shape, spacing, cases, _ = DATASETS["Hippocampus"]
    used = plan_experiment(fingerprint(shape, spacing, cases, crop_fraction=0.75)).configurations["3d_fullres"]
    unused = plan_experiment(fingerprint(shape, spacing, cases, crop_fraction=0.76)).configurations["3d_fullres"]
    assert used.normalization[0].use_nonzero_mask is True
    assert unused.normalization[0].use_nonzero_mask is False


def test_ct_channels_get_dataset_statistics_and_others_per_case_zscore():
    plans = plan_experiment(fingerprint((40, 40, 40), (1, 1, 1), 10, channels=("CT", "PET")))
    ct, pet = plans.configurations["3d_fullres"].normalization
    assert (ct.scheme, ct.clip_low, ct.clip_high, ct.mean, ct.std) == ("ct", 10.0, 250.0, 100.0, 20.0)
    assert pet.scheme == "zscore" and pet.mean is None


@pytest.mark.parametrize(
    "name, scheme",
    [
        ("CT", "ct"),
        ("ct", "ct"),
        ("CT_arterial", "ct"),
        ("PET/CT", "ct"),
        ("ADC", "zscore"),
        ("T1c", "zscore"),
        ("noNorm", "none"),
        ("rescale_to_0_1", "rescale_0_1"),
    ],
)
def test_normalization_scheme_from_channel_name(name, scheme):
    assert normalization_scheme(name) == scheme


def test_small_data_uses_the_median_shape_and_a_larger_batch():
    plans = plan_experiment(fingerprint((20, 24, 28), (1, 1, 1), 10_000))  # enough cases for the 5% rule not to bind
    c3 = plans.configurations["3d_fullres"]
    assert c3.patch_size == [20, 24, 28]  # already multiples of 2**2 (two pools per axis)
    assert c3.batch_size == 2 * 128**3 // (20 * 24 * 28)


def test_five_percent_rule_caps_the_batch_but_never_below_two():
    c3 = plan_experiment(fingerprint((36, 50, 35), (1, 1, 1), 5)).configurations["3d_fullres"]
    assert c3.batch_size == 2
    c3 = plan_experiment(fingerprint((36, 50, 35), (1, 1, 1), 208)).configurations["3d_fullres"]
    assert c3.batch_size == round(0.05 * 36 * 50 * 35 * 208 / (40 * 56 * 40))


def test_huge_slices_keep_a_2d_batch_of_two():
    c2 = plan_experiment(fingerprint((10, 2048, 2048), (5, 0.3, 0.3), 50)).configurations["2d"]
    assert c2.batch_size >= 2
    assert c2.patch_size[0] * c2.patch_size[1] * 2 <= 42 * 256 * 256


def test_single_slice_data_plans_2d_only():
    plans = plan_experiment(fingerprint((1, 256, 256), (999, 0.5, 0.5), 20))
    assert set(plans.configurations) == {"2d"}
    assert any("single slice" in n for n in plans.notes)


def test_features_start_at_30_and_double_with_a_cap():
    plans = plan_experiment(fingerprint(*DATASETS["Liver"][:3]))
    assert plans.configurations["3d_fullres"].features_per_stage == [30, 60, 120, 240, 320, 320]
    assert plans.configurations["2d"].features_per_stage == [30, 60, 120, 240, 480, 480, 480]


def test_large_3d_patches_use_in_plane_augmentation_when_edges_differ_by_more_than_2x():
    c3 = plan_experiment(fingerprint(*DATASETS["Prostate"][:3])).configurations["3d_fullres"]
    assert c3.in_plane_augmentation is True
    c3 = plan_experiment(fingerprint(*DATASETS["Hippocampus"][:3])).configurations["3d_fullres"]
    assert c3.in_plane_augmentation is False


def test_planner_options_change_the_plans():
    opts = PlannerOptions(patch_edge_3d=64, base_features=16)
    c3 = plan_experiment(fingerprint(*DATASETS["BrainTumour"][:3]), opts).configurations["3d_fullres"]
    assert c3.patch_size == [64, 64, 64] and c3.features_per_stage[0] == 16


def test_invalid_fingerprints_are_refused_with_a_reason():
    with pytest.raises(AutounetError, match="at least one class"):
        plan_experiment(fingerprint((10, 10, 10), (1, 1, 1), 3, labels={"0": "background"}))
    with pytest.raises(AutounetError, match="invalid spacing"):
        plan_experiment(fingerprint((10, 10, 10), (0, 1, 1), 3))


def test_planning_is_a_pure_function():
    fp = fingerprint(*DATASETS["Heart"][:3])
    assert plan_experiment(fp) == plan_experiment(fp)
