"""`--recipe nnunetv2 | resenc-m | resenc-l | resenc-xl` against nnU-Net v2.8.1 itself.

The oracle: tests/fixtures/nnunetv2/<dataset>/ holds nnU-Net's dataset.json, its
dataset_fingerprint.json and the plans its planners made (benchmarks/nnunetv2_oracle.sh made
them; nnU-Net is not needed here). Each dataset is planned from nnU-Net's own fingerprint through
`autounet.plan(fingerprint=...)`, and every configuration is compared field by field.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autounet.api import plan
from autounet.errors import AutounetError
from autounet.networks.spec import spec_from_plan
from autounet.planning.fingerprint import save_fingerprint
from autounet.planning.nnunet_fingerprint import fingerprint_from_nnunet
from autounet.planning.planner_v2 import plan_v2
from autounet.planning.plans import load_plans
from autounet.planning.recipes import plan_with_recipe

FIXTURES = Path(__file__).parent / "fixtures" / "nnunetv2"
DATASETS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) if FIXTURES.is_dir() else []
# nnU-Net's plans file -> (our recipe, --gpu-memory-target)
PLANS = {
    "nnUNetPlans.json": ("nnunetv2", None),
    "nnUNetPlans_12GB.json": ("nnunetv2", 12.0),
    "nnUNetResEncUNetMPlans.json": ("resenc-m", None),
    "nnUNetResEncUNetLPlans.json": ("resenc-l", None),
    "nnUNetResEncUNetXLPlans.json": ("resenc-xl", None),
}
SCHEMES = {"ZScoreNormalization": "zscore", "CTNormalization": "ct"}


def nnunet_fingerprint(dataset: str):
    return fingerprint_from_nnunet(FIXTURES / dataset / "dataset_fingerprint.json", FIXTURES / dataset / "dataset.json")


def their_configurations(plans: dict) -> dict[str, dict]:
    out = {}
    for name, c in plans["configurations"].items():
        while "inherits_from" in c:  # the cascade's full-resolution stage
            parent = plans["configurations"][c["inherits_from"]]
            c = {**parent, **{k: v for k, v in c.items() if k != "inherits_from"}}
        out[name] = c
    return out


def test_the_oracle_covers_four_datasets_and_every_preset():
    assert len(DATASETS) >= 4, f"fixtures missing in {FIXTURES}"
    for d in DATASETS:
        assert all((FIXTURES / d / name).is_file() for name in PLANS), d
    assert (FIXTURES / "VERSION").read_text().split() == ["nnunetv2", "2.8.1"]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("plans_file", list(PLANS))
def test_plans_equal_nnunet_v2(dataset, plans_file, tmp_path):
    recipe, memory = PLANS[plans_file]
    save_fingerprint(nnunet_fingerprint(dataset), tmp_path / "fingerprint.json")
    result = plan(
        fingerprint=tmp_path / "fingerprint.json", work=tmp_path, name="ds", recipe=recipe, gpu_memory_target_gb=memory
    )
    ours = load_plans(result.workspace.plans_json)  # what was written, read back
    theirs = json.loads((FIXTURES / dataset / plans_file).read_text())
    assert ours.recipe == recipe and ours.gpu_memory_target_gb == (memory or theirs_memory(recipe))
    configs = their_configurations(theirs)
    assert sorted(ours.configurations) == sorted(configs)
    for name, c in configs.items():
        mine = ours.configurations[name]
        arch = c["architecture"]["arch_kwargs"]
        dims = len(c["patch_size"])
        where = f"{dataset} {plans_file} {name}"
        assert mine.transpose_forward == theirs["transpose_forward"], where
        assert mine.spacing[-dims:] == pytest.approx(c["spacing"], rel=1e-12), where
        assert mine.patch_size == c["patch_size"], where
        assert mine.batch_size == c["batch_size"], where
        assert mine.pool_op_kernel_sizes == arch["strides"][1:], where
        assert all(s == 1 for s in arch["strides"][0]), where
        assert mine.conv_kernel_sizes == arch["kernel_sizes"], where
        assert mine.features_per_stage == arch["features_per_stage"], where
        spec = spec_from_plan(mine)
        if "n_blocks_per_stage" in arch:
            assert spec.encoder_blocks_per_stage == arch["n_blocks_per_stage"], where
        else:
            assert spec.encoder_blocks_per_stage == [] and arch["n_conv_per_stage"] == [2] * len(arch["strides"])
        assert [spec.decoder_convs_per_stage] * (spec.num_stages - 1) == arch["n_conv_per_stage_decoder"], where
        assert mine.batch_dice == c["batch_dice"], where
        assert [n.scheme for n in mine.normalization] == [SCHEMES[s] for s in c["normalization_schemes"]], where
        assert [n.use_nonzero_mask for n in mine.normalization] == c["use_mask_for_norm"], where
        assert (mine.previous_stage, mine.next_stage) == (c.get("previous_stage"), c.get("next_stage")), where
        assert mine.feature_map_voxels > 0 and mine.estimated_memory_gb > 0


def theirs_memory(recipe: str) -> float:
    return {"nnunetv2": 8.0, "resenc-m": 8.0, "resenc-l": 24.0, "resenc-xl": 40.0}[recipe]


@pytest.mark.parametrize("dataset", DATASETS)
def test_resenc_reuses_the_default_2d_and_fullres_data(dataset):
    fp = nnunet_fingerprint(dataset)
    default = plan_v2(fp, "nnunetv2")
    for recipe in ("resenc-m", "resenc-l", "resenc-xl"):
        plans = plan_v2(fp, recipe)
        for name, c in plans.configurations.items():
            if name in ("2d", "3d_fullres", "3d_cascade_fullres"):
                d = default.configurations[name if name != "3d_cascade_fullres" else "3d_fullres"]
                assert c.data_identifier == d.data_identifier and c.spacing == d.spacing
                assert c.normalization == d.normalization
            else:
                assert c.data_identifier == f"{recipe}_3d_lowres"


def test_memory_target_grows_patch_or_batch_and_is_checked():
    dataset = next(d for d in DATASETS if "SynthCT" in d)
    fp = nnunet_fingerprint(dataset)
    small, large = plan_v2(fp, "resenc-l", 8), plan_v2(fp, "resenc-l", 80)
    a, b = small.configurations["3d_fullres"], large.configurations["3d_fullres"]
    assert np.prod(b.patch_size) * b.batch_size > np.prod(a.patch_size) * a.batch_size
    assert small.gpu_memory_target_gb == 8 and large.gpu_memory_target_gb == 80
    for recipe, memory in (("nnunet", 8), ("brats", 8), ("resenc-m", 0), ("resenc-m", float("nan"))):
        with pytest.raises(AutounetError, match="gpu-memory-target"):
            plan_with_recipe(fp, recipe, gpu_memory_target_gb=memory)


def test_our_fingerprint_equals_nnunets_where_the_planners_read_it(tmp_path):
    """The anisotropic synthetic dataset, made again exactly as benchmarks/nnunetv2_oracle.sh made
    it: our spacings, cropped shapes and median crop fraction equal nnU-Net's. (The foreground
    intensity statistics are sampled differently and are not compared; they set only the CT
    normalisation's numbers, no planned field.)"""
    from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
    from autounet.planning.run import fingerprint_dataset

    dataset = next(d for d in DATASETS if "SynthAniso" in d)
    spec = SyntheticSpec(
        cases=12, shape=(20, 160, 160), spacing=(5, 0.7, 0.7), spacing_jitter=0.3, classes=3, seed=2, layout="nnunetv2"
    )
    raw = make_synthetic_dataset(tmp_path / dataset, spec)
    _, ours = fingerprint_dataset(raw, workers=1)
    theirs = json.loads((FIXTURES / dataset / "dataset_fingerprint.json").read_text())
    cases = sorted(ours.cases, key=lambda c: c.case_id)
    assert [c.spacing for c in cases] == theirs["spacings"]
    assert [c.shape_after_crop for c in cases] == theirs["shapes_after_crop"]
    fraction = float(np.median([c.crop_voxel_fraction for c in cases]))
    assert fraction == pytest.approx(theirs["median_relative_size_after_cropping"], rel=1e-12)


def test_plans_table_shows_recipe_memory_and_blocks():
    from autounet.planning.summary import format_plans

    text = format_plans(plan_v2(nnunet_fingerprint(DATASETS[0]), "resenc-m", 10))
    assert "recipe: resenc-m (training preset poly), GPU memory target 10 GB" in text
    assert "network 3d_fullres: residual encoder, blocks per stage 1,3,4,6" in text
    assert "GB estimated at batch" in text


def test_a_damaged_nnunet_fingerprint_is_refused_naming_the_file(tmp_path):
    source = FIXTURES / DATASETS[0]
    data = json.loads((source / "dataset_fingerprint.json").read_text())
    for change, message in (
        ({"spacings": data["spacings"][:-1]}, "spacings for"),
        ({"shapes_after_crop": [[1, 2]]}, "expected 3 values"),
        ({"median_relative_size_after_cropping": "x"}, "expected a number"),
        ({"foreground_intensity_properties_per_channel": {}}, "every channel"),
    ):
        broken = tmp_path / "dataset_fingerprint.json"
        broken.write_text(json.dumps({**data, **change}))
        with pytest.raises(AutounetError, match=message) as info:
            fingerprint_from_nnunet(broken, source / "dataset.json")
        assert str(broken) in str(info.value)
