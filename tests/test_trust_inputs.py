"""Files from strangers (issue 21): names from DICOM data never become paths, `--continue`
verifies the outputs it keeps, non-image DICOM objects beside a series are skipped, a crafted
NIfTI header is refused before anything is allocated, and an engine that fails at run time
hands the whole case to PyTorch.

Every series and image is synthetic (written with SimpleITK, pydicom where said).
"""

from __future__ import annotations

import gzip
import locale
import struct
from pathlib import Path

import numpy as np
import pytest

from autounet.data.image_io import read_label, write_image
from autounet.errors import AutounetError
from autounet.inference.inputs import discover_cases
from conftest import geometry
from test_dicom import ROOT_UID, SPACING, blob_volume, per_voxel_predictor, write_series


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(autouse=True)
def _locale_kept():
    """SimpleITK's DICOM writer (used by the helpers) sets the C locale to "C": put it back."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# --- 1. a SeriesInstanceUID or PatientID is never a path ----------------------------------------


@pytest.mark.parametrize("uid", ["../../escaped", "/ABSOLUTE/escaped", "1.2/../../x", "..", "1.2.3\\4"])
def test_a_hostile_series_uid_writes_nothing_outside_the_output_folder(tmp_path, uid):
    if uid.startswith("/"):
        uid = str(tmp_path / "abs" / "escaped")
    write_series(tmp_path / "in", blob_volume(), uid=uid)
    before = files_under(tmp_path)
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(AutounetError) as exc:
        per_voxel_predictor().predict(tmp_path / "in", out)
    message = str(exc.value)
    assert "SeriesInstanceUID" in message and str(tmp_path / "in") in message
    assert files_under(tmp_path) == before  # nothing written anywhere: not outside -o, not in it
    assert not (tmp_path / "a").exists()


def test_a_long_numeric_uid_still_names_its_case(tmp_path):
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    write_series(tmp_path / "in", blob_volume(), uid=uid)
    per_voxel_predictor().predict(tmp_path / "in", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [uid + ".nii.gz"]


@pytest.mark.parametrize(
    ("patient", "name"),
    [("../../evil", "_._.._evil"), ("/etc/passwd", "_etc_passwd"), ("a\\b", "a_b"), ("Müller", "M_ller")],
)
def test_a_patient_id_with_path_characters_is_mapped_to_a_safe_name(tmp_path, patient, name):
    write_series(tmp_path / "in", blob_volume(), patient_id=patient)
    (case,) = discover_cases([tmp_path / "in"], 1, "patientid")
    assert case.case_id == name
    per_voxel_predictor().predict(tmp_path / "in", tmp_path / "o" / "out", name_by="patientid")
    assert {p.relative_to(tmp_path / "o") for p in files_under(tmp_path / "o")} == {Path("out") / f"{name}.nii.gz"}


def test_an_output_that_is_a_link_out_of_the_folder_is_refused(tmp_path):
    write_series(tmp_path / "in", blob_volume())
    (tmp_path / "out").mkdir()
    victim = tmp_path / "victim.nii.gz"
    victim.write_bytes(b"not yours")
    (tmp_path / "out" / f"{ROOT_UID}.1.nii.gz").symlink_to(victim)
    with pytest.raises(AutounetError, match="resolves outside the output folder"):
        per_voxel_predictor().predict(tmp_path / "in", tmp_path / "out", overwrite=True)
    assert victim.read_bytes() == b"not yours"


def test_the_path_helper_refuses_what_leaves_its_folder(tmp_path):
    from autounet.utils.paths import inside

    assert inside(tmp_path, "1.2.3.nii.gz") == tmp_path / "1.2.3.nii.gz"
    for name in ["../x", "/etc/passwd", "a/../../b", "", ".", "a/b"]:
        with pytest.raises(AutounetError, match="outside the output folder|not a file name"):
            inside(tmp_path, name)


# --- 8. --continue verifies what it keeps -------------------------------------------------------


def nifti_inputs(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True)
    for k in range(count):
        write_image(folder / f"case{k}.nii.gz", blob_volume(seed=k), geometry(SPACING[::-1]))
    return folder


def test_continue_redoes_a_truncated_segmentation_and_names_it(tmp_path, capsys):
    predictor = per_voxel_predictor()
    inputs = nifti_inputs(tmp_path / "in")
    predictor.predict(inputs, tmp_path / "out")
    damaged = tmp_path / "out" / "case1.nii.gz"
    reference, _ = read_label(damaged)
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    predictor.predict(inputs, tmp_path / "out", skip_complete=True)
    err = capsys.readouterr().err
    assert predictor.skipped == ["case0"]
    assert [line for line in err.splitlines() if "damaged" in line] == [
        next(line for line in err.splitlines() if "case1" in line and "damaged" in line)
    ]
    seg, _ = read_label(damaged)
    np.testing.assert_array_equal(seg, reference)


def test_continue_redoes_an_uncompressed_output_cut_short(tmp_path, capsys):
    predictor = per_voxel_predictor()
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(inputs / "case0.nii", blob_volume(), geometry(SPACING[::-1]), compress=False)
    predictor.predict(inputs, tmp_path / "out")
    damaged = tmp_path / "out" / "case0.nii"
    reference, _ = read_label(damaged)
    damaged.write_bytes(damaged.read_bytes()[:-100])
    predictor.predict(inputs, tmp_path / "out", skip_complete=True)
    assert predictor.skipped == [] and "case0" in capsys.readouterr().err
    seg, _ = read_label(damaged)
    np.testing.assert_array_equal(seg, reference)


def test_continue_verifies_the_probabilities_too(tmp_path, capsys):
    predictor = per_voxel_predictor()
    inputs = nifti_inputs(tmp_path / "in")
    predictor.predict(inputs, tmp_path / "out", save_probabilities=True)
    npz = tmp_path / "out" / "case0.npz"
    good = npz.read_bytes()
    npz.write_bytes(good[: len(good) - 200])
    capsys.readouterr()
    predictor.predict(inputs, tmp_path / "out", save_probabilities=True, skip_complete=True)
    assert predictor.skipped == ["case1"]
    err = capsys.readouterr().err
    assert "case0" in err and "case0.npz" in err and "damaged" in err
    assert npz.read_bytes()[:4] == good[:4] and len(npz.read_bytes()) == len(good)
    predictor.predict(inputs, tmp_path / "out", save_probabilities=True, skip_complete=True)
    assert predictor.skipped == ["case0", "case1"]


# --- 18. a crafted NIfTI header ------------------------------------------------------------------


def crafted_nifti(path: Path, dims: tuple[int, ...], datatype: int = 16, bitpix: int = 32, payload: int = 64) -> Path:
    """A NIfTI-1 header declaring ``dims`` of ``datatype``, followed by ``payload`` bytes only."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<2h", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, 1.0, *([1.0] * 7))
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    raw = bytes(header) + b"\0" * 4 + b"\0" * payload
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


@pytest.mark.parametrize("name", ["huge.nii.gz", "huge.nii"])
@pytest.mark.parametrize("dims", [(32767, 32767, 32767, 32767), (4, 4, 4, 32767 * 32767), (2048, 2048, 2048)])
def test_a_crafted_nifti_header_is_refused_before_any_allocation(tmp_path, name, dims):
    from autounet.data.image_verify import verify_image_file, verify_image_header
    from autounet.data.nifti_scan import nonfinite_per_volume

    if dims[3:] and dims[3] > 32767:  # a NIfTI-1 dim is 16 bits: spread over dims 4 and 5
        dims = (*dims[:3], 32767, 32767)
    path = crafted_nifti(tmp_path / name, dims)
    for check in (verify_image_file, verify_image_header):
        try:
            check(path) if check is verify_image_header else check(path, count_nonfinite=True)
        except AutounetError as exc:
            assert str(path) in str(exc) and ("declares" in str(exc))
        else:
            assert check is verify_image_header and name.endswith(".gz") and dims == (2048, 2048, 2048)
    assert nonfinite_per_volume(path) is None


def test_predict_refuses_a_crafted_nifti_with_one_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    crafted_nifti(tmp_path / "in" / "huge.nii.gz", (4, 4, 4, 32767, 32767))
    with pytest.raises(AutounetError, match=r"huge\.nii\.gz.*declares"):
        per_voxel_predictor().predict(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- 13. non-image DICOM objects beside a series ---------------------------------------------------


def write_non_image(path: Path, modality: str, sop_class: str) -> Path:
    """A DICOM object without pixel data (an SR, a KO, ...), written with pydicom."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ROOT_UID + ".900." + str(len(modality))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, "P1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = ROOT_UID + ".100", ROOT_UID + ".901", 99
    path.parent.mkdir(parents=True, exist_ok=True)
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)
    return path


NON_IMAGES = [
    ("SR", "1.2.840.10008.5.1.4.1.1.88.11", "sr.dcm"),
    ("KO", "1.2.840.10008.5.1.4.1.1.88.59", "KO0001"),  # no ending: found by its DICM mark
    ("PR", "1.2.840.10008.5.1.4.1.1.11.1", "pr.dcm"),
    ("RTSTRUCT", "1.2.840.10008.5.1.4.1.1.481.3", "rs.dcm"),
]


@pytest.mark.parametrize("with_pydicom", [True, False])
def test_non_image_objects_beside_a_series_are_skipped_with_a_note(tmp_path, capsys, monkeypatch, with_pydicom):
    write_series(tmp_path / "in" / "s", blob_volume())
    for modality, sop_class, name in NON_IMAGES:
        write_non_image(tmp_path / "in" / "s" / name, modality, sop_class)
    write_non_image(tmp_path / "in" / "reports" / "sr.dcm", "SR", NON_IMAGES[0][1])  # a folder of reports only
    if not with_pydicom:  # reading series needs SimpleITK alone: the file meta header's bytes tell
        import builtins

        real_import = builtins.__import__

        def no_pydicom(name, *args, **kwargs):
            if name == "pydicom" or name.startswith("pydicom."):
                raise ImportError("no pydicom here")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_pydicom)
    capsys.readouterr()
    predictor = per_voxel_predictor()
    predictor.predict(tmp_path / "in", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [ROOT_UID + ".1.nii.gz"]
    notes = [line for line in capsys.readouterr().err.splitlines() if "not images" in line]
    assert len(notes) == 1 and "skipped 5 DICOM object(s)" in notes[0] and "sr.dcm" in notes[0]


def test_a_damaged_image_beside_non_image_objects_is_still_refused(tmp_path):
    write_series(tmp_path / "s", blob_volume(), names=[f"IM{k}.dcm" for k in range(7)])
    write_non_image(tmp_path / "s" / "sr.dcm", *NON_IMAGES[0][:2])
    damaged = tmp_path / "s" / "IM3.dcm"
    damaged.write_bytes(damaged.read_bytes()[:-50])
    with pytest.raises(AutounetError, match="IM3.dcm"):
        discover_cases([tmp_path], 1)


def test_an_image_cut_off_before_its_pixels_is_refused_not_skipped_as_a_non_image(tmp_path):
    pytest.importorskip("pydicom")
    write_series(tmp_path / "s", blob_volume(), names=[f"IM{k}.dcm" for k in range(7)])
    damaged = tmp_path / "s" / "IM3.dcm"
    data = damaged.read_bytes()
    rows = data.find(b"\x28\x00\x10\x00")  # (0028,0010) Rows: the cut leaves neither Rows nor pixels
    assert rows > 0
    damaged.write_bytes(data[:rows])
    with pytest.raises(AutounetError, match="IM3.dcm"):
        discover_cases([tmp_path], 1)


def test_a_folder_of_reports_only_says_so(tmp_path):
    write_non_image(tmp_path / "r" / "sr.dcm", *NON_IMAGES[0][:2])
    with pytest.raises(AutounetError, match=r"no DICOM series .*only 1 DICOM object\(s\) that are not images"):
        discover_cases([tmp_path / "r"], 1)


# --- 16. an engine that fails at run time: one engine per case -------------------------------------


def _flaky_engine(network, fail_at: int | None, exception: type[BaseException] = RuntimeError):
    """A converted engine (as OpenVINO's) whose logits differ from PyTorch's (class 2 everywhere, so
    a tile it predicted shows) and that fails on its ``fail_at``-th call."""
    import torch

    from autounet.inference.engines import _ConvertedEngine

    class Flaky(_ConvertedEngine):
        def __init__(self):
            super().__init__("openvino", "bf16", network)
            self.calls = 0

        def _run(self, x):
            self.calls += 1
            if fail_at is not None and self.calls >= fail_at:
                raise exception("device lost")
            logits = network(torch.from_numpy(x)).numpy()
            logits[:, 2] += 1000.0
            return logits

    return Flaky()


def small_patch_predictor(engines=None):
    from dataclasses import replace

    predictor = per_voxel_predictor()
    stage = predictor.members[0]
    stage.plan = replace(stage.plan, patch_size=[4, 4, 4])  # many tiles for the 7x12x10 volume
    if engines is None:
        return predictor
    stage.networks = engines(stage.networks[0].network)
    stage.sources = [""] * len(stage.networks)
    from autounet.inference.predictor import Predictor

    return Predictor(members=[stage], device="cpu", engine="torch", precision="fp32", quiet=True)


def test_a_runtime_engine_failure_redoes_the_whole_case_with_pytorch(tmp_path, capsys):
    inputs = nifti_inputs(tmp_path / "in")
    small_patch_predictor().predict(inputs, tmp_path / "reference")
    predictor = small_patch_predictor(lambda net: [_flaky_engine(net, None), _flaky_engine(net, 4)])
    capsys.readouterr()
    predictor.predict(inputs, tmp_path / "out")
    err = capsys.readouterr().err
    for case in ("case0", "case1"):  # every tile of each case from PyTorch fp32, in both networks
        np.testing.assert_array_equal(
            read_label(tmp_path / "out" / f"{case}.nii.gz")[0], read_label(tmp_path / "reference" / f"{case}.nii.gz")[0]
        )
    assert {e.describe() for e in predictor.members[0].networks} == {"torch fp32"}
    notes = [line for line in err.splitlines() if "failed at run time" in line]
    assert len(notes) == 1 and "RuntimeError: device lost" in notes[0] and "case0" in notes[0]


def test_a_memory_error_is_never_taken_for_an_engine_failure(tmp_path):
    inputs = nifti_inputs(tmp_path / "in", 1)
    predictor = small_patch_predictor(lambda net: [_flaky_engine(net, 2, MemoryError)])
    with pytest.raises(MemoryError):
        predictor.predict(inputs, tmp_path / "out")
    assert predictor.members[0].networks[0].describe() == "openvino bf16"


# --- 20. --dicom-seg with pydicom 2 and 3 ----------------------------------------------------------


@pytest.mark.parametrize("generation", [2, 3])
def test_dicom_seg_is_saved_with_either_pydicom_generation(tmp_path, generation):
    from autounet.inference.dicom_seg import write_dicom_seg

    calls = []

    class Pydicom2Dataset:  # pydicom 2's save_as: write_like_original, no enforce_file_format
        def save_as(self, filename, write_like_original=True):
            calls.append({"write_like_original": write_like_original})
            Path(filename).write_bytes(b"DICM")

    class Pydicom3Dataset:
        def save_as(self, filename, /, __write_like_original=None, *, implicit_vr=None, enforce_file_format=False):
            calls.append({"enforce_file_format": enforce_file_format})
            Path(filename).write_bytes(b"DICM")

    dataset = Pydicom2Dataset() if generation == 2 else Pydicom3Dataset()
    write_dicom_seg(tmp_path / "x.dcm", dataset)
    assert calls == [{"write_like_original": False} if generation == 2 else {"enforce_file_format": True}]
    assert (tmp_path / "x.dcm").read_bytes() == b"DICM"


def test_a_uid_with_a_line_break_is_shown_on_one_line(tmp_path):
    write_series(tmp_path / "in", blob_volume(), uid="1.2\nERROR: fake", positions=[0, 1, 2, 3, 4.5, 5.5, 6.5])
    with pytest.raises(AutounetError) as exc:
        discover_cases([tmp_path / "in"], 1)
    assert "\n" not in str(exc.value) and "'1.2\\nERROR: fake'" in str(exc.value)


@pytest.mark.parametrize("uid", ["1.2.3\n", "1.2.3.", ".1.2", "1..2", "1.2.a", "1" * 65, ""])
def test_only_a_valid_uid_names_a_case(uid):
    from autounet.data.dicom import DicomSeries
    from autounet.inference.inputs import series_case_name

    with pytest.raises(AutounetError, match="is not a valid UID"):
        series_case_name(DicomSeries(uid, (Path("a.dcm"),), (Path("in"),), "P1", 1))
    assert series_case_name(DicomSeries("1." + "2" * 62, (Path("a.dcm"),), (Path("in"),), "P1", 1)) == "1." + "2" * 62
