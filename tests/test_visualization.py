"""`autounet show`: overlay pictures of an image and its segmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autounet.cli import main
from autounet.data.image_io import read_image, read_label
from autounet.errors import AutounetError
from autounet.visualization import _to_lps, default_output, intensity_window, render_overlay, show_files
from conftest import write


def _png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(str(path))


def _bluish(img: np.ndarray) -> int:
    """Pixels clearly bluer than red: the colour of label 1; a grey picture has none."""
    return int(np.count_nonzero(img[..., 2] - img[..., 0] > 0.15))


def _volume(shape=(12, 16, 20), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    image = (100 + 50 * np.sin(x / 3.0) + 10 * rng.standard_normal(shape)).astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    seg[3:9, 4:12, 5:15] = 1
    seg[5:7, 6:9, 8:11] = 2
    return image, seg


def test_render_overlay_writes_png_with_label_colours(tmp_path: Path):
    image, seg = _volume()
    with_seg = render_overlay(image[None], (2.0, 1.0, 1.0), seg, tmp_path / "a.png", title="t", label_names={1: "one"})
    without = render_overlay(image[None], (2.0, 1.0, 1.0), None, tmp_path / "b.png")
    a, b = _png(with_seg), _png(without)
    assert with_seg.stat().st_size > 5000
    assert a.shape[0] > 300 and a.shape[1] > 300
    assert _bluish(b) == 0
    assert _bluish(a) > 2000  # label 1 overlaid in the panels, not only in the legend
    assert not list(tmp_path.glob(".autounet-tmp.*"))


def test_anisotropic_spacing_changes_the_picture_shape(tmp_path: Path):
    image, seg = _volume()
    iso = _png(render_overlay(image[None], (1.0, 1.0, 1.0), seg, tmp_path / "iso.png"))
    thick = _png(render_overlay(image[None], (3.0, 1.0, 1.0), seg, tmp_path / "thick.png"))
    assert thick.shape[1] == iso.shape[1]
    assert thick.shape[0] > iso.shape[0] * 1.3  # coronal and sagittal rows are three times as tall


def test_single_slice_image(tmp_path: Path):
    image = np.random.default_rng(1).random((1, 1, 30, 40)).astype(np.float32)
    seg = np.zeros((1, 30, 40), np.uint8)
    seg[0, 10:20, 10:30] = 1
    img = _png(render_overlay(image, (999.0, 1.0, 1.0), seg, tmp_path / "flat.png", slices=5))
    assert _bluish(img) > 500

    path = write(tmp_path / "flat.nii.gz", image[0])  # (1, Y, X) written as a 3D file with one slice
    assert show_files([path], out=tmp_path / "flat2.png").is_file()


def test_constant_and_non_finite_images(tmp_path: Path):
    assert intensity_window(np.full((4, 5, 6), 7.0)) == (6.0, 8.0)
    assert intensity_window(np.full((4, 5, 6), np.nan)) == (0.0, 1.0)
    image = np.full((1, 6, 7, 8), 3.0, np.float32)
    image[0, 2, 3, 4] = np.nan
    image[0, 1, 1, 1] = np.inf
    image[0, 3, 3, 3] = -np.inf
    assert render_overlay(image, (1, 1, 1), None, tmp_path / "c.png").is_file()
    assert _png(tmp_path / "c.png").size > 0


def test_bad_arguments(tmp_path: Path):
    image, seg = _volume()
    with pytest.raises(AutounetError, match="channel 1"):
        render_overlay(image[None], (1, 1, 1), seg, tmp_path / "x.png", channel=1)
    with pytest.raises(AutounetError, match="shape"):
        render_overlay(image[None], (1, 1, 1), seg[:-1], tmp_path / "x.png")
    with pytest.raises(AutounetError, match="slices"):
        render_overlay(image[None], (1, 1, 1), seg, tmp_path / "x.png", slices=0)


def test_show_files_reads_files_and_label_names(tiny_msd: Path, tmp_path: Path, monkeypatch):
    image = sorted((tiny_msd / "imagesTr").glob("*.nii.gz"))[0]
    seg = tiny_msd / "labelsTr" / image.name
    monkeypatch.chdir(tmp_path)
    out = show_files([image], seg)
    assert out == tmp_path / (image.name[: -len(".nii.gz")] + ".png")
    assert default_output(image) == out
    assert _png(out).shape[0] > 300
    # an existing folder as output gets the default name inside it
    (tmp_path / "pics").mkdir()
    assert show_files([image], seg, out=tmp_path / "pics") == tmp_path / "pics" / out.name


def test_show_files_multichannel(tiny_v2: Path, tmp_path: Path):
    channels = sorted((tiny_v2 / "imagesTr").glob("*_000[01].nii.gz"))[:2]
    case = channels[0].name[: -len("_0000.nii.gz")]
    out = show_files(channels, tiny_v2 / "labelsTr" / f"{case}.nii.gz", out=tmp_path / "v2.png", channel=1)
    assert out.is_file()
    with pytest.raises(AutounetError, match="channel 2"):
        show_files(channels, None, out=tmp_path / "v2.png", channel=2)


def test_mismatched_segmentation_is_refused(tmp_path: Path):
    image, seg = _volume()
    img = write(tmp_path / "img.nii.gz", image)
    small = write(tmp_path / "small_seg.nii.gz", seg[:, :-2])
    moved = write(tmp_path / "moved_seg.nii.gz", seg, origin=(5.0, 0.0, 0.0))
    with pytest.raises(AutounetError, match="small_seg.nii.gz: shape"):
        show_files([img], small, out=tmp_path / "x.png")
    with pytest.raises(AutounetError, match="moved_seg.nii.gz: geometry differs.*origin"):
        show_files([img], moved, out=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_reorientation_to_lps(tmp_path: Path):
    image, seg = _volume()
    # x axis pointing to the patient's right: the x axis is flipped for display
    flipped = write(tmp_path / "f.nii.gz", image, direction=np.diag([-1.0, 1.0, 1.0]).ravel())
    arr, geo = read_image([flipped])
    out, _, spacing, ok = _to_lps(arr, None, geo)
    assert ok and spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(out[0], image[:, :, ::-1])
    # index axes i and k swapped (array axis 0 runs along world x): transposed back
    perm = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    swapped = write(tmp_path / "s.nii.gz", image, spacing=(3.0, 2.0, 1.0), direction=perm.ravel())
    sw_seg = write(tmp_path / "s_seg.nii.gz", seg, spacing=(3.0, 2.0, 1.0), direction=perm.ravel())
    arr, geo = read_image([swapped])
    lab, _ = read_label(sw_seg)
    out, out_seg, spacing, ok = _to_lps(arr, lab, geo)
    assert ok and spacing == (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(out[0], np.transpose(image, (2, 1, 0)))
    np.testing.assert_array_equal(out_seg, np.transpose(seg, (2, 1, 0)))


def test_cli_show(tmp_path: Path, capsys):
    image, seg = _volume()
    img = write(tmp_path / "img.nii.gz", image)
    lab = write(tmp_path / "seg.nii.gz", seg)
    out = tmp_path / "o.png"
    assert main(["show", str(img), "--seg", str(lab), "--out", str(out), "--slices", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert _bluish(_png(out)) > 0
    bad = write(tmp_path / "bad.nii.gz", seg[:-1])
    assert main(["show", str(img), "--seg", str(bad), "--out", str(out)]) == 2
    assert "bad.nii.gz" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "missing.nii.gz")]) == 2
