"""Sparse annotations: nnU-Net v2's ignore label, from dataset.json to losses, sampling and metrics."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import autounet
from autounet.data.check import check_dataset
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.evaluation.evaluate import evaluate_arrays
from autounet.evaluation.metrics import case_metrics
from autounet.planning.plans import load_plans
from autounet.postprocessing.components import decide_postprocessing
from autounet.preprocessing.locations import ANNOTATED, sample_class_locations
from autounet.preprocessing.resample import resample_labels_linear
from autounet.regions import Region, RegionSet
from autounet.training.losses import (
    CrossEntropyLoss,
    DeepSupervisionLoss,
    DiceCELoss,
    DiceLoss,
    FocalLoss,
    RegionLoss,
    downsample_target,
)
from autounet.training.sampler import PatchSampler, SamplerSettings
from autounet.training.setup import RegionTargets
from autounet.training.trainer import _masks

IGNORE = 3


def _sparse_labels(root: Path, every: int = 2) -> None:
    """Every ``every``-th z slice keeps its labels; the others become IGNORE (background too)."""
    for path in sorted((root / "labelsTr").iterdir()):
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        keep = np.zeros(array.shape[0], bool)
        keep[array.shape[0] // 2 :: every] = True
        keep[array.shape[0] // 2 :: -every] = True
        array[~keep] = IGNORE
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(path))


def _set_labels(root: Path, labels: dict) -> None:
    d = json.loads((root / "dataset.json").read_text())
    d["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(d))


@pytest.fixture(scope="module")
def sparse_v2(tmp_path_factory) -> Path:
    """Six 1-channel cases, nnU-Net v2 layout, labels 0/1/2 on every other z slice, ``"ignore": 3``."""
    root = tmp_path_factory.mktemp("sparse") / "sparse"
    make_synthetic_dataset(root, SyntheticSpec(cases=6, shape=(12, 16, 16), classes=3, seed=4, layout="nnunetv2"))
    _sparse_labels(root)
    _set_labels(root, {"background": 0, "class_1": 1, "class_2": 2, "ignore": IGNORE})
    return root


@pytest.fixture(scope="module")
def planned(sparse_v2, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    autounet.plan(sparse_v2, work=work, workers=1)
    autounet.preprocess("sparse", work=work, configurations=["3d_fullres"], workers=1)
    return work


# --- dataset.json and check ------------------------------------------------------------------


def test_v2_ignore_label_is_no_class_in_the_plans(planned):
    plans = load_plans(planned / "sparse" / "plans.json")
    assert plans.labels == {"0": "background", "1": "class_1", "2": "class_2"}
    assert plans.ignore_label == IGNORE
    for c in plans.configurations.values():
        assert c.num_classes == 3 and c.ignore_label == IGNORE


def test_msd_dataset_declares_ignore_by_name(tmp_path):
    root = make_synthetic_dataset(tmp_path / "msd", SyntheticSpec(cases=2, shape=(8, 10, 12), classes=3, seed=1))
    _sparse_labels(root)
    _set_labels(root, {"0": "background", "1": "a", "2": "b", "3": "ignore"})
    report = check_dataset(root, workers=1)
    assert report.ok, report.format()
    assert report.dataset.ignore_label == IGNORE


@pytest.mark.parametrize("layout", ["msd", "nnunetv2"])
def test_check_refuses_an_ignore_label_that_is_not_the_highest_value(tmp_path, layout):
    root = make_synthetic_dataset(tmp_path / "d", SyntheticSpec(cases=2, shape=(8, 10, 12), classes=4, layout=layout))
    labels = (
        {"0": "background", "1": "a", "2": "ignore", "3": "c"}
        if layout == "msd"
        else {"background": 0, "a": 1, "ignore": 2, "c": 3}
    )
    _set_labels(root, labels)
    report = check_dataset(root, workers=1)
    assert not report.ok
    messages = [str(e) for e in report.errors]
    assert any("dataset.json" in m and "'ignore' (2) must have the highest label value" in m for m in messages)
    with pytest.raises(autounet.AutounetError, match="highest label value"):
        autounet.plan(root, work=tmp_path / "w", workers=1)


def test_check_reports_the_annotated_fraction_per_case(sparse_v2):
    report = check_dataset(sparse_v2, workers=1)
    assert report.ok, report.format()
    fractions = {i.case_id: i.annotated_fraction for i in report.inspections}
    for case_id, fraction in fractions.items():
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(sparse_v2 / "labelsTr" / f"{case_id}.nii.gz")))
        assert fraction == pytest.approx(np.mean(label != IGNORE))
    text = report.format()
    assert "Annotated    voxels not 'ignore' (3): min" in text
    for case_id, fraction in fractions.items():
        assert f"{case_id} {fraction:.1%}" in text


# --- losses ----------------------------------------------------------------------------------


def _softmax_case(seed: int = 0, ignore_index: int = 3, spatial=(6, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn((2, 3, *spatial), generator=gen)
    target = torch.randint(0, 3, (2, 1, *spatial), generator=gen)
    ignored = torch.rand((2, 1, *spatial), generator=gen) < 0.5
    target[ignored] = ignore_index
    return logits, target, ignored


@pytest.mark.parametrize(
    "loss",
    [
        DiceLoss(batch_dice=True, ignore_index=3),
        DiceLoss(batch_dice=False, ignore_index=3),
        CrossEntropyLoss(ignore_index=3),
        FocalLoss(ignore_index=3),
        DiceCELoss(batch_dice=True, ignore_index=3),
    ],
    ids=["dice_batch", "dice_sample", "ce", "focal", "dice_ce"],
)
def test_softmax_losses_ignore_unannotated_voxels(loss):
    logits, target, ignored = _softmax_case()
    before = loss(logits, target)
    changed = torch.where(ignored, torch.randn_like(logits) * 10, logits)  # other outputs under ignore
    assert loss(changed, target).item() == pytest.approx(before.item(), rel=1e-6, abs=1e-7)
    # and it is not a loss that ignores everything: an annotated voxel's output does count
    moved = logits.clone()
    first = torch.nonzero(~ignored[:, 0])[0]
    moved[first[0], :, first[1], first[2], first[3]] += torch.tensor([5.0, -5.0, 0.0])
    assert loss(moved, target).item() != pytest.approx(before.item(), rel=1e-6)


def test_softmax_loss_of_annotated_voxels_equals_the_dense_loss_on_them():
    logits, target, ignored = _softmax_case(seed=1)
    dense = torch.randint(0, 3, target.shape)
    dense[~ignored] = target[~ignored]
    ce = CrossEntropyLoss(ignore_index=3)(logits, target)
    keep = ~ignored[:, 0]
    expected = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 4, 1)[keep], dense[:, 0][keep])
    assert ce.item() == pytest.approx(expected.item(), rel=1e-5)


def test_deep_supervision_keeps_the_ignore_value_when_downsampling():
    _, target, _ = _softmax_case(seed=2, spatial=(8, 8, 8))
    small = downsample_target(target, (4, 4, 4))
    assert set(small.unique().tolist()) <= {0, 1, 2, 3} and (small == 3).any()
    loss = DeepSupervisionLoss(DiceCELoss(batch_dice=True, ignore_index=3))
    gen = torch.Generator().manual_seed(3)
    outputs = [torch.randn((2, 3, 8, 8, 8), generator=gen), torch.randn((2, 3, 4, 4, 4), generator=gen)]
    before = loss(outputs, target)
    changed = [torch.where(downsample_target(target, o.shape[2:]) == 3, torch.randn_like(o) * 10, o) for o in outputs]
    assert loss(changed, target).item() == pytest.approx(before.item(), rel=1e-6)


def _regions() -> RegionSet:
    return RegionSet([Region("whole", (1, 2), 1), Region("core", (2,), 2)], [0.5, 0.5])


@pytest.mark.parametrize("focal", [False, True])
def test_region_losses_ignore_unannotated_voxels_in_every_region(focal):
    labels = {"0": "background", "1": "a", "2": "b"}
    targets = RegionTargets(_regions(), labels, ignore_label=3)
    _, seg, ignored = _softmax_case(seed=4)  # class indices 0..2, ignore index 3
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn((2, 2, *seg.shape[2:]), generator=gen)
    loss = RegionLoss(focal=focal, batch_dice=True)
    before = loss(logits, targets(seg))
    changed_logits = torch.where(ignored, torch.randn_like(logits) * 10, logits)
    assert loss(changed_logits, targets(seg)).item() == pytest.approx(before.item(), rel=1e-6)
    # the label under an ignored voxel does not matter either: ignore is decided by the target
    dense = RegionTargets(_regions(), labels)(torch.where(ignored, torch.randint(0, 3, seg.shape, generator=gen), seg))
    masked = torch.where(ignored.expand_as(dense), torch.full_like(dense, -1.0), dense)
    assert loss(logits, masked).item() == pytest.approx(before.item(), rel=1e-6)
    assert loss(logits, dense).item() != pytest.approx(before.item(), rel=1e-4)


def test_pseudo_dice_leaves_out_unannotated_voxels():
    plan = SimpleNamespace(ignore_label=3, num_classes=3)
    run = SimpleNamespace(targets=None, plan=plan)
    logits, seg, ignored = _softmax_case(seed=6)
    _, pred, truth = _masks(run, logits, seg)
    changed = torch.where(ignored, torch.randn_like(logits) * 10, logits)
    _, pred2, truth2 = _masks(run, changed, seg)
    assert torch.equal(pred, pred2) and torch.equal(truth, truth2)
    assert not (pred | truth)[ignored.expand_as(pred)].any()


# --- preprocessing and sampling ----------------------------------------------------------------


def test_linear_label_resampling_keeps_the_ignore_value():
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[:, 2:6, 2:6] = 1
    labels[::2] = 3
    out = resample_labels_linear(labels, (12, 16, 16), num_classes=4)
    assert set(np.unique(out).tolist()) == {0, 1, 3}
    assert np.mean(out == 3) == pytest.approx(0.5, abs=0.1)


def test_ignore_is_never_a_class_to_oversample():
    seg = np.zeros((10, 12, 12), np.uint8)
    seg[3:6, 4:8, 4:8] = 1
    seg[1::2] = 3  # ignore index, odd slices
    table, info = sample_class_locations(seg, 3, "case", ignore_index=3)
    assert set(np.unique(table[:, 0]).tolist()) == {ANNOTATED, 1}
    assert 3 not in info and info[ANNOTATED]["voxels"] == int(np.count_nonzero(seg != 3))
    annotated = table[table[:, 0] == ANNOTATED, 1:]
    assert (seg[tuple(annotated.T)] != 3).all()
    fg = table[table[:, 0] == 1, 1:]
    assert (seg[tuple(fg.T)] == 1).all()
    dense, _ = sample_class_locations(np.where(seg == 3, 0, seg), 3, "case", ignore_index=3)
    assert ANNOTATED not in dense[:, 0]  # no ignored voxel: nothing extra stored


@pytest.mark.parametrize("patch", [(4, 6, 6), (6, 6)])
def test_every_sampled_patch_holds_annotated_voxels(planned, patch):
    folder = planned / "sparse" / "preprocessed" / "3d_fullres"
    cases = sorted(p.stem for p in folder.glob("*.json") if p.stem != "manifest")
    settings = SamplerSettings(patch_size=patch, sample_size=patch, batch_size=6, num_classes=3)
    sampler = PatchSampler(folder, cases, settings, seed=3)
    centre = tuple(p // 2 for p in patch)
    for index in range(30):
        batch = sampler.batch(index)
        for j in range(batch.seg.shape[0]):
            seg = batch.seg[j, 0]
            assert (seg != IGNORE).any()
            if batch.foreground[j]:  # forced patches are centred on a real class, never on ignore
                assert seg[centre] in (1, 2)


# --- metrics and post-processing ---------------------------------------------------------------


def _label_maps(seed: int = 0):
    rng = np.random.default_rng(seed)
    ref = np.zeros((10, 16, 16), np.uint8)
    ref[2:8, 3:11, 4:12] = 1
    ref[4:6, 5:9, 6:10] = 2
    pred = ref.copy()
    pred[3:7, 2:10, 5:13] = 1
    pred[rng.random(pred.shape) < 0.05] = 2
    ref[1::3] = IGNORE
    return pred, ref


def test_metrics_do_not_see_the_prediction_under_ignored_voxels():
    pred, ref = _label_maps()
    before = case_metrics(pred, ref, (1.0, 0.8, 0.8), labels=[1, 2], ignore_label=IGNORE)
    changed = np.where(ref == IGNORE, np.random.default_rng(1).integers(0, 3, ref.shape), pred).astype(np.uint8)
    after = case_metrics(changed, ref, (1.0, 0.8, 0.8), labels=[1, 2], ignore_label=IGNORE)
    for key in ("1", "2"):
        for metric in ("dice", "iou", "hd95", "surface_dice", "tp", "fp", "fn"):
            assert after[key][metric] == pytest.approx(before[key][metric]), (key, metric)
    without = case_metrics(changed, ref, (1.0, 0.8, 0.8), labels=[1, 2])
    assert without["1"]["fp"] != before["1"]["fp"]  # a test that can fail: the mask matters
    # a perfect prediction of the annotated voxels is perfect, whatever lies under ignore
    perfect = np.where(ref == IGNORE, 2, ref)
    scores = case_metrics(perfect, ref, (1.0, 0.8, 0.8), ignore_label=IGNORE)
    assert set(scores) == {"1", "2"}  # the ignore value is never a class to evaluate
    assert all(s["dice"] == 1 and s["hd95"] == 0 and s["surface_dice"] == 1 for s in scores.values())


def test_evaluation_refuses_to_score_the_ignore_label():
    pred, ref = _label_maps()
    with pytest.raises(autounet.AutounetError, match="ignore label 3 is no class"):
        evaluate_arrays([("a", pred, ref, (1.0, 1.0, 1.0))], labels=[1, 3], ignore_label=IGNORE)


def test_postprocessing_decision_does_not_see_the_prediction_under_ignored_voxels():
    cases, changed = [], []
    rng = np.random.default_rng(2)
    for seed in range(4):
        pred, ref = _label_maps(seed)
        pred[0, 0:2, 0:2] = 1  # a stray component on an annotated slice
        cases.append((pred, ref))
        noise = np.where(ref == IGNORE, rng.integers(0, 3, ref.shape), pred).astype(np.uint8)
        noise[1, 14:16, 14:16] = 1  # and one under ignore only (slice 1 is ignored)
        changed.append((noise, ref))
    before = decide_postprocessing(cases, [1, 2], [1, 2], ignore_label=IGNORE)
    after = decide_postprocessing(changed, [1, 2], [1, 2], ignore_label=IGNORE)
    assert before.evidence["foreground"]["dice_without"] == after.evidence["foreground"]["dice_without"]
    dense = decide_postprocessing(changed, [1, 2], [1, 2])
    assert dense.evidence["foreground"]["dice_without"] != before.evidence["foreground"]["dice_without"]


# --- the whole way -----------------------------------------------------------------------------


def test_sparse_dataset_trains_predicts_without_ignore_and_evaluates(planned, sparse_v2, tmp_path, one_torch_thread):
    work = planned
    result = autounet.train(
        "sparse",
        "3d_fullres",
        0,
        work=work,
        epochs=1,
        iterations_per_epoch=2,
        validation_iterations=1,
        device="cpu",
        features=[4, 8, 8],
    )
    summary = json.loads((result.training.fold_dir / "validation" / "summary.json").read_text())
    assert summary["settings"]["ignore_label"] == IGNORE
    assert set(summary["mean"]) == {"1", "2"}
    out = tmp_path / "pred"
    autounet.predict(sparse_v2 / "imagesTr", out, model=result.training.fold_dir, device="cpu", tta=False)
    predictions = sorted(out.glob("*.nii.gz"))
    assert len(predictions) == 6
    for path in predictions:
        assert IGNORE not in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    evaluation = autounet.evaluate(out, sparse_v2 / "labelsTr", workers=1)  # ignore read from dataset.json
    assert evaluation.settings["ignore_label"] == IGNORE
    assert set(evaluation.mean) <= {"1", "2"}


def test_et_grid_search_does_not_see_the_prediction_under_ignored_voxels():
    from autounet.postprocessing.brats_et import grid_search_et_rule
    from autounet.regions import labels_to_regions, msd_brain_tumour

    regions = msd_brain_tumour()  # labels 1, 2, 3; ignore 4
    rng = np.random.default_rng(7)
    cases, changed = [], []
    for _ in range(3):
        ref = np.zeros((8, 12, 12), np.uint8)
        ref[2:6, 3:9, 3:9] = 1
        ref[3:5, 4:8, 4:8] = 2
        ref[3:5, 5:7, 5:7] = 3
        probs = np.clip(
            labels_to_regions(ref, regions).astype(np.float32) * 0.8 + rng.random((3, *ref.shape)) * 0.3, 0, 1
        )
        ref[::2] = 4
        noise = np.where(ref == 4, rng.random(probs.shape), probs).astype(np.float32)
        cases.append((probs, ref))
        changed.append((noise, ref))
    grid = dict(thresholds=(0.4, 0.5), component_voxels=(0, 5, 20), total_voxels=(0, 10, 50))
    _, before = grid_search_et_rule(cases, regions, ignore_label=4, **grid)
    _, after = grid_search_et_rule(changed, regions, ignore_label=4, **grid)
    np.testing.assert_allclose(after.region_dice, before.region_dice)
    _, dense = grid_search_et_rule(changed, regions, **grid)
    assert not np.allclose(dense.region_dice, before.region_dice)
