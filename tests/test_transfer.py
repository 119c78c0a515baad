"""Transfer and fine-tuning: `plan --plans-from` (planning/transfer.py) and `train --pretrained` (training/pretrained.py)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from autounet.api import info, plan, preprocess, train
from autounet.cli import main as cli
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.errors import AutounetError
from autounet.networks.spec import NetworkSpec
from autounet.networks.unet import UNet
from autounet.planning.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from autounet.planning.planner import plan_experiment
from autounet.planning.plans import load_plans
from autounet.planning.recipes import plan_brats
from autounet.planning.transfer import TRANSFER_NOTE, plans_from_source
from autounet.training.assemble import assemble_run
from autounet.training.checkpoint import load_checkpoint, save_checkpoint
from autounet.training.options import TrainOptions
from autounet.training.pretrained import load_matching_weights, pretrained_checkpoint
from autounet.workspace import Workspace, checkpoint_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stats(mean: float = 100.0, low: float = 10.0, high: float = 250.0) -> IntensityStats:
    return IntensityStats(
        mean=mean, std=20.0, min=0.0, max=300.0, median=mean, percentile_00_5=low, percentile_99_5=high, num_samples=99
    )


def fingerprint(
    shape=(36, 50, 35), spacing=(1.0, 1.0, 1.0), cases=200, channels=("MRI",), labels=None, intensity=None
) -> Fingerprint:
    """A fingerprint of ``cases`` identical cases."""
    case = CaseFingerprint(
        case_id="c",
        spacing=list(spacing),
        shape_before_crop=list(shape),
        shape_after_crop=list(shape),
        crop_bbox=[[0, s] for s in shape],
        crop_voxel_fraction=1.0,
        label_voxel_counts={"0": 1, "1": 1},
        components_per_class={"1": 1},
        foreground_source="label",
        foreground_intensity=[{"mean": 0.0, "std": 1.0, "min": 0.0, "max": 1.0}] * len(channels),
        orientation="RAS",
        corner_values=[0.0] * len(channels),
    )
    return Fingerprint(
        dataset_name="new",
        layout="msd",
        channel_names=list(channels),
        labels=labels or {"0": "background", "1": "a", "2": "b"},
        component_connectivity=26,
        foreground_intensity_per_channel=[intensity or stats()] * len(channels),
        cases=[replace(case, case_id=f"c{i}") for i in range(cases)],
    )


# --- planning from a source -------------------------------------------------------------------------


def test_transferred_plans_keep_the_sources_networks_and_rederive_the_batch_for_the_new_dataset():
    source = plan_experiment(replace(fingerprint(shape=(36, 50, 35), cases=260), dataset_name="hippocampus"))
    new_fp = fingerprint(shape=(30, 44, 40), spacing=(1.2, 1.0, 1.0), cases=20)
    plans = plans_from_source(source, new_fp, "W/hippocampus")
    assert list(plans.configurations) == list(source.configurations)
    for name, c in plans.configurations.items():
        s = source.configurations[name]
        for key in ("spacing", "patch_size", "num_pool_per_axis", "pool_op_kernel_sizes", "conv_kernel_sizes"):
            assert getattr(c, key) == getattr(s, key), key
        assert c.features_per_stage == s.features_per_stage and c.transpose_forward == s.transpose_forward
        assert [n.scheme for n in c.normalization] == [n.scheme for n in s.normalization]
        assert c.num_classes == 3 and c.num_input_channels == 1
    assert source.configurations["3d_fullres"].batch_size == 9  # seed 001 Table 1 (260 cases)
    # 20 cases: 5% of 20 x 36x44x40 voxels is less than one 40x56x40 patch: the rule's minimum, 2.
    assert plans.configurations["3d_fullres"].batch_size == 2
    assert plans.configurations["3d_fullres"].median_shape == [36, 44, 40]  # at the source's 1 mm spacing
    assert plans.notes[0].startswith(f"{TRANSFER_NOTE}W/hippocampus (hippocampus")
    assert any("batch 2 here, 9 in the source" in n for n in plans.notes)
    assert any("resampled to the source's 1x1x1 mm" in n for n in plans.notes)
    assert plans.planner == "transfer:nnunet-paper" and plans.dataset_name == "new"


def test_the_batch_follows_the_planners_rule_where_the_new_dataset_would_get_the_same_patch():
    """Same shapes and spacing, fewer cases: plan_experiment makes the same patch, so the batch must agree."""
    source = plan_experiment(fingerprint(cases=260))
    for cases in (4, 30, 60, 120):
        native = plan_experiment(fingerprint(cases=cases))
        transferred = plans_from_source(source, fingerprint(cases=cases), "S")
        for name, c in transferred.configurations.items():
            assert c.patch_size == native.configurations[name].patch_size
            assert c.batch_size == native.configurations[name].batch_size, (cases, name)


def test_ct_channels_keep_the_sources_normalisation_statistics_and_say_so():
    """As nnU-Net transfers plans: the pretrained network sees inputs scaled as in its training."""
    source = plan_experiment(fingerprint(channels=("CT",), intensity=stats(mean=40.0, low=-100.0, high=200.0)))
    new = fingerprint(channels=("CT",), cases=30, intensity=stats(mean=300.0, low=50.0, high=900.0))
    plans = plans_from_source(source, new, "S")
    for name, c in plans.configurations.items():
        (n,) = c.normalization
        assert n == source.configurations[name].normalization[0]
        assert n.scheme == "ct" and (n.clip_low, n.clip_high, n.mean, n.std) == (-100.0, 200.0, 40.0, 20.0)
    (note,) = [n for n in plans.notes if "CT): the source's normalisation is kept" in n]
    assert "clip -100 to 200, mean 40, std 20" in note and "would give clip 50 to 900, mean 300" in note


def test_a_different_channel_count_is_refused_naming_both_counts():
    source = plan_experiment(fingerprint(channels=("T1", "T2")))
    with pytest.raises(AutounetError, match=r"2 image channel\(s\) \(T1, T2\) and this dataset has 1 \(MRI\)"):
        plans_from_source(source, fingerprint(), "W/two")


def test_other_labels_set_the_output_count_and_the_cascade_inputs():
    source = plan_experiment(fingerprint(shape=(200, 300, 300), cases=50))  # large: a cascade is planned
    assert "3d_cascade_fullres" in source.configurations
    labels = {"0": "background", "1": "a", "2": "b", "3": "c", "4": "d"}
    plans = plans_from_source(source, fingerprint(shape=(200, 300, 300), cases=50, labels=labels), "S")
    assert {c.num_classes for c in plans.configurations.values()} == {5}
    assert plans.configurations["3d_cascade_fullres"].num_input_channels == 1 + 4
    assert plans.labels == labels
    assert any(n.startswith("labels differ") and "5 classes" in n for n in plans.notes)


def test_a_brats_source_rederives_its_regions_and_background_from_the_new_labels():
    brats_labels = {"0": "background", "1": "necrosis", "2": "edema", "3": "non-enhancing", "4": "enhancing"}
    source = plan_brats(fingerprint(shape=(40, 48, 40), cases=20, channels=("a", "b"), labels=brats_labels))
    new_labels = {"0": "background", "1": "edema", "2": "non-enhancing", "3": "enhancing"}  # BraTS 2017 values
    plans = plans_from_source(
        source, fingerprint(shape=(40, 48, 40), cases=8, channels=("a", "b"), labels=new_labels), "S"
    )
    c = plans.configurations["3d_fullres"]
    assert plans.recipe == "brats" and c.training_preset == "nvidia" and c.foreground_channel
    assert c.regions.names == ["WT", "TC", "ET"] and c.num_input_channels == 3
    assert c.network == source.configurations["3d_fullres"].network
    assert c.regions != source.configurations["3d_fullres"].regions  # other label values


# --- the command ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """Workspace W with ``source`` (3 classes) planned, preprocessed and fold 0 of 3d_fullres trained briefly."""
    root = tmp_path_factory.mktemp("transfer")
    raw = make_synthetic_dataset(root / "source", SyntheticSpec(cases=6, shape=(12, 14, 16), classes=3, seed=1))
    plan(raw, work=root / "W", workers=1)
    preprocess("source", work=root / "W", configurations=["3d_fullres"], workers=1)
    options = dict(epochs=1, iterations_per_epoch=1, validation_iterations=1, validate=False)
    train("source", "3d_fullres", 0, work=root / "W", **options)
    return root


def test_plan_from_a_workspace_writes_plans_that_name_their_source(pretrained: Path, tmp_path: Path, capsys):
    raw = make_synthetic_dataset(tmp_path / "target", SyntheticSpec(cases=5, shape=(10, 16, 15), classes=4, seed=2))
    assert (
        cli(
            [
                "plan",
                str(raw),
                "--work",
                str(tmp_path / "W"),
                "-j",
                "1",
                "--plans-from",
                str(pretrained / "W" / "source"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"note: plans from {pretrained / 'W' / 'source'}" in out
    plans = load_plans(tmp_path / "W" / "target" / "plans.json")
    source = load_plans(pretrained / "W" / "source" / "plans.json")
    assert plans.configurations["3d_fullres"].patch_size == source.configurations["3d_fullres"].patch_size
    assert plans.configurations["3d_fullres"].num_classes == 4


def test_plan_from_refuses_a_recipe_and_a_missing_source(pretrained: Path, tmp_path: Path, capsys):
    raw = make_synthetic_dataset(tmp_path / "target", SyntheticSpec(cases=4, shape=(10, 12, 12), classes=3, seed=3))
    source = str(pretrained / "W" / "source")
    assert cli(["plan", str(raw), "--work", str(tmp_path / "W"), "--plans-from", source, "--recipe", "brats"]) == 2
    assert "without --recipe" in capsys.readouterr().err
    assert cli(["plan", str(raw), "--work", str(tmp_path / "W"), "--plans-from", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli(["plan", str(raw), "--work", str(tmp_path / "W"), "--plans-from", str(tmp_path)]) == 2
    assert "no plans.json" in capsys.readouterr().err
    assert not (tmp_path / "W" / "target").exists()  # refused before anything was written


# --- loading matching weights ------------------------------------------------------------------------


def spec(outputs: int = 3, dims: int = 3, features=(4, 8, 16)) -> NetworkSpec:
    k = [[3] * dims] * len(features)
    return NetworkSpec(dims, 1, outputs, list(features), k, [[2] * dims] * (len(features) - 1))


def checkpoint_of(network: torch.nn.Module, path: Path, **extra) -> Path:
    save_checkpoint(
        path, {"state_dict": network.state_dict(), "dataset": "src", "configuration": "3d_fullres", **extra}
    )
    return path


def test_matching_tensors_are_loaded_and_other_heads_reinitialised(tmp_path: Path):
    torch.manual_seed(0)
    source = UNet(spec(outputs=3))
    path = checkpoint_of(source, tmp_path / "source.pt", fold=0)
    torch.manual_seed(1)
    target = UNet(spec(outputs=5))
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    result = load_matching_weights(target, "SRC", path)
    theirs, ours = source.state_dict(), target.state_dict()
    assert sorted(result.reinitialised) == ["heads.0.bias", "heads.0.weight"]
    assert result.loaded and all(torch.equal(ours[k], theirs[k]) for k in result.loaded)
    assert all(torch.equal(ours[k], fresh[k]) for k in result.reinitialised)
    table = result.format()
    assert "initialised from SRC (source.pt: dataset src, configuration 3d_fullres, fold 0)" in table
    assert "heads.0.weight (5x4x1x1x1 here, 3x4x1x1x1 in the source)" in table
    assert f"total     {len(ours)}" in table and len(table.splitlines()) < 12
    assert result.record()["reinitialised"] == ["heads.0.bias", "heads.0.weight"]


@pytest.mark.parametrize(
    "labels, copied",
    [
        ({"0": "background", "1": "a", "2": "b"}, True),
        ({"0": "background", "1": "liver", "2": "tumour"}, False),  # same count, other classes
        ({"0": "background", "1": "b", "2": "a"}, False),  # the same names on other values
    ],
)
def test_same_shaped_heads_are_copied_only_for_the_same_labels(tmp_path: Path, labels, copied):
    torch.manual_seed(0)
    source = UNet(spec(outputs=3))
    path = checkpoint_of(source, tmp_path / "source.pt", labels={"0": "background", "1": "a", "2": "b"}, regions=None)
    torch.manual_seed(1)
    target = UNet(spec(outputs=3))
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    result = load_matching_weights(target, "SRC", path, labels=labels)
    ours, theirs = target.state_dict(), source.state_dict()
    heads = ["heads.0.bias", "heads.0.weight"]
    assert all(torch.equal(ours[k], (theirs if copied else fresh)[k]) for k in heads)
    assert sorted(result.reinitialised) == ([] if copied else heads)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("heads."))
    if not copied:
        assert "re-initialised, the source's labels differ (0 background, 1 a, 2 b there," in result.format()


def test_a_source_without_a_matching_encoder_tensor_is_refused(tmp_path: Path):
    path = checkpoint_of(UNet(spec(dims=2)), tmp_path / "two_d.pt")
    target = UNet(spec(dims=3))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AutounetError, match="none of the network's .* encoder convolution weights matches"):
        load_matching_weights(target, "SRC", path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_a_source_checkpoint_that_would_run_code_is_refused(tmp_path: Path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "autounet-checkpoint", "version": 1, "state_dict": {}, "hook": print}, path)
    with pytest.raises(AutounetError, match="refused"):
        load_matching_weights(UNet(spec()), "SRC", path)


def test_the_source_resolves_from_a_file_fold_configuration_or_workspace(tmp_path: Path):
    ws = Workspace.at(tmp_path, "src")
    ws.root.mkdir()
    ws.plans_json.write_text("{}")
    net = UNet(spec())
    fold0, fold3, fold_all = (ws.fold_dir("3d_fullres", f) for f in (0, 3, "all"))
    checkpoint_of(net, checkpoint_path(fold3, "final"))
    checkpoint_of(net, checkpoint_path(fold0, "latest"))
    checkpoint_of(net, checkpoint_path(fold0, "best"))
    assert pretrained_checkpoint(fold0, "3d_fullres") == checkpoint_path(fold0, "best")  # best before latest
    assert pretrained_checkpoint(ws.results_dir("3d_fullres"), "2d") == checkpoint_path(fold0, "best")  # lowest fold
    checkpoint_of(net, checkpoint_path(fold_all, "final"))
    assert pretrained_checkpoint(ws.results_dir("3d_fullres"), "2d") == checkpoint_path(fold_all, "final")
    assert pretrained_checkpoint(ws.root, "3d_fullres") == checkpoint_path(fold_all, "final")
    assert pretrained_checkpoint(checkpoint_path(fold3, "final"), "2d") == checkpoint_path(fold3, "final")
    with pytest.raises(AutounetError, match=r"no trained 2d \(configurations there: 3d_fullres\)"):
        pretrained_checkpoint(ws.root, "2d")
    with pytest.raises(AutounetError, match="not found"):
        pretrained_checkpoint(tmp_path / "nothing", "2d")


# --- training with --pretrained -----------------------------------------------------------------------


@pytest.fixture
def target(pretrained: Path, tmp_path: Path) -> Path:
    """A 4-class dataset planned --plans-from the source workspace and preprocessed, in its own work folder."""
    raw = make_synthetic_dataset(tmp_path / "target", SyntheticSpec(cases=6, shape=(12, 14, 16), classes=4, seed=4))
    plan(raw, work=tmp_path / "W", workers=1, plans_from=pretrained / "W" / "source")
    preprocess("target", work=tmp_path / "W", configurations=["3d_fullres"], workers=1)
    return tmp_path / "W"


def test_assembling_a_new_run_loads_the_sources_weights_and_reinitialises_the_heads(pretrained: Path, target: Path):
    source = pretrained / "W" / "source"
    options = TrainOptions("3d_fullres", 1, epochs=1, pretrained=str(source), device="cpu")
    run, stored = assemble_run(Workspace.at(target, "target"), options)
    theirs = load_checkpoint(checkpoint_path(source / "results" / "3d_fullres" / "fold_0", "final"))["state_dict"]
    ours = run.network.state_dict()
    assert stored is None and run.pretrained is not None
    assert sorted(run.pretrained.reinitialised) == ["heads.0.bias", "heads.0.weight"]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("heads."))
    assert ours["heads.0.weight"].shape[0] == 4 and theirs["heads.0.weight"].shape[0] == 3
    assert run.initialised_from["source"] == str(source) and run.initialised_from["fold"] == 0


def test_a_dataset_with_other_label_names_gets_fresh_heads_as_its_plans_say(pretrained: Path, tmp_path: Path):
    """Three classes on both sides: the heads fit by shape, and are still re-initialised."""
    raw = make_synthetic_dataset(tmp_path / "renamed", SyntheticSpec(cases=6, shape=(12, 14, 16), classes=3, seed=4))
    descriptor = json.loads((raw / "dataset.json").read_text())
    descriptor["labels"] = {"0": "background", "1": "liver", "2": "tumour"}
    (raw / "dataset.json").write_text(json.dumps(descriptor))
    source = pretrained / "W" / "source"
    planned = plan(raw, work=tmp_path / "W", workers=1, plans_from=source)
    assert any(n.startswith("labels differ") and "re-initialises their output heads" in n for n in planned.plans.notes)
    preprocess("renamed", work=tmp_path / "W", configurations=["3d_fullres"], workers=1)
    options = TrainOptions("3d_fullres", 0, epochs=1, pretrained=str(source), device="cpu")
    run, _ = assemble_run(Workspace.at(tmp_path / "W", "renamed"), options)
    theirs = load_checkpoint(checkpoint_path(source / "results" / "3d_fullres" / "fold_0", "final"))["state_dict"]
    ours = run.network.state_dict()
    assert ours["heads.0.weight"].shape == theirs["heads.0.weight"].shape
    assert sorted(run.pretrained.reinitialised) == ["heads.0.bias", "heads.0.weight"]
    assert not torch.equal(ours["heads.0.weight"], theirs["heads.0.weight"])


def test_a_fine_tuned_fold_records_its_source_and_a_resume_does_not_reload_it(pretrained: Path, target: Path, capsys):
    source = str(pretrained / "W" / "source")
    args = ["train", "target", "-c", "3d_fullres", "-f", "0", "--work", str(target), "--iters-per-epoch", "1"]
    args += ["--val-iters", "1", "--no-validate", "--pretrained", source]
    assert cli([*args, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert f"initialised from {source} (checkpoint_final.pt: dataset source, configuration 3d_fullres, fold 0" in out
    assert "heads     2        0       2" in out
    fold = target / "target" / "results" / "3d_fullres" / "fold_0"
    final = load_checkpoint(checkpoint_path(fold, "final"))
    assert final["initialised_from"]["source"] == source and final["initialised_from"]["epoch"] == 1
    assert cli([*args, "--epochs", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "not applied: a resumed run continues from its own checkpoint" in out and "initialised from" not in out
    assert load_checkpoint(checkpoint_path(fold, "final"))["initialised_from"] == final["initialised_from"]
    (described,) = [c for c in info(target / "target").configurations if c.name == "3d_fullres"]
    assert described.initialised_from == f"{source} (dataset source, configuration 3d_fullres, fold 0, epoch 1)"


def test_a_pretrained_network_of_another_topology_is_refused_before_training(pretrained: Path, tmp_path: Path, capsys):
    raw = make_synthetic_dataset(tmp_path / "other", SyntheticSpec(cases=6, shape=(24, 28, 30), classes=3, seed=5))
    plan(raw, work=tmp_path / "W", workers=1)  # its own plans: other features and pools
    preprocess("other", work=tmp_path / "W", configurations=["2d"], workers=1)
    source = pretrained / "W" / "source" / "results" / "3d_fullres"
    args = ["train", "other", "-c", "2d", "-f", "0", "--work", str(tmp_path / "W"), "--pretrained", str(source)]
    assert cli(args) == 2
    assert "encoder convolution weights matches" in capsys.readouterr().err
    assert not (tmp_path / "W" / "other" / "results" / "2d" / "fold_0").exists()


def test_a_model_package_is_a_source_for_plans_and_weights(monkeypatch, pretrained: Path, tmp_path: Path, capsys):
    """`--plans-from` and `--pretrained` take a package .zip (opened by autounet.packaging.open_package)."""
    from autounet.api import package, select, validate

    monkeypatch.setenv("AUTOUNET_CACHE", str(tmp_path / "cache"))
    shutil.copytree(pretrained / "W" / "source", tmp_path / "S" / "source")  # a package needs a selection
    validate("source", "3d_fullres", 0, work=tmp_path / "S", tta=False)
    select("source", work=tmp_path / "S", workers=1)
    zipped = tmp_path / "model.zip"
    package(tmp_path / "S" / "source", zipped, configurations=["3d_fullres"], folds=[0])
    raw = make_synthetic_dataset(tmp_path / "target", SyntheticSpec(cases=6, shape=(12, 14, 16), classes=3, seed=6))
    result = plan(raw, work=tmp_path / "W", workers=1, plans_from=zipped)
    assert result.plans.notes[0].startswith(f"plans from {zipped} (source")
    source_plans = load_plans(pretrained / "W" / "source" / "plans.json")
    assert result.plans.configurations["3d_fullres"].patch_size == source_plans.configurations["3d_fullres"].patch_size
    preprocess("target", work=tmp_path / "W", configurations=["3d_fullres"], workers=1)
    options = dict(epochs=1, iterations_per_epoch=1, validation_iterations=1, validate=False)
    train("target", "3d_fullres", 0, work=tmp_path / "W", pretrained=zipped, **options)
    assert "total     28       28      0" in capsys.readouterr().out  # same labels: every tensor loaded
    final = load_checkpoint(checkpoint_path(Workspace.at(tmp_path / "W", "target").fold_dir("3d_fullres", 0), "final"))
    assert final["initialised_from"]["source"] == str(zipped)
    assert final["initialised_from"]["checkpoint"].startswith(str(tmp_path / "cache"))
    assert json.loads((tmp_path / "W" / "target" / "plans.json").read_text())["planner"] == "transfer:nnunet-paper"
