"""One pass over each input of a prediction (issue 22): a NIfTI file is verified (CRC, non-finite
voxels) once, before the first case, and then read without a second verifying decompression; a
DICOM series is decoded once, when its case is read."""

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


def test_a_nifti_input_is_decompressed_once_to_verify_and_once_to_read(tmp_path, monkeypatch):
    image = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    write_image(tmp_path / "a.nii.gz", image, geometry())
    (case,) = discover_cases([tmp_path], 1)
    calls = _counting(monkeypatch)
    verify_inputs([case])
    array, _, nonfinite = read_input(case, verified=True)
    assert len(calls) == 1  # before issue 22: verified again by the read (three decompressions)
    assert nonfinite == [0]
    np.testing.assert_array_equal(array[0], image)
    read_input(case)  # unverified: the read verifies and counts itself
    assert len(calls) == 2


def test_a_nifti_input_with_nan_is_refused_by_the_verifying_pass(tmp_path):
    image = np.ones((6, 7, 8), np.float32)
    image[2, 3, 4] = np.nan
    write_image(tmp_path / "a.nii.gz", image, geometry())
    (case,) = discover_cases([tmp_path], 1)
    with pytest.raises(AutounetError, match="NaN or infinite"):
        verify_inputs([case])


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
