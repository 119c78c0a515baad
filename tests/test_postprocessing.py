import json
from pathlib import Path

import numpy as np
import pytest

from autounet.data.image_io import read_label
from autounet.errors import AutounetError
from autounet.postprocessing.components import (
    PostprocessingDecision,
    apply_postprocessing,
    decide_postprocessing,
    keep_largest_component,
    keep_largest_foreground,
    postprocess_folder,
    single_component_classes,
)
from autounet.utils.plain_data import from_plain, to_plain
from conftest import write


def _dice(pred: np.ndarray, ref: np.ndarray, c: int) -> float:
    p, r = pred == c, ref == c
    denom = p.sum() + r.sum()
    return float("nan") if denom == 0 else 2 * float((p & r).sum()) / denom


def _two_blobs() -> np.ndarray:
    seg = np.zeros((12, 12, 12), np.uint8)
    seg[1:4, 1:4, 1:4] = 1  # 27 voxels
    seg[8:10, 8:10, 8:10] = 1  # 8 voxels
    seg[1:3, 8:11, 1:3] = 2  # 12 voxels
    seg[9, 1, 9] = 2  # 1 voxel
    return seg


def test_keep_largest_component_per_class():
    seg = _two_blobs()
    out = keep_largest_component(seg, [1])
    assert out.dtype == seg.dtype
    assert (out == 1).sum() == 27 and (out == 2).sum() == 13  # class 2 untouched
    out = keep_largest_component(seg, [1, 2])
    assert (out == 1).sum() == 27 and (out == 2).sum() == 12 and out[9, 1, 9] == 0
    np.testing.assert_array_equal(seg, _two_blobs())  # input unchanged
    assert keep_largest_component(np.zeros((3, 3, 3), np.uint8), [1]).sum() == 0


def test_connectivity_26_joins_diagonal_neighbours():
    seg = np.zeros((5, 5, 5), np.uint8)
    seg[1, 1, 1] = seg[2, 2, 2] = seg[3, 3, 3] = 1
    seg[0, 4, 4] = 1
    assert (keep_largest_component(seg, [1]) == 1).sum() == 3
    assert (keep_largest_component(seg, [1], connectivity=6) == 1).sum() == 1


def test_keep_largest_foreground_treats_all_labels_as_one_object():
    seg = np.zeros((10, 10, 10), np.float32)  # float label maps occur in real data
    seg[2:5, 2:5, 2:5] = 1
    seg[2:5, 5:7, 2:5] = 2  # touches class 1: same foreground object
    seg[8, 8, 8] = 2  # far away
    out = keep_largest_foreground(seg)
    assert out.dtype == np.float32
    assert (out == 1).sum() == 27 and (out == 2).sum() == 18 and out[8, 8, 8] == 0
    # 2D arrays work too (26 → 8-connectivity)
    flat = np.zeros((6, 6), np.uint8)
    flat[0, 0] = flat[1, 1] = 1
    flat[5, 5] = 2
    assert keep_largest_foreground(flat).sum() == 2


def test_single_component_classes():
    cases = [{"1": 1, "2": 1, "3": 2}, {"1": 1, "3": 1}, {"1": 1, "2": 1, "4": 0}]
    # class 2 is absent from case 2 (does not count against it), 3 has two components once,
    # 4 never occurs.
    assert single_component_classes(cases) == [1, 2]
    assert single_component_classes([]) == []


def _cube(shape=(20, 20, 20)) -> np.ndarray:
    ref = np.zeros(shape, np.uint8)
    ref[3:9, 3:9, 3:9] = 1
    return ref


def test_decide_adopts_the_foreground_step_when_a_spurious_blob_is_removed():
    ref = _cube()
    pred = ref.copy()
    pred[15:17, 15:17, 15:17] = 1  # false positive far away
    decision = decide_postprocessing([(pred, ref), (ref.copy(), ref)], classes=[1], candidates=[1])
    fg = decision.evidence["foreground"]
    assert decision.keep_largest_foreground and fg["adopted"]
    assert fg["dice_without"]["1"] < fg["dice_with"]["1"] == 1.0
    assert fg["cases_changed"] == 1
    # on top of the foreground step class 1 is already one component: a no-op, so not adopted
    assert decision.evidence["classes"]["1"]["gain"] == 0.0 and decision.evidence["classes"]["1"]["cases_changed"] == 0
    assert decision.keep_largest_classes == []
    np.testing.assert_array_equal(apply_postprocessing(pred, decision), ref)


def test_decide_rejects_a_step_that_removes_true_positives():
    ref = _cube()
    ref[15:17, 15:17, 15:17] = 1  # the reference really has two objects
    pred = ref.copy()
    decision = decide_postprocessing([(pred, ref)], classes=[1], candidates=[1])
    assert not decision.keep_largest_foreground and decision.keep_largest_classes == []
    assert decision.evidence["foreground"]["gain"] < 0
    assert decision.evidence["classes"]["1"]["gain"] < 0 and not decision.evidence["classes"]["1"]["adopted"]
    assert decision.evidence["final"]["dice"]["1"] == 1.0


def test_decide_per_class_step_without_foreground_step():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2:8, 2:8, 2:8] = 1
    ref[2:8, 8:12, 2:8] = 2
    ref[15:18, 15:18, 15:18] = 1  # a second true class-1 object: the foreground step must lose
    pred = ref.copy()
    pred[5, 5, 5] = 2  # inside class 1's body, a spurious class-2 island (same foreground object)
    decision = decide_postprocessing([(pred, ref)], classes=[1, 2], candidates=[2])
    assert not decision.keep_largest_foreground
    assert decision.keep_largest_classes == [2]
    cls2 = decision.evidence["classes"]["2"]
    assert cls2["adopted"] and cls2["dice_with"]["2"] > cls2["dice_without"]["2"]
    assert cls2["dice_with"]["1"] == cls2["dice_without"]["1"]
    assert decision.candidates == [2]


def test_decide_evidence_matches_applying_the_steps():
    rng = np.random.default_rng(7)
    cases = []
    for _ in range(4):
        ref = (rng.random((14, 14, 14)) > 0.8).astype(np.uint8) * rng.integers(1, 4, (14, 14, 14)).astype(np.uint8)
        pred = np.where(rng.random(ref.shape) > 0.9, rng.integers(0, 4, ref.shape), ref).astype(np.uint8)
        cases.append((pred, ref))
    classes = [1, 2, 3]
    decision = decide_postprocessing(cases, classes=classes, candidates=[1, 3], min_gain=-1.0)  # adopt all
    assert decision.keep_largest_foreground and decision.keep_largest_classes == [1, 3]
    ev = decision.evidence
    assert ev["foreground"]["cases_changed"] == 4 and ev["classes"]["1"]["cases_changed"] > 0
    for c in classes:
        raw = np.nanmean([_dice(p, r, c) for p, r in cases])
        fg = np.nanmean([_dice(keep_largest_foreground(p), r, c) for p, r in cases])
        final = np.nanmean([_dice(apply_postprocessing(p, decision), r, c) for p, r in cases])
        assert ev["foreground"]["dice_without"][str(c)] == pytest.approx(raw)
        assert ev["foreground"]["dice_with"][str(c)] == pytest.approx(fg)
        assert ev["final"]["dice"][str(c)] == pytest.approx(final)
    with_1 = np.nanmean([_dice(keep_largest_component(keep_largest_foreground(p), [1]), r, 1) for p, r in cases])
    assert ev["classes"]["1"]["dice_with"]["1"] == pytest.approx(with_1)


def test_decision_is_plain_json_and_reads_paths(tmp_path: Path):
    ref = _cube()
    pred = ref.copy()
    pred[15, 15, 15] = 1
    pairs = [(write(tmp_path / "p.nii.gz", pred), write(tmp_path / "r.nii.gz", ref))]
    decision = decide_postprocessing(pairs, classes=[1, 2], candidates=[1])  # class 2 never occurs
    assert decision.evidence["foreground"]["dice_with"]["2"] is None
    text = json.dumps(to_plain(decision), allow_nan=False)
    back = from_plain(PostprocessingDecision, json.loads(text))
    assert back == decision
    with pytest.raises(AutounetError, match="not among"):
        decide_postprocessing(pairs, classes=[1], candidates=[2])


def test_postprocess_folder_keeps_geometry_and_dtype(tmp_path: Path):
    seg = _two_blobs()
    src, dst = tmp_path / "in", tmp_path / "out"
    write(src / "case_1.nii.gz", seg, spacing=(2.0, 1.0, 0.5), origin=(5.0, -3.0, 1.0))
    write(src / "case_2.nrrd", seg.astype(np.int16))
    (src / "summary.json").write_text("{}")
    (src / "case_3.npz").write_bytes(b"")
    decision = PostprocessingDecision(keep_largest_foreground=False, keep_largest_classes=[1, 2], candidates=[1, 2])
    written = postprocess_folder(src, dst, decision, workers=1)
    assert [p.name for p in written] == ["case_1.nii.gz", "case_2.nrrd"]
    assert sorted(p.name for p in dst.iterdir()) == ["case_1.nii.gz", "case_2.nrrd"]
    out, geo = read_label(dst / "case_1.nii.gz")
    _, geo_in = read_label(src / "case_1.nii.gz")
    assert geo == geo_in and out.dtype == np.uint8
    np.testing.assert_array_equal(out, keep_largest_component(seg, [1, 2]))
    assert read_label(dst / "case_2.nrrd")[0].dtype == np.int16
