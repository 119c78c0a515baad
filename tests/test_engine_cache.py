"""The engine conversion cache with files from strangers (issue 21, item 6): every cached
conversion carries a record (the SHA-256 of its files and the inputs of its key), checked on
load; a file that does not match or does not load is deleted and converted once more with one
note, and a conversion that fails is never cached.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from autounet.inference import engines
from autounet.inference.engines import EngineUnavailable, compile_network
from autounet.networks.spec import NetworkSpec
from autounet.networks.unet import UNet
from autounet.workspace import engine_cache_dir

CONVERTED = ("onnxruntime", "openvino")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def needs(engine: str) -> None:
    for package in engines.ENGINE_PACKAGES[engine]:
        pytest.importorskip(package)


def tiny(seed: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """A small 3D U-Net (weights from ``seed``) and its tiles."""
    torch.manual_seed(seed)
    spec = NetworkSpec(3, 1, 3, [4, 8], [[3, 3, 3]] * 2, [[2, 2, 2]])
    return UNet(spec).eval(), (2, 1, 8, 8, 8)


def x_for(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(5))


def compile_(net, shape, fold, engine, **kwargs):
    return compile_network(net, engine=engine, precision="fp32", example_shape=shape, cache_dir=fold, **kwargs)


def runs_like(compiled, net, shape) -> bool:
    x = x_for(shape)
    with torch.no_grad():
        return (compiled(x) - net(x)).abs().max().item() <= 1e-4


def notes(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]


def cache_files(fold: Path) -> list[str]:
    folder = engine_cache_dir(fold)
    return sorted(p.name for p in folder.iterdir() if p.suffix != ".lock") if folder.exists() else []


@pytest.mark.parametrize("engine", CONVERTED)
def test_network_bs_conversion_at_network_as_key_is_not_served_for_a(engine, tmp_path, capsys):
    needs(engine)
    a, shape = tiny(0)
    b, _ = tiny(1)
    first = compile_(a, shape, tmp_path / "a", engine)
    other = compile_(b, shape, tmp_path / "b", engine)
    capsys.readouterr()
    # B's files (record included) under A's key
    for source in (engine_cache_dir(tmp_path / "b") / name for name in cache_files(tmp_path / "b")):
        shutil.copyfile(
            source, engine_cache_dir(tmp_path / "a") / source.name.replace(other.file.stem, first.file.stem)
        )

    again = compile_(a, shape, tmp_path / "a", engine)
    assert not again.cached and again.name == engine
    assert runs_like(again, a, shape)
    said = notes(capsys)
    assert len(said) == 1 and str(first.file) in said[0] and "another network" in said[0], said
    third = compile_(a, shape, tmp_path / "a", engine)
    assert third.cached and notes(capsys) == []


def test_a_zeroed_block_of_a_cached_openvino_bin_is_noticed_and_rebuilt(tmp_path, capsys):
    needs("openvino")
    net, shape = tiny(0)
    first = compile_(net, shape, tmp_path, "openvino")
    weights = first.file.with_suffix(".bin")
    data = bytearray(weights.read_bytes())
    size = len(data)
    data[size // 4 : size // 4 + 1024] = bytes(1024)  # same size, a block zeroed
    weights.write_bytes(bytes(data))
    del first
    capsys.readouterr()

    again = compile_(net, shape, tmp_path, "openvino")
    assert not again.cached and runs_like(again, net, shape)
    said = notes(capsys)
    assert len(said) == 1 and str(weights.with_suffix(".xml")) in said[0] and ".bin" in said[0], said
    assert weights.read_bytes() != bytes(data) and weights.stat().st_size == size
    assert compile_(net, shape, tmp_path, "openvino").cached and notes(capsys) == []


@pytest.mark.parametrize("engine", CONVERTED)
def test_a_damaged_cached_file_is_rebuilt_once_not_pytorch_on_every_run(engine, tmp_path, capsys):
    needs(engine)
    net, shape = tiny(0)
    first = compile_(net, shape, tmp_path, engine)
    path = first.file
    del first
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # truncated
    capsys.readouterr()

    again = compile_(net, shape, tmp_path, engine)
    assert again.name == engine and not again.cached and runs_like(again, net, shape)
    assert len(notes(capsys)) == 1
    later = compile_(net, shape, tmp_path, engine)
    assert later.name == engine and later.cached and notes(capsys) == []


@pytest.mark.parametrize("engine", CONVERTED)
def test_a_cached_file_with_a_valid_record_that_fails_to_load_is_rebuilt(engine, tmp_path, capsys, monkeypatch):
    needs(engine)
    net, shape = tiny(0)
    compile_(net, shape, tmp_path, engine)
    engine_class = engines.OnnxRuntimeEngine if engine == "onnxruntime" else engines.OpenVinoEngine
    real_init = engine_class.__init__
    calls = []

    def fails_once(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            raise RuntimeError("cannot read the model")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(engine_class, "__init__", fails_once)
    capsys.readouterr()
    again = compile_(net, shape, tmp_path, engine)
    assert again.name == engine and not again.cached and len(calls) == 2
    said = notes(capsys)
    assert len(said) == 1 and "cannot read the model" in said[0], said


@pytest.mark.parametrize("engine", CONVERTED)
def test_a_conversion_that_does_not_load_is_never_cached(engine, tmp_path, monkeypatch):
    needs(engine)
    net, shape = tiny(0)

    def broken_export(network, path, example_shape):  # "succeeds", but writes no usable model
        Path(path).write_bytes(b"\x08\x07garbage")
        return Path(path)

    with monkeypatch.context() as m:
        m.setattr(engines, "export_onnx", broken_export)
        if engine == "openvino":
            m.setattr(engines, "onnx_exporter_available", lambda: True)
        with pytest.raises(EngineUnavailable):
            compile_(net, shape, tmp_path, engine)
    assert cache_files(tmp_path) == []
    fresh = compile_(net, shape, tmp_path, engine)
    assert not fresh.cached and runs_like(fresh, net, shape)


def test_a_conversion_that_fails_half_way_leaves_nothing_in_the_cache(tmp_path, monkeypatch, capsys):
    """OpenVINO's .bin is moved into the cache, then moving the .xml fails: no .bin stays behind."""
    needs("openvino")
    net, shape = tiny(0)
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(".xml") and engine_cache_dir(tmp_path) in Path(dst).parents:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    compiled = compile_(net, shape, tmp_path, "openvino")  # converted in memory instead, with a note
    assert compiled.name == "openvino" and compiled.file is None and runs_like(compiled, net, shape)
    assert "in memory" in capsys.readouterr().err
    assert cache_files(tmp_path) == []


def test_an_entry_without_its_record_is_rebuilt(tmp_path, capsys):
    """What a crash between writing the files and their record leaves."""
    needs("onnxruntime")
    net, shape = tiny(0)
    first = compile_(net, shape, tmp_path, "onnxruntime")
    records = [p for p in engine_cache_dir(tmp_path).iterdir() if p.suffix == ".json"]
    assert len(records) == 1
    records[0].unlink()
    capsys.readouterr()
    again = compile_(net, shape, tmp_path, "onnxruntime")
    assert not again.cached and again.file == first.file and len(notes(capsys)) == 1
    assert records[0].is_file()


def test_openvino_files_are_flushed_to_disk_before_they_are_renamed(tmp_path, monkeypatch):
    needs("openvino")
    flushed = []
    real = os.fsync

    def fsync(fd):
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    monkeypatch.setattr(os, "fsync", fsync)
    net, shape = tiny(0)
    compile_(net, shape, tmp_path, "openvino")
    names = [Path(p).name for p in flushed]
    assert "model.bin" in names and "model.xml" in names, names


def test_a_damaged_entry_in_a_cache_that_cannot_be_changed_is_converted_in_memory(tmp_path, capsys, monkeypatch):
    needs("onnxruntime")
    net, shape = tiny(0)
    first = compile_(net, shape, tmp_path, "onnxruntime")
    path = first.file
    path.write_bytes(b"damaged")
    real_unlink = Path.unlink

    def refuse(self, missing_ok=False):
        if self.parent == path.parent:
            raise PermissionError(13, "Read-only file system", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    capsys.readouterr()
    again = compile_(net, shape, tmp_path, "onnxruntime")
    assert again.name == "onnxruntime" and again.file is None and runs_like(again, net, shape)
    said = notes(capsys)
    assert len(said) == 1 and str(path.parent) in said[0] and "in memory" in said[0], said
    assert path.read_bytes() == b"damaged"


def test_two_processes_converting_the_same_network_convert_it_once(tmp_path, monkeypatch):
    """``predict --part`` jobs or Ray workers on one fold: the entry's lock makes the second wait
    and use the first one's conversion (OpenVINO's .xml differs from run to run, so two writers
    would leave a mix that the record check refuses)."""
    needs("openvino")
    import threading

    net, shape = tiny(0)
    converted = []
    real = engines._convert

    def slow_convert(*args):
        converted.append(threading.get_ident())
        path = real(*args)
        threading.Event().wait(0.5)  # the other one arrives meanwhile
        return path

    monkeypatch.setattr(engines, "_convert", slow_convert)
    results = {}

    def work(i):
        results[i] = compile_(net, shape, tmp_path, "openvino")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(converted) == 1 and sorted(r.cached for r in results.values()) == [False, True]
    assert all(runs_like(r, net, shape) for r in results.values())
