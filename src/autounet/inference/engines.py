"""Inference engines: what runs a network's forward pass for the sliding window (issue 12).

The sliding window (:mod:`autounet.inference.sliding_window`) calls ``network(tiles)`` on float32
tiles ``(B, C, *patch)`` and wants logits ``(B, K, *patch)``. An :class:`Engine` is such a
callable (a :class:`torch.nn.Module`, so it also goes wherever a network went: ``_SliceNet``,
``StageModel.networks``), built by :func:`compile_network` for one of

* ``torch``: the network itself, eager, in fp32 or under autocast (bf16 on the CPU, bf16/fp16 on
  CUDA);
* ``onnxruntime``: the network exported to ONNX (dynamic batch axis), fp32, CPU;
* ``openvino``: the network without its head (:class:`~autounet.networks.unet.NetworkBody`)
  exported to ONNX and converted to OpenVINO IR, fp32 or bf16 (OpenVINO's inference precision
  hint; the CPU must run bf16 natively: AVX512-BF16 or AMX); the 1x1 head runs in PyTorch fp32
  on the features it returns (:func:`split_head`), so that in bf16 the logits are not rounded
  before the softmax and the argmax, as PyTorch's autocast path keeps its head in fp32 too.

``auto`` picks OpenVINO on a CPU when it is installed and PyTorch otherwise (always on CUDA);
precision ``auto`` picks bf16 where the hardware runs it natively, else fp32 (see
:func:`resolve_engine`, :func:`resolve_precision`); the predictor turns it to fp32
(:meth:`Engine.full_precision`) for a model whose probabilities are too near ties for half
precision (:func:`autounet.inference.agreement.tie_risk`).

Engines are optional: onnxruntime and openvino are imported only when asked for. An engine that
is not installed, cannot run the requested precision or fails to compile raises
:class:`EngineUnavailable` (an :class:`AutounetError`), which :func:`compile_or_fallback` and
:func:`compile_stage` turn into a PyTorch engine plus a one-line reason, so a case is never lost
to an engine; an engine that fails at run time hands over to PyTorch for good with a note
(the predictor then predicts the case again from its first tile: :class:`EngineRunFailure`).

Conversions are cached beside the checkpoints (``fold_K/engines/KEY.onnx``, ``KEY.xml`` +
``KEY.bin``; :func:`autounet.workspace.engine_cache_path`), written atomically and flushed, under
a key made of the network's weights and structure, the patch shape, this module's
:data:`CONVERSION_VERSION`, the exporter's opset and the converting library's version
(:func:`conversion_key`), with a record ``KEY.json`` of those inputs and every file's SHA-256
(:mod:`autounet.inference.engine_cache`), written once the conversion has loaded. A cached
conversion is used only when its record and files match this network; one that does not, or
that fails to load, is deleted and converted once more with a note; a failed conversion is never
kept. The precision is not part of the key: the converted files are fp32 and the precision is
chosen when they are loaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from autounet.errors import AutounetError
from autounet.inference.engine_cache import (
    conversion_lock,
    entry_exists,
    entry_files,
    entry_problem,
    remove_entry,
    write_record,
)
from autounet.networks.unet import NetworkBody, UNet
from autounet.runtime import cpu_flags, half_precision, native_bf16
from autounet.utils.atomic import atomic_write, make_folder
from autounet.utils.temporary import temporary_prefix
from autounet.workspace import engine_cache_path

if TYPE_CHECKING:
    from autounet.inference.model import StageModel

ENGINES = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The Python packages each engine needs (the first is the engine; onnxruntime also needs onnx,
# which PyTorch's ONNX exporter uses), and the extra that brings them.
ENGINE_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino",)}
ENGINE_EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}
# ONNX opset of the exported files: InstanceNormalization, ConvTranspose and the rest are stable
# since long before; 17 is read by onnxruntime >= 1.12 and OpenVINO >= 2022.
ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# Bump when a change here alters the converted files, so that cached conversions are redone
# (2: every conversion has a record, autounet.inference.engine_cache).
CONVERSION_VERSION = 2
# CPU flags that mean native bf16 arithmetic (Linux /proc/cpuinfo names).

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16"}


class EngineUnavailable(AutounetError):
    """An engine cannot run here (not installed, precision not supported, conversion failed).

    ``engine`` is the engine asked for, ``reason`` says why in a few words; the caller falls back
    to PyTorch (:func:`compile_or_fallback`).
    """

    def __init__(self, engine: str, reason: str):
        super().__init__(f"{engine}: {reason}")
        self.engine = engine
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# What is installed and what the hardware runs
# ---------------------------------------------------------------------------------------------


def _import(engine: str) -> Any:
    """The engine's Python module, or :class:`EngineUnavailable` naming the extra to install."""
    modules = []
    for package in ENGINE_PACKAGES[engine]:
        try:
            modules.append(importlib.import_module(package))
        except Exception as exc:  # ImportError, or a broken install failing on import
            detail = str(exc).splitlines()[0] if str(exc) else package
            raise EngineUnavailable(
                engine,
                f"not installed ({type(exc).__name__}: {detail}); pip install 'autounet[{ENGINE_EXTRAS[engine]}]'",
            ) from None
    return modules[0]


def onnx_exporter_available() -> bool:
    """Whether PyTorch can write ONNX here (its exporter needs the ``onnx`` package)."""
    try:
        importlib.import_module("onnx")
    except Exception:
        return False
    return True


def engine_installed(engine: str) -> bool:
    """Whether ``engine`` can be imported (``torch`` always can)."""
    if engine == "torch":
        return True
    try:
        _import(engine)
    except EngineUnavailable:
        return False
    return True


def available_engines() -> list[str]:
    """The engines importable here, ``torch`` first."""
    return [e for e in ENGINES[1:] if engine_installed(e)]


def engine_version(engine: str) -> str:
    """The version of the library behind ``engine`` (raises :class:`EngineUnavailable` if missing)."""
    if engine == "torch":
        return torch.__version__
    module = _import(engine)
    if engine == "openvino":
        get = getattr(module, "get_version", None)
        return str(get()) if callable(get) else str(getattr(module, "__version__", "unknown"))
    return str(getattr(module, "__version__", "unknown"))


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return native_bf16(cpu_flags())


def openvino_cpu_supports_bf16() -> bool:
    """Whether OpenVINO's CPU plugin offers bf16 here (its ``OPTIMIZATION_CAPABILITIES``)."""
    try:
        ov = _import("openvino")
    except EngineUnavailable:
        return False
    return _openvino_bf16(ov.get_version())


@functools.cache
def _openvino_bf16(version: str) -> bool:
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:
        return False


def check_request(engine: str, precision: str) -> None:
    """Refuse unknown names (an :class:`AutounetError`, not a fallback): for the CLI to call early."""
    if engine not in ENGINES:
        raise AutounetError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise AutounetError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")


def resolve_engine(engine: str, device: str | torch.device = "cpu", precision: str = "auto") -> str:
    """The engine ``engine`` stands for on ``device``.

    ``auto``: OpenVINO on a CPU when it is installed, else PyTorch (always PyTorch on CUDA or MPS);
    with an explicit ``precision`` of ``fp32``, PyTorch, so that ``--precision fp32`` alone gives
    exactly PyTorch's full-precision results (ask for ``openvino`` to run it in fp32).
    A named engine is returned as it is (:func:`compile_network` checks that it is installed);
    onnxruntime and OpenVINO run on the CPU only, so on another device they are refused.
    """
    check_request(engine, "auto")
    device = torch.device(device)
    if engine == "auto":
        if precision == "fp32":
            return "torch"
        return "openvino" if device.type == "cpu" and engine_installed("openvino") else "torch"
    if engine != "torch" and device.type != "cpu":
        raise EngineUnavailable(engine, f"runs on the CPU only, not on {device}")
    return engine


def resolve_precision(precision: str, engine: str, device: str | torch.device = "cpu") -> str:
    """The precision ``precision`` stands for with ``engine`` (resolved) on ``device``.

    ``auto``: on CUDA the autocast type of the GPU (bf16 from Ampere on, else fp16); on a CPU bf16
    where the engine runs it natively (PyTorch: AVX512-BF16 or AMX; OpenVINO: its CPU plugin says
    BF16; onnxruntime: never), else fp32. An explicit precision the engine cannot run raises
    :class:`EngineUnavailable`.
    """
    check_request(engine if engine != "auto" else "torch", precision)
    device = torch.device(device)
    if engine == "torch":
        if precision == "auto":
            if device.type == "cuda":
                dtype = half_precision(device)
                return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
            return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
        if precision == "fp16" and device.type == "cpu":
            raise EngineUnavailable("torch", "fp16 runs on CUDA only (use bf16 or fp32 on the CPU)")
        return precision
    if engine == "onnxruntime":
        if precision in ("auto", "fp32"):
            return "fp32"
        raise EngineUnavailable("onnxruntime", f"runs fp32 only here, not {precision}")
    if engine == "openvino":
        if precision == "auto":
            return "bf16" if openvino_cpu_supports_bf16() else "fp32"
        if precision == "fp32":
            return "fp32"
        if precision == "bf16":
            if not openvino_cpu_supports_bf16():
                raise EngineUnavailable("openvino", "this CPU has no native bf16 (AVX512-BF16 or AMX)")
            return "bf16"
        raise EngineUnavailable("openvino", f"precision {precision} is not offered on the CPU (fp32 or bf16)")
    raise AutounetError(f"unknown engine {engine!r}")


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


class Engine(torch.nn.Module):
    """A compiled network: ``engine(x)`` with float32 tiles ``(B, C, *patch)`` returns float32
    logits ``(B, K, *patch)`` on ``x``'s device.

    ``name`` and ``precision`` say what actually runs (after a fallback: ``torch``); ``cached``
    whether the conversion came from the cache; ``file`` the converted file run (None for torch).
    """

    def __init__(self, name: str, precision: str):
        super().__init__()
        self.name = name
        self.precision = precision
        self.cached = False
        self.file: Path | None = None

    def describe(self) -> str:
        return f"{self.name} {self.precision}"

    def full_precision(self) -> None:
        """Run in fp32 from now on (precision ``auto`` found half precision unsafe for a case)."""
        self.precision = "fp32"

    def extra_repr(self) -> str:
        return self.describe()


class TorchEngine(Engine):
    """The PyTorch network itself, in fp32 or under autocast; its own precision wins over any
    autocast context the caller is in."""

    def __init__(self, network: torch.nn.Module, precision: str = "fp32"):
        if precision not in _DTYPES:
            raise AutounetError(f"unknown precision {precision!r}")
        super().__init__("torch", precision)
        self.network = network.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _DTYPES[self.precision]
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            out = self.network(x)
        return out.float()


class EngineRunFailure(Exception):
    """A converted engine failed at run time and has handed over to PyTorch; raised (instead of
    going on with PyTorch for the rest of the tiles) when the engine's ``redo_case`` is set, so
    that the caller predicts the whole case again with one engine (the predictor does)."""


class _ConvertedEngine(Engine):
    """An engine that runs a converted file on the CPU, with the torch network as a standby: if
    the engine fails at run time, PyTorch (fp32) takes over for good and a note says why. With
    ``redo_case`` it raises :class:`EngineRunFailure` after the handover instead of predicting
    the remaining tiles (the predictor redoes the case: one engine per case). A ``MemoryError``
    is never handed over: it is not the engine's fault and passes through as it is."""

    def __init__(self, name: str, precision: str, network: torch.nn.Module | None, head: torch.nn.Module | None = None):
        super().__init__(name, precision)
        self.standby = network  # PyTorch's network, should the engine fail at run time
        # When the converted file is the network without its head (NetworkBody): the head, run
        # here in float32 on the features the engine returns.
        self.head = head
        self._fallback: TorchEngine | None = None
        self.failure: str | None = None
        self.redo_case = False

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fall_back(self, reason: str, device: str | torch.device = "cpu") -> None:
        """Hand over to PyTorch fp32 for good (``reason``: one line for the note)."""
        if self._fallback is None and self.standby is not None:
            self.failure = reason
            self._fallback = TorchEngine(self.standby.to(device), "fp32")
            self.name, self.precision = "torch", "fp32"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fallback is not None:
            return self._fallback(x)
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        try:
            out = torch.from_numpy(self._run(array))
            if self.head is not None:
                with torch.autocast("cpu", enabled=False):
                    out = self.head(out.float())
        except MemoryError:
            raise
        except Exception as exc:
            if self.standby is None:
                raise
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            self.fall_back(f"{self.name} failed at run time ({type(exc).__name__}: {first_line})", x.device)
            if self.redo_case:
                raise EngineRunFailure(self.failure) from exc
            print(f"note: {self.failure}; PyTorch fp32 predicts from here on", file=sys.stderr)
            return self._fallback(x)
        return out.to(x.device)


class OnnxRuntimeEngine(_ConvertedEngine):
    def __init__(self, path: Path, threads: int | None = None, network: torch.nn.Module | None = None):
        super().__init__("onnxruntime", "fp32", network)
        ort = _import("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.file = Path(path)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float32, copy=False)


class OpenVinoEngine(_ConvertedEngine):
    def __init__(
        self,
        path: Path,
        precision: str = "fp32",
        threads: int | None = None,
        network: torch.nn.Module | None = None,
        mmap: bool = True,
        head: torch.nn.Module | None = None,
    ):
        super().__init__("openvino", precision, network, head)
        ov = _import("openvino")
        core = ov.Core()
        if not mmap:  # the file is temporary: read the weights, do not map them
            core.set_property({"ENABLE_MMAP": False})
        # the model as read (kept, to compile it again in fp32: full_precision)
        self._core, self._model, self.file = core, core.read_model(str(path)), Path(path)
        self._config = {
            "INFERENCE_PRECISION_HINT": _OPENVINO_HINTS[precision],
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            "PERFORMANCE_HINT": "LATENCY",
        }
        self._load()

    def _load(self) -> None:
        self.compiled = self._core.compile_model(self._model, "CPU", self._config)
        actual = str(self.compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        self.precision = "bf16" if "bf16" in actual or "bfloat16" in actual else "fp32"
        self.request = self.compiled.create_infer_request()

    def full_precision(self) -> None:
        """The same converted file compiled again with OpenVINO's fp32 hint (a second or so)."""
        if self._fallback is None and self.precision != "fp32":
            self._config["INFERENCE_PRECISION_HINT"] = _OPENVINO_HINTS["fp32"]
            self._load()

    def _run(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: x})
        data = self.request.get_output_tensor(0).data
        if self.head is not None:  # features, read once by the head before the next request
            return data
        return np.array(data, dtype=np.float32, copy=True)


# ---------------------------------------------------------------------------------------------
# Conversion (shared with autounet.inference.export)
# ---------------------------------------------------------------------------------------------


def network_digest(network: torch.nn.Module) -> str:
    """sha256 of a network's structure (its module tree, with every layer's settings) and weights."""
    h = hashlib.sha256(str(network).encode())
    for name, tensor in network.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def conversion_inputs(digest: str, engine: str, example_shape: Sequence[int]) -> dict[str, str]:
    """What a conversion of the network of ``digest`` (:func:`network_digest`) for ``engine``
    with tiles of ``example_shape`` depends on: the inputs of its key, kept in its cache record
    (the batch size does not matter: the batch axis is dynamic)."""
    route = "onnx" if engine == "onnxruntime" or onnx_exporter_available() else "pytorch-frontend"
    return {
        "network_sha256": digest,
        "engine": engine,
        "engine_version": engine_version(engine),
        "route": route,
        "onnx_opset": str(ONNX_OPSET),
        "conversion_version": str(CONVERSION_VERSION),
        "torch": torch.__version__,
        "tile": "x".join(str(int(s)) for s in example_shape[1:]),
        "stored_precision": "fp32",
    }


def _key_of(inputs: dict[str, str]) -> str:
    text = ";".join(f"{k}={inputs[k]}" for k in sorted(inputs))
    return f"{inputs['engine']}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def conversion_key(network: torch.nn.Module, engine: str, example_shape: Sequence[int]) -> str:
    """The cache key of ``network`` converted for ``engine`` with tiles of ``example_shape``
    (a digest of :func:`conversion_inputs`; for OpenVINO, of what it converts: :func:`split_head`)."""
    return _key_of(conversion_inputs(network_digest(converted_network(network, engine)), engine, example_shape))


def _tile_shape(example_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in example_shape)
    if len(shape) not in (4, 5) or any(s < 1 for s in shape):
        raise AutounetError(f"example_shape must be (B, C, *patch) with a 2D or 3D patch, got {list(shape)}")
    return shape


@contextlib.contextmanager
def _quiet():
    """The exporters' warnings (tracer notes, instance norm in eval mode) and prints, hidden."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export_onnx(network: torch.nn.Module, path: str | Path, example_shape: Sequence[int]) -> Path:
    """Write ``network`` (eval mode, fp32, on the CPU) as ONNX to ``path`` (not atomic: see
    :func:`write_onnx`): input ``image`` ``(batch, C, *patch)``, output ``logits``; the batch axis
    is dynamic, the patch fixed. The TorchScript-based exporter is used (no onnxscript needed);
    the torch.export-based one when that is missing from the installed PyTorch."""
    shape = _tile_shape(example_shape)
    path = Path(path)
    network = network.eval()
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        network = _cpu_copy(network)
    example = torch.zeros(shape, dtype=torch.float32)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": ONNX_OPSET}
    legacy = {"dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, "do_constant_folding": True}
    takes_dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters
    with _quiet(), torch.no_grad():
        try:
            extra = {"dynamo": False} if takes_dynamo else {}
            torch.onnx.export(network, (example,), str(path), **names, **legacy, **extra)
        except Exception as legacy_error:
            if not takes_dynamo:
                raise
            # a PyTorch whose TorchScript exporter is gone or failed: the torch.export-based one
            # (it needs onnxscript); if that fails too, the first error is the one to report
            try:
                torch.onnx.export(
                    network,
                    (example,),
                    str(path),
                    **names,
                    dynamo=True,
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    external_data=False,
                )
            except Exception:
                raise legacy_error from None
    return path


def _cpu_copy(network: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(network).to("cpu").eval()


def write_onnx(network: torch.nn.Module, path: str | Path, example_shape: Sequence[int]) -> Path:
    """:func:`export_onnx` written atomically (temporary file beside ``path``, then a rename)."""
    return atomic_write(path, lambda tmp: export_onnx(network, tmp, example_shape))


def _save_ir(model: Any, xml_path: Path) -> Path:
    """Save an OpenVINO model as ``xml_path`` + its ``.bin`` (fp32 weights), atomically: both are
    written in a temporary folder beside them, flushed to disk and renamed, the ``.bin`` first, so
    that an ``.xml`` never exists without its weights (and a ``.bin`` is removed again when the
    ``.xml`` cannot follow it)."""
    ov = _import("openvino")
    make_folder(xml_path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(), suffix="." + xml_path.stem, dir=xml_path.parent))
    bin_path = xml_path.with_suffix(".bin")
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        for name in ("model.bin", "model.xml"):
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp / "model.bin", bin_path)
        try:
            os.replace(tmp / "model.xml", xml_path)
        except BaseException:
            bin_path.unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return xml_path


def write_openvino_ir(onnx_path: str | Path, xml_path: str | Path) -> Path:
    """Convert an ONNX file to OpenVINO IR ``xml_path`` (+ ``.bin``), atomically."""
    ov = _import("openvino")
    with _quiet():
        model = ov.convert_model(str(onnx_path))
    return _save_ir(model, Path(xml_path))


def write_openvino_ir_from_network(
    network: torch.nn.Module, xml_path: str | Path, example_shape: Sequence[int]
) -> Path:
    """Convert the PyTorch network directly (OpenVINO's own PyTorch frontend; for when the
    ``onnx`` package is missing) to IR ``xml_path`` (+ ``.bin``), atomically; dynamic batch axis."""
    ov = _import("openvino")
    shape = _tile_shape(example_shape)
    network = network.eval()
    if next((p.device.type for p in network.parameters()), "cpu") != "cpu":
        network = _cpu_copy(network)
    with _quiet(), torch.no_grad():
        model = ov.convert_model(network, example_input=torch.zeros(shape), input=[ov.PartialShape([-1, *shape[1:]])])
    return _save_ir(model, Path(xml_path))


# ---------------------------------------------------------------------------------------------
# compile_network
# ---------------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def _discard(record: Path, files: list[Path]) -> None:
    """Remove what a failed conversion left of a cache entry, if the folder lets us."""
    with contextlib.suppress(OSError):
        remove_entry(record, files)


def _cached_engine(
    network: torch.nn.Module,
    engine: str,
    example_shape: Sequence[int],
    cache_dir: Path | None,
    cache_key: str | None,
    scratch: Path,
    load: Callable[[Path, bool], _ConvertedEngine],
) -> _ConvertedEngine:
    """``network`` converted for ``engine`` and loaded by ``load(path, temporary)``.

    From the cache when it holds this network's conversion intact (its record matches the key's
    inputs and every file's SHA-256: :mod:`autounet.inference.engine_cache`) and it loads; else
    converted into the cache (``scratch`` without one) and recorded once it loads. A cached entry
    that does not match or does not load is deleted and converted once more, with one note; a
    conversion that fails or does not load is not kept; a cache that cannot be written is
    skipped with a note (converted in memory).
    """
    suffix = ".xml" if engine == "openvino" else ".onnx"
    in_memory = scratch / f"network{suffix}"
    if cache_dir is None:
        return load(_convert(network, engine, example_shape, in_memory, scratch), True)
    inputs = conversion_inputs(network_digest(network), engine, example_shape)
    key = cache_key or _key_of(inputs)
    target = engine_cache_path(cache_dir, key, suffix)
    record = engine_cache_path(cache_dir, key, ".json")
    with conversion_lock(engine_cache_path(cache_dir, key, ".lock")):
        return _locked_entry(network, engine, example_shape, target, record, key, inputs, scratch, load)


def _locked_entry(
    network: torch.nn.Module,
    engine: str,
    example_shape: Sequence[int],
    target: Path,
    record: Path,
    key: str,
    inputs: dict[str, str],
    scratch: Path,
    load: Callable[[Path, bool], _ConvertedEngine],
) -> _ConvertedEngine:
    """:func:`_cached_engine` for the entry ``target`` (record ``record``) of ``key``, under its lock."""
    in_memory = scratch / f"network{target.suffix}"
    files = entry_files(target)
    if entry_exists(record, files):
        try:
            problem = entry_problem(record, key, inputs, files)
        except OSError as exc:
            problem = f"cannot read it ({exc.strerror or exc})"
        if problem is None:
            try:
                compiled = load(target, False)
            except Exception as exc:
                problem = f"it does not load ({_reason(exc)})"
            else:
                compiled.cached = True
                return compiled
        unused = f"note: cached {engine} conversion {target} not used: {problem}"
        try:
            remove_entry(record, files)
        except OSError as exc:
            print(
                f"{unused}; cannot replace it in {target.parent} ({exc.strerror or exc}); converting in memory",
                file=sys.stderr,
            )
            return load(_convert(network, engine, example_shape, in_memory, scratch), True)
        print(f"{unused}; converting it again", file=sys.stderr)
    try:
        path = _convert(network, engine, example_shape, target, scratch)
    except OSError as exc:
        _discard(record, files)
        print(
            f"note: cannot write the {engine} conversion to {target.parent} ({exc}); converting in memory",
            file=sys.stderr,
        )
        return load(_convert(network, engine, example_shape, in_memory, scratch), True)
    except BaseException:
        _discard(record, files)  # a failed conversion is never cached
        raise
    try:
        compiled = load(path, False)
    except BaseException:
        _discard(record, files)
        raise
    try:
        write_record(record, key, inputs, files)
    except OSError as exc:
        _discard(record, files)
        print(
            f"note: cannot record the {engine} conversion in {target.parent} ({exc}); it is not kept", file=sys.stderr
        )
    return compiled


def _convert(network: torch.nn.Module, engine: str, example_shape: Sequence[int], target: Path, scratch: Path) -> Path:
    if engine == "onnxruntime":
        return write_onnx(network, target, example_shape)
    if not onnx_exporter_available():
        return write_openvino_ir_from_network(network, target, example_shape)
    onnx_path = export_onnx(network, scratch / "network.onnx", example_shape)
    return write_openvino_ir(onnx_path, target)


def compile_network(
    network: torch.nn.Module,
    *,
    engine: str = "auto",
    precision: str = "auto",
    example_shape: Sequence[int],
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> Engine:
    """``network`` (eval mode, no deep supervision) as an :class:`Engine` for the sliding window.

    ``example_shape``: the tiles it will get, ``(B, C, *patch)`` (2D networks: ``(B, C, Y, X)``);
    the batch axis stays dynamic. ``cache_dir``: the fold folder whose ``engines/`` keeps the
    conversion (:func:`autounet.workspace.engine_cache_path`; None: convert in a temporary
    folder each time); ``cache_key``: default :func:`conversion_key`. ``threads``: for
    onnxruntime and OpenVINO (default ``torch.get_num_threads()``).

    Raises :class:`EngineUnavailable` when the engine is missing, cannot run ``precision`` here
    or fails to convert or load (the caller falls back to PyTorch: :func:`compile_or_fallback`),
    and :class:`AutounetError` for unknown names.
    """
    check_request(engine, precision)
    shape = _tile_shape(example_shape)
    name = resolve_engine(engine, device, precision)
    prec = resolve_precision(precision, name, device)
    if name == "torch":
        return TorchEngine(network, prec)
    _import(name)
    network = network.eval()
    standby = network
    converted = converted_network(network, name)
    head = split_head(network)[1] if converted is not network else None

    def load(path: Path, temporary: bool) -> _ConvertedEngine:
        if name == "onnxruntime":
            loaded: _ConvertedEngine = OnnxRuntimeEngine(path, threads, standby)
        else:
            loaded = OpenVinoEngine(path, prec, threads, standby, mmap=not temporary, head=head)
        if temporary:
            loaded.file = None  # a temporary file, gone with the folder (the engine holds the model)
        return loaded

    try:
        with tempfile.TemporaryDirectory(prefix="autounet-engine-") as scratch:
            folder = Path(cache_dir) if cache_dir is not None else None
            compiled = _cached_engine(converted, name, shape, folder, cache_key, Path(scratch), load)
    except EngineUnavailable:
        raise
    except Exception as exc:
        raise EngineUnavailable(name, f"conversion failed ({_reason(exc)})") from exc
    return compiled


def split_head(network: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """What OpenVINO converts of ``network`` and the head to run apart: for a :class:`UNet`, its
    :class:`NetworkBody` and its 1x1 head, so that in bf16 only the body rounds and the logits
    are computed in float32 (else ``10.0`` and ``10.03`` would be one bf16 value before the
    argmax); any other module whole, with no head."""
    if isinstance(network, UNet):
        return NetworkBody(network).eval(), network.heads[0]
    return network, None


def converted_network(network: torch.nn.Module, engine: str) -> torch.nn.Module:
    """What ``engine`` converts of ``network`` (and what its cache key is made of): OpenVINO the
    body of a :class:`UNet` (:func:`split_head`), onnxruntime the whole network."""
    return split_head(network)[0] if engine == "openvino" else network


def torch_precision_for(precision: str, device: str | torch.device = "cpu") -> str:
    """The precision PyTorch runs for a request of ``precision`` (used after a fallback): as
    asked when PyTorch can, else its ``auto`` choice."""
    try:
        return resolve_precision(precision, "torch", device)
    except EngineUnavailable:
        return resolve_precision("auto", "torch", device)


def compile_or_fallback(
    network: torch.nn.Module,
    *,
    engine: str = "auto",
    precision: str = "auto",
    example_shape: Sequence[int],
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> tuple[Engine, str | None]:
    """:func:`compile_network`, or PyTorch when that raises :class:`EngineUnavailable`; returns
    the engine and None, or the PyTorch engine and the reason (one line, for a note)."""
    try:
        return (
            compile_network(
                network,
                engine=engine,
                precision=precision,
                example_shape=example_shape,
                cache_dir=cache_dir,
                cache_key=cache_key,
                device=device,
                threads=threads,
            ),
            None,
        )
    except EngineUnavailable as exc:
        fallback = TorchEngine(network, torch_precision_for(precision, device))
        return fallback, f"engine {exc}; using {fallback.describe()}"


@dataclass
class StageEngines:
    """What :func:`compile_stage` did: the engines of a stage's networks and any fallback notes."""

    engines: list[Engine]
    notes: list[str]

    def describe(self) -> str:
        kinds = sorted({e.describe() for e in self.engines})
        return ", ".join(kinds)


def compile_stage(
    stage: StageModel,
    *,
    engine: str = "auto",
    precision: str = "auto",
    device: str | torch.device = "cpu",
    tiles_per_batch: int | None = None,
    cache: bool = True,
    threads: int | None = None,
) -> StageEngines:
    """Replace every network of ``stage`` (and of a cascade's first stage) by an :class:`Engine`,
    in place; conversions are cached in each checkpoint's fold folder (``cache``). Engines that
    are unavailable fall back to PyTorch: their reasons are in ``notes`` (one per distinct reason).
    Call it after ``stage.to(device)``; afterwards predict with ``amp_dtype=None`` (each engine
    runs its own precision).
    """
    engines: list[Engine] = []
    notes: list[str] = []
    s: StageModel | None = stage
    while s is not None:
        three_d = s.plan.network_dims == 3
        batch = tiles_per_batch or (4 if three_d else 32)
        shape = (batch, s.spec.in_channels, *s.plan.patch_size)
        compiled = []
        for network, source in zip(s.networks, s.sources):
            inner = network.network if isinstance(network, TorchEngine) else network
            if isinstance(inner, Engine):  # compiled already
                compiled.append(inner)
                continue
            cache_dir = Path(source).parent if cache and source else None
            e, note = compile_or_fallback(
                inner,
                engine=engine,
                precision=precision,
                example_shape=shape,
                cache_dir=cache_dir,
                device=device,
                threads=threads,
            )
            if note and note not in notes:
                notes.append(note)
            compiled.append(e)
        s.networks = compiled
        engines += compiled
        s = s.previous
    return StageEngines(engines, notes)
