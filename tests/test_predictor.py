"""Inference on raw images: geometry, label values, 2D and cascade models, inputs, ensembles.

Tiny models are trained once per module (one epoch of two iterations): the checks are about
what the predictor does with a model, not about how good the model is.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from autounet.api import plan, preprocess
from autounet.cli import main
from autounet.data.geometry import Geometry
from autounet.data.image_io import read_image, read_label, write_image
from autounet.data.probabilities import load_probability_file
from autounet.data.synthetic import SyntheticSpec, make_case, make_synthetic_dataset
from autounet.errors import AutounetError
from autounet.inference import predictor as predictor_module
from autounet.inference.model import load_stage
from autounet.inference.predictor import (
    Predictor,
    finalize,
    prepare,
    stage_probabilities,
)
from autounet.inference.sliding_window import HALF_ACCUMULATION_TIE, fits_on_device, predict_volume
from autounet.pipeline.fold import train_and_validate
from autounet.planning.planner import PlannerOptions
from autounet.training.options import TrainOptions
from autounet.workspace import Workspace
from conftest import listing

TINY = dict(epochs=1, iterations_per_epoch=2, validation_iterations=1, device="cpu")
SHAPE = (16, 20, 18)
LABELS = {1: 2, 2: 5}  # synthetic class -> label value written to the relabelled dataset
VALUES = [0, 2, 5]


def train(work, name, options, validate=True, validation_tta=True):
    """Train one fold and validate it in full, as `autounet train` does."""
    return train_and_validate(Workspace.at(work, name), options, validate, validation_tta).training


def relabel(raw: Path, mapping: dict[int, int]) -> None:
    """Give a synthetic dataset non-consecutive label values (labels and dataset.json)."""
    for f in sorted((raw / "labelsTr").glob("*.nii.gz")):
        label, geo = read_label(f)
        new = label.copy()
        for old, value in mapping.items():
            new[label == old] = value
        write_image(f, new, geo)
    descriptor = json.loads((raw / "dataset.json").read_text())
    descriptor["labels"] = {"0": "background", **{str(v): f"class_{v}" for v in mapping.values()}}
    (raw / "dataset.json").write_text(json.dumps(descriptor))


def rotated_geometry(spacing=(2.5, 0.7, 0.9), origin=(-12.5, 40.25, 7.0)) -> Geometry:
    """A non-axis-aligned direction: a rotation times an axis permutation with a flip (det -1)."""
    a, b = math.radians(30), math.radians(20)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    permute_flip = np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0]], dtype=float)
    direction = rz @ rx @ permute_flip
    return Geometry(spacing=spacing, origin_xyz=origin, direction_xyz=tuple(direction.ravel()))


def sample_image(seed: int = 0, channels: int = 1, shape=SHAPE) -> np.ndarray:
    image, _, _ = make_case(SyntheticSpec(shape=shape, channels=channels, seed=99), seed)
    return image


def assert_same_grid(out: Path, reference: Path) -> np.ndarray:
    """The segmentation ``out`` lies exactly on the grid of the image ``reference``; returns it."""
    seg, geo = read_label(out)
    image, ref = read_image([reference])
    assert seg.shape == image.shape[1:]
    np.testing.assert_allclose(geo.spacing, ref.spacing, rtol=1e-6)
    np.testing.assert_allclose(geo.origin_xyz, ref.origin_xyz, atol=1e-5)
    np.testing.assert_allclose(geo.direction_xyz, ref.direction_xyz, atol=1e-6)
    return seg


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny networks gain nothing from a second thread, and OpenMP threads that spin while the
    other core is busy (another process) make each forward pass many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """1-channel MRI data with labels {0, 2, 5}: 3d_fullres folds 0 and 1, 2d fold 0."""
    root = tmp_path_factory.mktemp("predictor")
    raw = make_synthetic_dataset(root / "raw", SyntheticSpec(cases=6, shape=SHAPE, classes=3, seed=21))
    relabel(raw, LABELS)
    plan(raw, work=root / "W", workers=1)
    preprocess("raw", work=root / "W", workers=1)
    for config, fold in [("3d_fullres", 0), ("3d_fullres", 1), ("2d", 0)]:
        train(root / "W", "raw", TrainOptions(config, fold, **TINY))
    return root / "W"


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory) -> Path:
    """2-channel anisotropic data (MSD 4D files, 3 x 0.8 x 0.8 mm): 3d_fullres fold 0."""
    root = tmp_path_factory.mktemp("predictor2")
    spec = SyntheticSpec(cases=6, shape=SHAPE, spacing=(3.0, 0.8, 0.8), channels=2, seed=22)
    raw = make_synthetic_dataset(root / "raw", spec)
    result = plan(raw, work=root / "W", workers=1)
    assert result.plans.configurations["3d_fullres"].spacing == pytest.approx([3.0, 0.8, 0.8])
    preprocess("raw", work=root / "W", workers=1)
    train(root / "W", "raw", TrainOptions("3d_fullres", 0, **TINY))
    return root / "W"


def results(work: Path, config: str = "3d_fullres") -> Path:
    return work / "raw" / "results" / config


def test_segmentation_has_the_input_grid_with_a_rotated_direction_and_anisotropic_spacing(work, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = sample_image(0)[0]
    write_image(inputs / "rotated.nii.gz", image, rotated_geometry())
    write_image(inputs / "plain.mha", sample_image(1)[0], rotated_geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    write_image(inputs / "header.mhd", sample_image(2)[0], rotated_geometry((0.8, 1.2, 1.0)))  # + header.zraw
    write_image(inputs / "header2.nhdr", sample_image(3)[0], rotated_geometry((1.0, 1.0, 3.0)))  # + .raw.gz
    out = tmp_path / "out"
    code = main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(results(work)), "--device", "cpu"])
    assert code == 0
    # Header + data file formats name their data file by its final name (no temporary leftovers).
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in inputs.iterdir())
    assert "ElementDataFile = header.zraw" in (out / "header.mhd").read_text()
    names = ("rotated.nii.gz", "plain.mha", "header.mhd", "header2.nhdr")
    for name in names:
        seg = assert_same_grid(out / name, inputs / name)
        assert set(np.unique(seg).tolist()) <= set(VALUES)


def test_label_values_are_the_datasets_non_consecutive_values(work):
    predictor = Predictor(results(work), device="cpu")
    assert predictor.stage.label_values == VALUES
    validation = results(work) / "fold_0" / "validation"
    summary = json.loads((validation / "summary.json").read_text())
    assert summary["settings"]["labels"] == [2, 5] and set(summary["mean"]) == {"2", "5"}
    for case in summary["per_case"]:
        assert set(np.unique(read_label(validation / f"{case}.nii.gz")[0]).tolist()) <= set(VALUES)
        assert load_probability_file(validation / f"{case}.npz")[1] == VALUES
    image = sample_image(2)
    geo = rotated_geometry((1.3, 0.9, 1.1))
    out = predictor.predict_array(image, geo, "c", keep_probabilities=True)
    assert out.segmentation.shape == image.shape[1:] and out.geometry == geo
    assert out.probabilities.shape == (3, *image.shape[1:])
    # float16 accumulators (inference/sliding_window.py): probabilities to about 2**-11
    np.testing.assert_allclose(out.probabilities.sum(0), 1, atol=HALF_ACCUMULATION_TIE)
    np.testing.assert_array_equal(out.segmentation, np.asarray(VALUES)[out.probabilities.argmax(0)])
    # Whatever the (barely trained) network says, class index k is written as VALUES[k].
    props = prepare(predictor.stage, "c", image, geo).properties[-1]
    for k, value in enumerate(VALUES):
        probs = np.full((3, *props.shape_after_resampling), 0.1, np.float32)
        probs[k] = 0.8
        seg = finalize(predictor.stage, probs, props).segmentation
        inside = tuple(slice(lo, hi) for lo, hi in props.crop_bbox)
        assert (seg[inside] == value).all()


def test_a_2d_model_predicts_a_3d_volume_slice_by_slice(work, tmp_path):
    stage = load_stage(results(work, "2d"), checkpoints=["final"])
    assert stage.plan.network_dims == 2 and stage.mirror_axes == (0, 1)
    image = sample_image(3)
    prepared = prepare(stage, "c", image, rotated_geometry((1.0, 1.0, 1.0)))
    volume = prepared.images[0]
    probs = stage_probabilities(stage, volume, torch.device("cpu"))
    network = stage.networks[0]
    slices = [
        predict_volume(network, volume[:, z], stage.plan.patch_size, 3, mirror_axes=(0, 1))
        for z in range(volume.shape[1])
    ]
    # one float16 step of the accumulators at most (tiles are batched differently)
    torch.testing.assert_close(probs, torch.stack(slices, 1), atol=2**-11, rtol=0)

    path = tmp_path / "in" / "case.nii.gz"
    path.parent.mkdir()
    write_image(path, image[0], rotated_geometry())
    out = tmp_path / "out"
    assert main(["predict", "-i", str(path), "-o", str(out), "-m", str(results(work, "2d")), "--device", "cpu"]) == 0
    assert_same_grid(out / "case.nii.gz", path)


def test_a_volume_smaller_than_the_patch_is_padded_and_predicted(work):
    predictor = Predictor(results(work), folds=[0], device="cpu")
    patch = predictor.stage.plan.patch_size
    image = sample_image(4)[:, 6:11, 8:12, 6:10]  # inside the body: nothing is cropped away
    assert all(s < p for s, p in zip(image.shape[1:], patch))
    geo = Geometry((1.0, 1.0, 1.0), (3.0, 2.0, 1.0), tuple(np.eye(3).ravel()))
    out = predictor.predict_array(image, geo, keep_probabilities=True)
    assert out.segmentation.shape == image.shape[1:]
    np.testing.assert_allclose(out.probabilities.sum(0), 1, atol=HALF_ACCUMULATION_TIE)


def test_msd_4d_files_and_v2_channel_files_give_the_same_segmentation(two_channel, tmp_path):
    image = sample_image(5, channels=2)
    geo = rotated_geometry((1.2, 1.0, 0.8))
    msd, v2 = tmp_path / "msd", tmp_path / "v2"
    msd.mkdir()
    v2.mkdir()
    write_image(msd / "case_a.nii.gz", image, geo)  # 4D
    for c in range(2):
        write_image(v2 / f"case_a_{c:04d}.nii.gz", image[c], geo)
    model = str(results(two_channel))
    for folder in (msd, v2):
        code = main(["predict", "-i", str(folder), "-o", str(tmp_path / f"out_{folder.name}"), "-m", model])
        assert code == 0
        assert [p.name for p in (tmp_path / f"out_{folder.name}").iterdir()] == ["case_a.nii.gz"]
    a = assert_same_grid(tmp_path / "out_msd" / "case_a.nii.gz", v2 / "case_a_0000.nii.gz")
    b = assert_same_grid(tmp_path / "out_v2" / "case_a.nii.gz", v2 / "case_a_0000.nii.gz")
    np.testing.assert_array_equal(a, b)


def _predict_fails(capsys, inputs: Path, out: Path, model: Path, *extra: str) -> str:
    capsys.readouterr()
    code = main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(model), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error:" in err
    assert listing(out) == set(), "a failed prediction wrote into the output folder"
    return err


def test_bad_channel_inputs_exit_2_naming_the_case_and_write_nothing(two_channel, tmp_path, capsys):
    model = results(two_channel)
    image = sample_image(6, channels=2)
    geo = rotated_geometry((1.0, 1.0, 1.0))
    one = tmp_path / "one_channel"
    one.mkdir()
    write_image(one / "lonely.nii.gz", image[0], geo)
    err = _predict_fails(capsys, one, tmp_path / "out1", model)
    assert "lonely: 1 image channel(s)" in err and "expects 2" in err

    missing = tmp_path / "missing"
    missing.mkdir()
    write_image(missing / "half_0000.nii.gz", image[0], geo)
    err = _predict_fails(capsys, missing, tmp_path / "out2", model)
    assert "half: missing channel file(s) half_0001" in err

    extra = tmp_path / "extra"
    extra.mkdir()
    for c in range(3):
        write_image(extra / f"more_{c:04d}.nii.gz", image[c % 2], geo)
    err = _predict_fails(capsys, extra, tmp_path / "out3", model)
    assert "more: channel file(s) beyond the model's 2: more_0002" in err


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nan_intensities_exit_2_naming_the_case(work, tmp_path, capsys, suffix):
    image = sample_image(7)[0]
    image[4, 5, 6] = np.nan
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(inputs / f"broken{suffix}", image, rotated_geometry())
    err = _predict_fails(capsys, inputs, tmp_path / "out", results(work))
    assert "broken: the image holds NaN or infinite intensities" in err


def test_a_missing_model_or_an_untrained_fold_exits_2(work, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(inputs / "case.nii.gz", sample_image(8)[0], rotated_geometry())
    err = _predict_fails(capsys, inputs, tmp_path / "out", tmp_path / "no_model")
    assert "no_model: no trained model here" in err
    err = _predict_fails(capsys, inputs, tmp_path / "out", results(work), "-f", "3")
    assert "fold(s) 3 not found (available: 0, 1)" in err

    # A fold whose training has not finished (only checkpoint_latest.pt).
    model = tmp_path / "results" / "3d_fullres"
    shutil.copytree(results(work), model)
    (model / "fold_1" / "checkpoint_final.pt").unlink()
    err = _predict_fails(capsys, inputs, tmp_path / "out", model)
    assert "fold_1/checkpoint_final.pt: not found (training has not finished" in err
    assert main(["predict", "-i", str(inputs), "-o", str(tmp_path / "ok"), "-m", str(model), "-f", "0"]) == 0
    assert main(["predict", "-i", str(inputs), "-o", str(inputs), "-m", str(model), "-f", "0"]) == 2  # overwrite


def test_tta_changes_the_probabilities_not_the_shape_and_runs_every_mirror(work):
    image, geo = sample_image(9), rotated_geometry((1.0, 1.1, 0.9))
    calls = {}
    outputs = {}
    for tta in (True, False):
        predictor = Predictor(results(work), folds=[0], device="cpu", tta=tta)
        network = predictor.stage.networks[0]
        calls[tta] = 0

        def count(*_, tta=tta):
            calls[tta] += 1

        handle = network.register_forward_hook(count)
        outputs[tta] = predictor.predict_array(image, geo, keep_probabilities=True)
        handle.remove()
    assert outputs[True].segmentation.shape == outputs[False].segmentation.shape == image.shape[1:]
    assert outputs[True].probabilities.shape == outputs[False].probabilities.shape
    assert not np.allclose(outputs[True].probabilities, outputs[False].probabilities)
    assert calls[True] == 8 * calls[False]


def test_two_folds_average_their_probabilities(work, tmp_path):
    image, geo = sample_image(10), rotated_geometry((1.4, 0.8, 1.0))
    probs = {}
    for folds in ([0], [1], [0, 1]):
        predictor = Predictor(results(work), folds=folds, device="cpu")
        probs[tuple(folds)] = predictor.predict_array(image, geo, keep_probabilities=True).probabilities
    assert not np.allclose(probs[(0,)], probs[(1,)])
    # float16 probabilities (inference/sliding_window.py): equal to a few float16 steps
    np.testing.assert_allclose(probs[(0, 1)], (probs[(0,)] + probs[(1,)]) / 2, atol=2**-10)

    # The same through the command and its probability files (float16).
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(inputs / "c.nii.gz", image[0], geo)
    saved = {}
    for folds in (["0"], ["1"], ["0", "1"]):
        out = tmp_path / ("out_" + "_".join(folds))
        args = ["predict", "-i", str(inputs), "-o", str(out), "-m", str(results(work)), "--save-probabilities"]
        assert main([*args, "-f", *folds, "--device", "cpu"]) == 0
        p, labels, kind = load_probability_file(out / "c.npz")
        assert labels == VALUES and kind == "softmax" and p.shape == (3, *image.shape[1:])
        seg, _ = read_label(out / "c.nii.gz")
        agree = (seg == np.asarray(VALUES)[p.argmax(0)]).mean()
        assert agree > 0.99  # float16 rounding may flip near-ties
        saved[tuple(folds)] = p
    np.testing.assert_allclose(saved[("0", "1")], (saved[("0",)] + saved[("1",)]) / 2, atol=2e-3)
    np.testing.assert_allclose(saved[("0", "1")], probs[(0, 1)], atol=2e-3)


def test_predict_returns_the_timing_of_every_case_in_order(work, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, name in enumerate(["b", "a", "c"]):
        write_image(inputs / f"{name}.nii.gz", sample_image(11 + i)[0], rotated_geometry())
    timings = Predictor(results(work), device="cpu", tta=False).predict(inputs, tmp_path / "out")
    assert [t.case_id for t in timings] == ["a", "b", "c"]
    for t in timings:
        assert t.output == tmp_path / "out" / f"{t.case_id}.nii.gz" and t.output.is_file()
        assert t.preprocess_s >= 0 and t.network_s > 0 and t.export_s >= 0
        assert t.shape == list(read_label(t.output)[0].shape)


def test_the_memory_fallback_path_gives_the_same_probabilities(work):
    assert fits_on_device(torch.device("cpu"), 4, 3, (512, 512, 512))
    stage = load_stage(results(work), folds=[0])
    volume = prepare(stage, "c", sample_image(14), rotated_geometry((1.0, 1.0, 1.0))).images[0]
    args = (stage.networks[0], volume, stage.plan.patch_size, 3)
    default = predict_volume(*args, mirror_axes=(0, 1, 2))
    on_host = predict_volume(*args, mirror_axes=(0, 1, 2), accumulate_device="cpu")
    assert on_host.device.type == "cpu"
    torch.testing.assert_close(default, on_host)


def test_the_cascade_runs_its_first_stage_then_its_second(tmp_path, monkeypatch):
    raw = make_synthetic_dataset(tmp_path / "raw", SyntheticSpec(cases=5, shape=(24, 28, 26), seed=5))
    result = plan(raw, work=tmp_path / "W", workers=1, options=PlannerOptions(patch_edge_3d=12))
    assert {"3d_lowres", "3d_cascade_fullres"} <= set(result.plans.configurations)
    preprocess("raw", work=tmp_path / "W", workers=1)
    for fold in range(5):
        train(tmp_path / "W", "raw", TrainOptions("3d_lowres", fold, **TINY))
    train(tmp_path / "W", "raw", TrainOptions("3d_cascade_fullres", 0, **TINY))

    # fp32: with precision auto on a CPU with native bf16 an untrained cascade would be predicted twice
    predictor = Predictor(
        results(tmp_path / "W", "3d_cascade_fullres"), device="cpu", tta=False, engine="torch", precision="fp32"
    )
    assert predictor.stage.previous is not None and len(predictor.stage.previous.networks) == 5
    assert predictor.num_channels == 1
    seen = []
    original = predictor_module.stage_probabilities

    def spy(stage, image, *args, **kwargs):
        previous = args[4] if len(args) > 4 else kwargs.get("previous_seg")
        seen.append((stage.configuration, image.shape[1:], None if previous is None else previous.shape))
        return original(stage, image, *args, **kwargs)

    monkeypatch.setattr(predictor_module, "stage_probabilities", spy)
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, _, _ = make_case(SyntheticSpec(shape=(24, 28, 26), seed=77), 0)
    write_image(inputs / "case.nii.gz", image[0], rotated_geometry((1.0, 1.0, 1.0)))
    timings = predictor.predict(inputs, tmp_path / "out")
    assert [s[0] for s in seen] == ["3d_lowres", "3d_cascade_fullres"]
    (_, low_shape, none), (_, full_shape, previous_shape) = seen
    assert none is None and previous_shape == full_shape and math.prod(low_shape) < math.prod(full_shape)
    seg = assert_same_grid(timings[0].output, inputs / "case.nii.gz")
    assert set(np.unique(seg).tolist()) <= {0, 1, 2}

    alone = tmp_path / "alone" / "results" / "3d_cascade_fullres"
    shutil.copytree(results(tmp_path / "W", "3d_cascade_fullres"), alone)
    with pytest.raises(AutounetError, match="needs its first stage 3d_lowres"):
        load_stage(alone)
