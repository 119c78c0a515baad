"""Gzip in pieces on several cores: one ordinary gzip member; a .nii.gz written through it."""

import errno
import gzip
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autounet.data.geometry import Geometry
from autounet.data.image_io import read_volume, save_image, write_image
from autounet.utils import deflate
from autounet.utils.temporary import is_temporary


@pytest.mark.parametrize("size", [0, 1, 5000, 3 * 4096 + 17])
def test_pieces_deflated_apart_make_one_gzip_member_any_reader_reads(tmp_path, monkeypatch, size):
    monkeypatch.setattr(deflate, "PIECE_BYTES", 4096)  # several pieces, several in flight
    rng = np.random.default_rng(size)
    data = (rng.random(size) * 4).astype(np.uint8).tobytes()  # compressible, not trivially
    (tmp_path / "a").write_bytes(data)
    deflate.gzip_file(tmp_path / "a", tmp_path / "a.gz", workers=3)
    packed = (tmp_path / "a.gz").read_bytes()
    assert gzip.decompress(packed) == data
    # one member: a reader that stops after the first member still gets everything
    import zlib

    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert inflate.decompress(packed) == data and inflate.eof and inflate.unused_data == b""


def _geometry() -> Geometry:
    return Geometry(spacing=(2.0, 0.7, 0.8), origin_xyz=(1.0, -2.0, 3.0), direction_xyz=tuple(np.eye(3).ravel()))


def test_a_nii_gz_reads_back_in_itk_and_leaves_no_temporary(tmp_path):
    labels = (np.random.default_rng(0).random((7, 33, 29)) * 5).astype(np.uint8)
    path = tmp_path / "seg.nii.gz"
    write_image(path, labels, _geometry())
    back = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)
    np.testing.assert_allclose(back.GetSpacing(), (0.8, 0.7, 2.0), rtol=1e-6)  # NIfTI stores float32
    assert back.GetOrigin() == (1.0, -2.0, 3.0)
    array, geo = read_volume(path)  # autounet's own one-pass reader
    np.testing.assert_array_equal(array[0], labels)
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]
    with gzip.open(path) as fh:  # an ordinary gzip stream
        assert len(fh.read()) >= 348 + labels.nbytes


def test_a_write_cut_short_names_the_file_keeps_the_old_one_and_leaves_no_temporary(tmp_path, monkeypatch):
    """EFBIG in ITK's uncompressed write (a full disk in miniature, in a child process with a file
    size limit), then ENOSPC in the gzip after it."""
    old = tmp_path / "seg.nii.gz"
    old.write_bytes(b"an earlier result")
    script = (
        "import sys, numpy as np; from pathlib import Path\n"
        "from autounet.data.geometry import Geometry\n"
        "from autounet.data.image_io import save_image\n"
        "g = Geometry(spacing=(1.0, 1.0, 1.0), origin_xyz=(0.0, 0.0, 0.0), direction_xyz=tuple(np.eye(3).ravel()))\n"
        "a = (np.random.default_rng(0).random((40, 64, 64)) * 9).astype(np.uint8)\n"
        "try:\n    save_image(Path(sys.argv[1]), a, g)\nexcept OSError as e:\n    print('OSError', e); sys.exit(2)\n"
    )

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    done = subprocess.run([sys.executable, "-c", script, str(old)], capture_output=True, text=True, preexec_fn=limit)
    assert done.returncode == 2 and str(old) in done.stdout, done
    assert old.read_bytes() == b"an earlier result"
    assert not [p for p in os.listdir(tmp_path) if is_temporary(p)]

    def full(source: Path, target: Path, level: int = 1, workers=None) -> None:
        target.write_bytes(b"\x1f\x8b part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(deflate, "gzip_file", full)
    with pytest.raises(OSError, match="No space left") as err:
        save_image(old, np.ones((2, 3, 4), np.uint8), _geometry())
    assert str(old) in str(err.value)
    assert old.read_bytes() == b"an earlier result"
    assert not [p for p in os.listdir(tmp_path) if is_temporary(p)]
