"""The streaming ensemble and export (issue 22) gives today's segmentation and probability file."""

import numpy as np
import pytest
import torch

from autounet.data.crop import box_slices
from autounet.data.probabilities import ProbabilityStream, load_probability_file, save_probability_file
from autounet.inference import streaming
from autounet.inference.streaming import MemberOutput, revert_channel, stream_segmentation
from autounet.postprocessing.apply import Postprocessing
from autounet.postprocessing.brats_et import EtRule, brats_postprocess
from autounet.postprocessing.components import PostprocessingDecision, apply_postprocessing
from autounet.preprocessing.case import preprocess_case, revert_map, revert_probabilities
from autounet.regions import brats_2015, regions_to_labels
from autounet.utils.atomic import atomic_write
from test_preprocess_case import make_case, make_plan

VALUES = [0, 1, 4]


def _props(spacing, target, transpose=(0, 1, 2)):
    image, label, geo = make_case(shape=(10, 22, 18), spacing=spacing, pad=2)
    return preprocess_case("c", image, geo, label, make_plan(target, transpose), VALUES).properties


def _softmax(props, k=3, seed=0):
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(0, 2, (k, *props.shape_after_resampling)).astype(np.float32))
    return torch.softmax(logits, 0)


@pytest.fixture(scope="module")
def anisotropic():
    """Thick slices (a separate axis, nearest along it), a transposed network order and a crop box."""
    props = _props((4.0, 0.8, 0.9), (4.0, 1.1, 0.7), transpose=(0, 2, 1))
    assert props.separate_axis is not None and props.crop_bbox[1] != [0, 22]
    return props


def test_one_class_reverts_to_what_revert_map_gives_inside_the_crop_box_to_rounding(anisotropic):
    probs = _softmax(anisotropic)
    inside = box_slices(tuple(tuple(b) for b in anisotropic.crop_bbox))
    for k in range(3):
        np.testing.assert_allclose(
            revert_channel(probs[k], anisotropic, torch.device("cpu")),
            revert_map(probs[k].numpy(), anisotropic)[inside],
            rtol=0,
            atol=2e-6,
        )


def test_one_member_gives_the_argmax_of_revert_probabilities(anisotropic):
    probs = _softmax(anisotropic)
    today, kept = revert_probabilities(probs.numpy(), anisotropic, keep_probabilities=True)
    seg = stream_segmentation([MemberOutput(probs, anisotropic)], VALUES)
    top2 = np.sort(kept, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-5
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(seg[clear], np.asarray(VALUES, np.uint8)[today][clear])


def test_an_ensemble_of_two_plans_equals_the_mean_of_the_reverted_probabilities(tmp_path):
    a, b = _props((1.0, 0.8, 0.9), (1.2, 1.1, 0.7)), _props((1.0, 0.8, 0.9), (0.9, 1.3, 1.0), (2, 0, 1))
    pa, pb = _softmax(a, seed=1), _softmax(b, seed=2)
    kept = [revert_probabilities(p.numpy(), q, keep_probabilities=True)[1] for p, q in ((pa, a), (pb, b))]
    total = kept[0] + kept[1]
    total /= 2
    decision = PostprocessingDecision(keep_largest_foreground=True, keep_largest_classes=[], candidates={})
    pp = Postprocessing("components", decision=decision)
    expected = apply_postprocessing(np.asarray(VALUES, np.uint8)[total.argmax(0)], decision)
    path = tmp_path / "c.npz"

    def write(tmp):
        with ProbabilityStream(tmp, total.shape, VALUES, "softmax") as stream:
            made.append(stream_segmentation([MemberOutput(pa, a), MemberOutput(pb, b)], VALUES, None, pp, stream))

    made = []
    atomic_write(path, write)
    top2 = np.sort(total, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-5  # the labels agree wherever the top two are not tied
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(made[0][clear], expected[clear])
    # the streamed file is the file save_probability_file writes from the whole array, to the
    # float32 rounding of the resampling, so to one float16 step
    save_probability_file(tmp_path / "whole.npz", total, VALUES, "softmax")
    streamed, whole = load_probability_file(path), load_probability_file(tmp_path / "whole.npz")
    np.testing.assert_allclose(streamed[0], whole[0], rtol=0, atol=2**-11)
    assert streamed[1:] == whole[1:] == (VALUES, "softmax")
    assert streamed[0][0, 0, 0, 0] == 1.0 and streamed[0][1:, 0, 0, 0].sum() == 0  # outside the crop box


def test_members_on_one_grid_are_reverted_once_and_equal_the_mean_of_their_reverted_maps(anisotropic):
    """2d and 3d_fullres of one spacing: summed before reverting (linear), so the mean differs from
    reverting each only by float32 rounding, and so do the labels (only at such ties)."""
    pa, pb, pc = (_softmax(anisotropic, seed=s) for s in (3, 4, 5))
    kept = [revert_probabilities(p.numpy(), anisotropic, keep_probabilities=True)[1] for p in (pa, pb, pc)]
    mean = (kept[0] + kept[1] + kept[2]) / 3
    members = [MemberOutput(p, anisotropic) for p in (pa, pb, pc)]
    calls = []

    class Counted(streaming._Source):
        def __init__(self, probabilities, k, *args):
            calls.append(k)
            super().__init__(probabilities, k, *args)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(streaming, "_Source", Counted)
        seg = stream_segmentation(members, VALUES)
    assert sorted(calls) == [0, 1, 2]  # one revert per class, not one per member and class
    ties = np.sort(mean, axis=0)
    clear = ties[-1] - ties[-2] > 1e-5
    expected = np.asarray(VALUES, np.uint8)[mean.argmax(0)]
    np.testing.assert_array_equal(seg[clear], expected[clear])
    assert clear.mean() > 0.99


@pytest.mark.parametrize("members, classes", [(1, 5), (2, 5), (3, 5), (1, 200), (1, 300)])
def test_one_grid_decides_each_chunk_as_the_argmax_of_its_reverted_mean(anisotropic, members, classes):
    """The one-grid path compares each chunk of rows as it is reverted (packed values): the
    first maximum of the reverted mean, NaN counting as -inf, slab by slab (here one row each),
    with label values that are not the class indices, up to 256 classes and beyond (the slab
    path). Random maps have no two classes within the packing's 2**(bits - 23) of each other."""
    probs = [_softmax(anisotropic, k=classes, seed=s) for s in range(members)]
    probs[0][0, 2:4] = float("nan")  # class 0 (the first maximum's start) and a later class
    probs[-1][3, 5:6, 3:9] = float("nan")
    for p in probs:  # exact ties between classes 1 and 2: the first wins
        p[2, :, 1:4] = p[1, :, 1:4]
    summed = probs[0].clone()
    for p in probs[1:]:
        summed += p
    cpu = torch.device("cpu")
    mean = np.stack([revert_channel(summed[k], anisotropic, cpu) for k in range(classes)])
    mean /= np.float32(members)
    expected = np.nan_to_num(mean, nan=-np.inf).argmax(0)
    values = [0, 1, 4, 7, 9] if classes == 5 else list(range(classes))
    seg = stream_segmentation([MemberOutput(p, anisotropic) for p in probs], values, slab_bytes=1)
    inside = box_slices(tuple(tuple(b) for b in anisotropic.crop_bbox))
    np.testing.assert_array_equal(seg[inside], np.asarray(values)[expected])
    assert seg.dtype == (np.uint8 if classes <= 256 else np.uint16)
    assert np.isinf(mean).sum() == 0 and np.isnan(mean).any()  # the NaNs reached the input grid


def test_regions_with_the_brats_et_rule_equal_the_whole_array_path(anisotropic):
    regions = brats_2015()
    rng = np.random.default_rng(3)
    maps = [torch.from_numpy(rng.random((3, *anisotropic.shape_after_resampling), np.float32)) for _ in range(2)]
    reverted = [np.stack([revert_map(m[r].numpy(), anisotropic) for r in range(3)]) for m in maps]
    total = reverted[0] + reverted[1]
    total /= 2
    members = [MemberOutput(m, anisotropic) for m in maps]
    plain = stream_segmentation(members, regions.label_values, regions)
    np.testing.assert_array_equal(plain, regions_to_labels(total, regions))
    rule = EtRule(component_voxels=40, total_voxels=200, et_threshold=0.6)
    pp = Postprocessing("brats_et", rule=rule, regions=regions)
    np.testing.assert_array_equal(
        stream_segmentation(members, regions.label_values, regions, pp), brats_postprocess(total, regions, rule)
    )


def test_a_stream_that_misses_a_class_leaves_no_file(tmp_path):
    path = tmp_path / "c.npz"

    def write(tmp):
        with ProbabilityStream(tmp, (2, 3, 4, 5), VALUES[:2], "softmax") as stream:
            stream.write(0, np.zeros((3, 4, 5), np.float32), (slice(0, 3), slice(0, 4), slice(0, 5)), 1.0)

    with pytest.raises(ValueError, match="1 of 2 classes written"):
        atomic_write(path, write)
    assert list(tmp_path.iterdir()) == []


def test_classes_that_cannot_win_in_a_slab_are_not_reverted_and_the_labels_stay_the_argmax(anisotropic):
    """Softmax maps sum to 1, so the best class has at least 1/K everywhere: a class below that in
    every source row of a slab is skipped (organs of a trained whole-body model), and the labels
    are still the argmax of the reverted mean."""
    k, shape = 6, anisotropic.shape_after_resampling
    torch.manual_seed(0)
    logits = torch.full((k, *shape), -8.0)
    logits[0] = 0.0
    for z in range(shape[0]):  # each row holds background and one organ (which one: by row)
        logits[1 + z % (k - 1), z, 2:9, 3:15] = 2.0 + z
        # a three-way near-tie: the winner's probability is about 1/3, below a half
        logits[1 + (z + 2) % (k - 1), z, 9:11, 15:20] = 0.1
        logits[1 + (z + 3) % (k - 1), z, 9:11, 15:20] = 0.05
    probs = [torch.softmax(logits + 0.3 * torch.randn(logits.shape), 0) for _ in range(2)]
    summed = probs[0] + probs[1]
    cpu = torch.device("cpu")
    mean = np.stack([revert_channel(summed[c], anisotropic, cpu) for c in range(k)]) / np.float32(2)
    reverted = []
    original = streaming._Source.resample
    with pytest.MonkeyPatch.context() as m:
        m.setattr(streaming._Source, "resample", lambda self, **o: reverted.append(1) or original(self, **o))
        seg = stream_segmentation([MemberOutput(p, anisotropic) for p in probs], list(range(k)), slab_bytes=1)
    slabs = anisotropic.crop_bbox[0][1] - anisotropic.crop_bbox[0][0]  # one row per slab
    assert 0 < len(reverted) < k * slabs * 3 / 4  # a third of the classes of the slabs were skipped
    inside = box_slices(tuple(tuple(b) for b in anisotropic.crop_bbox))
    np.testing.assert_array_equal(seg[inside], mean.argmax(0))
    assert set(np.unique(seg[inside]).tolist()) == set(range(k))  # every organ is labelled somewhere


def test_slabs_side_by_side_in_threads_give_the_labels_of_one_thread(anisotropic):
    """With several PyTorch threads the one-grid export takes as many slabs at once, each in a
    thread of its own with one PyTorch thread: the same labels as one slab after the other."""
    import threading

    probs = [_softmax(anisotropic, k=5, seed=s) for s in (7, 8)]
    members = [MemberOutput(p, anisotropic) for p in probs]
    threads = torch.get_num_threads()
    seen = set()
    original = streaming._argmax_rows

    def recorded(*args, **kwargs):
        seen.add((threading.current_thread().name, torch.get_num_threads()))
        return original(*args, **kwargs)

    try:
        torch.set_num_threads(1)
        alone = stream_segmentation(members, VALUES + [7, 9], slab_bytes=1)
        torch.set_num_threads(2)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(streaming, "_argmax_rows", recorded)
            together = stream_segmentation(members, VALUES + [7, 9], slab_bytes=1)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(together, alone)
    assert {name.rsplit("_", 1)[0] for name, _ in seen} == {"autounet-export"}
    assert {count for _, count in seen} == {1}
