"""Dataclasses to and from plain JSON data, strictly: unknown or missing keys are errors."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from autounet.errors import AutounetError
from autounet.utils.loaders import read_json

T = TypeVar("T")


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and dicts as JSON-ready dicts, lists and scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    return obj


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except AutounetError as exc:
                errors.append(str(exc))
        raise AutounetError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise AutounetError(f"{where}: expected a list, got {type(value).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise AutounetError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        seq = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        if not isinstance(value, dict):
            raise AutounetError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AutounetError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.lstrip("-").isdigit():
                return int(value)
            raise AutounetError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise AutounetError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise AutounetError(f"{where}: expected a string, got {value!r}")
        return value
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # slow: resolves string annotations every call


def from_plain(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from plain data; errors name the offending field via ``where``."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise AutounetError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise AutounetError(f"{where}: unknown field(s) {unknown}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise AutounetError(f"{where}: missing field '{name}'")
            continue
        kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}")
    return cls(**kwargs)


def read_json_document(path: str | Path, what: str, schema_version: int, hint: str = "") -> Any:
    """The JSON content of ``path``, with one clear error if it is missing, not JSON or of another
    schema version (checked when it is an object with a ``schema_version`` key).

    ``what`` names the file in messages ("plans", "fingerprint"); ``hint`` is appended when the
    file does not exist (e.g. which command writes it).
    """
    path = Path(path)
    if not path.exists():
        raise AutounetError(f"{path}: {what} file not found" + (f" ({hint})" if hint else ""))
    data = read_json(path)
    if isinstance(data, dict) and data.get("schema_version", schema_version) != schema_version:
        found = data.get("schema_version")
        raise AutounetError(f"{path}: {what} schema version {found} is not supported (expected {schema_version})")
    return data


def load_json_dataclass(cls: type[T], path: str | Path, what: str, schema_version: int, hint: str = "") -> T:
    """Read ``path`` into dataclass ``cls``, with one clear error if it is missing or malformed
    (see :func:`read_json_document`)."""
    data = read_json_document(path, what, schema_version, hint)
    try:
        return from_plain(cls, data, where=str(path))
    except AutounetError as exc:
        raise AutounetError(f"malformed {what}: {exc}") from None
