"""Check and plan on the shared real datasets (skipped where they are not available)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autounet.api import check, plan
from autounet.cli import main
from conftest import listing, real_data_dir

DATA = real_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="shared real data not found (set AUTOUNET_DATA)")


@pytest.fixture(scope="module")
def hippocampus_plan(tmp_path_factory):
    return plan(DATA / "hippocampus", work=tmp_path_factory.mktemp("W"), workers=2)


@pytest.fixture(scope="module")
def hippocampus_preprocessed(hippocampus_plan):
    from autounet.api import preprocess

    ws = hippocampus_plan.workspace
    summary = preprocess(ws.name, work=ws.work, configurations=["2d", "3d_fullres"], workers=2)
    assert summary.ok
    return hippocampus_plan, summary


def test_hippocampus_check_reports_cases_channels_labels_and_the_float_label(capsys):
    assert main(["check", str(DATA / "hippocampus"), "-j", "2"]) == 0
    out = capsys.readouterr().out
    assert "Cases        208" in out
    assert "Channels     1: 0 MRI" in out
    assert "found {0, 1, 2}" in out
    # only hippocampus_243 of the two float label files of the MSD release is in this subset
    assert "hippocampus_243: label labelsTr/hippocampus_243.nii.gz is stored as float32" in out


def test_hippocampus_plans_follow_table1(hippocampus_plan):
    plans = hippocampus_plan.plans
    assert set(plans.configurations) == {"2d", "3d_fullres"}  # no low-res stage
    c3, c2 = plans.configurations["3d_fullres"], plans.configurations["2d"]
    assert c3.median_shape == [36, 50, 35]
    assert c3.patch_size == [40, 56, 40] and c3.num_pool_per_axis == [3, 3, 3]
    assert c2.patch_size == [56, 40] and c2.num_pool_per_axis == [3, 3]
    # start values and the 5% rule with this subset's 208 cases
    dataset_voxels = 36 * 50 * 35 * 208
    assert c3.batch_size == round(0.05 * dataset_voxels / (40 * 56 * 40))
    assert c2.batch_size == min(42 * 256 * 256 // (56 * 40), round(0.05 * dataset_voxels / (56 * 40)))
    assert c3.normalization[0].scheme == "zscore" and not c3.normalization[0].use_nonzero_mask
    ws = hippocampus_plan.workspace.root
    assert {p.name for p in ws.iterdir()} == {"dataset.json", "fingerprint.json", "plans.json"}


def test_brats_four_dimensional_two_channel_data_plans(tmp_path: Path):
    result = plan(DATA / "brats2015-mini", work=tmp_path / "W", workers=2)
    fp = result.fingerprint
    assert fp.channel_names == ["FLAIR", "T1c"] and fp.num_cases == 6
    assert all(c.shape_before_crop == [155, 240, 240] for c in fp.cases)
    assert all(set(c.label_voxel_counts) == {"0", "1", "2", "3", "4"} for c in fp.cases)
    assert {n.name for n in result.plans.configurations["3d_fullres"].normalization} == {"FLAIR", "T1c"}
    assert any(w.kind == "nonzero_background" for w in result.report.warnings)


def _copy_subset(src: Path, dst: Path, n: int = 6) -> list[str]:
    desc = json.loads((src / "dataset.json").read_text())
    desc["training"] = desc["training"][:n]
    desc["numTraining"] = n
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True)
    for entry in desc["training"]:
        for key in ("image", "label"):
            shutil.copy(src / entry[key], dst / entry[key])
    (dst / "dataset.json").write_text(json.dumps(desc))
    return [Path(e["image"]).name.replace(".nii.gz", "") for e in desc["training"]]


def _rewrite(path: Path, change) -> None:
    img = sitk.ReadImage(str(path))
    out = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(img)))
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path))


DEFECTS = {
    "missing_file": lambda root, c: (root / "labelsTr" / f"{c}.nii.gz").unlink(),
    "unreadable_file": lambda root, c: (root / "imagesTr" / f"{c}.nii.gz").write_bytes(b"\x1f\x8b broken"),
    "nonfinite_intensity": lambda root, c: _rewrite(
        root / "imagesTr" / f"{c}.nii.gz", lambda a: np.where(a == a.max(), np.nan, a).astype(np.float32)
    ),
    "undeclared_label": lambda root, c: _rewrite(
        root / "labelsTr" / f"{c}.nii.gz", lambda a: np.where(a == 2, 9, a).astype(a.dtype)
    ),
    "non_integer_label": lambda root, c: _rewrite(
        root / "labelsTr" / f"{c}.nii.gz", lambda a: a.astype(np.float32) * 0.5
    ),
    "empty_image": lambda root, c: _rewrite(root / "imagesTr" / f"{c}.nii.gz", lambda a: np.zeros_like(a)),
}


@pytest.mark.parametrize("kind", sorted(DEFECTS))
def test_planted_defects_in_real_cases_exit_2_naming_case_and_defect(kind, tmp_path: Path, capsys):
    root = tmp_path / "hippo"
    cases = _copy_subset(DATA / "hippocampus", root)
    DEFECTS[kind](root, cases[3])
    report = check(root, workers=1)
    assert [(e.case, e.kind) for e in report.errors] == [(cases[3], kind)]
    work = tmp_path / "W"
    assert main(["check", str(root), "-j", "1"]) == 2
    assert main(["plan", str(root), "--work", str(work), "-j", "1"]) == 2
    assert cases[3] in capsys.readouterr().out
    assert listing(work) == set()


def test_real_cases_regridded_to_thick_slices_plan_an_anisotropic_network(tmp_path: Path):
    root = tmp_path / "thick"
    _copy_subset(DATA / "hippocampus", root, n=8)
    for path in list((root / "imagesTr").iterdir()) + list((root / "labelsTr").iterdir()):
        img = sitk.ReadImage(str(path))
        size, spacing = list(img.GetSize()), list(img.GetSpacing())
        new_size = [size[0], size[1], int(round(size[2] * spacing[2] / 4.0))]
        interp = sitk.sitkNearestNeighbor if "labelsTr" in str(path) else sitk.sitkLinear
        out = sitk.Resample(
            img,
            new_size,
            sitk.Transform(),
            interp,
            img.GetOrigin(),
            [spacing[0], spacing[1], 4.0],
            img.GetDirection(),
            0,
            img.GetPixelID(),
        )
        sitk.WriteImage(out, str(path))
    c3 = plan(root, work=tmp_path / "W", workers=1).plans.configurations["3d_fullres"]
    assert c3.spacing == [4.0, 1.0, 1.0] and c3.transpose_forward == [0, 1, 2]
    assert c3.conv_kernel_sizes[0] == [1, 3, 3]  # thick slices: in-plane convolutions first
    assert c3.num_pool_per_axis[0] < c3.num_pool_per_axis[1]
    assert c3.pool_op_kernel_sizes[0] == [1, 2, 2]


def test_hippocampus_preprocesses_to_the_implied_shapes_normalised_with_valid_locations(hippocampus_preprocessed):
    from autounet.preprocessing.store import open_case

    hippocampus_plan, summary = hippocampus_preprocessed
    ws = hippocampus_plan.workspace
    assert summary.written == {"2d": 208, "3d_fullres": 208}
    for config in ("2d", "3d_fullres"):
        folder = ws.preprocessed_dir(config)
        for case in [c.case_id for c in hippocampus_plan.fingerprint.cases]:
            image, seg, locations, props = open_case(folder, case)
            crop = [b - a for a, b in props.crop_bbox]
            assert crop == props.shape_after_crop
            implied = [
                round(crop[a] * props.spacing_after_crop[i] / props.target_spacing[i])
                for i, a in enumerate(props.transpose_forward)
            ]
            assert list(image.shape[1:]) == implied == list(seg.shape)
            assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1) < 1e-3
            assert (seg[tuple(locations[:, 1:].T)] == locations[:, 0]).all()
            assert {int(k) for k in np.unique(locations[:, 0])} == {1, 2}


def test_real_labels_round_trip_exactly_or_with_high_dice_when_header_spacing_changes(tmp_path: Path):
    from autounet.api import preprocess
    from autounet.preprocessing.case import revert_segmentation
    from autounet.preprocessing.store import open_case

    root = tmp_path / "spacings"
    cases = _copy_subset(DATA / "hippocampus", root, n=18)
    factors = [0.9, 1.0, 1.1]  # header spacing per case; the median (target) stays 1 mm
    for i, case in enumerate(cases):
        for sub in ("imagesTr", "labelsTr"):
            path = root / sub / f"{case}.nii.gz"
            img = sitk.ReadImage(str(path))
            img.SetSpacing((factors[i % 3],) * 3)
            sitk.WriteImage(img, str(path))
    plan(root, work=tmp_path / "W", workers=1)
    preprocess("spacings", work=tmp_path / "W", configurations=["3d_fullres"], workers=1)
    folder = tmp_path / "W" / "spacings" / "preprocessed" / "3d_fullres"
    dice = {f: [] for f in factors}
    for i, case in enumerate(cases):
        original = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelsTr" / f"{case}.nii.gz"))).astype(np.uint8)
        _, seg, _, props = open_case(folder, case)
        back = revert_segmentation(np.asarray(seg), props)
        if factors[i % 3] == 1.0:
            np.testing.assert_array_equal(back, original)  # no resampling: exact
        dice[factors[i % 3]].append(
            [2 * ((back == k) & (original == k)).sum() / ((back == k).sum() + (original == k).sum()) for k in (1, 2)]
        )
    everything = np.array(sum(dice.values(), []))
    assert (everything.mean(0) >= 0.98).all()  # per class, over all cases
    assert (np.array(dice[1.1]) == 1.0).all()  # up-sampled with nearest and back: lossless
    assert (everything.min(0) >= 0.94).all()  # 10% down-sampling of these small structures loses a little


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_the_data_pipeline_keeps_the_network_busy(hippocampus_preprocessed, configuration):
    """Sampling and full augmentation of a batch, done serially (the loader overlaps the sampling
    with the network, so this over-estimates), cost at most 15% of a training iteration of the
    plan's own network and batch size. `benchmarks/data_pipeline.py` measures the real ratio."""
    import statistics
    import time

    import torch

    from autounet.training.assemble import assemble_run
    from autounet.training.options import TrainOptions
    from autounet.training.step import train_step

    ws = hippocampus_preprocessed[0].workspace
    run, _ = assemble_run(ws, TrainOptions(configuration, "all", device="cpu"))
    assert run.augmenter.sample_size != run.plan.patch_size  # rotation and scaling room is sampled
    pipeline = []
    for i in range(3):
        start = time.perf_counter()
        batch = run.train_sampler.batch(i)
        image, seg = run.augmenter(torch.from_numpy(batch.image), torch.from_numpy(batch.seg), batch.augmentation_seed)
        pipeline.append(time.perf_counter() - start)
    assert image.shape == (run.plan.batch_size, 1, *run.plan.patch_size)
    run.model.train()
    train_step(run, image, seg, 1e-3)  # warm-up
    start = time.perf_counter()
    loss = float(train_step(run, image, seg, 1e-3))
    network = time.perf_counter() - start
    assert np.isfinite(loss)
    assert (network + statistics.median(pipeline)) / network <= 1.15
