"""One pass over each input of a prediction (issue 22): the first case's NIfTI files are verified
(CRC, length, non-finite voxels) in the pass that reads them, the later cases' before the first
case is predicted; a DICOM series is decoded once, when its case is read."""

from __future__ import annotations

import locale

import numpy as np
import pytest

from autounet.data import image_verify
from autounet.data.image_io import write_image
from autounet.errors import AutounetError
from autounet.inference import inputs
from autounet.inference.inputs import discover_cases, read_input, verify_inputs
from conftest import geometry


def _counting(monkeypatch):
    calls = []
    real = image_verify.scan_nifti

    def scan(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(image_verify, "scan_nifti", scan)
    return calls


def test_the_first_case_is_verified_by_its_read_and_the_later_ones_before_it(tmp_path, monkeypatch):
    image = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    write_image(tmp_path / "a.nii.gz", image, geometry())
    write_image(tmp_path / "b.nii.gz", image, geometry())
    first, second = discover_cases([tmp_path], 1)
    calls = _counting(monkeypatch)
    verify_inputs([first, second])
    assert calls == [second.files[0]]  # the first case is verified in the pass that reads it
    array, _, nonfinite = read_input(first, verified=True)
    assert len(calls) == 1 and nonfinite == [0]  # the read verified it without scan_nifti's pass
    np.testing.assert_array_equal(array[0], image)


def test_nan_voxels_are_counted_by_the_read_of_the_first_case_and_refused_before_the_later_ones(tmp_path):
    image = np.ones((6, 7, 8), np.float32)
    write_image(tmp_path / "a.nii.gz", image, geometry())
    image[2, 3, 4] = np.nan
    write_image(tmp_path / "b.nii.gz", image, geometry())
    write_image(tmp_path / "c.nii.gz", image, geometry())
    _, b, c = discover_cases([tmp_path], 1)
    with pytest.raises(AutounetError, match="b: the image holds NaN or infinite intensities"):
        verify_inputs(discover_cases([tmp_path], 1))
    verify_inputs([c])  # the first case: left to its read
    array, _, nonfinite = read_input(c, verified=True)
    assert nonfinite == [1] and np.isfinite(array).all()  # counted; made 0 as SimpleITK reads it


@pytest.fixture
def _locale_kept():
    """GDCM's writer (test helper only) sets the C locale: put it back (see test_dicom.py)."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.mark.usefixtures("_locale_kept")
def test_verify_inputs_does_not_decode_dicom_series(tmp_path, monkeypatch):
    from test_dicom import blob_volume, write_series

    write_series(tmp_path / "s", blob_volume())
    (case,) = discover_cases([tmp_path], 1)
    decoded = []
    real = inputs.read_dicom_series
    monkeypatch.setattr(inputs, "read_dicom_series", lambda s: decoded.append(s) or real(s))
    verify_inputs([case])
    assert decoded == []
    image, _, nonfinite = read_input(case, verified=True)
    assert len(decoded) == 1 and nonfinite == [0] and image.dtype.kind == "i"
