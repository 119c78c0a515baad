"""Accumulators spilled to disk (issue 22, autounet.inference.spill): a rolling accumulator hands
over exactly what the whole one holds, the spill file gives back what was written, and a
prediction whose accumulators spill writes the same files as one that keeps them in memory,
leaving no spill folder behind."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from autounet.data.geometry import Geometry
from autounet.data.image_io import read_image, write_image
from autounet.errors import AutounetError
from autounet.inference import memory
from autounet.inference.sliding_window import predict_slices, predict_volume
from autounet.inference.spill import SpillFolder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Rows:
    """A sink that collects the rows it is handed into one array, checking their order."""

    def __init__(self, shape):
        self.array = np.full(shape, np.nan, np.float32)
        self.next = 0

    def write(self, z0: int, rows: torch.Tensor) -> None:
        assert z0 == self.next and rows.dtype == torch.float16
        self.array[:, z0 : z0 + rows.shape[1]] = rows.float().numpy()
        self.next = z0 + rows.shape[1]


def _inputs(folder, names, seed: int) -> None:
    """Random 20 x 30 x 26 images at 1.5 x 1.2 x 1.0 mm in ``folder`` (made), one per name."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for name in names:
        image = rng.normal(0, 1, (20, 30, 26)).astype(np.float32)
        write_image(
            folder / f"{name}.nii.gz", image, Geometry((1.5, 1.2, 1.0), (0.0,) * 3, (1.0, 0, 0, 0, 1, 0, 0, 0, 1))
        )


def _ensemble(stage):
    """A predictor of ``stage`` twice (an ensemble on one grid): PyTorch fp32, no mirroring."""
    from autounet.inference.predictor import Predictor

    return Predictor(members=[stage, stage], device="cpu", tta=False, engine="torch", precision="fp32", quiet=True)


def _spill_folders(monkeypatch) -> list:
    """The paths of the spill folders the predictor makes from now on (a list that fills)."""
    made = []

    class Counted(SpillFolder):
        def __init__(self, root, needed):
            super().__init__(root, needed)
            made.append(self.path)

    monkeypatch.setattr("autounet.inference.predictor.SpillFolder", Counted)
    return made


@pytest.mark.parametrize(
    "shape, patch, mirror",
    [
        ((19, 14, 11), (6, 8, 8), ()),  # several tiles along every axis, overlaps of uneven depth
        ((5, 14, 11), (6, 8, 8), (0, 2)),  # smaller than the patch along axis 0: padded rows are not handed over
        ((13, 9, 10), (13, 9, 10), (1,)),  # one tile
    ],
)
def test_a_rolling_accumulator_hands_over_exactly_what_the_whole_one_holds(shape, patch, mirror):
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 5, 3, padding=1).eval()
    image = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    whole = predict_volume(net, image, patch, 5, mirror_axes=mirror, tiles_per_batch=3)
    sink = Rows((5, *shape))
    assert predict_volume(net, image, patch, 5, mirror_axes=mirror, tiles_per_batch=3, sink=sink) is None
    assert sink.next == shape[0]
    np.testing.assert_array_equal(sink.array, whole.float().numpy())


def test_a_rolling_accumulator_over_the_slices_of_a_2d_network():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 4, 3, padding=1).eval()
    image = np.random.default_rng(2).normal(size=(1, 7, 20, 17)).astype(np.float32)
    whole = predict_slices(net, image, (8, 8), 4, mirror_axes=(0, 1), tiles_per_batch=5)
    sink = Rows((4, 7, 20, 17))
    predict_slices(net, image, (8, 8), 4, mirror_axes=(0, 1), tiles_per_batch=5, sink=sink)
    np.testing.assert_array_equal(sink.array, whole.float().numpy())


def test_a_spill_file_gives_back_each_class_rows_and_its_folder_goes(tmp_path):
    folder = SpillFolder(tmp_path, needed=1)
    volume = folder.volume("member0", (3, 6, 4, 5))
    data = np.random.default_rng(0).random((3, 6, 4, 5)).astype(np.float16)
    volume.write(0, torch.from_numpy(data[:, :4]))
    volume.write(4, data[:, 4:])
    for k in range(3):
        np.testing.assert_array_equal(volume.rows(k, 1, 5), data[k, 1:5])
    with pytest.raises(ValueError):
        volume.write(5, data[:, :2])  # past the end
    assert [p.name for p in tmp_path.iterdir()] == [folder.path.name]
    volume.close()
    folder.remove()
    assert list(tmp_path.iterdir()) == []


def test_a_disk_without_room_for_the_spill_is_refused_naming_it(tmp_path):
    from autounet.errors import AutounetError

    with pytest.raises(AutounetError, match=f"{tmp_path}: the probabilities of this case need"):
        SpillFolder(tmp_path, needed=1 << 60)
    assert list(tmp_path.iterdir()) == []


def test_a_prediction_with_spilled_accumulators_writes_the_same_files(tmp_path, monkeypatch):
    from test_memory_limit import tiny_stage

    stage = tiny_stage(4, patch=(16, 16, 16))
    _inputs(tmp_path / "in", ("a", "b"), seed=3)

    def predict(out: str) -> None:
        _ensemble(stage).predict(tmp_path / "in", tmp_path / out, save_probabilities=True)

    made = _spill_folders(monkeypatch)
    predict("kept")
    assert made == []
    monkeypatch.setattr(memory, "in_memory_budget", lambda limit: 0)  # every accumulator spills
    predict("spilled")
    assert len(made) == 2 and not any(p.exists() for p in made)  # one folder per case, removed
    for name in ("a", "b"):
        kept, spilled = (read_image([tmp_path / run / f"{name}.nii.gz"]) for run in ("kept", "spilled"))
        np.testing.assert_array_equal(kept[0], spilled[0])
        with np.load(tmp_path / "kept" / f"{name}.npz") as a, np.load(tmp_path / "spilled" / f"{name}.npz") as b:
            np.testing.assert_array_equal(a["probabilities"], b["probabilities"])
    assert sorted(p.name for p in (tmp_path / "spilled").iterdir()) == sorted(
        p.name for p in (tmp_path / "kept").iterdir()
    )


def test_the_export_reads_the_next_class_rows_in_a_second_thread(tmp_path, monkeypatch):
    """Without --save-probabilities (the one-grid argmax): the segmentation is the same spilled
    or not, and the spilled rows are read outside the calling thread: by the reader thread (the
    next class's while this one is reverted) with one PyTorch thread, by the slab threads with
    more where there are several slabs."""
    import threading

    from autounet.inference.spill import SpillVolume
    from test_memory_limit import tiny_stage

    stage = tiny_stage(4, patch=(16, 16, 16))
    _inputs(tmp_path / "in", ("a",), seed=5)

    def predict(out: str) -> np.ndarray:
        _ensemble(stage).predict(tmp_path / "in", tmp_path / out)
        return read_image([tmp_path / out / "a.nii.gz"])[0]

    kept = predict("kept")
    readers = set()
    original = SpillVolume.rows
    monkeypatch.setattr(
        SpillVolume,
        "rows",
        lambda self, k, z0, z1: readers.add((k, threading.current_thread().name)) or original(self, k, z0, z1),
    )
    monkeypatch.setattr(memory, "in_memory_budget", lambda limit: 0)  # every accumulator spills
    threads = torch.get_num_threads()
    try:
        for count, prefix in ((1, "autounet-export-reader"), (2, "autounet-export")):
            torch.set_num_threads(count)
            readers.clear()
            np.testing.assert_array_equal(predict(f"spilled{count}"), kept)
            assert {k for k, _ in readers} == {0, 1, 2, 3}
            assert all(name.startswith(prefix) for _, name in readers), readers
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_read_that_fails_in_an_export_thread_reaches_the_caller_and_leaves_nothing(tmp_path, monkeypatch, threads):
    """A spill file that lost its end (class 2 onwards cannot be read: in the reader thread with
    one PyTorch thread, in a slab thread with two): the error naming the file reaches the caller,
    no segmentation is written, and the spill folder is removed."""
    from autounet.inference.spill import SpillVolume
    from test_memory_limit import tiny_stage

    stage = tiny_stage(4, patch=(16, 16, 16))
    _inputs(tmp_path / "in", ("a",), seed=6)
    made, cut, original = _spill_folders(monkeypatch), set(), SpillVolume.rows

    def rows(self, k, z0, z1):  # the file loses class 2 onwards before it is first read
        if self.path not in cut:
            cut.add(self.path)
            os.ftruncate(self._fd, self._offset(2, 0))
        return original(self, k, z0, z1)

    monkeypatch.setattr(SpillVolume, "rows", rows)
    monkeypatch.setattr(memory, "in_memory_budget", lambda limit: 0)  # every accumulator spills
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        predictor = _ensemble(stage)
        with pytest.raises(AutounetError, match=r"\.f16: cannot read the spilled probabilities back"):
            predictor.predict(tmp_path / "in", tmp_path / "out")
    finally:
        torch.set_num_threads(before)
    assert len(made) == 1 and not made[0].exists()
    assert not (tmp_path / "out" / "a.nii.gz").exists()
