"""DICOM input of `autounet predict`: series found in folder trees, refused when they are not one
regular stack, predicted in the series' physical geometry, named by SeriesInstanceUID or
PatientID, and (optionally) written as a DICOM SEG that references the series.

Every series is synthetic: written slice by slice with SimpleITK (no patient data).
"""

from __future__ import annotations

import importlib.util
import locale
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autounet.api import plan, preprocess
from autounet.cli import main
from autounet.data.dicom import find_dicom_series, read_dicom_series
from autounet.data.image_io import read_label, write_image
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.errors import AutounetError
from autounet.inference.inputs import discover_cases
from autounet.inference.model import StageModel
from autounet.inference.predictor import Predictor
from autounet.networks.spec import spec_from_plan
from autounet.pipeline.fold import train_and_validate
from autounet.training.options import TrainOptions
from autounet.workspace import Workspace
from conftest import geometry as plain_geometry
from test_unet import hippocampus_plans

ROOT_UID = "1.2.826.0.1.3680043.8.498"  # test UIDs under pydicom's example root
SPACING = (2.5, 0.9, 0.8)  # (z, y, x) mm
TINY = dict(epochs=1, iterations_per_epoch=2, validation_iterations=1, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(autouse=True)
def _locale_kept():
    """SimpleITK's DICOM writer (GDCM; the test helpers write series with it, autounet never does)
    sets the process's C locale to "C", which makes Python's default text encoding ASCII for every
    later test: put it back after each test."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def oblique() -> np.ndarray:
    """Direction cosines (columns: row direction, column direction, slice normal) of a tilted stack."""
    a, b = math.radians(30), math.radians(20)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    uid: str = ROOT_UID + ".1",
    patient_id: str = "P1",
    series_number: int | None = 1,
    spacing=SPACING,
    origin=(10.0, -20.0, 30.0),
    direction: np.ndarray | None = None,
    positions=None,
    shift=None,
    names=None,
    rescale=None,
) -> Path:
    """Write ``volume`` (Z, Y, X) as one DICOM file per slice: slice k at ``origin + positions[k] *
    normal`` (default ``k * spacing[0]``), plus ``shift[k]`` in the plane when given. Files are named
    ``names[k]`` (default: in reverse order of position, so that nothing relies on the names)."""
    folder.mkdir(parents=True, exist_ok=True)
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.shape[0]):
        z = k * spacing[0] if positions is None else positions[k]
        position = np.asarray(origin) + z * d[:, 2] + (0 if shift is None else shift[k] * d[:, 0])
        image = sitk.GetImageFromArray(volume[k : k + 1].astype(np.int16))
        image.SetSpacing((spacing[2], spacing[1], spacing[0]))  # the writer takes PixelSpacing from here
        image.SetOrigin(tuple(position))
        image.SetDirection(tuple(d.ravel()))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
            "0008|0018": f"{uid}.{k + 1}",
            "0008|0060": "MR",
            "0010|0010": "Synthetic^Test",
            "0010|0020": patient_id,
            "0020|000d": ROOT_UID + ".100",
            "0020|000e": uid,
            "0020|0052": ROOT_UID + ".200",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])),
            "0028|0030": f"{spacing[1]}\\{spacing[2]}",
            "0018|0050": str(spacing[0]),
        }
        if series_number is not None:
            tags["0020|0011"] = str(series_number)
        if rescale is not None:  # (slope, intercept) of slice k; the writer stores (value - b) / m
            tags["0028|1053"], tags["0028|1052"] = (str(v) for v in rescale[k])
        for key, value in tags.items():
            image.SetMetaData(key, value)
        name = names[k] if names is not None else f"IM{volume.shape[0] - k:04d}.dcm"
        writer.SetFileName(str(folder / name))
        writer.Execute(image)
    return folder


def blob_volume(shape=(7, 12, 10), seed: int = 0) -> np.ndarray:
    """Background 100 with noise, an off-centre block of 400 and a smaller one of 900 (labels 1 and 2)."""
    rng = np.random.default_rng(seed)
    v = 100 + rng.integers(0, 20, size=shape)
    v[1:5, 2:7, 1:4] = 400
    v[4:6, 8:11, 6:9] = 900
    return v.astype(np.int16)


def series_image(folder: Path) -> sitk.Image:
    """The series in ``folder`` as SimpleITK's own series reader reads it."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def refusal(root: Path) -> str:
    with pytest.raises(AutounetError) as exc:
        find_dicom_series([root])
    return str(exc.value)


# --- a model that reproduces a known segmentation ----------------------------------------------


class _PerVoxel(torch.nn.Module):
    """logits_k = weight_k * x + bias_k at every voxel: the classes are intensity bands of the
    normalised image, so the expected segmentation is known exactly."""

    weights = (0.0, 20.0, 40.0)
    biases = (0.0, 0.0, -60.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.tensor(self.weights, dtype=x.dtype).view(1, -1, 1, 1, 1)
        b = torch.tensor(self.biases, dtype=x.dtype).view(1, -1, 1, 1, 1)
        return x * w + b


def expected_labels(volume: np.ndarray) -> np.ndarray:
    z = (volume - volume.mean()) / volume.std()
    logits = np.stack([w * z + b for w, b in zip(_PerVoxel.weights, _PerVoxel.biases)])
    return np.argmax(logits, axis=0)


def per_voxel_predictor(channels: int = 1) -> Predictor:
    hippocampus = hippocampus_plans().configurations["3d_fullres"]
    norm = hippocampus.normalization[0]
    stage_plan = replace(
        hippocampus,
        spacing=list(SPACING),
        num_classes=3,
        normalization=[replace(norm, channel=c) for c in range(channels)],
        num_input_channels=channels,
    )
    stage = StageModel(
        configuration="3d_fullres",
        plan=stage_plan,
        spec=spec_from_plan(stage_plan),
        labels={"0": "background", "1": "lesion", "2": "core"},
        channel_names=["MR"] * channels,
        networks=[_PerVoxel()],
        sources=[""],
        mirror_axes=(),
    )
    return Predictor(members=[stage], device="cpu", engine="torch", precision="fp32", quiet=True)


# --- reading ------------------------------------------------------------------------------------


def test_a_series_is_read_in_slice_order_with_the_geometry_of_its_headers(tmp_path):
    volume = blob_volume()
    folder = write_series(tmp_path / "s", volume, direction=oblique())
    (series,) = find_dicom_series([tmp_path])
    assert series.series_uid == ROOT_UID + ".1" and series.patient_id == "P1" and len(series.files) == 7
    image, geometry = read_dicom_series(series)
    np.testing.assert_array_equal(image[0], volume)  # files named in reverse: sorted by position
    np.testing.assert_allclose(geometry.spacing, SPACING, rtol=1e-6)
    np.testing.assert_allclose(geometry.origin_xyz, (10.0, -20.0, 30.0), atol=1e-5)
    np.testing.assert_allclose(np.reshape(geometry.direction_xyz, (3, 3)), oblique(), atol=1e-5)
    reference = series_image(folder)
    np.testing.assert_allclose(geometry.origin_xyz, reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(geometry.direction_xyz, reference.GetDirection(), atol=1e-6)


def test_a_series_is_decoded_in_an_integer_type_unless_its_slices_rescale_differently(tmp_path):
    volume = blob_volume() // 2 * 2  # even: a slope of 2 stores them exactly
    write_series(tmp_path / "same", volume, rescale=[(1, -1024)] * 7)
    write_series(tmp_path / "mixed", volume, uid=ROOT_UID + ".2", rescale=[(1, -1024)] * 3 + [(2, 0)] * 4)
    same, mixed = find_dicom_series([tmp_path])
    assert same.integer_rescale and not mixed.integer_rescale
    image = read_dicom_series(same)[0]
    assert image.dtype.kind == "i"  # not float32: half the memory or less for 16-bit data
    np.testing.assert_array_equal(image[0], volume)
    image = read_dicom_series(mixed)[0]  # each slice's own slope and intercept: float32
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image[0], volume)


def test_a_series_split_over_two_folders_is_one_case(tmp_path):
    volume = blob_volume()
    names = [f"IM{k}.dcm" for k in range(7)]
    write_series(tmp_path / "a", volume, names=names)
    for k in range(4):  # the first four slices move to a sibling folder
        (tmp_path / "b").mkdir(exist_ok=True)
        shutil.move(tmp_path / "a" / names[k], tmp_path / "b" / names[k])
    (series,) = find_dicom_series([tmp_path])
    assert [f.parent.name for f in series.files] == ["b"] * 4 + ["a"] * 3
    np.testing.assert_array_equal(read_dicom_series(series)[0][0], volume)


def test_irregular_slice_spacing_is_refused(tmp_path):
    write_series(tmp_path / "s", blob_volume(), positions=[0, 2.5, 5, 7.5, 10.8, 13.3, 15.8])
    message = refusal(tmp_path)
    assert "irregular slice spacing" in message and ROOT_UID + ".1" in message and str(tmp_path / "s") in message


def test_a_missing_slice_is_refused(tmp_path):
    write_series(tmp_path / "s", blob_volume(), positions=[0, 2.5, 5, 10, 12.5, 15, 17.5])
    message = refusal(tmp_path)
    assert "incomplete" in message and "1 slice(s) missing" in message and "5.000 mm" in message


def test_a_deleted_slice_file_is_refused_as_missing(tmp_path):
    write_series(tmp_path / "s", blob_volume(), names=[f"IM{k}.dcm" for k in range(7)])
    (tmp_path / "s" / "IM3.dcm").unlink()
    assert "IM2.dcm and IM4.dcm" in refusal(tmp_path)


def test_duplicate_positions_are_refused(tmp_path):
    write_series(tmp_path / "s", blob_volume(), positions=[0, 2.5, 5, 5, 7.5, 10, 12.5])
    assert "lie at the same position" in refusal(tmp_path)


def test_slices_of_different_orientation_or_size_are_refused(tmp_path):
    volume = blob_volume()
    write_series(tmp_path / "a", volume, names=[f"IM{k}.dcm" for k in range(7)])
    write_series(tmp_path / "b", volume[:1], direction=oblique(), names=["IM9.dcm"])
    shutil.move(tmp_path / "b" / "IM9.dcm", tmp_path / "a" / "IM9.dcm")
    assert "different orientations" in refusal(tmp_path / "a")
    (tmp_path / "a" / "IM9.dcm").unlink()
    write_series(tmp_path / "c", np.zeros((1, 5, 5), np.int16), positions=[20.0], names=["IM8.dcm"])
    shutil.move(tmp_path / "c" / "IM8.dcm", tmp_path / "a" / "IM8.dcm")
    assert "different sizes" in refusal(tmp_path / "a")


def test_a_tilted_stack_is_refused(tmp_path):
    write_series(tmp_path / "s", blob_volume(), shift=[0.5 * k for k in range(7)])  # gantry tilt
    assert "not stacked along their normal" in refusal(tmp_path)


def test_a_single_slice_series_is_refused(tmp_path):
    write_series(tmp_path / "s", blob_volume()[:1])
    assert "a single slice" in refusal(tmp_path)


def test_a_damaged_dicom_file_is_named(tmp_path):
    write_series(tmp_path / "s", blob_volume(), names=[f"IM{k}.dcm" for k in range(7)])
    damaged = tmp_path / "s" / "IM3.dcm"
    damaged.write_bytes(damaged.read_bytes()[:-50])
    assert str(damaged) in refusal(tmp_path)


def test_a_file_name_that_is_not_utf8_is_refused_before_simpleitk_sees_it(tmp_path):
    write_series(tmp_path / "s", blob_volume())
    os.close(os.open(os.path.join(os.fsencode(tmp_path / "s"), b"IM\xff.dcm"), os.O_CREAT | os.O_WRONLY))
    assert "not valid UTF-8" in refusal(tmp_path)


def test_a_folder_of_image_files_and_dicom_files_is_refused(tmp_path):
    write_series(tmp_path / "in", blob_volume())
    write_image(tmp_path / "in" / "case.nii.gz", blob_volume(), plain_geometry())
    with pytest.raises(AutounetError, match="holds image files .* and DICOM files"):
        discover_cases([tmp_path / "in"], 1)
    with pytest.raises(AutounetError, match="a DICOM file: give the folder"):
        discover_cases([next((tmp_path / "in").glob("*.dcm"))], 1)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(AutounetError, match="no DICOM series in it or its subfolders"):
        discover_cases([empty], 1)


def test_cases_are_named_by_series_uid_or_patient_id(tmp_path):
    volume = blob_volume()
    write_series(tmp_path / "in" / "a", volume, uid=ROOT_UID + ".7", patient_id="P/2", series_number=5)
    write_series(tmp_path / "in" / "b", volume, uid=ROOT_UID + ".8", patient_id="P/2", series_number=3)
    write_series(tmp_path / "in" / "c" / "d", volume, uid=ROOT_UID + ".9", patient_id="Q1", series_number=None)
    by_uid = discover_cases([tmp_path / "in"], 1)
    assert [c.case_id for c in by_uid] == [ROOT_UID + ".7", ROOT_UID + ".8", ROOT_UID + ".9"]
    assert all(c.output_name() == c.case_id + ".nii.gz" for c in by_uid)
    by_patient = {c.series.series_uid: c.case_id for c in discover_cases([tmp_path / "in"], 1, "patientid")}
    # one patient's series in SeriesNumber order; characters a file name cannot hold become _
    assert by_patient == {ROOT_UID + ".8": "P_2_1", ROOT_UID + ".7": "P_2_2", ROOT_UID + ".9": "Q1"}
    write_series(tmp_path / "in" / "e", volume, uid=ROOT_UID + ".10", patient_id="Q1")
    assert {c.case_id for c in discover_cases([tmp_path / "in"], 1, "patientid")} >= {"Q1_1", "Q1_2"}
    write_series(tmp_path / "in" / "f", volume, uid=ROOT_UID + ".11", patient_id="P_2_1")
    with pytest.raises(AutounetError, match="would both be named P_2_1"):
        discover_cases([tmp_path / "in"], 1, "patientid")
    with pytest.raises(AutounetError, match="names the cases of DICOM series"):
        discover_cases([write_image_folder(tmp_path / "nifti")], 1, "patientid")


def write_image_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    write_image(folder / "case.nii.gz", blob_volume(), plain_geometry())
    return folder


def test_a_model_with_several_channels_refuses_dicom_series(tmp_path):
    write_series(tmp_path / "in", blob_volume())
    with pytest.raises(AutounetError, match="a DICOM series is one image channel, the model expects 2"):
        discover_cases([tmp_path / "in"], 2)


# --- prediction ---------------------------------------------------------------------------------


def test_the_segmentation_of_a_series_overlays_it_in_physical_space(tmp_path):
    axial, tilted = blob_volume(seed=1), blob_volume(seed=2)
    write_series(tmp_path / "study" / "1", axial, uid=ROOT_UID + ".21", spacing=SPACING)
    write_series(tmp_path / "study" / "2" / "x", tilted, uid=ROOT_UID + ".22", direction=oblique(), origin=(-5, 7, 3))
    predictor = per_voxel_predictor()
    predictor.predict(tmp_path / "study", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [ROOT_UID + ".21.nii.gz", ROOT_UID + ".22.nii.gz"]
    for uid, volume, folder in [(".21", axial, "1"), (".22", tilted, "2/x")]:
        out = tmp_path / "out" / f"{ROOT_UID}{uid}.nii.gz"
        seg, _ = read_label(out)
        np.testing.assert_array_equal(seg, expected_labels(volume))  # the known bands, voxel for voxel
        assert set(np.unique(seg)) == {0, 1, 2}
        written, source = sitk.ReadImage(str(out)), series_image(tmp_path / "study" / folder)
        assert written.GetSize() == source.GetSize()
        np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
        for index in [(0, 0, 0), (9, 11, 6), (3, 5, 2)]:
            np.testing.assert_allclose(
                written.TransformIndexToPhysicalPoint(index), source.TransformIndexToPhysicalPoint(index), atol=1e-3
            )


def test_dicom_seg_references_the_series_and_its_slices(tmp_path):
    pytest.importorskip("highdicom")
    import highdicom as hd
    import pydicom

    volume = blob_volume(seed=3)
    folder = write_series(tmp_path / "in", volume, direction=oblique(), series_number=4)
    per_voxel_predictor().predict(tmp_path / "in", tmp_path / "out", dicom_seg=True)
    case = ROOT_UID + ".1"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [case + ".dcm", case + ".nii.gz"]
    seg = read_label(tmp_path / "out" / f"{case}.nii.gz")[0]
    sources = sorted(
        (pydicom.dcmread(f) for f in folder.iterdir()),
        key=lambda d: float(np.dot(d.ImagePositionPatient, oblique()[:, 2])),
    )
    dcm = pydicom.dcmread(tmp_path / "out" / f"{case}.dcm")
    assert dcm.Modality == "SEG" and dcm.SegmentationType == "BINARY" and dcm.SeriesNumber == 1004
    assert dcm.ReferencedSeriesSequence[0].SeriesInstanceUID == case
    assert dcm.StudyInstanceUID == sources[0].StudyInstanceUID and dcm.PatientID == "P1"
    assert [s.SegmentLabel for s in dcm.SegmentSequence] == ["lesion", "core"]
    algorithm = dcm.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "autounet"
    # a frame for each (segment, slice) holding the segment (highdicom omits empty ones)
    expected = {(value, k) for value in (1, 2) for k in range(volume.shape[0]) if (seg[k] == value).any()}
    assert int(dcm.NumberOfFrames) == len(expected) > 0
    frames = dcm.pixel_array.reshape(len(expected), *volume.shape[1:])
    slice_of = {s.SOPInstanceUID: k for k, s in enumerate(sources)}
    found = set()
    for frame, pixels in zip(dcm.PerFrameFunctionalGroupsSequence, frames):
        value = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        k = slice_of[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        found.add((value, k))
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in sources[k].ImagePositionPatient],
            atol=1e-4,
        )
        np.testing.assert_array_equal(pixels, seg[k] == value)
    assert found == expected
    assert len(hd.seg.segread(tmp_path / "out" / f"{case}.dcm").get_segment_numbers()) == 2
    assert "a DICOM SEG (a segmentation, not an image)" in refusal(tmp_path / "out")  # never read as an input


def test_an_empty_segmentation_keeps_every_frame_of_its_dicom_seg(tmp_path):
    pytest.importorskip("highdicom")
    from autounet.inference.dicom_seg import segmentation_dataset

    write_series(tmp_path / "s", blob_volume())
    (case,) = discover_cases([tmp_path], 1)
    labels = {"0": "background", "1": "lesion", "2": "core"}
    dataset = segmentation_dataset(case.series, np.zeros((7, 12, 10), np.uint8), labels)
    assert int(dataset.NumberOfFrames) == 7 * 2 and not dataset.pixel_array.any()
    with pytest.raises(AutounetError, match="not the series' grid"):
        segmentation_dataset(case.series, np.zeros((6, 12, 10), np.uint8), labels)


def test_dicom_seg_is_refused_for_image_files_and_without_highdicom(tmp_path, monkeypatch, capsys):
    predictor = per_voxel_predictor()
    folder = write_image_folder(tmp_path / "nifti")
    if importlib.util.find_spec("highdicom") is not None:
        with pytest.raises(AutounetError, match="--dicom-seg writes a DICOM SEG for each DICOM series; 1 case"):
            predictor.predict(folder, tmp_path / "out", dicom_seg=True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "highdicom" else real(name, *a))
    with pytest.raises(AutounetError, match=r"pip install autounet\[dicom\]"):
        predictor.predict(folder, tmp_path / "out", dicom_seg=True)
    # the command refuses before it looks at the model
    code = main(
        ["predict", "-i", str(folder), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "none"), "--dicom-seg"]
    )
    assert code == 2 and "pip install autounet[dicom]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_existing_dicom_seg_counts_among_a_case_outputs(tmp_path):
    pytest.importorskip("highdicom")
    write_series(tmp_path / "in", blob_volume())
    predictor = per_voxel_predictor()
    predictor.predict(tmp_path / "in", tmp_path / "out")
    case = ROOT_UID + ".1"
    predictor.predict(tmp_path / "in", tmp_path / "out", skip_complete=True, dicom_seg=True)  # CASE.dcm missing
    assert predictor.skipped == [] and (tmp_path / "out" / f"{case}.dcm").is_file()
    (tmp_path / "out" / f"{case}.nii.gz").unlink()
    with pytest.raises(AutounetError, match=rf"already holds 1 file\(s\) this prediction would write \({case}.dcm\)"):
        predictor.predict(tmp_path / "in", tmp_path / "out", dicom_seg=True)


# --- the command line, with a trained model -----------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny 3d_fullres model (one epoch of two iterations) on 1-channel data of 1 mm spacing."""
    root = tmp_path_factory.mktemp("dicom_model")
    make_synthetic_dataset(root / "raw", SyntheticSpec(cases=5, shape=(12, 16, 14), classes=3, seed=31))
    plan(root / "raw", work=root / "W", workers=1)
    preprocess("raw", work=root / "W", workers=1)
    train_and_validate(Workspace.at(root / "W", "raw"), TrainOptions("3d_fullres", 0, **TINY), False, False)
    return root / "W" / "raw" / "results" / "3d_fullres"


def test_predict_command_reads_dicom_folders_and_refuses_bad_series(trained, tmp_path, capsys):
    volume = blob_volume(shape=(12, 16, 14))
    write_series(tmp_path / "in" / "a", volume, uid=ROOT_UID + ".31", patient_id="ANON7", spacing=(1.0, 1.0, 1.0))
    args = ["predict", "-i", str(tmp_path / "in"), "-m", str(trained), "--device", "cpu", "--no-tta"]
    seg = ["--dicom-seg"] if importlib.util.find_spec("highdicom") else []
    assert main([*args, "-o", str(tmp_path / "out"), "--name-by", "patientid", *seg]) == 0
    assert (tmp_path / "out" / "ANON7.dcm").is_file() == bool(seg)
    written = sitk.ReadImage(str(tmp_path / "out" / "ANON7.nii.gz"))
    source = series_image(tmp_path / "in" / "a")
    assert written.GetSize() == source.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    write_series(
        tmp_path / "in" / "b",
        volume,
        uid=ROOT_UID + ".32",
        positions=[0, 1, 2, 3, 4, 5, 6.5, 7.5, 8.5, 9.5, 10.5, 11.5],
    )
    capsys.readouterr()
    assert main([*args, "-o", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert f"DICOM series {ROOT_UID}.32" in err and "irregular slice spacing" in err
    assert not (tmp_path / "out2").exists()


def test_each_slice_rescale_slope_and_intercept_are_applied(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    volume = blob_volume()
    write_series(tmp_path / "s", volume, names=[f"IM{k}.dcm" for k in range(7)])
    for k in range(7):  # as PET series do: a slope of its own for one slice
        path = tmp_path / "s" / f"IM{k}.dcm"
        ds = pydicom.dcmread(path)
        ds.RescaleSlope, ds.RescaleIntercept = ("0.5" if k == 3 else "2"), "-1000"
        ds.save_as(path)
    image, _ = read_dicom_series(find_dicom_series([tmp_path])[0])
    expected = volume * 2.0 - 1000
    expected[3] = volume[3] * 0.5 - 1000
    np.testing.assert_array_equal(image[0], expected)
