"""The export's PyTorch resampler (issue 22) gives the NumPy resampler's values."""

import numpy as np
import pytest
import torch

from autounet.inference.linear_resample import axis_map, resample_linear, resample_rows, source_rows
from autounet.inference.streaming import MemberOutput, revert_channel, stream_segmentation
from autounet.preprocessing.case import preprocess_case, revert_map, revert_probabilities
from autounet.preprocessing.resample import resample_axis, resample_volume
from test_preprocess_case import make_case, make_plan

# (source, target): odd sizes, growing and shrinking axes, an unchanged axis, one-sample axes,
# and axis 0 growing least (so the whole-volume NumPy order differs from in-plane-then-axis-0)
SHAPES = [
    ((7, 9, 11), (13, 5, 17)),
    ((10, 12, 9), (10, 21, 4)),
    ((9, 8, 7), (3, 8, 7)),
    ((1, 5, 4), (3, 7, 2)),
    ((5, 6, 7), (5, 6, 7)),
    ((4, 6, 6), (6, 13, 11)),
    ((6, 3, 1), (11, 1, 3)),
]


def _in_plane_then_axis0(volume: np.ndarray, shape, sep) -> np.ndarray:
    """The NumPy reference in the kernel's axis order: in-plane (smaller ratio first, ties: the
    last axis first), then along axis 0."""
    out = volume.astype(np.float32)
    ratio = {a: shape[a] / volume.shape[a] for a in (1, 2)}
    for a in [*sorted((2, 1), key=ratio.get), 0]:
        out = resample_axis(out, a, shape[a], 0 if a == sep else 1)
    return out


@pytest.mark.parametrize("source, target", SHAPES)
@pytest.mark.parametrize("sep", [None, 0, 1, 2])
def test_equals_numpy_to_rounding_whatever_the_chunks(source, target, sep):
    """PyTorch's bilinear kernel in-plane and one lerp per output row along axis 0, where NumPy
    takes three operations per pass: a few units in the last place from NumPy in the same order
    and from the whole volume; the chunks change no bit."""
    vol = np.random.default_rng(0).random(source, dtype=np.float32)
    expected = _in_plane_then_axis0(vol, target, sep)
    whole = resample_volume(vol, target, 1, sep, 0)
    first = None
    for chunk in (1, 37, 1 << 20):  # one row per chunk (rows shared between chunks), a few, all
        got = resample_rows(torch.from_numpy(vol), source[0], target, sep, chunk_voxels=chunk).numpy()
        assert got.dtype == np.float32 and got.shape == tuple(target)
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
        assert np.abs(got - whole).max() <= 2e-6
        if first is None:
            first = got
        np.testing.assert_array_equal(got, first)
    constant = resample_rows(torch.full(source, 0.3), source[0], target, sep).numpy()
    assert np.abs(constant - np.float32(0.3)).max() <= 6e-8  # a constant map stays constant, to rounding


def test_the_separate_axis_is_nearest_and_a_linear_ramp_stays_linear():
    ramp = np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None], (6, 4, 4)).copy()
    out = resample_linear(torch.from_numpy(ramp), [12, 4, 4]).numpy()
    inside = (np.arange(12)[1:-1] + 0.5) / 2 - 0.5  # pixel-centre mapping, clamped at the ends
    np.testing.assert_allclose(out[1:-1, 2, 1], inside, atol=1e-6)
    assert out[0, 0, 0] == 0 and out[-1, 0, 0] == 5
    nearest = resample_linear(torch.from_numpy(ramp), [12, 4, 4], sep_axis=0).numpy()
    np.testing.assert_array_equal(nearest[:, 0, 0], np.repeat(np.arange(6), 2))
    np.testing.assert_array_equal(axis_map(6, 12, 0).i0, resample_axis(np.arange(6), 0, 12, 0))


@pytest.mark.parametrize("sep", [None, 0, 2])
def test_rows_of_a_block_into_a_strided_out_from_float16(sep):
    """What the slabbed export asks for: rows ``o0 .. o1`` from just the source rows they read
    (:func:`source_rows`), float16 input, written into a transposed view: the whole volume's rows,
    bit for bit."""
    rng = np.random.default_rng(1)
    vol = rng.random((9, 7, 8), dtype=np.float32).astype(np.float16)
    target = [20, 5, 11]
    expected = resample_rows(torch.from_numpy(vol), 9, target, sep).numpy()
    np.testing.assert_allclose(expected, _in_plane_then_axis0(vol.astype(np.float32), target, sep), atol=2e-6)
    for o0, o1 in ((0, 20), (3, 4), (5, 17), (19, 20)):
        lo, hi = source_rows(9, target, sep, o0, o1)
        buf = torch.full((11, 5, o1 - o0), -1.0)
        view = buf.permute(2, 1, 0)
        got = resample_rows(torch.from_numpy(vol[lo:hi]), 9, target, sep, (o0, o1), lo, view, chunk_voxels=60)
        assert got is view
        np.testing.assert_array_equal(view.numpy(), expected[o0:o1])
    with pytest.raises(ValueError, match="needs"):  # a block without the rows the output reads
        resample_rows(torch.from_numpy(vol[1:]), 9, target, sep, (0, 20), 1)
    with pytest.raises(ValueError, match="out must be"):
        resample_rows(torch.from_numpy(vol), 9, target, sep, out=torch.empty(20, 5, 10))


def test_revert_channel_and_the_segmentation_equal_todays_numpy_export():
    """A plan whose axis-0 ratio is the smallest (the whole-volume NumPy order resamples it first):
    probabilities within 1e-5, the argmax equal wherever the top two classes are not tied."""
    image, label, geo = make_case(shape=(12, 22, 18), spacing=(1.0, 0.8, 0.9), pad=2)
    props = preprocess_case("c", image, geo, label, make_plan((1.3, 1.1, 1.2), (0, 1, 2)), [0, 1, 4]).properties
    rng = np.random.default_rng(2)
    probs = torch.softmax(torch.from_numpy(rng.normal(0, 3, (3, *props.shape_after_resampling)).astype(np.float32)), 0)
    today, kept = revert_probabilities(probs.numpy(), props, keep_probabilities=True)
    inside = tuple(slice(*b) for b in props.crop_bbox)
    for k in range(3):
        new = revert_channel(probs[k], props, torch.device("cpu"))
        assert np.abs(new - revert_map(probs[k].numpy(), props)[inside]).max() <= 1e-5
    seg = stream_segmentation([MemberOutput(probs, props)], [0, 1, 4])
    top2 = np.sort(kept, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-5
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(seg[clear], np.asarray([0, 1, 4], np.uint8)[today][clear])
