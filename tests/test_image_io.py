from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autounet.data.geometry import SPACING_2D_IMAGES, geometry_differences
from autounet.data.image_io import ImageReadError, read_image, read_label, read_volume, write_image
from conftest import geometry, write


def test_3d_file_reads_as_channel_first_zyx_with_spacing_in_array_order(tmp_path: Path):
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    p = write(tmp_path / "a.nii.gz", arr, spacing=(3.0, 1.5, 0.5), origin=(10.0, 20.0, 30.0))
    # ITK sees (x, y, z) = (6, 5, 4) with spacing (0.5, 1.5, 3.0)
    img = sitk.ReadImage(str(p))
    assert img.GetSize() == (6, 5, 4)
    assert img.GetSpacing() == (0.5, 1.5, 3.0)
    out, geo = read_volume(p)
    assert out.shape == (1, 4, 5, 6) and out.dtype == np.int16
    np.testing.assert_array_equal(out[0], arr)
    assert geo.spacing == (3.0, 1.5, 0.5)
    assert geo.origin_xyz == (10.0, 20.0, 30.0)
    assert geo.orientation() == "LPS"


def test_4d_file_puts_modalities_first(tmp_path: Path):
    arr = np.random.default_rng(0).normal(size=(3, 4, 5, 6)).astype(np.float32)
    p = tmp_path / "four.nii.gz"
    write_image(p, arr, geometry((2.0, 1.0, 1.0)))
    out, geo = read_image([p])
    assert out.shape == (3, 4, 5, 6)
    np.testing.assert_array_equal(out, arr)
    assert geo.spacing == (2.0, 1.0, 1.0)


def test_channel_files_are_stacked_and_must_agree(tmp_path: Path):
    a = write(tmp_path / "c_0000.nrrd", np.ones((4, 5, 6), np.float32))
    b = write(tmp_path / "c_0001.mha", np.full((4, 5, 6), 2, np.uint8))
    out, _ = read_image([a, b])
    assert out.shape == (2, 4, 5, 6)
    assert out[1].max() == 2
    c = write(tmp_path / "c_0002.nii.gz", np.ones((4, 5, 7), np.float32))
    with pytest.raises(ImageReadError) as e:
        read_image([a, c])
    assert e.value.kind == "shape_mismatch" and "c_0002" in str(e.value)
    d = write(tmp_path / "c_0003.nii.gz", np.ones((4, 5, 6), np.float32), spacing=(1.0, 1.0, 2.0))
    with pytest.raises(ImageReadError) as e:
        read_image([a, d])
    assert e.value.kind == "geometry_mismatch" and "spacing" in str(e.value)


def test_2d_file_is_one_slice_with_a_coarse_slice_spacing_and_writes_back_as_2d(tmp_path: Path):
    img = sitk.GetImageFromArray(np.arange(20, dtype=np.uint8).reshape(4, 5))
    img.SetSpacing((0.5, 0.25))
    p = tmp_path / "flat.nii.gz"
    sitk.WriteImage(img, str(p))
    out, geo = read_volume(p)
    assert out.shape == (1, 1, 4, 5)
    assert geo.spatial_dims == 2 and geo.spacing == (SPACING_2D_IMAGES, 0.25, 0.5)
    back = tmp_path / "back.nii.gz"
    write_image(back, out[0], geo)
    img2 = sitk.ReadImage(str(back))
    assert img2.GetDimension() == 2 and img2.GetSpacing() == (0.5, 0.25)


def test_missing_and_garbage_files_raise_with_their_kind(tmp_path: Path):
    with pytest.raises(ImageReadError) as e:
        read_volume(tmp_path / "nope.nii.gz")
    assert e.value.kind == "missing_file"
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError) as e:
        read_volume(bad)
    assert e.value.kind == "unreadable_file" and "bad.nii.gz" in str(e.value)


def test_label_must_have_one_channel(tmp_path: Path):
    p = tmp_path / "lab.nii.gz"
    write_image(p, np.zeros((2, 3, 4, 5), np.uint8), geometry())
    with pytest.raises(ImageReadError, match="one channel"):
        read_label(p)


def test_geometry_tolerance_accepts_header_rounding_but_not_real_differences():
    a = geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    assert geometry_differences(a, geometry((1.0000001, 1.0, 1.0), (1e-4, 0.0, 0.0))) == []
    assert geometry_differences(a, geometry((1.1, 1.0, 1.0)))[0].startswith("spacing")
    assert geometry_differences(a, geometry(origin=(0.5, 0.0, 0.0)))[0].startswith("origin")
    flipped = np.diag([-1.0, 1.0, 1.0]).ravel()
    assert geometry_differences(a, geometry(direction=flipped))[0].startswith("direction")
