import json
from pathlib import Path

import numpy as np
import pytest

from autounet.errors import AutounetError
from autounet.postprocessing.brats_et import (
    EtRule,
    apply_et_rule,
    brats_postprocess,
    et_labels,
    grid_search_et_rule,
)
from autounet.regions import brats_2015, brats_2017, labels_to_regions, regions_from_v2
from autounet.utils.plain_data import from_plain, to_plain


def _volume_with_et(et_voxels: tuple[slice, ...], prob: float, shape=(24, 24, 24)):
    labels = np.zeros(shape, np.uint8)
    labels[2:22, 2:22, 2:22] = 2  # edema
    labels[6:18, 6:18, 6:18] = 1  # necrosis
    labels[et_voxels] = 4
    p = np.zeros(shape, np.float32)
    p[et_voxels] = prob
    return labels, p


def test_small_uncertain_et_component_becomes_necrosis():
    labels, p = _volume_with_et((slice(8, 10), slice(8, 13), slice(8, 9)), 0.6)  # 10 voxels
    out = apply_et_rule(labels, p)
    assert (out == 4).sum() == 0 and (out == 1).sum() == (labels == 1).sum() + 10
    assert (out == 2).sum() == (labels == 2).sum()


def test_small_confident_et_component_stays():
    labels, p = _volume_with_et((slice(8, 10), slice(8, 13), slice(8, 9)), 0.95)
    np.testing.assert_array_equal(apply_et_rule(labels, p), labels)


def test_small_total_uncertain_et_becomes_necrosis():
    labels, p = _volume_with_et((slice(8, 10), slice(8, 13), slice(8, 13)), 0.5)  # one 50-voxel component
    out = apply_et_rule(labels, p)
    assert (out == 4).sum() == 0
    # with the total rule switched off the component is too large for the first rule
    np.testing.assert_array_equal(apply_et_rule(labels, p, EtRule(total_voxels=0)), labels)


def test_large_et_stays():
    labels, p = _volume_with_et((slice(8, 16), slice(8, 13), slice(8, 13)), 0.5)  # 200 voxels
    np.testing.assert_array_equal(apply_et_rule(labels, p), labels)


def test_rule_counts_the_et_left_after_the_first_step():
    labels, p = _volume_with_et((slice(8, 11), slice(8, 12), slice(8, 12)), 0.95)  # 48 confident voxels
    labels[16, 16, 16] = 4  # a lone uncertain voxel
    p[16, 16, 16] = 0.5
    out = apply_et_rule(labels, p)
    assert out[16, 16, 16] == 1 and (out == 4).sum() == 48


def test_rule_is_plain_data():
    rule = EtRule(component_voxels=10, total_voxels=50, min_mean_probability=0.8, et_threshold=0.5)
    assert from_plain(EtRule, json.loads(json.dumps(to_plain(rule)))) == rule


def test_brats_postprocess_uses_the_rule_threshold():
    probs = np.zeros((3, 12, 12, 12), np.float32)
    probs[0, 1:11, 1:11, 1:11] = 0.9
    probs[1, 3:9, 3:9, 3:9] = 0.9
    probs[2, 3:9, 3:9, 3:9] = 0.5  # 216 voxels of ET at 0.5
    assert (brats_postprocess(probs, brats_2017()) == 4).sum() == 216
    assert (brats_postprocess(probs, brats_2017(), EtRule(et_threshold=0.55)) == 4).sum() == 0
    assert et_labels(brats_2015()) == (4, 1)


def _brats_case(ref_et: bool, fp_blob: bool, et_prob: float = 0.8, fp_prob: float = 0.6, shape=(20, 20, 20)):
    """Region probabilities and reference; ET (5^3) where ``ref_et``, a 2x2x2 false-positive ET blob."""
    ref = np.zeros(shape, np.uint8)
    ref[2:18, 2:18, 2:18] = 2
    ref[4:16, 4:16, 4:16] = 1
    probs = np.zeros((3, *shape), np.float32)
    probs[0][ref > 0] = 0.9
    probs[1][np.isin(ref, [1, 4])] = 0.9
    if ref_et:
        ref[5:10, 5:10, 5:10] = 4
        probs[2][5:10, 5:10, 5:10] = et_prob
    if fp_blob:
        probs[2][12:14, 12:14, 12:14] = fp_prob
    return probs, ref


def _direct_score(cases, region_set, rule):
    scores = []
    for probs, ref in cases:
        pred = labels_to_regions(brats_postprocess(probs, region_set, rule), region_set)
        truth = labels_to_regions(ref, region_set)
        d = []
        for p, r in zip(pred, truth):
            denom = p.sum() + r.sum()
            d.append(1.0 if denom == 0 else 2 * (p & r).sum() / denom)
        scores.append(np.mean(d))
    return float(np.mean(scores))


def test_grid_search_fixes_false_positive_et():
    cases = [_brats_case(ref_et=False, fp_blob=True), _brats_case(ref_et=True, fp_blob=False)] * 2
    best, table = grid_search_et_rule(cases, brats_2017())
    assert table.score.shape == (9, 1, 101, 101)
    assert table.thresholds[0] == 0.3 and table.thresholds[-1] == 0.7
    # the 8-voxel blob (p 0.6) goes with component_voxels > 8; ties go to the default threshold
    # and the smallest counts
    assert best == EtRule(component_voxels=9, total_voxels=0, et_threshold=0.45)
    summary = table.summary()
    json.dumps(summary, allow_nan=False)
    assert summary["best_score"] == pytest.approx(1.0)
    assert summary["no_rule_score"] == pytest.approx(_direct_score(cases, brats_2017(), EtRule(0, 0)))
    assert summary["no_rule_score"] < 1.0
    assert summary["paper_rule_score"] == pytest.approx(1.0)  # 8 < 16 voxels, mean 0.6 < 0.9


def test_grid_search_can_choose_the_threshold():
    cases = [_brats_case(ref_et=False, fp_blob=True, fp_prob=0.5), _brats_case(ref_et=True, fp_blob=False)]
    best, table = grid_search_et_rule(cases, brats_2017(), component_voxels=[0], total_voxels=[0])
    assert best.et_threshold == pytest.approx(0.55)  # the lowest threshold above the blob, nearest 0.45
    assert table.score_of(best) == pytest.approx(1.0)


@pytest.mark.parametrize("hierarchical", [True, False])
def test_grid_scores_equal_direct_evaluation(hierarchical: bool):
    rng = np.random.default_rng(11)
    region_set = brats_2015() if hierarchical else regions_from_v2({"wt": [1, 2, 3, 4], "tc": [1, 3, 4], "et": 4})
    cases = []
    for k in range(3):
        probs = rng.random((3, 10, 11, 12)).astype(np.float32) ** 2
        ref = rng.choice(np.array([0, 1, 2, 3, 4], np.uint8), size=(10, 11, 12), p=[0.5, 0.1, 0.2, 0.1, 0.1])
        if k == 2:
            ref[ref == 4] = 1  # a case without ET
        cases.append((probs, ref))
    grid = dict(component_voxels=[0, 2, 5, 40], total_voxels=[0, 30, 200], min_mean_probabilities=[0.5, 0.9])
    _, table = grid_search_et_rule(cases, region_set, thresholds=[0.3, 0.5, 0.65], **grid)
    for t in table.thresholds:
        for m in grid["min_mean_probabilities"]:
            for c in grid["component_voxels"]:
                for v in grid["total_voxels"]:
                    rule = EtRule(c, v, m, t)
                    assert table.score_of(rule) == pytest.approx(_direct_score(cases, region_set, rule)), rule


def test_grid_search_reads_files_and_checks_shapes(tmp_path: Path):
    probs, ref = _brats_case(ref_et=True, fp_blob=True)
    np.save(tmp_path / "p.npy", probs)
    np.savez(tmp_path / "q.npz", probabilities=probs)
    best, _ = grid_search_et_rule([(tmp_path / "p.npy", ref), (tmp_path / "q.npz", ref)], brats_2017())
    assert best.component_voxels > 0
    with pytest.raises(AutounetError, match="does not match"):
        grid_search_et_rule([(probs[:2], ref)], brats_2017())
    with pytest.raises(AutounetError, match="enclosing region"):
        et_labels(regions_from_v2({"a": [1]}))
