"""MkDocs hook: the command-line reference (``reference/cli.md``), generated from the parser.

It imports :func:`autounet.cli.build_parser` and writes one section per command: usage, the
description, then every argument group with each option's flags, metavar, choices, default and
help. Options hidden from ``--help`` (deprecated spellings) and hidden commands are left out, as
``--help`` leaves them out. Nothing is written by hand, so the page cannot drift from the code.
"""

from __future__ import annotations

import argparse
import html
import os

PAGE = "reference/cli.md"
PROG = "autounet"
# Where each command's behaviour is explained in depth (strict builds check these links).
NARRATIVE = {
    "check": "../explanation/pipeline.md#check",
    "plan": "../explanation/pipeline.md#plan",
    "preprocess": "../explanation/pipeline.md#preprocess",
    "train": "../explanation/training.md",
    "predict": "../explanation/prediction.md",
    "export": "../how-to/deploy.md#export",
    "package": "../how-to/deploy.md#package",
    "info": "../how-to/deploy.md#info",
    "show": "../explanation/pipeline.md#show",
    "evaluate": "../explanation/pipeline.md#evaluate",
    "make-synthetic": "../explanation/pipeline.md#make-synthetic",
    "select": "../explanation/pipeline.md#select",
    "report": "../explanation/pipeline.md#report",
    "postprocess": "../explanation/pipeline.md#postprocess",
    "run": "../explanation/pipeline.md#run",
    "demo": "../explanation/pipeline.md#demo",
}
MARKDOWN_MARKS = set("\\*_[]#")  # backticks stay: help texts use them for code


def visible_commands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """``(name, parser, help)`` of every command ``--help`` lists (aliases and hidden ones left out)."""
    commands: list[tuple[str, argparse.ArgumentParser, str]] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        seen: set[int] = set()
        for name, sub in action.choices.items():
            if id(sub) in seen or helps.get(name) == argparse.SUPPRESS:
                continue  # an alias of a command already listed, or a hidden command
            seen.add(id(sub))
            commands.append((name, sub, helps.get(name) or ""))
    return commands


def visible(action: argparse.Action) -> bool:
    return action.help != argparse.SUPPRESS and not isinstance(action, argparse._SubParsersAction)


def _expand_help(action: argparse.Action, prog: str) -> str:
    """The help text as ``--help`` prints it (``%(default)s`` and friends filled in)."""
    text = action.help or ""
    if "%" not in text:
        return text
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    for key in ("choices",):
        if params.get(key) is not None:
            params[key] = ", ".join(map(str, params[key]))
    try:
        return text % params
    except (KeyError, TypeError, ValueError):
        return text


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        mv = action.metavar
        return " ".join(mv) if isinstance(mv, tuple) else str(mv)
    if action.choices is not None:  # as argparse spells it
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _value_syntax(action: argparse.Action) -> str:
    """``CONFIG``, ``[CONFIG]``, ``CONFIG [CONFIG ...]``, ``Z Y X``, as argparse spells them."""
    mv = _metavar(action)
    nargs = action.nargs
    if nargs is None:
        return mv
    if nargs == argparse.OPTIONAL:
        return f"[{mv}]"
    if nargs == argparse.ZERO_OR_MORE:
        return f"[{mv} ...]"
    if nargs == argparse.ONE_OR_MORE:
        return f"{mv} [{mv} ...]"
    if isinstance(nargs, int):
        if isinstance(action.metavar, tuple):
            return mv
        return " ".join([mv] * nargs)
    return mv


def _code(text: str) -> str:
    """Inline code (a ``|`` inside it does not split a table cell; backticks kept apart)."""
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _text(text: str) -> str:
    """Plain text that Markdown shows as it is: whitespace joined, HTML and Markdown marks escaped."""
    text = html.escape(" ".join(text.split()), quote=False)
    return "".join("\\" + c if c in MARKDOWN_MARKS else c for c in text)


def _cell(text: str) -> str:
    """Plain text in a table cell (``|`` escaped too)."""
    return _text(text).replace("|", "\\|")


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return _code(_metavar(action) if action.metavar is not None else action.dest)
    value = f" {_value_syntax(action)}" if _takes_value(action) else ""
    return ", ".join(_code(flag + value) for flag in action.option_strings)


def _default(action: argparse.Action) -> str:
    default = action.default
    if default is None or default is argparse.SUPPRESS or default is False or default == "" or not _takes_value(action):
        return ""
    if isinstance(default, (list, tuple)):
        if not default:
            return ""
        return _code(" ".join(map(str, default)))
    return _code(str(default))


def _details(action: argparse.Action, prog: str) -> str:
    parts = [_cell(_expand_help(action, prog))]
    if action.choices is not None:
        parts.append("Choices: " + ", ".join(_code(str(c)) for c in action.choices) + ".")
    if action.required and action.option_strings:
        parts.append("Required.")
    parts = [p for p in parts if p]
    return " ".join(p if p.endswith((".", "!", "?")) or i == len(parts) - 1 else p + "." for i, p in enumerate(parts))


def _group_title(group: argparse._ArgumentGroup) -> str:
    title = group.title or "options"
    return {"optional arguments": "options"}.get(title, title)


def command_section(name: str, parser: argparse.ArgumentParser, summary: str, level: int = 2) -> list[str]:
    """The Markdown of one command: heading, summary, usage, description and its options."""
    prog = f"{PROG} {name}"
    anchor = name.replace(" ", "-")
    lines = [f"{'#' * level} `{prog}` {{#{anchor}}}", ""]
    if summary:
        lines += [_capital(_text(summary)) + ("" if summary.endswith(".") else "."), ""]
    usage = parser.format_usage().strip()
    usage = usage[len("usage: ") :] if usage.startswith("usage: ") else usage
    lines += ["```text", usage, "```", ""]
    if parser.description:
        lines += [_text(parser.description), ""]
    if name in NARRATIVE:
        lines += [f"What it writes and how it behaves: [in depth]({NARRATIVE[name]}).", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if visible(a)]
        if not actions:
            continue
        lines += [f"{'#' * (level + 1)} {_capital(_cell(_group_title(group)))} {{#{anchor}-{_slug(group)}}}", ""]
        if group.description:
            lines += [_text(group.description), ""]
        lines += ["| argument | meaning | default |", "|---|---|---|"]
        for action in actions:
            lines.append(f"| {_flags(action)} | {_details(action, prog)} | {_default(action)} |")
        lines.append("")
    if parser.epilog:
        lines += [_text(parser.epilog), ""]
    for sub_name, sub, sub_help in visible_commands(parser):
        lines += command_section(f"{name} {sub_name}", sub, sub_help, level=min(level + 1, 6))
    return lines


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _slug(group: argparse._ArgumentGroup) -> str:
    words = "".join(c if c.isalnum() else " " for c in _group_title(group).lower()).split()
    return "-".join(words[:3]) or "options"


def render(parser: argparse.ArgumentParser) -> str:
    """The whole page for ``parser`` (the ``autounet`` parser), with usage lines wrapped at 100
    columns whatever the terminal building the site is."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return _render(parser)
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def _render(parser: argparse.ArgumentParser) -> str:
    commands = visible_commands(parser)
    lines = [
        "# Command-line reference",
        "",
        "<!-- generated by docs/hooks/cli_reference.py from autounet.cli.build_parser(); do not edit -->",
        "",
        "Generated from the argument parser at build time: every command, option, default and help text",
        "exactly as `autounet COMMAND --help` has them. What each command does in depth is in the",
        "[explanation pages](../explanation/pipeline.md); each command is one call of its",
        "[Python API](api.md) twin.",
        "",
        "```text",
        parser.format_usage().strip().removeprefix("usage: "),
        "```",
        "",
    ]
    if parser.description:
        lines += [_text(parser.description), ""]
    top = [a for a in parser._actions if visible(a) and a.option_strings]
    if top:
        lines += ["| option | meaning |", "|---|---|"]
        lines += [f"| {_flags(a)} | {_details(a, PROG)} |" for a in top]
        lines.append("")
    lines += ["| command | what it does |", "|---|---|"]
    lines += [f"| [`{name}`](#{name}) | {_cell(text)} |" for name, _, text in commands]
    lines.append("")
    for name, sub, text in commands:
        lines += command_section(name, sub, text)
    return "\n".join(lines).rstrip() + "\n"


def on_files(files, config):
    """Add the generated page to the site (nothing is written into docs/)."""
    from mkdocs.structure.files import File

    from autounet.cli import build_parser

    files.append(File.generated(config, PAGE, content=render(build_parser())))
    return files
