"""Inference engines (PyTorch, onnxruntime, OpenVINO), their conversion cache and fallback, the
export of a trained model with its model.json, and examples/onnx_predict.py reproducing
``autounet predict`` without autounet (issue 12).

Engines that are not installed are skipped; the fallback is tested by hiding them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autounet.api import plan, preprocess
from autounet.data.geometry import Geometry
from autounet.data.image_io import read_label, write_image
from autounet.data.synthetic import SyntheticSpec, make_case, make_synthetic_dataset
from autounet.errors import AutounetError
from autounet.inference import engines
from autounet.inference.engines import (
    EngineUnavailable,
    TorchEngine,
    compile_network,
    compile_or_fallback,
    compile_stage,
    resolve_engine,
)
from autounet.inference.model import load_stage
from autounet.inference.predictor import Predictor
from autounet.networks.spec import NetworkSpec
from autounet.networks.unet import UNet
from autounet.pipeline.fold import train_and_validate
from autounet.postprocessing.apply import Postprocessing
from autounet.postprocessing.brats_et import EtRule, brats_postprocess
from autounet.postprocessing.components import PostprocessingDecision, apply_postprocessing
from autounet.preprocessing.resample import resample_volume
from autounet.regions import brats_2017, regions_to_labels
from autounet.selection_document import Selection, Winner, save_selection
from autounet.training.options import TrainOptions
from autounet.utils.plain_data import to_plain
from autounet.workspace import Workspace, engine_cache_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "onnx_predict.py"
TINY = dict(epochs=1, iterations_per_epoch=2, validation_iterations=1, device="cpu")
CONVERTED = ("onnxruntime", "openvino")


def needs(engine: str) -> None:
    for package in engines.ENGINE_PACKAGES[engine]:
        pytest.importorskip(package)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def network(kind: str, seed: int = 0) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """A small U-Net and the tile shape it runs on (batch 2)."""
    torch.manual_seed(seed)
    if kind == "2d":
        spec = NetworkSpec(2, 2, 3, [4, 8, 16], [[3, 3]] * 3, [[2, 2]] * 2)
        return UNet(spec).eval(), (2, 2, 16, 24)
    if kind == "3d_seed004":  # strided convolutions, residual blocks, attention gates, sigmoid regions
        spec = NetworkSpec(
            3,
            1,
            3,
            [4, 8, 16],
            [[3, 3, 3]] * 3,
            [[1, 2, 2], [2, 2, 2]],
            downsampling="strided_conv",
            deep_supervision_heads=1,
            residual_encoder=True,
            residual_decoder=True,
            attention_gates=True,
        )
        return UNet(spec).eval(), (2, 1, 8, 16, 12)
    spec = NetworkSpec(3, 1, 3, [4, 8, 16], [[3, 3, 3]] * 3, [[2, 2, 2]] * 2, deep_supervision_heads=1)
    return UNet(spec).eval(), (2, 1, 16, 16, 12)


def smooth(shape, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


# ---------------------------------------------------------------------------------------------
# (a) converted networks agree with PyTorch fp32
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", CONVERTED)
@pytest.mark.parametrize("kind", ["3d", "2d", "3d_seed004"])
def test_a_converted_network_matches_pytorch_fp32(engine, kind, tmp_path):
    needs(engine)
    net, shape = network(kind)
    compiled = compile_network(net, engine=engine, precision="fp32", example_shape=shape, cache_dir=tmp_path)
    assert compiled.name == engine and compiled.precision == "fp32"
    activation = torch.sigmoid if kind == "3d_seed004" else lambda t: torch.softmax(t, 1)
    for batch in (3, 1, 2):  # the batch axis is dynamic
        x = smooth((batch, *shape[1:]), seed=batch)
        with torch.no_grad():
            expected = net(x)
            got = compiled(x)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-4
        assert (activation(got) - activation(expected)).abs().max().item() <= 1e-4


def test_openvino_converts_from_pytorch_without_the_onnx_package(monkeypatch, tmp_path):
    needs("openvino")
    import openvino

    if tuple(int(v) for v in openvino.get_version().split("-")[0].split(".")[:2]) < (2024, 6):
        pytest.skip("OpenVINO before 2024.6 cannot read back the IR of its PyTorch frontend")
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert not engines.onnx_exporter_available()
    net, shape = network("3d_seed004")
    compiled = compile_network(net, engine="openvino", precision="fp32", example_shape=shape, cache_dir=tmp_path)
    x = smooth((3, *shape[1:]))
    with torch.no_grad():
        assert (compiled(x) - net(x)).abs().max().item() <= 1e-4
    with pytest.raises(EngineUnavailable, match="not installed"):
        compile_network(net, engine="onnxruntime", precision="fp32", example_shape=shape)


# ---------------------------------------------------------------------------------------------
# (b) bf16 agrees with fp32 within a loose bound
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_bf16_agrees_with_fp32_loosely(engine, tmp_path):
    if engine == "openvino":
        needs("openvino")
        if not engines.openvino_cpu_supports_bf16():
            pytest.skip("this CPU runs no bf16 in OpenVINO")
    net, shape = network("3d")
    compiled = compile_network(net, engine=engine, precision="bf16", example_shape=shape, cache_dir=tmp_path)
    assert compiled.precision == "bf16"
    x = smooth(shape)
    with torch.no_grad():
        expected = torch.softmax(net(x), 1)
        got = torch.softmax(compiled(x), 1)
    assert got.dtype == torch.float32
    diff = (got - expected).abs()
    assert diff.max().item() < 0.1 and diff.mean().item() < 0.01


def test_precision_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(engines, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert engines.resolve_precision("auto", "torch", "cpu") == "fp32"
    monkeypatch.setattr(engines, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert engines.resolve_precision("auto", "torch", "cpu") == "bf16"
    assert engines.resolve_precision("auto", "onnxruntime", "cpu") == "fp32"
    with pytest.raises(EngineUnavailable, match="fp32 only"):
        engines.resolve_precision("bf16", "onnxruntime", "cpu")
    with pytest.raises(AutounetError, match="unknown engine"):
        compile_network(network("3d")[0], engine="tensorrt", example_shape=(1, 1, 16, 16, 12))


# ---------------------------------------------------------------------------------------------
# (c) the conversion cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", CONVERTED)
def test_the_conversion_cache_is_reused_and_rebuilt_when_the_key_changes(engine, tmp_path, monkeypatch):
    needs(engine)
    exports = []
    real = engines.export_onnx
    monkeypatch.setattr(engines, "export_onnx", lambda *a, **k: exports.append(a[1]) or real(*a, **k))
    net, shape = network("3d")
    fold = tmp_path / "fold_0"
    first = compile_network(net, engine=engine, precision="fp32", example_shape=shape, cache_dir=fold)
    assert len(exports) == 1 and not first.cached
    files = sorted(p.name for p in engine_cache_dir(fold).iterdir() if p.suffix != ".lock")
    assert files == sorted(  # the converted file(s) and their record (autounet.inference.engine_cache)
        [f"{first.file.stem}.json"]
        + ([f"{first.file.stem}.bin", f"{first.file.stem}.xml"] if engine == "openvino" else [first.file.name])
    )

    again = compile_network(net, engine=engine, precision="fp32", example_shape=(4, *shape[1:]), cache_dir=fold)
    assert len(exports) == 1 and again.cached and again.file == first.file  # the batch size is not in the key
    x = smooth(shape)
    torch.testing.assert_close(again(x), first(x))

    retrained, _ = network("3d", seed=1)  # other weights: another key, a new conversion
    other = compile_network(retrained, engine=engine, precision="fp32", example_shape=shape, cache_dir=fold)
    assert len(exports) == 2 and not other.cached and other.file != first.file
    with torch.no_grad():
        assert (other(x) - retrained(x)).abs().max().item() <= 1e-4

    named = compile_network(net, engine=engine, precision="fp32", example_shape=shape, cache_dir=fold, cache_key="k2")
    assert len(exports) == 3 and named.file.stem == "k2"
    assert not any(p.name.startswith(".autounet-tmp") for p in engine_cache_dir(fold).iterdir())


# ---------------------------------------------------------------------------------------------
# (d) a missing or failing engine falls back to PyTorch
# ---------------------------------------------------------------------------------------------


def test_a_missing_engine_gives_the_fallback_signal(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)
    net, shape = network("3d")
    for engine in CONVERTED:
        with pytest.raises(EngineUnavailable, match="not installed") as info:
            compile_network(net, engine=engine, precision="fp32", example_shape=shape, cache_dir=tmp_path)
        assert info.value.engine == engine and "pip install" in info.value.reason
        fallback, note = compile_or_fallback(net, engine=engine, precision="fp32", example_shape=shape)
        assert isinstance(fallback, TorchEngine) and fallback.describe() == "torch fp32"
        assert note.startswith(f"engine {engine}: not installed")
    assert resolve_engine("auto", "cpu") == "torch"
    assert engines.available_engines() == ["torch"]
    assert not engine_cache_dir(tmp_path).exists()


def test_auto_engine_is_openvino_on_a_cpu_but_pytorch_for_an_explicit_fp32():
    """`--precision fp32` alone reproduces PyTorch's full-precision results."""
    needs("openvino")
    assert resolve_engine("auto", "cpu") == "openvino"
    assert resolve_engine("auto", "cpu", "fp32") == "torch"
    assert resolve_engine("openvino", "cpu", "fp32") == "openvino"


def test_a_failed_conversion_and_a_runtime_failure_fall_back(monkeypatch, tmp_path, capsys):
    needs("onnxruntime")
    net, shape = network("3d")

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    with monkeypatch.context() as m:
        m.setattr(engines, "export_onnx", broken)
        fallback, note = compile_or_fallback(net, engine="onnxruntime", precision="fp32", example_shape=shape)
    assert isinstance(fallback, TorchEngine) and "conversion failed (RuntimeError: unsupported operator)" in note

    compiled = compile_network(net, engine="onnxruntime", precision="fp32", example_shape=shape)
    monkeypatch.setattr(compiled, "_run", broken)
    x = smooth(shape)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x))
    assert compiled.describe() == "torch fp32" and "unsupported operator" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A tiny trained model: engines in the predictor, export, and the standalone script
# ---------------------------------------------------------------------------------------------


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    total = x.sum() + y.sum()
    return 1.0 if total == 0 else 2.0 * (x & y).sum() / total


def rotated_geometry(spacing) -> Geometry:
    a = math.radians(25)
    rotation = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    permute_flip = np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0]], dtype=float)
    return Geometry(spacing, (-12.5, 40.25, 7.0), tuple((rotation @ permute_flip).ravel()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A workspace ``W/raw`` whose selection chose the 2d + 3d_fullres ensemble (fold 0 of each)."""
    root = tmp_path_factory.mktemp("export")
    raw = make_synthetic_dataset(root / "raw", SyntheticSpec(cases=6, shape=(16, 20, 18), classes=3, seed=31))
    plan(raw, work=root / "W", workers=1)
    preprocess("raw", work=root / "W", workers=1)
    ws = Workspace.at(root / "W", "raw")
    for config in ("3d_fullres", "2d"):
        train_and_validate(ws, TrainOptions(config, 0, **TINY), False, False)
    selection = Selection(
        dataset="raw",
        metric="mean foreground Dice over the cross-validation cases",
        n_cases=0,
        ranking=[],
        winner=Winner("2d+3d_fullres", ["2d", "3d_fullres"], [0]),
        postprocessing=None,
        predict_command="",
    )
    save_selection(selection, ws.selection_json)
    return ws.root


def write_case(path: Path, spacing=(1.3, 0.8, 1.1)) -> Path:
    """A case with another spacing than the plan's (resampled both ways), a rotated direction and a
    zero border (cropped)."""
    image, _, _ = make_case(SyntheticSpec(shape=(16, 20, 18), seed=99), 0)
    image = np.pad(image[0], ((1, 2), (3, 0), (2, 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, image, rotated_geometry(spacing))
    return path


@pytest.fixture(scope="module")
def test_image(tmp_path_factory) -> Path:
    return write_case(tmp_path_factory.mktemp("image") / "case.nii.gz")


def test_compile_stage_replaces_the_networks_and_the_predictor_agrees(trained, test_image):
    needs("onnxruntime")
    from autounet.data.image_io import read_image

    image, geometry = read_image([test_image])
    reference = Predictor(trained / "results" / "3d_fullres", device="cpu", engine="torch", precision="fp32")
    reference = reference.predict_array(image, geometry, "c", True)
    stage = load_stage(trained / "results" / "3d_fullres")
    done = compile_stage(stage, engine="onnxruntime", precision="fp32")
    assert done.notes == [] and done.describe() == "onnxruntime fp32"
    fold = trained / "results" / "3d_fullres" / "fold_0"
    assert sorted(p.suffix for p in engine_cache_dir(fold).iterdir()) == [".json", ".lock", ".onnx"]
    predictor = Predictor(members=[stage], device="cpu")
    predictor.amp_dtype = None
    out = predictor.predict_array(image, geometry, "c", True)
    # one float16 step of the accumulators (inference/sliding_window.py) at most
    np.testing.assert_allclose(out.probabilities, reference.probabilities, atol=2**-11)
    again = compile_stage(load_stage(trained / "results" / "3d_fullres"), engine="onnxruntime", precision="fp32")
    assert all(e.cached for e in again.engines)


def test_export_writes_a_network_per_fold_and_a_model_json(trained, tmp_path):
    needs("onnxruntime")
    needs("openvino")
    from autounet.inference.export import MODEL_FILE, export_model, load_model_document

    path = export_model(trained, tmp_path / "export", ("onnx", "openvino"))
    assert path == tmp_path / "export" / MODEL_FILE
    doc = load_model_document(path)
    assert [m.configuration for m in doc.members] == ["2d", "3d_fullres"]
    assert doc.output.activation == "softmax" and doc.output.label_values == [0, 1, 2]
    assert doc.postprocessing is None and doc.versions["openvino"] and doc.dataset == "raw"
    names = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert names == sorted(
        [MODEL_FILE] + [f"{c}.fold0.final.{s}" for c in ("2d", "3d_fullres") for s in ("onnx", "xml", "bin")]
    )
    three_d = doc.members[1]
    assert three_d.tiling.mirror_axes == [0, 1, 2] and three_d.networks[0].files == {
        "onnx": "3d_fullres.fold0.final.onnx",
        "openvino": "3d_fullres.fold0.final.xml",
    }
    stage = load_stage(trained / "results" / "3d_fullres")
    shape = (3, 1, *three_d.tiling.patch_size)
    x = smooth(shape)
    with torch.no_grad():
        expected = stage.networks[0](x)
    for fmt, engine_class in (("onnx", engines.OnnxRuntimeEngine), ("openvino", engines.OpenVinoEngine)):
        run = engine_class(tmp_path / "export" / three_d.networks[0].files[fmt])
        assert (run(x) - expected).abs().max().item() <= 1e-4
    with pytest.raises(AutounetError, match="exist already"):
        export_model(trained, tmp_path / "export", ("onnx",))

    one_fold = load_model_document(export_model(trained / "results" / "2d" / "fold_0", tmp_path / "fold", ("onnx",)))
    assert [m.configuration for m in one_fold.members] == ["2d"] and one_fold.formats == ["onnx"]
    assert one_fold.members[0].tiling.network_dims == 2 and one_fold.members[0].networks[0].fold == "0"
    assert sorted(p.name for p in (tmp_path / "fold").iterdir()) == ["2d.fold0.final.onnx", MODEL_FILE]


def test_export_refuses_a_cascade(trained, tmp_path, monkeypatch):
    from autounet.inference import export

    stage = load_stage(trained / "results" / "3d_fullres")
    stage.previous = stage
    monkeypatch.setattr(export, "resolve_model", lambda *a: ([stage], None))
    with pytest.raises(AutounetError, match="exporting cascades is not supported"):
        export.export_model(trained, tmp_path / "x", ("onnx",))


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_export_never_replaces_or_deletes_a_users_files_without_overwrite(trained, tmp_path, fmt, capsys):
    """Issue 21: the user's own 3d_fullres.fold0.final.onnx was overwritten (onnx) or deleted (openvino)."""
    needs("onnxruntime" if fmt == "onnx" else "openvino")
    from autounet.cli import main
    from autounet.inference.export import MODEL_FILE, export_model

    out = tmp_path / "out"
    out.mkdir()
    mine = out / ("3d_fullres.fold0.final.onnx" if fmt == "onnx" else "2d.fold0.final.xml")
    mine.write_bytes(b"the user's own network")
    (out / "notes.txt").write_text("mine too")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = main(["export", str(trained), "-o", str(out), "--format", fmt])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and mine.name in err[0] and "--overwrite" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    if fmt == "openvino":  # an .onnx of the user's beside an OpenVINO export is left alone
        mine.unlink()
        (out / "3d_fullres.fold0.final.onnx").write_bytes(b"the user's own network")
        export_model(trained, out, ("openvino",))
        assert (out / "3d_fullres.fold0.final.onnx").read_bytes() == b"the user's own network"
        assert (out / "2d.fold0.final.xml").is_file() and (out / "2d.fold0.final.bin").is_file()
    else:
        assert main(["export", str(trained), "-o", str(out), "--format", fmt, "--overwrite"]) == 0
        assert mine.read_bytes() != b"the user's own network" and (out / MODEL_FILE).is_file()
    assert (out / "notes.txt").read_text() == "mine too"
    assert not any(p.name.startswith(".autounet-tmp") for p in out.iterdir())


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_an_exporter_failure_is_one_clear_error_and_nothing_is_left(trained, tmp_path, fmt, monkeypatch):
    needs("onnxruntime" if fmt == "onnx" else "openvino")
    from autounet.inference import export

    written = []

    def fails_on_the_second(network, path, *args):
        written.append(path)
        if len(written) == 2:
            Path(path).write_bytes(b"half")
            raise RuntimeError("Exporting the operator 'aten::foo' to ONNX opset version 17 is not supported.")
        return real(network, path, *args)

    name = "write_onnx" if fmt == "onnx" else "write_openvino_ir"
    real = getattr(export, name)
    monkeypatch.setattr(export, name, fails_on_the_second)
    with pytest.raises(AutounetError, match=r"cannot export 3d_fullres fold 0 \(final checkpoint\) to (ONNX|OpenVINO)"):
        export.export_model(trained, tmp_path / "new", (fmt,))
    assert not (tmp_path / "new").exists()  # the folder it made, removed again
    keep = tmp_path / "kept"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    written.clear()
    with pytest.raises(AutounetError, match="not supported"):
        export.export_model(trained, keep, (fmt,))
    assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]


def test_the_optional_engines_are_imported_only_when_used():
    code = (
        "import sys, autounet, autounet.inference.engines, autounet.inference.export; "
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'openvino') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def _script_module():
    spec = importlib.util.spec_from_file_location("onnx_predict", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_imports_no_autounet():
    text = SCRIPT.read_text()
    assert "autounet" not in "".join(line for line in text.splitlines() if line.startswith(("import", "from")))
    code = f"import runpy, sys; runpy.run_path({str(SCRIPT)!r}, run_name='x'); print('autounet' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if done.returncode and "onnxruntime" in done.stderr:
        pytest.skip("onnxruntime not installed")
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize(
    "postprocess, spacing",
    [(False, (1.3, 0.8, 1.1)), (True, (3.5, 0.8, 0.9))],  # 3.5 mm: anisotropic, z resampled on its own
)
def test_the_script_reproduces_autounet_predict(trained, tmp_path, postprocess, spacing):
    needs("onnxruntime")
    test_image = write_case(tmp_path / "in" / "case.nii.gz", spacing)
    from autounet.inference.export import export_model

    export = tmp_path / "export"
    model_json = export_model(trained, export, ("onnx",))
    predictor = Predictor(trained, device="cpu")
    if postprocess:  # a components rule, as `autounet select` would choose it, in both
        decision = PostprocessingDecision(keep_largest_foreground=True, keep_largest_classes=[1, 2], candidates=[1, 2])
        predictor.postprocessing = Postprocessing("components", decision=decision)
        doc = json.loads(model_json.read_text())
        doc["postprocessing"] = to_plain(predictor.postprocessing)
        model_json.write_text(json.dumps(doc))
    reference = tmp_path / "reference"
    predictor.predict([test_image], reference)
    out = tmp_path / "script.nii.gz"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(export), "-i", str(test_image), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected, geo_expected = read_label(reference / "case.nii.gz")
    got, geo_got = read_label(out)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(geo_got.spacing, geo_expected.spacing, rtol=1e-6)
    np.testing.assert_allclose(geo_got.origin_xyz, geo_expected.origin_xyz, atol=1e-5)
    np.testing.assert_allclose(geo_got.direction_xyz, geo_expected.direction_xyz, atol=1e-6)
    assert (expected > 0).sum() > 0
    for value in (0, 1, 2):
        assert dice(got, expected, value) >= 0.999, value


# ---------------------------------------------------------------------------------------------
# The script's pieces against autounet's (exact)
# ---------------------------------------------------------------------------------------------


def test_the_scripts_resampling_is_autounets():
    script = _script_module()
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(7, 12, 9)).astype(np.float32)
    for shape, order, sep in [((11, 7, 9), 3, None), ((3, 20, 14), 3, 0), ((7, 5, 16), 1, 2), ((9, 9, 9), 1, None)]:
        expected = resample_volume(volume, shape, order, sep, 0)
        np.testing.assert_array_equal(script.resample_volume(volume, shape, order, sep, 0), expected)
    labels = rng.integers(0, 3, (7, 12, 9)).astype(np.uint8)
    np.testing.assert_array_equal(
        script.resample_volume(labels, (10, 5, 9), 0, None, 0), resample_volume(labels, (10, 5, 9), 0)
    )


def test_the_scripts_postprocessing_and_region_labels_are_autounets():
    script = _script_module()
    rng = np.random.default_rng(1)
    seg = (rng.random((12, 14, 10)) < 0.08).astype(np.uint8) * rng.integers(1, 3, (12, 14, 10)).astype(np.uint8)
    seg[2:8, 3:9, 2:7] = 1
    seg[4:6, 4:6, 3:5] = 2
    decision = PostprocessingDecision(True, [1, 2], [1, 2])
    pp = to_plain(Postprocessing("components", decision=decision))
    np.testing.assert_array_equal(script.postprocess(seg, None, pp), apply_postprocessing(seg, decision))
    decision = PostprocessingDecision(False, [2], [2])
    pp = to_plain(Postprocessing("components", decision=decision))
    np.testing.assert_array_equal(script.postprocess(seg, None, pp), apply_postprocessing(seg, decision))

    regions = brats_2017()
    probs = rng.random((3, 12, 14, 10)).astype(np.float32)
    np.testing.assert_array_equal(script.region_labels(probs, to_plain(regions)), regions_to_labels(probs, regions))
    rule = EtRule(component_voxels=5, total_voxels=40, et_threshold=0.6)
    pp = to_plain(Postprocessing("brats_et", rule=rule, regions=regions))
    np.testing.assert_array_equal(script.postprocess(None, probs, pp), brats_postprocess(probs, regions, rule))


@pytest.fixture(scope="module")
def segmenting(tmp_path_factory) -> Path:
    """A 3d_fullres fold trained long enough to segment the synthetic shapes (120 steps)."""
    root = tmp_path_factory.mktemp("guard")
    raw = make_synthetic_dataset(root / "raw", SyntheticSpec(cases=6, shape=(16, 20, 18), classes=3, seed=31))
    plan(raw, work=root / "W", workers=1)
    preprocess("raw", work=root / "W", workers=1, configurations=["3d_fullres"])
    ws = Workspace.at(root / "W", "raw")
    options = TrainOptions("3d_fullres", 0, epochs=6, iterations_per_epoch=20, validation_iterations=1, device="cpu")
    train_and_validate(ws, options, False, False)
    return ws.results_dir("3d_fullres")


def test_accuracy_guard_every_engine_and_precision_on_a_trained_model(segmenting, test_image):
    """bf16 segmentations keep Dice >= 0.99 per class against fp32, and fp32 engines agree except
    where two classes are within 1e-4 of each other (a decision boundary)."""
    from autounet.data.image_io import read_image

    image, geometry = read_image([test_image])
    model = segmenting
    reference = Predictor(model, device="cpu", engine="torch", precision="fp32", quiet=True)
    ref = reference.predict_array(image, geometry, "c", True)
    top2 = np.sort(ref.probabilities, axis=0)[-2:]
    boundary = (top2[1] - top2[0]) < 1e-4
    combos = [("torch", "bf16")] + [(e, p) for e in CONVERTED for p in ("fp32", "bf16") if engines.engine_installed(e)]
    for engine, precision in combos:
        if engine == "onnxruntime" and precision == "bf16":
            continue  # onnxruntime runs fp32 only (it says so and falls back)
        if engine == "openvino" and precision == "bf16" and not engines.openvino_cpu_supports_bf16():
            continue  # a CPU without native bf16: OpenVINO refuses bf16 (and falls back)
        predictor = Predictor(model, device="cpu", engine=engine, precision=precision, quiet=True)
        assert predictor.engines == f"{engine} {precision}", predictor.engines
        seg = predictor.predict_array(image, geometry, "c").segmentation
        if precision == "fp32":
            differ = seg != ref.segmentation
            assert not np.any(differ & ~boundary), f"{engine} fp32 differs away from decision boundaries"
        for value in (1, 2):
            a, b = seg == value, ref.segmentation == value
            assert b.sum() > 30, "the reference model must segment the class for the guard to mean something"
            dice = 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))
            assert dice >= 0.99, (engine, precision, value, dice)


def test_accuracy_guard_half_accumulators_change_only_float32_ties(segmenting, test_image, monkeypatch):
    """The float16 accumulators (issue 22) give the float32 accumulators' segmentation except at
    voxels whose two best classes are within HALF_ACCUMULATION_TIE of each other in float32."""
    from autounet.data.image_io import read_image
    from autounet.inference import sliding_window

    image, geometry = read_image([test_image])
    predictor = Predictor(segmenting, device="cpu", engine="torch", precision="fp32", quiet=True)
    half = predictor.predict_array(image, geometry, "c")
    monkeypatch.setattr(sliding_window, "ACCUMULATOR_DTYPE", torch.float32)
    full = predictor.predict_array(image, geometry, "c", True)
    top2 = np.sort(full.probabilities, axis=0)[-2:]
    tie = (top2[1] - top2[0]) < sliding_window.HALF_ACCUMULATION_TIE
    assert not np.any((half.segmentation != full.segmentation) & ~tie)
    assert np.sum(full.segmentation > 0) > 60  # the model segments something
