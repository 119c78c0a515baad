"""The BraTS recipe (seed 004): `autounet plan --recipe brats`, background detection, the one-hot
foreground channel, region training with the two best checkpoints, and the ablation switches."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from autounet.api import plan, preprocess
from autounet.cli import main
from autounet.data.image_io import read_image, read_label, write_image
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.errors import AutounetError
from autounet.inference.model import inference_checkpoints, load_stage
from autounet.inference.predictor import Predictor
from autounet.networks.unet import UNet
from autounet.pipeline.fold import train_and_validate
from autounet.planning.fingerprint import load_fingerprint
from autounet.planning.plans import load_plans
from autounet.planning.recipes import detect_background
from autounet.planning.topology import NVIDIA_FEATURES
from autounet.preprocessing.case import label_values, preprocess_case
from autounet.preprocessing.store import open_case
from autounet.training.checkpoint import load_checkpoint
from autounet.training.losses import DiceCELoss, FocalLoss, RegionLoss
from autounet.training.options import TrainOptions
from autounet.training.schedule import TrainingPreset, load_training_preset
from autounet.training.setup import model_setup
from autounet.training.trainer import _rank
from autounet.utils.plain_data import from_plain
from autounet.validation.fold import validate_trained_fold
from autounet.workspace import Workspace, checkpoint_path
from conftest import real_data_dir

# channel 0: a different background in every case (data z-scored per case); channel 1: the same
BACKGROUND = [[-3.5 - 0.1 * i, -4.0] for i in range(5)]
TINY = [4, 8, 8, 8]  # features of a network small enough to train in seconds
QUICK = dict(iterations_per_epoch=2, validation_iterations=1, device="cpu", features=TINY)


def train(work, name, options, validate=True, validation_tta=True):
    """Train one fold and validate it in full, as `autounet train` does."""
    return train_and_validate(Workspace.at(work, name), options, validate, validation_tta).training


def _with_background(raw: Path) -> Path:
    for i, path in enumerate(sorted((raw / "imagesTr").glob("*.nii.gz"))):
        image, geometry = read_image([path])
        outside = np.all(image == 0, axis=0)
        image = image.astype(np.float32)
        image[:, outside] = np.asarray(BACKGROUND[i], np.float32)[:, None]
        write_image(path, image, geometry)
    return raw


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-channel, 5-class (0..4, BRATS 2015 values) dataset with a constant non-zero background,
    planned with `--recipe brats --patch-size 16 16 16` and preprocessed."""
    root = tmp_path_factory.mktemp("brats")
    raw = make_synthetic_dataset(
        root / "raw", SyntheticSpec(cases=5, shape=(20, 24, 24), channels=2, classes=5, seed=3)
    )
    _with_background(raw)
    work = root / "W"
    code = main(
        ["plan", str(raw), "--work", str(work), "--recipe", "brats", "--patch-size", "16", "16", "16", "-j", "1"]
    )
    assert code == 0
    preprocess("raw", work=work, workers=1)
    return raw, work


@pytest.fixture(scope="module")
def trained(planned, tmp_path_factory) -> Path:
    """Fold 0 trained for 2 epochs of 2 iterations with the plan's presets (nvidia)."""
    raw, base = planned
    work = tmp_path_factory.mktemp("brats_trained") / "W"
    shutil.copytree(base, work, symlinks=True)
    train(work, "raw", TrainOptions("3d_fullres", 0, epochs=2, **QUICK))
    return work


def test_the_brats_preset_plans_one_region_configuration_with_seed_004s_choices(planned):
    _, work = planned
    plans = load_plans(work / "raw" / "plans.json")
    assert plans.recipe == "brats" and list(plans.configurations) == ["3d_fullres"]
    c = plans.configurations["3d_fullres"]
    regions = {r.name: list(r.labels) for r in c.regions.regions}
    assert regions == {"WT": [1, 2, 3, 4], "TC": [1, 3, 4], "ET": [4]}
    assert c.regions.thresholds == [0.45, 0.4, 0.45] and c.regions.hierarchical
    assert c.patch_size == [16, 16, 16] and c.batch_dice
    assert c.foreground_channel and c.num_input_channels == 3 and c.image_channels == 2
    assert all(n.scheme == "zscore" and n.use_nonzero_mask for n in c.normalization)
    assert c.background == [None, -4.0]  # per case for channel 0, the common value for channel 1
    assert c.network["downsampling"] == "strided_conv" and c.network["deep_supervision_heads"] == 2
    assert c.network["features_per_stage"] == list(NVIDIA_FEATURES[:4])  # 16^3 allows 4 stages: 16, 8, 4, 2
    assert c.training_preset == "nvidia" and c.augmentation_preset == "nvidia"
    assert load_training_preset("nvidia").deep_supervision_normalized is False


def test_the_default_preset_neither_crops_a_constant_background_nor_uses_regions(planned, tmp_path: Path):
    raw, _ = planned
    result = plan(raw, work=tmp_path / "W", workers=1)
    assert result.plans.recipe == "nnunet" and "2d" in result.plans.configurations
    c = result.plans.configurations["3d_fullres"]
    assert c.regions is None and not c.foreground_channel and c.background is None and c.network == {}
    assert c.training_preset == "paper" and c.augmentation_preset is None
    assert all(case.shape_after_crop == case.shape_before_crop for case in result.fingerprint.cases)


def test_preprocessing_crops_the_background_and_appends_the_foreground_channel(planned):
    raw, work = planned
    folder = work / "raw" / "preprocessed" / "3d_fullres"
    for i, path in enumerate(sorted((raw / "imagesTr").glob("*.nii.gz"))):
        case = path.name.replace(".nii.gz", "")
        raw_image, _ = read_image([path])
        image, seg, _, props = open_case(folder, case)
        inside = np.any(np.abs(raw_image - np.asarray(BACKGROUND[i])[:, None, None, None]) > 1e-6, axis=0)
        box = [
            [int(np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != ax)))[k]) for k in (0, -1)]
            for ax in range(3)
        ]
        assert props.crop_bbox == [[a, b + 1] for a, b in box]  # the box of the non-background voxels
        assert props.shape_after_crop != props.original_shape
        assert image.shape[0] == 3 and set(np.unique(image[2])) <= {0.0, 1.0}
        fg = image[2] > 0
        assert np.all(image[:2][:, ~fg] == 0)  # background 0 after normalisation (seed 004 §2.2)
        assert abs(float(image[0][fg].mean())) < 1e-3  # z-scored inside the nonzero region
        assert set(np.unique(seg)) <= {0, 1, 2, 3, 4}


def test_a_brats_model_trains_with_regions_and_keeps_its_two_best_checkpoints(trained):
    fold = trained / "raw" / "results" / "3d_fullres" / "fold_0"
    names = {p.name for p in fold.iterdir()}
    assert {"checkpoint_best.pt", "checkpoint_second_best.pt", "checkpoint_final.pt"} <= names
    final = load_checkpoint(fold / "checkpoint_final.pt")
    assert [r["name"] for r in final["regions"]["regions"]] == ["WT", "TC", "ET"]
    assert final["training_preset"]["name"] == "nvidia" and final["augmentation_preset"]["name"] == "nvidia"
    assert final["network_spec"]["num_outputs"] == 3 and final["network_spec"]["in_channels"] == 3
    assert (
        final["network_spec"]["downsampling"] == "strided_conv" and final["network_spec"]["features_per_stage"] == TINY
    )
    log = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    assert all(set(e["val_dice"]) == {"WT", "TC", "ET"} for e in log)
    best, second = (load_checkpoint(checkpoint_path(fold, k))["training"] for k in ("best", "second_best"))
    assert {best["epoch"], second["epoch"]} == {1, 2}  # raw Dice of each epoch, the better one is "best"
    scores = {e["epoch"]: e["val_dice_mean"] for e in log}
    assert scores[best["epoch"]] >= scores[second["epoch"]]
    assert final["training"]["best_scores"] == sorted(scores.values(), reverse=True)
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"WT", "TC", "ET"} and summary["settings"]["empty"] == "one"
    assert summary["checkpoint"]["checkpoints"] == ["best", "second_best"]


def test_inference_defaults_to_the_two_best_checkpoints_and_writes_2015_label_values(trained, planned, tmp_path: Path):
    raw, _ = planned
    fold = trained / "raw" / "results" / "3d_fullres" / "fold_0"
    assert inference_checkpoints(fold) == ["best", "second_best"]
    stage = load_stage(fold.parent)
    assert stage.extra["checkpoints"] == ["best", "second_best"] and len(stage.networks) == 2
    assert stage.activation == "sigmoid" and stage.image_channels == 2 and stage.mirror_axes == (0, 1, 2)
    assert load_stage(fold.parent, checkpoints=["final"]).extra["checkpoints"] == ["final"]
    image = sorted((raw / "imagesTr").glob("*.nii.gz"))[0]
    Predictor(fold.parent, device="cpu").predict([image], tmp_path / "out")
    seg, geometry = read_label(tmp_path / "out" / image.name)
    reference, ref_geometry = read_image([image])
    assert seg.shape == reference.shape[1:] and geometry.spacing == ref_geometry.spacing
    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4}  # 2015 values, non-enhancing (3) painted as necrosis
    again = validate_trained_fold(Workspace.at(trained, "raw"), "3d_fullres", 0, device="cpu", tta=False)
    assert again.checkpoints == ["best", "second_best"] and set(again.evaluation.mean) == {"WT", "TC", "ET"}


def test_a_resumed_run_keeps_its_switches_and_refuses_to_change_them(trained, tmp_path: Path):
    work = tmp_path / "W"
    shutil.copytree(trained, work, symlinks=True)
    with pytest.raises(AutounetError, match="network switches differ"):
        train(work, "raw", TrainOptions("3d_fullres", 0, epochs=3, resume=True, attention=True, **QUICK))
    with pytest.raises(AutounetError, match="--focal cannot change"):
        train(work, "raw", TrainOptions("3d_fullres", 0, epochs=3, resume=True, focal=True, iterations_per_epoch=2))
    result = train(
        work, "raw", TrainOptions("3d_fullres", 0, epochs=3, resume=True, iterations_per_epoch=2), validate=False
    )
    final = load_checkpoint(result.fold_dir / "checkpoint_final.pt")
    assert final["network_spec"]["features_per_stage"] == TINY and final["training"]["epoch"] == 3


def test_the_best_checkpoints_follow_the_raw_score_and_the_paper_rule_is_unchanged():
    def ranks(keep: int, scores: list[float | None]) -> list[int | None]:
        run = SimpleNamespace(preset=SimpleNamespace(best_checkpoints=keep))
        state = SimpleNamespace(best_scores=[])
        return [_rank(run, state, s) for s in scores]

    assert ranks(2, [0.5, 0.7, 0.6, 0.8, None, 0.55]) == [0, 0, 1, 0, None, None]
    assert ranks(1, [0.5, 0.7, 0.6, 0.7, 0.8]) == [0, 0, None, None, 0]  # ties keep the earlier one
    paper, nvidia = load_training_preset("paper"), load_training_preset("nvidia")
    assert (paper.best_checkpoints, paper.best_metric, paper.inference_checkpoints) == (1, "ema", ["final"])
    assert (nvidia.best_checkpoints, nvidia.best_metric) == (2, "raw")
    assert nvidia.inference_checkpoints == ["best", "second_best"]


def _setup(plan_entry, labels, **switches):
    return model_setup(plan_entry, load_training_preset("nvidia"), TrainOptions("3d_fullres", 0, **switches), labels)


def _outputs(setup, size=16):
    net = UNet(setup.spec).train()
    x = torch.randn(2, setup.spec.in_channels, size, size, size)
    out = net(x)
    return out if isinstance(out, list) else [out]


@pytest.mark.parametrize(
    "switches, check",
    [
        ({"attention": True}, lambda s: s.spec.attention_gates),
        ({"residual": True}, lambda s: s.spec.residual_encoder and s.spec.residual_decoder),
        ({"drop_block": 0.1}, lambda s: s.spec.drop_block_prob == 0.1 and s.spec.drop_block_size == 5),
        ({"deep_supervision_heads": 0}, lambda s: s.spec.deep_supervision_heads == 0),
        ({"deep_supervision_heads": 1}, lambda s: s.spec.deep_supervision_heads == 1),
        ({"features": [4, 6, 8, 10]}, lambda s: s.spec.features_per_stage == [4, 6, 8, 10]),
        ({"width_multiplier": 0.0625}, lambda s: s.spec.features_per_stage == [4, 6, 8, 12]),
        ({"foreground_channel": False}, lambda s: s.spec.in_channels == 2 and not s.plan.foreground_channel),
        ({"focal": True}, lambda s: s.preset.focal_loss and s.loss.loss.focal),
        ({}, lambda s: s.spec.in_channels == 3 and s.spec.deep_supervision_heads == 2 and not s.loss.loss.focal),
    ],
)
def test_every_ablation_switch_builds_the_network_and_loss_it_implies(planned, switches, check):
    _, work = planned
    plans = load_plans(work / "raw" / "plans.json")
    entry = plans.configurations["3d_fullres"]
    switches = (
        {"features": TINY, **switches}
        if "features" not in switches and "width_multiplier" not in switches
        else switches
    )
    setup = _setup(entry, plans.labels, **switches)
    assert check(setup)
    assert isinstance(setup.loss.loss, RegionLoss) and setup.loss.normalize is False
    outputs = _outputs(setup)
    assert len(outputs) == 1 + setup.spec.deep_supervision_heads
    assert outputs[0].shape == (2, 3, 16, 16, 16)  # one sigmoid output per region
    seg = torch.randint(0, 5, (2, 1, 16, 16, 16), dtype=torch.uint8)
    target = setup.targets(seg)
    assert target.shape == (2, 3, 16, 16, 16)
    assert torch.equal(target[:, 2], (seg[:, 0] == 4).float())  # ET = label value 4 = class index 4
    loss = setup.loss(outputs if len(outputs) > 1 else outputs[0], target)
    assert torch.isfinite(loss)


def test_deeper_and_focal_softmax_switches_on_a_paper_plan(planned, tmp_path: Path):
    raw, _ = planned
    plans = plan(raw, work=tmp_path / "W", workers=1).plans
    entry = replace(plans.configurations["3d_fullres"], patch_size=[128, 128, 128], num_pool_per_axis=[5, 5, 5])
    entry = replace(entry, pool_op_kernel_sizes=[[2, 2, 2]] * 5, conv_kernel_sizes=[[3, 3, 3]] * 6)
    setup = _setup(entry, plans.labels, deeper=True)
    assert setup.spec.features_per_stage == list(NVIDIA_FEATURES) and setup.spec.num_outputs == 5
    assert UNet(setup.spec).encoder[-1][0][0].out_channels == 512
    small = plans.configurations["3d_fullres"]
    focal = _setup(small, plans.labels, focal=True, features=[4, 8, 8])
    assert isinstance(focal.loss.loss, DiceCELoss) and isinstance(focal.loss.loss.ce, FocalLoss)
    assert focal.targets is None
    with pytest.raises(AutounetError, match="--deeper or --features"):
        _setup(small, plans.labels, deeper=True, features=[4, 8])
    with pytest.raises(AutounetError, match="planned without a foreground channel"):
        _setup(small, plans.labels, foreground_channel=True)


def test_the_train_command_passes_every_switch(monkeypatch, tmp_path: Path):
    seen = []
    monkeypatch.setattr("autounet.pipeline.fold.train_and_validate", lambda ws, options, **_: seen.append(options))
    args = ["train", "x", "-c", "3d_fullres", "-f", "0", "--work", str(tmp_path), "--attention", "--residual"]
    args += ["--drop-block", "0.1", "--focal", "--deep-supervision-heads", "0", "--features", "8", "16"]
    args += ["--width-multiplier", "2", "--no-foreground-channel"]
    assert main(args) == 0
    o = seen[0]
    assert (o.attention, o.residual, o.drop_block, o.focal, o.deep_supervision_heads) == (True, True, 0.1, True, 0)
    assert (o.features, o.width_multiplier, o.foreground_channel, o.preset) == ([8, 16], 2.0, False, None)
    assert main(["train", "x", "-c", "3d_fullres", "-f", "0", "--deeper"]) == 0
    assert (
        seen[1].deeper and seen[1].features is None and seen[1].attention is None and seen[1].foreground_channel is None
    )


def test_a_dropped_foreground_channel_is_dropped_at_inference_too(planned, tmp_path: Path):
    raw, base = planned
    work = tmp_path / "W"
    shutil.copytree(base, work, symlinks=True)
    result = train(work, "raw", TrainOptions("3d_fullres", 1, epochs=1, foreground_channel=False, **QUICK))
    final = load_checkpoint(result.fold_dir / "checkpoint_final.pt")
    assert final["plan"]["foreground_channel"] is False and final["network_spec"]["in_channels"] == 2
    assert json.loads((result.fold_dir / "validation" / "summary.json").read_text())["n_cases"] == 1
    image = sorted((raw / "imagesTr").glob("*.nii.gz"))[0]
    out = Predictor(result.fold_dir, device="cpu", tta=False).predict([image], tmp_path / "out")
    assert out and (tmp_path / "out" / image.name).is_file()


def test_old_plans_and_presets_without_the_new_fields_still_load(planned, tmp_path: Path):
    _, work = planned
    data = json.loads((work / "raw" / "plans.json").read_text())
    data.pop("recipe")
    for c in data["configurations"].values():
        for key in ("regions", "foreground_channel", "background", "network", "training_preset", "augmentation_preset"):
            c.pop(key)
    (tmp_path / "plans.json").write_text(json.dumps(data))
    old = load_plans(tmp_path / "plans.json")
    c = old.configurations["3d_fullres"]
    assert old.recipe == "nnunet" and c.regions is None and not c.foreground_channel and c.network == {}
    assert c.background is None and c.training_preset == "paper" and c.augmentation_preset is None
    preset = json.loads((resources.files("autounet.presets") / "training" / "paper.json").read_text())
    for key in ("best_checkpoints", "best_metric", "inference_checkpoints", "focal_loss"):
        preset.pop(key)
    loaded = from_plain(TrainingPreset, preset)
    assert loaded.best_checkpoints == 1 and loaded.inference_checkpoints == ["final"] and not loaded.focal_loss


def test_background_detection_rules(planned):
    _, work = planned
    fp = load_fingerprint(work / "raw" / "fingerprint.json")
    assert detect_background(fp) == [None, -4.0]
    same = replace(fp, cases=[replace(c, corner_values=[-1.5, None]) for c in fp.cases])
    assert detect_background(same) == [-1.5, 0.0]
    old = replace(fp, cases=[replace(c, corner_values=None) for c in fp.cases])
    assert detect_background(old) == [None, None]  # no record: each case's own corners


def test_declared_regions_are_trained_by_both_recipes(tmp_path: Path):
    spec = SyntheticSpec(cases=4, shape=(12, 14, 14), channels=1, classes=3, seed=4, layout="nnunetv2")
    raw = make_synthetic_dataset(tmp_path / "v2", spec)
    d = json.loads((raw / "dataset.json").read_text())
    d["labels"] = {"background": 0, "whole": [1, 2], "inner": 2}
    (raw / "dataset.json").write_text(json.dumps(d))
    plans = plan(raw, work=tmp_path / "W", workers=1).plans
    assert plans.configurations and all(c.regions.names == ["whole", "inner"] for c in plans.configurations.values())
    assert not any(c.previous_stage for c in plans.configurations.values())
    brats = plan(
        fingerprint=tmp_path / "W" / "v2" / "fingerprint.json", work=tmp_path / "W2", name="v2", recipe="brats"
    )
    assert brats.plans.configurations["3d_fullres"].regions.names == ["whole", "inner"]
    with pytest.raises(AutounetError, match="not a BraTS convention"):
        plan(
            make_synthetic_dataset(tmp_path / "k3", SyntheticSpec(cases=3, classes=3, shape=(8, 8, 8))),
            work=tmp_path / "W3",
            recipe="brats",
            workers=1,
        )
    with pytest.raises(AutounetError, match="--recipe brats only"):
        plan(raw, work=tmp_path / "W", workers=1, patch_size=[16, 16, 16])


@pytest.mark.skipif(real_data_dir() is None, reason="real data not available")
def test_brats2015_mini_is_cropped_to_the_brain_with_the_recipes_patch(tmp_path: Path):
    data = real_data_dir() / "brats2015-mini"
    result = plan(data, work=tmp_path / "W", workers=2, recipe="brats")
    c = result.plans.configurations["3d_fullres"]
    assert c.patch_size == [128, 128, 128] and c.batch_size == 2 and c.background == [None, None]
    assert c.network["features_per_stage"] == list(NVIDIA_FEATURES)
    shapes = np.array([[b - a for a, b in case.background_crop_bbox] for case in result.fingerprint.cases])
    assert np.all(shapes < [155, 240, 240]) and np.all(np.median(shapes, axis=0) < [150, 180, 150])
    image, geometry = read_image([data / "imagesTr" / "brats_2013_pat0001_1.nii.gz"])
    label, _ = read_label(data / "labelsTr" / "brats_2013_pat0001_1.nii.gz")
    case = preprocess_case("pat1", image, geometry, label, c, label_values(result.plans.labels))
    assert case.image.shape[0] == 3 and case.properties.shape_after_crop == [132, 176, 136]
    assert float(np.abs(case.image[:2][:, case.image[2] == 0]).max()) == 0.0
