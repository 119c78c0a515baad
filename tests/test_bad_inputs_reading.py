"""Hard to break: no accepted corruption (issue 15).

Each test plants one fault in what a command reads (an image cut off inside its voxel data, a raw
file shorter than its header, a spacing of 0 in a NIfTI header, a file name that is not UTF-8, a
truncated JSON document, a damaged ``.npz`` or ``.npy``) and checks that the command exits 2 (or
the API raises AutounetError) with a message naming the file or case, prints no traceback, and
leaves every earlier output as it was.

A tiny model (3d_fullres and 2d, fold 0, validated) is trained once for the module.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autounet import api
from autounet.cli import main
from autounet.data.dataset import parse_raw_dataset
from autounet.data.image_io import ImageReadError, read_image_scanned, read_label, read_volume, write_image
from autounet.data.probabilities import load_probability_file
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.errors import AutounetError
from autounet.pipeline.fold import train_and_validate
from autounet.preprocessing.store import case_paths, check_preprocessed, is_complete
from autounet.training.options import TrainOptions
from autounet.utils.atomic import read_json
from autounet.utils.loaders import load_npy, load_npz
from autounet.workspace import Workspace
from conftest import geometry, listing

TINY = dict(epochs=1, iterations_per_epoch=2, validation_iterations=1, device="cpu")
SPEC = SyntheticSpec(cases=5, shape=(12, 14, 16), seed=5)
ENV = {**os.environ, "AUTOUNET_PROGRESS": "0"}
CLI = [sys.executable, "-m", "autounet"]
BAD_NAME = os.fsdecode(b"synth_bad\xff")  # byte 0xff: not UTF-8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """``root/raw`` and ``root/W/raw``: 3d_fullres and 2d fold 0 trained and validated."""
    root = tmp_path_factory.mktemp("reading")
    raw = make_synthetic_dataset(root / "raw", SPEC)
    api.plan(raw, work=root / "W", workers=1)
    api.preprocess("raw", work=root / "W", workers=1, configurations=["3d_fullres", "2d"])
    for config in ("3d_fullres", "2d"):
        train_and_validate(Workspace.at(root / "W", "raw"), TrainOptions(config, 0, **TINY), True, False)
    return root


def copy_work(root: Path, tmp_path: Path) -> Path:
    """A copy of the trained workspace (its dataset.json still names ``root/raw``)."""
    work = tmp_path / "W"
    shutil.copytree(root / "W", work)
    return work


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def cut_inside_voxels(path: Path) -> None:
    """Keep the first half of a compressed image: its header survives, its voxel data end early."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_intact(before: dict[str, bytes], folder: Path) -> None:
    """Every file of ``before`` is still in ``folder``, unchanged."""
    now = snapshot(folder)
    changed = [name for name, data in before.items() if now.get(name) != data]
    assert not changed, f"changed or removed: {changed}"


def set_pixdim(path: Path, axis: int, value: float) -> None:
    """Write ``value`` into pixdim[axis] (1: x, 2: y, 3: z) of a NIfTI-1 file's header, as stored."""
    gz = path.name.endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    assert struct.unpack("<i", data[:4])[0] == 348
    struct.pack_into("<f", data, 76 + 4 * axis, value)
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))


# --- 1. truncated and corrupt image files ----------------------------------------------------


def test_simpleitk_itself_reads_a_cut_nii_gz_without_a_word(tmp_path):
    """The fault the checks exist for (if ITK starts refusing such files, this test can go)."""
    p = write_image_file(tmp_path / "a.nii.gz")
    cut_inside_voxels(p)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(p))).shape == (12, 14, 16)
    with pytest.raises(ImageReadError) as e:
        read_volume(p)
    assert e.value.kind == "truncated_file" and str(p) in str(e.value) and "truncated" in str(e.value)


def write_image_file(path: Path, dtype=np.float32) -> Path:
    arr = (np.arange(12 * 14 * 16).reshape(12, 14, 16) % 97 + 1).astype(dtype)
    write_image(path, arr, geometry((2.0, 1.0, 0.5)), compress=path.name.endswith((".gz", ".mha", ".nrrd")))
    return path


@pytest.mark.parametrize("name", ["a.nii.gz", "a.nii", "a.mha", "a.nrrd", "a.mhd", "a.nhdr"])
def test_every_format_reads_intact_and_refuses_data_shorter_than_its_header(tmp_path, name):
    p = write_image_file(tmp_path / name)
    arr, geo = read_volume(p)
    assert arr.shape == (1, 12, 14, 16) and geo.spacing == (2.0, 1.0, 0.5)
    data_file = p
    if name.endswith((".mhd", ".nhdr")):  # the voxels are in a separate file
        (data_file,) = [q for q in tmp_path.iterdir() if q != p]
    data = data_file.read_bytes()
    data_file.write_bytes(data[:-40])
    with pytest.raises(ImageReadError) as e:
        read_volume(p)
    assert e.value.kind == "truncated_file" and str(data_file) in str(e.value)


def test_a_gzip_crc_error_and_a_missing_gzip_trailer_are_refused(tmp_path):
    p = write_image_file(tmp_path / "a.nii.gz")
    good = p.read_bytes()
    p.write_bytes(good[:-4])  # only the length field of the trailer is missing: ITK reads it
    with pytest.raises(ImageReadError, match="truncated"):
        read_volume(p)
    bad = bytearray(good)
    bad[-8] ^= 0xFF  # the CRC
    p.write_bytes(bytes(bad))
    with pytest.raises(ImageReadError, match="CRC"):
        read_volume(p)


def test_a_truncated_nii_gz_fails_check_and_plan_naming_the_case(tmp_path, capsys):
    raw = make_synthetic_dataset(tmp_path / "raw", SPEC)
    cut_inside_voxels(raw / "imagesTr" / "synth_002.nii.gz")
    code, out, _ = run(capsys, "check", raw, "-j", "1")
    assert code == 2
    assert "synth_002: image: imagesTr/synth_002.nii.gz: the compressed data end early: the file is truncated" in out
    code, out, err = run(capsys, "plan", raw, "--work", tmp_path / "W", "-j", "1")
    assert code == 2 and "synth_002" in out + err
    assert not (tmp_path / "W" / "raw" / "plans.json").exists()


def test_a_raw_nii_shorter_than_its_header_fails_check(tmp_path, capsys):
    raw = make_synthetic_dataset(tmp_path / "raw", SPEC)
    image = raw / "imagesTr" / "synth_001.nii.gz"
    flat = raw / "imagesTr" / "synth_001.nii"
    flat.write_bytes(gzip.decompress(image.read_bytes())[:-100])
    image.unlink()
    descriptor = read_json(raw / "dataset.json", dict)
    for entry in descriptor["training"]:
        entry["image"] = entry["image"].replace("synth_001.nii.gz", "synth_001.nii")
    (raw / "dataset.json").write_text(json.dumps(descriptor))
    code, out, _ = run(capsys, "check", raw, "-j", "1")
    assert code == 2
    assert "synth_001: image: imagesTr/synth_001.nii: the file is truncated" in out


def test_preprocess_refuses_a_corrupt_file_of_unchanged_size_and_time(tmp_path, capsys):
    """Bit rot after planning: the dataset signature (sizes, times) is unchanged, the data are not."""
    raw = make_synthetic_dataset(tmp_path / "raw", SPEC)
    work = tmp_path / "W"
    api.plan(raw, work=work, workers=1)
    label = raw / "labelsTr" / "synth_003.nii.gz"
    stat = label.stat()
    data = bytearray(label.read_bytes())
    for i in range(len(data) // 2, len(data) - 8):
        data[i] ^= 0x5A
    label.write_bytes(bytes(data))
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code, out, err = run(capsys, "preprocess", "raw", "--work", work, "-j", "1", "-c", "3d_fullres")
    assert code == 2
    assert "synth_003" in out + err and "synth_003.nii.gz" in out + err and "corrupt" in out + err
    folder = work / "raw" / "preprocessed" / "3d_fullres"
    assert not case_paths(folder, "synth_003")["properties"].exists()
    assert (folder / "synth_000.json").exists()  # the other cases were preprocessed


def test_predict_evaluate_show_and_postprocess_refuse_a_truncated_image(trained, tmp_path, capsys):
    model = trained / "W" / "raw" / "results" / "3d_fullres"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((trained / "raw" / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(f, inputs / f.name)
    cut_inside_voxels(inputs / "synth_001.nii.gz")
    code, _, err = run(capsys, "predict", "-i", inputs, "-o", tmp_path / "out", "-m", model, "--device", "cpu")
    assert code == 2 and "synth_001" in err and "truncated" in err
    assert listing(tmp_path / "out") == set(), "nothing is predicted before every input is verified"

    preds = tmp_path / "preds"
    shutil.copytree(trained / "W" / "raw" / "results" / "3d_fullres" / "fold_0" / "validation", preds)
    seg = next(preds.glob("*.nii.gz"))
    refs = tmp_path / "refs"
    refs.mkdir()
    shutil.copy(trained / "raw" / "labelsTr" / seg.name, refs)
    cut_inside_voxels(seg)
    before = snapshot(preds)
    code, _, err = run(capsys, "evaluate", preds, refs, "-j", "1")
    assert code == 2 and seg.name in err and "truncated" in err
    assert snapshot(preds) == before  # no evaluation.json written, nothing changed

    code, _, err = run(capsys, "show", inputs / "synth_001.nii.gz", "-o", tmp_path / "pic.png")
    assert code == 2 and "synth_001.nii.gz" in err and "truncated" in err
    assert not (tmp_path / "pic.png").exists()

    api.select("raw", work=copy_work(trained, tmp_path), workers=1)
    code, _, err = run(capsys, "postprocess", preds, tmp_path / "pp", "--from", tmp_path / "W" / "raw", "-j", "1")
    assert code == 2 and seg.name in err and "truncated" in err


# --- 2. header sanity ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_a_zero_negative_or_nan_nifti_spacing_is_refused(tmp_path, value):
    p = write_image_file(tmp_path / "a.nii")
    set_pixdim(p, 2, value)
    assert all(s > 0 for s in sitk.ReadImage(str(p)).GetSpacing())  # what ITK would make of it
    with pytest.raises(ImageReadError) as e:
        read_volume(p)
    assert e.value.kind == "invalid_header" and str(p) in str(e.value) and "pixdim y" in str(e.value)


def test_zero_spacing_fails_check_plan_and_predict_naming_the_case(trained, tmp_path, capsys):
    raw = make_synthetic_dataset(tmp_path / "raw", SPEC)
    set_pixdim(raw / "imagesTr" / "synth_004.nii.gz", 1, 0.0)
    set_pixdim(raw / "labelsTr" / "synth_004.nii.gz", 1, 0.0)
    code, out, _ = run(capsys, "check", raw, "-j", "1")
    assert code == 2 and "synth_004: image: imagesTr/synth_004.nii.gz: invalid voxel spacing" in out
    assert "synth_004: label: labelsTr/synth_004.nii.gz: invalid voxel spacing" in out
    code, out, err = run(capsys, "plan", raw, "--work", tmp_path / "W", "-j", "1")
    assert code == 2 and "synth_004" in out + err and not (tmp_path / "W" / "raw" / "plans.json").exists()

    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(trained / "raw" / "imagesTr" / "synth_000.nii.gz", inputs)
    shutil.copy(raw / "imagesTr" / "synth_004.nii.gz", inputs)
    model = trained / "W" / "raw" / "results" / "3d_fullres"
    code, _, err = run(capsys, "predict", "-i", inputs, "-o", tmp_path / "out", "-m", model, "--device", "cpu")
    assert code == 2 and "synth_004" in err and "pixdim x = 0" in err
    assert listing(tmp_path / "out") == set()


def test_check_warns_of_a_tiny_case_and_plan_names_it(tmp_path, capsys):
    raw = make_synthetic_dataset(tmp_path / "raw", SyntheticSpec(cases=6, shape=(12, 14, 16), seed=6))
    write_image(raw / "imagesTr" / "synth_005.nii.gz", np.full((1, 1, 1), 3.0, np.float32), geometry())
    write_image(raw / "labelsTr" / "synth_005.nii.gz", np.ones((1, 1, 1), np.uint8), geometry())
    code, out, _ = run(capsys, "check", raw, "-j", "1")
    assert code == 0
    assert "synth_005: shape 1x1x1 (Z, Y, X) is below 25% of the dataset's median" in out
    code, out, _ = run(capsys, "plan", raw, "--work", tmp_path / "W", "-j", "1")
    assert code == 0
    warned = [line for line in out.splitlines() if line.startswith("warning: 3d_fullres:")]
    assert len(warned) == 1 and "synth_005 (1x1x1)" in warned[0] and "coarsest feature map" in warned[0]
    plans = read_json(tmp_path / "W" / "raw" / "plans.json", dict)
    assert any("synth_005" in n for n in plans["notes"])


# --- 3. file names that are not UTF-8 --------------------------------------------------------


def test_a_non_utf8_file_name_is_refused_by_check_and_plan_not_aborting(tiny_v2, tmp_path):
    images, labels = tiny_v2 / "imagesTr", tiny_v2 / "labelsTr"
    for c in (0, 1):
        shutil.copy(images / f"synth_000_{c:04d}.nii.gz", images / f"{BAD_NAME}_{c:04d}.nii.gz")
    shutil.copy(labels / "synth_000.nii.gz", labels / f"{BAD_NAME}.nii.gz")
    for args in (["check", tiny_v2, "-j", "1"], ["plan", tiny_v2, "--work", tmp_path / "W", "-j", "1"]):
        done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)
        assert done.returncode == 2, done.stdout + done.stderr  # not -6 (SIGABRT inside ITK)
        assert "synth_bad\\xff.nii.gz: the file name is not valid UTF-8" in done.stdout
        assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "W" / "tiny_v2").exists()


def test_a_non_utf8_name_in_dataset_json_is_a_finding(tiny_msd):
    descriptor = read_json(tiny_msd / "dataset.json", dict)
    descriptor["training"][0]["image"] = "./imagesTr/synth_bad\udcff.nii.gz"
    (tiny_msd / "dataset.json").write_text(json.dumps(descriptor))
    dataset, findings = parse_raw_dataset(tiny_msd)
    assert [f.kind for f in findings] == ["invalid_file_name"]
    assert "synth_bad\\xff.nii.gz" in str(findings[0]) and "\udcff" not in str(findings[0])


def test_predict_refuses_an_input_with_a_non_utf8_name(trained, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(trained / "raw" / "imagesTr" / "synth_000.nii.gz", inputs / f"{BAD_NAME}.nii.gz")
    model = trained / "W" / "raw" / "results" / "3d_fullres"
    args = ["predict", "-i", inputs, "-o", tmp_path / "out", "-m", model, "--device", "cpu"]
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "synth_bad\\xff.nii.gz: the file name is not valid UTF-8" in done.stderr
    assert "Traceback" not in done.stderr and listing(tmp_path / "out") == set()


def test_writing_an_image_under_a_non_utf8_name_is_refused(tmp_path):
    with pytest.raises(ImageReadError, match="not valid UTF-8"):
        write_image(tmp_path / f"{BAD_NAME}.nii.gz", np.zeros((2, 3, 4), np.uint8), geometry())


# --- 4. JSON and .npz ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "document, command",
    [
        ("plans.json", ["preprocess", "raw", "-j", "1"]),
        ("splits.json", ["train", "raw", "-c", "3d_fullres", "-f", "1", "--device", "cpu", "--epochs", "1"]),
        ("selection.json", ["predict", "-i", "IN", "-o", "OUT", "-m", "W/raw", "--device", "cpu"]),
        ("dataset.json", ["preprocess", "raw", "-j", "1"]),
    ],
)
def test_a_truncated_json_document_exits_2_naming_it(trained, tmp_path, capsys, document, command):
    work = copy_work(trained, tmp_path)
    path = work / "raw" / document
    if document == "selection.json":
        api.select("raw", work=work, workers=1)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    before = snapshot(work)
    (tmp_path / "IN").mkdir()
    shutil.copy(trained / "raw" / "imagesTr" / "synth_000.nii.gz", tmp_path / "IN")
    args = [{"IN": tmp_path / "IN", "OUT": tmp_path / "OUT", "W/raw": work / "raw"}.get(a, a) for a in command]
    if command[0] != "predict":
        args += ["--work", work]
    code, _, err = run(capsys, *args)
    assert code == 2 and f"{path}: not valid JSON" in err
    assert_intact(before, work)
    assert listing(tmp_path / "OUT") == set()


def test_a_json_document_of_the_wrong_type_names_the_file(tmp_path):
    p = tmp_path / "splits.json"
    p.write_text('{"train": []}')
    with pytest.raises(AutounetError, match=f"{p}: expected a JSON list, found dict"):
        read_json(p, list)


def test_select_refuses_a_truncated_probability_file(trained, tmp_path, capsys):
    work = copy_work(trained, tmp_path)
    validation = work / "raw" / "results" / "2d" / "fold_0" / "validation"
    npz = next(validation.glob("*.npz"))
    npz.write_bytes(npz.read_bytes()[:-100])
    before = snapshot(work)
    code, _, err = run(capsys, "select", "raw", "--work", work, "-j", "1")
    assert code == 2 and f"{npz}: damaged or truncated .npz archive" in err
    assert_intact(before, work)
    assert not (work / "raw" / "selection.json").exists()


def test_probability_and_array_files_of_python_objects_are_never_loaded(tmp_path):
    npz, npy = tmp_path / "case.npz", tmp_path / "case.npy"
    np.savez(npz, probabilities=np.array([{"x": 1}], dtype=object), labels=np.arange(2), kind=np.asarray("softmax"))
    with pytest.raises(AutounetError, match=f"{npz}: holds Python objects"):
        load_probability_file(npz)
    np.save(npy, np.array([1, None], dtype=object), allow_pickle=True)
    for mmap in (None, "r"):
        with pytest.raises(AutounetError, match=f"{npy}: holds Python objects"):
            load_npy(npy, mmap_mode=mmap)
    (tmp_path / "noise.npz").write_bytes(b"not a zip archive at all")
    with pytest.raises(AutounetError, match="not a .npz archive"):
        load_npz(tmp_path / "noise.npz")


# --- 5. preprocessed arrays checked when training starts -------------------------------------


def _damage(kind: str, folder: Path) -> Path:
    if kind == "truncated":
        p = case_paths(folder, "synth_002")["image"]
        p.write_bytes(p.read_bytes()[:-64])
    else:  # an array of Python objects where the segmentation was
        p = case_paths(folder, "synth_001")["seg"]
        np.save(p, np.array([{"evil": 1}] * 4, dtype=object), allow_pickle=True)
    return p


@pytest.mark.parametrize("kind", ["truncated", "object"])
def test_training_refuses_damaged_preprocessed_cases_and_preprocess_redoes_exactly_them(
    trained, tmp_path, capsys, kind
):
    work = copy_work(trained, tmp_path)
    folder = work / "raw" / "preprocessed" / "3d_fullres"
    bad = _damage(kind, folder)
    case = bad.name.split("_image")[0].split("_seg")[0]
    args = ["train", "raw", "-c", "3d_fullres", "-f", "1", "--work", work, "--device", "cpu", "--epochs", "1"]
    code, _, err = run(capsys, *args, "--iters-per-epoch", "1", "--val-iters", "1")
    assert code == 2
    assert "1 preprocessed case(s) are damaged" in err and f"{case} ({bad.name}: " in err
    assert ("truncated" if kind == "truncated" else "Python objects") in err
    assert f"autounet preprocess raw -c 3d_fullres --work {work}" in err
    assert not (work / "raw" / "results" / "3d_fullres" / "fold_1" / "checkpoint_latest.pt").exists()

    key = read_json(case_paths(folder, "synth_000")["properties"], dict)["preprocess_key"]
    assert not is_complete(folder, case, key)
    others = {c: case_paths(folder, c)["image"].stat().st_mtime_ns for c in ("synth_000", "synth_003")}
    summary = api.preprocess("raw", work=work, workers=1, configurations=["3d_fullres"])
    assert summary.processed == 1 and summary.ok
    assert others == {c: case_paths(folder, c)["image"].stat().st_mtime_ns for c in others}
    check_preprocessed(folder, [f"synth_{i:03d}" for i in range(5)], "unused")


def test_load_npy_refuses_an_array_shorter_than_its_header(tmp_path):
    p = tmp_path / "synth_000_image.npy"
    np.save(p, np.zeros((1, 4, 5, 6), np.float32))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(AutounetError, match=f"{p}: truncated: "):
        load_npy(p, mmap_mode="r")


def test_scanned_reads_count_nan_in_the_verifying_pass(tmp_path):
    """check and predict get the NaN count of a float NIfTI from the same pass that verifies it."""
    arr = np.ones((12, 14, 16), np.float32)
    arr[3, 4, 5] = np.nan
    arr[6, 7, 8] = np.inf
    p = tmp_path / "nan.nii.gz"
    write_image(p, arr, geometry())
    image, _, nonfinite = read_image_scanned([p])
    assert nonfinite == [2] and np.isfinite(image).all()  # ITK made them 0
    label = tmp_path / "label.nii.gz"
    write_image(label, np.zeros((12, 14, 16), np.uint8), geometry())
    assert read_label(label)[0].shape == (12, 14, 16)


def test_an_input_folder_entry_named_like_an_image_but_not_a_file_is_refused(tmp_path):
    """A folder (or a dangling link) called CASE.nii.gz among the inputs is a case that would be
    skipped silently: refused, naming it."""
    from autounet.inference.inputs import discover_cases

    inputs = tmp_path / "in"
    (inputs / "a.nii.gz").mkdir(parents=True)
    (inputs / "b.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    with pytest.raises(
        AutounetError, match=r"2 entries are named like an image but not a file: a\.nii\.gz \(a folder\)"
    ):
        discover_cases([inputs], 1)
