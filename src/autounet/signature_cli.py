"""Argparse commands derived from typed functions: a command's options are its function's
parameters, with their help from its Google-style docstring (``Args:``), their choices from a
``Literal``, their type and number of values from the annotation and their default from the
signature. Nothing here knows autounet's commands: :mod:`autounet.cli` gives the functions and how
their parameters are spelled.

Spelling of a parameter (``name=...`` in a table): flags, then metavar(s), e.g. ``-c --configs
CONFIG``; only a metavar (``GB``) keeps the flag ``--param-name``; none at all gives a keyword-only
parameter ``--param-name PARAM_NAME`` and a positional one a positional argument ``PARAM``.
``~--old`` adds a deprecated spelling (hidden; it says so on stderr), ``one`` takes one value for a
list parameter, ``append`` repeats the flag for a list. A flag of a parameter whose default is True,
or spelled ``--no-...``, stores False; its help may start with ``False: `` (dropped here).
"""

from __future__ import annotations

import argparse
import collections.abc
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

KEYWORDS = ("one", "append")


@dataclass
class Command:
    """One command: ``function``'s parameters are its options, ``run`` is called with their values."""

    name: str
    function: Callable
    run: Callable[[dict], int | None]
    spell: dict[str, str] = field(default_factory=dict)  # spellings of this command only
    hide: str = ""  # parameters the command line leaves at their defaults (separated by spaces)
    groups: dict[str, str] = field(default_factory=dict)  # help section title -> its parameters
    extra: dict[str, tuple[str, str]] = field(default_factory=dict)  # flag of the command only -> (before, help)
    helps: dict[str, str] = field(default_factory=dict)  # help where the command line means more than the API


def table(text: str) -> dict[str, str]:
    """``name=spelling; name=spelling ...`` (a line break also separates two) as a dict."""
    return dict(entry.strip().split("=", 1) for entry in re.split(r"[;\n]", text) if entry.strip())


def docstring(function: Callable) -> tuple[str, str, dict[str, str]]:
    """The summary line, the description (the text before ``Args:``) and each parameter's help."""
    text = inspect.getdoc(function) or ""
    head, _, rest = text.partition("\nArgs:\n")
    summary, _, description = head.partition("\n\n")
    helps: dict[str, str] = {}
    for line in rest.splitlines():
        if not line.startswith("    "):  # the next section
            break
        if found := re.match(r" {4}(\w+): (.*)", line):
            name = found[1]
            helps[name] = found[2]
        else:
            helps[name] += " " + line.strip()
    return summary, description, helps


class DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: stores like the new one and says so on stderr."""

    def __init__(self, option_strings: list[str], dest: str, use: str, **kwargs: object):
        self.use = use
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog.split()[0]}: {option_string} is deprecated, use {self.use}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def build(
    parser: argparse.ArgumentParser,
    commands: list[Command],
    spellings: dict[str, str],
    exclusive: tuple[tuple[str, str], ...] = (),
    documented: tuple[Callable, ...] = (),
) -> None:
    """Add ``commands`` as subcommands of ``parser``. A parameter a function's docstring leaves out
    takes its help from the first of ``documented`` and the commands' functions that states it."""
    shared: dict[tuple[str, bool], str] = {}  # (parameter, keyword-only) -> its help
    for function in [*documented, *(c.function for c in commands)]:
        parameters = inspect.signature(function).parameters
        stated = {(n, parameters[n].kind is parameters[n].KEYWORD_ONLY): h for n, h in docstring(function)[2].items()}
        shared = {**stated, **shared}
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands:
        summary, description, helps = docstring(command.function)
        p = sub.add_parser(command.name, help=summary[0].lower() + summary[1:-1], description=description)
        p.set_defaults(run=command.run)
        groups = {title: p.add_argument_group(title) for title in command.groups}
        parameters = inspect.signature(command.function).parameters
        pairs = {
            n: group
            for pair in exclusive
            if set(parameters) >= set(pair)
            for group in [p.add_mutually_exclusive_group()]
            for n in pair
        }
        for parameter in parameters.values():
            for flag, (before, text) in command.extra.items():
                if before == parameter.name:
                    p.add_argument(flag, action="store_true", help=text)
            if parameter.name in command.hide.split():
                continue
            title = next((t for t, members in command.groups.items() if parameter.name in members.split()), None)
            where = pairs.get(parameter.name) or groups.get(title) or p
            keyword = parameter.kind is parameter.KEYWORD_ONLY
            spelling = command.spell.get(parameter.name) or (spellings.get(parameter.name) if keyword else None)
            text = (
                command.helps.get(parameter.name) or helps.get(parameter.name) or shared.get((parameter.name, keyword))
            )
            _argument(where, parameter, spelling or "", text, vars(sys.modules[command.function.__module__]))


def _argument(where, parameter: inspect.Parameter, spelling: str, text: str | None, namespace: dict) -> None:
    words = spelling.split()
    flags = [w for w in words if w.startswith("-")]
    old = [w[1:] for w in words if w.startswith("~")]
    metavar = [w for w in words if w[0] not in "-~" and w not in KEYWORDS]
    if not flags and parameter.kind is parameter.KEYWORD_ONLY:
        flags = ["--" + parameter.name.replace("_", "-")]
    default = None if parameter.default is parameter.empty else parameter.default
    kind, sequence, choices = _kind(parameter.annotation, namespace)
    off = default is True or any(f.startswith("--no-") for f in flags)
    kwargs: dict = {"help": text.removeprefix("False: ").replace("%", "%%") if text else None}
    if kind is bool:
        kwargs.update(action="store_const", const=not off, default=default)
    else:
        kwargs.update(type=None if kind is str else kind, choices=choices, default=default)
        if "append" in words or "one" in words:
            kwargs["action"] = "append" if "append" in words else _OneAsList
        elif sequence:
            kwargs["nargs"] = len(metavar) if len(metavar) > 1 else "+"
        elif not flags and parameter.default is not parameter.empty:
            kwargs["nargs"] = "?"
        if metavar or not choices:
            long = next((f for f in flags if f.startswith("--")), "--" + parameter.name)
            names = metavar or [long[2:].upper().replace("-", "_")]
            kwargs["metavar"] = tuple(names) if len(names) > 1 else names[0]
    if not flags:
        where.add_argument(parameter.name, **kwargs)
        return
    required = parameter.default is parameter.empty
    if old and required:  # the old spelling satisfies the requirement too
        where = where.add_mutually_exclusive_group(required=True)
    where.add_argument(*flags, dest=parameter.name, required=required and not old, **kwargs)
    for spelling in old:
        hidden = dict(kwargs, help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        where.add_argument(spelling, action=DeprecatedAlias, use="/".join(flags), dest=parameter.name, **hidden)


def _kind(annotation: object, namespace: dict) -> tuple[type, bool, tuple | None]:
    """(value type, whether it is a list, its choices) of a parameter's annotation."""
    # postponed annotations are strings: evaluated (our own source) in the namespace of the function's module
    hint = eval(annotation, namespace) if isinstance(annotation, str) else annotation
    members = _union(hint)
    sequences = [m for m in members if typing.get_origin(m) in (collections.abc.Sequence, list, tuple)]
    if sequences:
        members = _union(typing.get_args(sequences[0])[0])
    choices = next((typing.get_args(m) for m in members if typing.get_origin(m) is typing.Literal), None)
    kind = members[0] if len(members) == 1 and members[0] in (bool, int, float) else str
    return kind, bool(sequences), choices


def _union(hint: object) -> list:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return [m for m in (typing.get_args(hint) if union else (hint,)) if m is not type(None)]


class _OneAsList(argparse.Action):
    """One value of a list parameter, stored as that list: ``--checkpoint best`` is ``["best"]``."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [values])
