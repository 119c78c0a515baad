"""The command line is derived from `autounet.api` (signatures and docstrings): its help stays what
users know, every option reaches its API parameter with the API's default, and the numbers are
checked once, by the API, with exit code 2 and one line."""

import argparse
import contextlib
import inspect
import io
import typing
from pathlib import Path

import pytest

from autounet import api, cli

SNAPSHOTS = Path(__file__).parent / "data" / "cli_help"


def help_text(monkeypatch, *args: str) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps at the terminal's width
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.build_parser().parse_args([*args, "--help"])
    return out.getvalue()


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("snapshot", sorted(SNAPSHOTS.glob("*.txt")), ids=lambda p: p.stem)
def test_the_help_of_every_command_is_what_it_was(snapshot: Path, monkeypatch):
    """tests/data/cli_help/ holds `COLUMNS=100 autounet CMD --help` of the hand-written parser this
    one replaced (main.txt: `autounet --help`); only run's and make-synthetic's --seed gained a help."""
    args = [] if snapshot.stem == "main" else [snapshot.stem]
    assert help_text(monkeypatch, *args) == snapshot.read_text()


def test_every_command_has_a_snapshot_and_every_option_a_help():
    commands = subparsers()
    assert {p.stem for p in SNAPSHOTS.glob("*.txt")} == {"main", *commands}
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help, f"autounet {name} {action.option_strings or action.dest}: no help in the docstring"


def defaults(name: str, *required: str) -> dict:
    args = vars(cli.build_parser().parse_args([name, *required]))
    return {k: v for k, v in args.items() if k not in ("command", "run")}


@pytest.mark.parametrize(
    "name, required",
    [
        ("check", ["RAW"]),
        ("plan", []),
        ("preprocess", ["D"]),
        ("train", ["D", "-c", "2d", "-f", "0"]),
        ("predict", ["-i", "IN", "-o", "OUT", "-m", "M"]),
        ("export", ["M", "-o", "OUT"]),
        ("package", ["W/D", "-o", "P.zip"]),
        ("info", ["M"]),
        ("show", ["IMAGE"]),
        ("evaluate", ["PRED", "GT"]),
        ("make-synthetic", ["OUT"]),
        ("select", ["D"]),
        ("report", ["W/D"]),
        ("postprocess", ["IN", "OUT", "--from", "W/D"]),
        ("run", ["RAW"]),
        ("demo", []),
    ],
)
def test_an_option_left_out_is_the_api_default(name, required):
    function = getattr(api, name.replace("-", "_"))
    values = defaults(name, *required)
    for parameter in inspect.signature(function).parameters.values():
        if parameter.name in values and parameter.default is not parameter.empty:
            assert values[parameter.name] == parameter.default, (name, parameter.name)
    cli_only = {"validate_only", "per_case"}
    assert set(values) - cli_only <= set(inspect.signature(function).parameters), name


def test_flags_reach_their_api_parameters():
    values = defaults("predict", "-i", "a", "b", "-o", "O", "-m", "M", "--checkpoint", "best", "--no-tta", "--continue")
    assert values["inputs"] == ["a", "b"] and values["checkpoints"] == ["best"]
    assert values["tta"] is False and values["skip_complete"] is True and values["postprocess"] is True
    assert defaults("predict", "-i", "a", "-o", "O", "-m", "M", "--part", "1", "3")["part"] == [1, 3]
    train = ["D", "-c", "2d", "-f", "all"]
    assert defaults("train", *train)["foreground_channel"] is None  # None: the plan decides
    assert defaults("train", *train, "--no-foreground-channel")["foreground_channel"] is False
    assert defaults("train", *train, "--attention")["attention"] is True
    assert defaults("train", *train, "--iters-per-epoch", "7", "--threads", "2")["iterations_per_epoch"] == 7
    assert defaults("train", *train, "--logger", "wandb", "--logger", "mlflow")["loggers"] == ["wandb", "mlflow"]
    assert defaults("export", "M", "-o", "O", "--format", "onnx")["formats"] == ["onnx"]
    assert defaults("report", "W/D", "--html")["markdown"] is False
    assert defaults("postprocess", "I", "O", "--from", "W/D")["workspace"] == "W/D"
    assert defaults("make-synthetic", "O", "--spacing", "1", "2", "3")["spacing"] == [1.0, 2.0, 3.0]


def test_choices_come_from_the_api_literals_and_match_the_stages():
    from autounet.inference.inputs import NAME_BY
    from autounet.training.trackers import LOGGERS
    from autounet.utils.arguments import EXECUTORS
    from autounet.workspace import CHECKPOINT_KINDS

    assert typing.get_args(api.Logger) == tuple(LOGGERS)
    assert set(typing.get_args(api.Checkpoint)) == set(CHECKPOINT_KINDS)
    assert typing.get_args(api.Executor) == EXECUTORS
    name_by = inspect.signature(api.predict).parameters["name_by"].annotation  # a string: postponed annotations
    assert typing.get_args(eval(name_by, vars(api))) == NAME_BY
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["predict", "-i", "a", "-o", "O", "-m", "M", "--checkpoint", "middle"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "-i", "IN", "-o", "OUT", "-m", "M", "--step", "0"], "--step must be a finite number > 0"),
        (["predict", "-i", "IN", "-o", "OUT", "-m", "M", "--part", "2", "2"], "--part I must be in 0..1, got 2"),
        (["predict", "-i", "IN", "-o", "OUT", "-m", "M", "-f", "x"], "-f/--folds: 'x' is not a fold number"),
        (["train", "D", "-c", "2d", "-f", "0", "--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["run", "RAW", "--iters-per-epoch", "0"], "--iters-per-epoch must be >= 1, got 0"),
        (["run", "RAW", "-j", "0"], "-j/--workers must be >= 1, got 0"),
        (["evaluate", "P", "G", "--tolerance", "-1"], "--tolerance must be a finite number > 0"),
        (["show", "IMAGE", "--slices", "0"], "--slices must be >= 1, got 0"),
        (["report", "W/D", "--cases", "-1"], "--cases must be >= 0, got -1"),
        (["demo", "--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["make-synthetic", "OUT", "--spacing", "1", "0", "1"], "--spacing must be a finite number > 0"),
    ],
)
def test_numbers_are_checked_once_by_the_api_with_exit_2(args, message, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may be written; relative paths land here
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"autounet {args[0]}: error: {message}" in err
    assert list(tmp_path.iterdir()) == []


def test_the_cli_states_no_number_check_of_its_own():
    """Range checks live in the API (autounet/utils/arguments.py and the stages' option classes)."""
    source = Path(cli.__file__).read_text()
    for check in ("arguments.", "AutounetError(", ">= 0", "> 0", "raise "):
        assert check not in source
