"""One pass over each input (issue 22, item 4): a NIfTI file is verified and read in one
decompression, into the array SimpleITK would give; a DICOM file's header is read without its
pixel data (pydicom) and each series is decoded once, by a prediction as a whole."""

from __future__ import annotations

import gzip
import locale
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autounet.data import dicom
from autounet.data.image_io import read_image_scanned, read_volume, write_image
from autounet.errors import AutounetError
from autounet.inference.inputs import case_grid, discover_cases
from conftest import geometry


@pytest.fixture(autouse=True)
def _locale_kept():
    """SimpleITK's DICOM writer (test helpers only) sets the C locale to "C": put it back."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def _itk(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _patched(path: Path, edit) -> Path:
    """``path`` (an uncompressed .nii) with its bytes changed by ``edit(bytearray)``, gzipped when
    ``path`` ends in .gz."""
    raw = bytearray(path.read_bytes())
    edit(raw)
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def _nii(tmp_path: Path, array: np.ndarray, name: str = "a.nii", edit=None) -> Path:
    plain = tmp_path / "plain.nii"
    write_image(plain, array, geometry((1.5, 0.8, 0.7), origin=(3.0, -2.0, 1.0)), compress=False)
    out = tmp_path / name
    out.write_bytes(plain.read_bytes())
    return _patched(out, edit or (lambda raw: None))


# --- NIfTI: the array SimpleITK gives, from one pass ---------------------------------------------


@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz"])
@pytest.mark.parametrize(
    ("dtype", "scaling"),
    [
        ("int16", None),
        ("uint8", None),
        ("float64", None),
        ("int16", (1.0, -1024.0)),
        ("int16", (0.1, 3.3)),
        ("float32", (2.0, 1.0)),
        ("float64", (0.1, 3.3)),
        ("int16", (0.0, 5.0)),
        ("int16", (float("nan"), 7.0)),
    ],
)
def test_a_nifti_file_reads_as_simpleitk_reads_it(tmp_path, name, dtype, scaling):
    rng = np.random.default_rng(1)
    array = (rng.normal(0, 400, size=(5, 6, 7))).astype(dtype)

    def scale(raw):
        if scaling is not None:
            raw[112:120] = struct.pack("<2f", *scaling)

    path = _nii(tmp_path, array, name, scale)
    image, geo = read_volume(path)
    reference = _itk(path)
    assert image.dtype == reference.dtype and image.shape == (1, *reference.shape)
    np.testing.assert_array_equal(image[0], reference)
    itk = sitk.ReadImage(str(path))
    assert geo.spacing == tuple(reversed(itk.GetSpacing())) and geo.origin_xyz == itk.GetOrigin()


def test_a_big_endian_file_with_a_header_extension_reads_as_simpleitk_reads_it(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 50
    little = _nii(tmp_path, array)
    raw = bytearray(little.read_bytes())
    header, data = raw[:348], raw[352:]
    swapped = bytearray(header)
    fields = [(0, "i"), (32, "i"), (36, "h"), (40, "8h"), (56, "3f"), (68, "4h"), (76, "8f"), (108, "3f")]
    fields += [(120, "h"), (124, "4f"), (140, "2i"), (252, "2h")]
    for start, fmt in fields:
        values = struct.unpack("<" + fmt, header[start : start + struct.calcsize(fmt)])
        swapped[start : start + struct.calcsize(fmt)] = struct.pack(">" + fmt, *values)
    for start in range(256, 328, 4):  # quatern, qoffset, srow: floats
        swapped[start : start + 4] = struct.pack(">f", *struct.unpack("<f", header[start : start + 4]))
    swapped[108:112] = struct.pack(">f", 368.0)  # voxels after a 16-byte extension
    extension = struct.pack(">4b", 1, 0, 0, 0) + struct.pack(">2i", 16, 0) + b"\0" * 8
    big = tmp_path / "big.nii.gz"
    big.write_bytes(gzip.compress(bytes(swapped) + extension + np.frombuffer(data, "<i2").astype(">i2").tobytes()))
    image, _ = read_volume(big)
    np.testing.assert_array_equal(image[0], array)
    np.testing.assert_array_equal(image[0], _itk(big))


def test_non_finite_voxels_are_counted_and_read_as_zero_as_itk_5_does(tmp_path):
    array = np.ones((4, 5, 6), np.float32)
    array[1, 2, 3], array[2, 2, 2] = np.nan, -np.inf
    path = _nii(tmp_path, array, "nan.nii.gz")
    image, _, nonfinite = read_image_scanned([path])
    assert nonfinite == [2]
    np.testing.assert_array_equal(image[0], _itk(path))


def test_4d_2d_and_vector_files_read_as_simpleitk_reads_them(tmp_path):
    four = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5)
    image = sitk.JoinSeries([sitk.GetImageFromArray(v) for v in four])
    sitk.WriteImage(image, str(tmp_path / "4d.nii.gz"))
    assert np.array_equal(read_volume(tmp_path / "4d.nii.gz")[0], four)
    sitk.WriteImage(sitk.GetImageFromArray(four[0, 0]), str(tmp_path / "2d.nii.gz"))
    flat, geo = read_volume(tmp_path / "2d.nii.gz")
    assert flat.shape == (1, 1, 4, 5) and geo.spatial_dims == 2
    vector = np.random.default_rng(0).normal(size=(3, 4, 5, 2)).astype(np.float32)  # read by SimpleITK
    sitk.WriteImage(sitk.GetImageFromArray(vector, isVector=True), str(tmp_path / "v.nii.gz"))
    np.testing.assert_array_equal(read_volume(tmp_path / "v.nii.gz")[0], np.moveaxis(vector, -1, 0))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),  # the stream ends early
        (lambda b: b[:-8] + bytes([b[-8] ^ 1]) + b[-7:], "corrupt"),  # the CRC is wrong
        (lambda b: gzip.compress(gzip.decompress(b)[:-100]), "truncated: its header declares"),  # intact, short
    ],
)
def test_a_damaged_nii_gz_is_refused_by_the_read_naming_it(tmp_path, damage, message):
    path = tmp_path / "a.nii.gz"
    write_image(path, np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32), geometry())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(AutounetError, match=message) as exc:
        read_volume(path)
    assert str(path) in str(exc.value)


def test_a_nifti_file_simpleitk_must_read_is_verified_even_when_the_caller_verified_the_others(tmp_path):
    vector = np.random.default_rng(0).normal(size=(8, 9, 10, 2)).astype(np.float32)
    path = tmp_path / "v.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(vector, isVector=True), str(path))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(AutounetError, match="truncated"):
        read_image_scanned([path], verified=True)  # verify_inputs leaves the first case's NIfTI to its read


# --- a prediction decompresses each .nii.gz once ---------------------------------------------------


class _Reads:
    """Bytes decompressed by Python's gzip per file, and SimpleITK's reads of voxel data."""

    def __init__(self, monkeypatch):
        self.decompressed: Counter[str] = Counter()
        self.itk_reads: list[str] = []
        reads = self

        class Counting(gzip.GzipFile):
            def read(self, size=-1):
                data = super().read(size)
                reads.decompressed[str(self.name)] += len(data)
                return data

        monkeypatch.setattr(gzip, "GzipFile", Counting)
        real_read, real_execute = sitk.ReadImage, sitk.ImageFileReader.Execute
        monkeypatch.setattr(
            sitk, "ReadImage", lambda path, *a, **k: reads.itk_reads.append(str(path)) or real_read(path, *a, **k)
        )

        def execute(reader):
            reads.itk_reads.append(reader.GetFileName())
            return real_execute(reader)

        monkeypatch.setattr(sitk.ImageFileReader, "Execute", execute)


def test_a_one_case_prediction_decompresses_its_nii_gz_once(tmp_path, monkeypatch):
    from test_dicom import blob_volume, per_voxel_predictor

    volume = np.repeat(blob_volume(), 6, axis=0)  # 42 x 12 x 10 int16
    path = tmp_path / "in" / "ct.nii.gz"
    path.parent.mkdir()
    write_image(path, volume, geometry((2.5, 0.9, 0.8)))
    predictor = per_voxel_predictor()
    reads = _Reads(monkeypatch)
    predictor.predict(path.parent, tmp_path / "out")
    voxel_bytes = 352 + volume.nbytes
    total = reads.decompressed[str(path)]
    # the whole stream once, plus the first bytes read for the headers (540 at a time)
    assert voxel_bytes <= total <= voxel_bytes + 4 * 540, total
    assert str(path) not in reads.itk_reads  # SimpleITK read its header only
    assert (tmp_path / "out" / "ct.nii.gz").is_file()


def test_a_damaged_first_case_stops_the_prediction_naming_it_with_nothing_written(tmp_path, capsys):
    from test_dicom import blob_volume, per_voxel_predictor

    path = tmp_path / "in" / "a.nii.gz"
    path.parent.mkdir()
    write_image(path, np.random.default_rng(0).normal(size=(7, 12, 10)).astype(np.float32), geometry())
    path.write_bytes(path.read_bytes()[:-30])
    write_image(tmp_path / "in" / "b.nii.gz", blob_volume(), geometry())
    with pytest.raises(AutounetError, match=rf"{path}: the compressed data end early: the file is truncated"):
        per_voxel_predictor().predict(path.parent, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


# --- DICOM: headers without pixel data, each file decoded once ------------------------------------


@pytest.fixture(params=["pydicom", "simpleitk"])
def header_reader(request, monkeypatch):
    """Headers read with pydicom (when installed) or, without it, with SimpleITK."""
    if request.param == "pydicom":
        pytest.importorskip("pydicom")
    else:
        monkeypatch.setattr(dicom, "_pydicom", lambda: None)
    return request.param


def test_each_dicom_file_is_decoded_once_by_a_prediction(tmp_path, monkeypatch):
    pydicom = pytest.importorskip("pydicom")
    from test_dicom import blob_volume, per_voxel_predictor, write_series

    folder = write_series(tmp_path / "s", blob_volume())
    predictor = per_voxel_predictor()
    decoded: Counter[str] = Counter()
    headers: Counter[str] = Counter()
    single: list[str] = []
    real_series, real_info = sitk.ImageSeriesReader.Execute, sitk.ImageFileReader.ReadImageInformation
    real_dcmread = pydicom.dcmread

    def series_execute(reader):
        decoded.update(reader.GetFileNames())
        return real_series(reader)

    def info(reader):
        single.append(reader.GetFileName())
        return real_info(reader)

    def dcmread(path, *args, **kwargs):
        assert kwargs.get("defer_size") or kwargs.get("stop_before_pixels")  # never the pixel data
        headers[str(path)] += 1
        return real_dcmread(path, *args, **kwargs)

    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", series_execute)
    monkeypatch.setattr(sitk.ImageFileReader, "ReadImageInformation", info)
    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    predictor.predict(folder, tmp_path / "out")
    files = {str(p) for p in folder.iterdir()}
    assert dict(decoded) == dict.fromkeys(files, 1)  # each file decoded once
    assert dict(headers) == dict.fromkeys(files, 1)  # each header read once, without its pixels
    assert not [f for f in single if f in files]  # SimpleITK never read a file on its own
    assert len(list((tmp_path / "out").iterdir())) == 1


def test_the_memory_estimate_takes_a_series_grid_from_its_headers(tmp_path, header_reader):
    from test_dicom import SPACING, blob_volume, write_series

    write_series(tmp_path / "s", blob_volume())
    (case,) = discover_cases([tmp_path / "s"], 1)
    shape, spacing, channels = case_grid(case)
    assert shape == [7, 12, 10] and channels == 1
    np.testing.assert_allclose(spacing, SPACING)


def test_geometry_refusals_hold_with_either_header_reader(tmp_path, header_reader):
    from test_dicom import blob_volume, refusal, write_series

    write_series(tmp_path / "gap", blob_volume(), positions=[0, 2.5, 5, 10, 12.5, 15, 17.5])
    assert "1 slice(s) missing" in refusal(tmp_path / "gap")
    write_series(tmp_path / "tilt", blob_volume(), shift=[0.5 * k for k in range(7)])
    assert "not stacked along their normal" in refusal(tmp_path / "tilt")
    write_series(tmp_path / "cut", blob_volume(), names=[f"IM{k}.dcm" for k in range(7)])
    damaged = tmp_path / "cut" / "IM3.dcm"
    damaged.write_bytes(damaged.read_bytes()[:-50])
    message = refusal(tmp_path / "cut")
    assert str(damaged) in message and "cannot read this DICOM file as an image" in message


def test_a_dicom_file_without_pixel_data_is_refused_unless_it_is_a_non_image_object(tmp_path, header_reader):
    pydicom = pytest.importorskip("pydicom")
    from test_dicom import blob_volume, write_series

    folder = write_series(tmp_path / "s", blob_volume())
    first = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(first)
    del ds.PixelData
    ds.save_as(folder / "nopixels.dcm")
    if header_reader == "pydicom":
        with pytest.raises(AutounetError, match=r"nopixels\.dcm: cannot read this DICOM file as an image \(no pixel"):
            dicom.find_dicom_series([tmp_path])
    else:
        with pytest.raises(AutounetError, match=r"nopixels\.dcm"):
            dicom.find_dicom_series([tmp_path])
    ds.Modality, ds.SOPClassUID = "SR", "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(folder / "nopixels.dcm")
    skipped: list = []
    (series,) = dicom.find_dicom_series([tmp_path], skipped)
    assert len(series.files) == 7 and [p.name for p, _ in skipped] == ["nopixels.dcm"]
