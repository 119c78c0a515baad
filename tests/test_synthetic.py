from pathlib import Path

import numpy as np
import pytest

from autounet.api import plan
from autounet.data.check import check_dataset
from autounet.data.image_io import read_image
from autounet.data.synthetic import SyntheticSpec, make_case, make_synthetic_dataset


def test_cases_are_deterministic_and_differ_between_indices():
    spec = SyntheticSpec(shape=(16, 18, 20), classes=4)
    a1, l1, g1 = make_case(spec, 0)
    a2, l2, _ = make_case(spec, 0)
    b, lb, _ = make_case(spec, 1)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(l1, l2)
    assert a1.shape[1:] != b.shape[1:] or not np.array_equal(l1, lb)
    assert set(np.unique(l1)) == {0, 1, 2, 3}
    assert g1.spacing == (1.0, 1.0, 1.0)


def test_classes_are_separable_by_intensity_in_every_channel():
    image, label, _ = make_case(SyntheticSpec(shape=(24, 24, 24), channels=2, classes=3), 3)
    for c in range(2):
        means = [image[c][label == k].mean() for k in range(3)]
        assert min(abs(means[i] - means[j]) for i in range(3) for j in range(i + 1, 3)) > 20


def test_mri_is_zero_outside_the_body_and_ct_is_air():
    mri, label, _ = make_case(SyntheticSpec(shape=(20, 20, 20)), 0)
    ct, _, _ = make_case(SyntheticSpec(shape=(20, 20, 20), modality="CT"), 0)
    assert mri[0, 0, 0, 0] == 0 and (mri[0] == 0).mean() > 0.3
    assert ct[0, 0, 0, 0] == -1000


def test_anisotropic_multichannel_dataset_checks_and_plans(tmp_path: Path):
    spec = SyntheticSpec(cases=4, shape=(6, 40, 40), spacing=(4.0, 0.8, 0.8), channels=2, classes=3)
    root = make_synthetic_dataset(tmp_path / "aniso", spec)
    img, geo = read_image([root / "imagesTr" / "synth_000.nii.gz"])
    assert img.shape[0] == 2 and geo.spacing == pytest.approx((4.0, 0.8, 0.8))  # NIfTI stores float32
    assert check_dataset(root, workers=1).ok
    result = plan(root, work=tmp_path / "W", workers=1)
    c3 = result.plans.configurations["3d_fullres"]
    assert c3.spacing == pytest.approx([4.0, 0.8, 0.8])
    assert c3.conv_kernel_sizes[0] == [1, 3, 3]
    assert c3.normalization[0].use_nonzero_mask  # MRI body is cropped by more than 1/4


def test_v2_layout_dataset_plans_like_msd(tmp_path: Path):
    msd = make_synthetic_dataset(tmp_path / "m", SyntheticSpec(cases=3, shape=(10, 12, 14), channels=2))
    v2 = make_synthetic_dataset(
        tmp_path / "v", SyntheticSpec(cases=3, shape=(10, 12, 14), channels=2, layout="nnunetv2")
    )
    a = plan(msd, work=tmp_path / "W", workers=1).fingerprint
    b = plan(v2, work=tmp_path / "W", workers=1).fingerprint
    assert [c.shape_after_crop for c in a.cases] == [c.shape_after_crop for c in b.cases]
    assert a.foreground_intensity_per_channel == b.foreground_intensity_per_channel
