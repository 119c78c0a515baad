"""Patch sampling and background loading over preprocessed synthetic cases."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from autounet.api import plan, preprocess
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.errors import AutounetError
from autounet.preprocessing.store import open_case
from autounet.training.loader import BatchLoader
from autounet.training.sampler import PatchSampler, SamplerSettings
from autounet.workspace import previous_stage_path


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler")
    raw = make_synthetic_dataset(root / "raw", SyntheticSpec(cases=6, shape=(20, 40, 36), classes=3, seed=9))
    plan(raw, work=root / "W", workers=1)
    preprocess("raw", work=root / "W", workers=1)
    folder = root / "W" / "raw" / "preprocessed" / "3d_fullres"
    cases = sorted(p.stem for p in folder.glob("synth_*.json"))
    return folder, cases


def settings(patch=(12, 16, 16), sample=None, batch=6, **kw) -> SamplerSettings:
    return SamplerSettings(
        patch_size=tuple(patch), sample_size=tuple(sample or patch), batch_size=batch, num_classes=3, **kw
    )


def centre_crop(x: np.ndarray, patch) -> np.ndarray:
    idx = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(x.shape[-len(patch) :], patch))
    return x[(Ellipsis, *idx)]


def test_at_least_a_third_of_every_batch_is_centred_on_foreground(preprocessed):
    folder, cases = preprocessed
    patch = (8, 8, 8)  # small patches: random ones often miss the foreground
    sampler = PatchSampler(folder, cases, settings(patch, batch=7), seed=1)
    with_fg = []
    for i in range(40):
        b = sampler.batch(i)
        assert b.foreground.sum() >= math.ceil(7 / 3)
        for j in np.flatnonzero(b.foreground):  # the centre voxel of a forced patch is foreground
            assert b.seg[j, 0][tuple(p // 2 for p in patch)] > 0 or centre_crop(b.seg[j, 0], patch).any()
        with_fg.extend(centre_crop(b.seg[j, 0], patch).any() for j in range(7))
    assert np.mean(with_fg) >= 1 / 3


def test_probability_mode_forces_foreground_per_sample(preprocessed):
    folder, cases = preprocessed
    sampler = PatchSampler(
        folder, cases, settings(batch=10, foreground_mode="probability", foreground_value=0.4), seed=2
    )
    share = np.mean([sampler.batch(i).foreground.mean() for i in range(60)])
    assert 0.3 < share < 0.5


def test_batches_are_deterministic_under_the_seed(preprocessed):
    folder, cases = preprocessed
    a = PatchSampler(folder, cases, settings(), seed=3)
    b = PatchSampler(folder, cases, settings(), seed=3)
    c = PatchSampler(folder, cases, settings(), seed=4)
    assert np.array_equal(a.batch(5).image, b.batch(5).image) and a.batch(5).case_ids == b.batch(5).case_ids
    assert a.batch(5).augmentation_seed == b.batch(5).augmentation_seed
    assert not np.array_equal(a.batch(5).image, c.batch(5).image)
    threaded = [batch.image for batch, _, _ in BatchLoader(a, start=2, count=4, threads=3)]
    assert all(np.array_equal(t, a.batch(2 + i).image) for i, t in enumerate(threaded))


def test_regions_are_read_exactly_and_padded_with_zeros(preprocessed):
    folder, cases = preprocessed
    image, seg, _, _ = open_case(folder, cases[0])
    big = tuple(s + 10 for s in seg.shape)  # larger than the case: the patch covers it with padding
    sampler = PatchSampler(folder, [cases[0]], settings(big, batch=2), seed=0)
    b = sampler.batch(0)
    for j in range(2):
        nz = np.argwhere(b.seg[j, 0] > 0)
        assert nz.size and b.image.shape[2:] == big
        lo = [int(np.argmax(np.any(b.image[j, 0] != 0, axis=tuple(a for a in range(3) if a != ax)))) for ax in range(3)]
        inner = b.image[j][(slice(None), *[slice(o, o + s) for o, s in zip(lo, seg.shape)])]
        np.testing.assert_array_equal(inner, image)
        assert np.abs(b.image[j]).sum() == pytest.approx(
            float(np.abs(np.asarray(image)).sum()), rel=1e-5
        )  # zero outside


def test_enlarged_samples_are_centred_on_the_patch(preprocessed):
    folder, cases = preprocessed
    near = PatchSampler(folder, cases, settings((8, 8, 8), batch=4), seed=7).batch(0)
    wide = PatchSampler(folder, cases, settings((8, 8, 8), sample=(14, 12, 16), batch=4), seed=7).batch(0)
    np.testing.assert_array_equal(centre_crop(wide.image, (8, 8, 8)), near.image)


def test_two_dimensional_slices_come_from_the_volumes(preprocessed):
    folder, cases = preprocessed
    sampler = PatchSampler(folder, cases, settings((16, 16), batch=9), seed=5)
    b = sampler.batch(0)
    assert b.image.shape == (9, 1, 16, 16) and b.seg.shape == (9, 1, 16, 16)
    assert b.foreground.sum() >= 3 and all(b.seg[j, 0].any() for j in np.flatnonzero(b.foreground))


def test_previous_stage_prediction_becomes_one_hot_channels(preprocessed, tmp_path: Path):
    folder, cases = preprocessed
    for c in cases:
        _, seg, _, _ = open_case(folder, c)
        np.save(previous_stage_path(tmp_path, c), np.asarray(seg))
    sampler = PatchSampler(folder, cases, settings(batch=3, previous_stage_dir=tmp_path), seed=0)
    b = sampler.batch(0)
    assert b.image.shape[1] == 1 + 2
    np.testing.assert_array_equal(b.image[:, 1], (b.seg[:, 0] == 1).astype(np.float32))
    np.testing.assert_array_equal(b.image[:, 2], (b.seg[:, 0] == 2).astype(np.float32))
    with pytest.raises(AutounetError, match="previous-stage prediction missing"):
        PatchSampler(folder, cases, settings(previous_stage_dir=tmp_path / "none"), seed=0).batch(0)


def test_missing_cases_are_reported(preprocessed):
    folder, cases = preprocessed
    with pytest.raises(AutounetError, match="preprocessed case"):
        PatchSampler(folder, cases + ["ghost"], settings())


def test_loader_yields_tensors_in_order_and_stops(preprocessed):
    folder, cases = preprocessed
    sampler = PatchSampler(folder, cases, settings(batch=2), seed=0)
    seen = [
        (b.index, img.dtype, seg.dtype) for b, img, seg in BatchLoader(sampler, start=5, count=6, threads=2, prefetch=1)
    ]
    assert [s[0] for s in seen] == list(range(5, 11))
    assert seen[0][1] == torch.float32 and seen[0][2] == torch.uint8


def test_loader_threads_share_the_open_case_cache_safely(preprocessed, monkeypatch):
    """Eight threads drawing batches while the cache holds one case at a time (constant eviction)
    get exactly the batches one thread gets."""
    import threading

    from autounet.training import sampler as sampler_module

    folder, cases = preprocessed
    expected = [PatchSampler(folder, cases, settings(batch=2), seed=4).batch(i) for i in range(16)]
    monkeypatch.setattr(sampler_module, "open_case_budget", lambda: 1)
    shared = PatchSampler(folder, cases, settings(batch=2), seed=4)
    got, errors = {}, []

    def draw(k: int) -> None:
        try:
            for i in range(k, 16, 8):
                got[i] = shared.batch(i)
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(exc)

    threads = [threading.Thread(target=draw, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, batch in enumerate(expected):
        assert np.array_equal(got[i].image, batch.image) and np.array_equal(got[i].seg, batch.seg)
