import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autounet.cli import main
from conftest import listing


def run(*args: str) -> int:
    return main([str(a) for a in args])


def test_console_script_help_lists_every_command():
    exe = shutil.which("autounet") or None
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "autounet", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for name in (
        "check",
        "plan",
        "preprocess",
        "train",
        "predict",
        "evaluate",
        "select",
        "run",
        "demo",
        "make-synthetic",
    ):
        assert name in out


@pytest.mark.parametrize("name", ["predict", "evaluate", "select", "postprocess", "run", "demo", "show"])
def test_every_command_has_help_and_refuses_bad_arguments_with_exit_2(name, capsys):
    with pytest.raises(SystemExit) as exc:
        run(name, "--help")
    assert exc.value.code == 0 and name in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        run(name, "--no-such-option")
    assert exc.value.code == 2


def test_check_exits_0_on_a_valid_dataset_and_2_listing_problems(tiny_msd: Path, capsys):
    assert run("check", tiny_msd, "-j", "1") == 0
    assert "OK: the dataset is valid" in capsys.readouterr().out
    (tiny_msd / "labelsTr" / "synth_003.nii.gz").unlink()
    assert run("check", tiny_msd, "-j", "1") == 2
    out = capsys.readouterr().out
    assert "synth_003: label: " in out and "file not found" in out


def test_plan_writes_the_workspace(tiny_msd: Path, tmp_path: Path, capsys):
    work = tmp_path / "W"
    assert run("plan", tiny_msd, "--work", work, "-j", "1") == 0
    out = capsys.readouterr().out
    assert "3d_fullres" in out and "2d" in out
    ws = work / "tiny"
    assert sorted(p.name for p in ws.iterdir()) == ["dataset.json", "fingerprint.json", "plans.json"]
    desc = json.loads((ws / "dataset.json").read_text())
    assert desc["raw_path"] == str(tiny_msd.resolve()) and desc["training"]
    plans = json.loads((ws / "plans.json").read_text())
    assert set(plans["configurations"]) == {"2d", "3d_fullres"}
    # a second run reuses the fingerprint; --force recomputes it
    assert run("plan", tiny_msd, "--work", work, "-j", "1") == 0
    assert "fingerprint up to date" in capsys.readouterr().out
    assert run("plan", tiny_msd, "--work", work, "-j", "1", "--force") == 0
    assert "fingerprint up to date" not in capsys.readouterr().out


def test_plan_of_a_defective_dataset_exits_2_and_writes_nothing(tiny_msd: Path, tmp_path: Path, capsys):
    (tiny_msd / "imagesTr" / "synth_002.nii.gz").write_bytes(b"broken")
    work = tmp_path / "W"
    assert run("plan", tiny_msd, "--work", work, "-j", "1") == 2
    out = capsys.readouterr().out
    assert "synth_002: image: imagesTr/synth_002.nii.gz: cannot read image" in out
    assert listing(work) == set()


def test_plan_refreshes_a_stale_fingerprint_and_refuses_a_defect_added_later(tiny_msd: Path, tmp_path: Path):
    work = tmp_path / "W"
    assert run("plan", tiny_msd, "--work", work, "-j", "1") == 0
    before = {p: p.read_bytes() for p in (work / "tiny").iterdir()}
    (tiny_msd / "labelsTr" / "synth_001.nii.gz").write_bytes(b"broken")
    assert run("plan", tiny_msd, "--work", work, "-j", "1") == 2
    assert {p: p.read_bytes() for p in (work / "tiny").iterdir()} == before


def test_plan_from_a_fingerprint_alone(tiny_msd: Path, tmp_path: Path, capsys):
    assert run("plan", tiny_msd, "--work", tmp_path / "A", "-j", "1") == 0
    fp = tmp_path / "A" / "tiny" / "fingerprint.json"
    assert run("plan", "--fingerprint", fp, "--work", tmp_path / "B", "--name", "copy") == 0
    a = json.loads((tmp_path / "A" / "tiny" / "plans.json").read_text())
    b = json.loads((tmp_path / "B" / "copy" / "plans.json").read_text())
    assert a == b
    assert (tmp_path / "B" / "copy" / "fingerprint.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan"], "give a raw dataset folder"),
        (["plan", "--fingerprint", "x.json"], "--fingerprint needs --name"),
        (["plan", "--fingerprint", "missing.json", "--name", "n"], "fingerprint file not found"),
        (["plan", "RAW", "--name", "bad/name"], "not usable as a folder name"),
        (["make-synthetic", "OUT", "--classes", "1"], "--classes must be between"),
    ],
)
def test_bad_options_give_one_clear_error(args, message, tmp_path: Path, capsys):
    args = [str(tmp_path / a) if a in ("RAW", "OUT") else a for a in args]
    assert run(*args) == 2
    assert message in capsys.readouterr().err


def test_missing_dataset_folder(tmp_path: Path, capsys):
    assert run("check", tmp_path / "nowhere") == 2
    assert "dataset folder not found" in capsys.readouterr().out
    assert run("plan", tmp_path / "nowhere", "--work", tmp_path / "W") == 2
    assert not (tmp_path / "W").exists()


def test_workspace_of_another_dataset_is_not_overwritten(tiny_msd: Path, tmp_path: Path, capsys):
    other = tmp_path / "other" / "tiny"
    shutil.copytree(tiny_msd, other)
    work = tmp_path / "W"
    assert run("plan", tiny_msd, "--work", work, "-j", "1") == 0
    assert run("plan", other, "--work", work, "-j", "1") == 2
    assert "already holds the dataset from" in capsys.readouterr().err


def test_make_synthetic_command_writes_a_valid_dataset(tmp_path: Path, capsys):
    out = tmp_path / "syn"
    assert (
        run(
            "make-synthetic",
            out,
            "--cases",
            "3",
            "--test-cases",
            "1",
            "--shape",
            "8",
            "10",
            "12",
            "--modality",
            "CT",
            "--channels",
            "2",
        )
        == 0
    )
    assert run("check", out, "-j", "1") == 0
    assert (out / "imagesTs" / "synth_003.nii.gz").is_file() and (out / "labelsTs" / "synth_003.nii.gz").is_file()
    assert run("make-synthetic", out) == 2  # refuses to overwrite
    assert "already holds a dataset.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, dest, value, message",
    [
        (["preprocess", "D", "--configurations", "2d"], "configurations", ["2d"], "--configurations is deprecated"),
        (["train", "D", "--configuration", "2d", "-f", "0"], "configuration", "2d", "--configuration is deprecated"),
        (["plan", "RAW", "--preset", "brats"], "recipe", "brats", "--preset is deprecated, use --recipe"),
        (["run", "RAW", "--preset", "brats"], "recipe", "brats", "--preset is deprecated, use --recipe"),
    ],
)
def test_old_option_spellings_still_work_and_say_they_are_deprecated(args, dest, value, message, capsys):
    from autounet.cli import build_parser

    parsed = build_parser().parse_args(args)
    assert getattr(parsed, dest) == value
    err = capsys.readouterr().err
    assert err.count("deprecated") == 1 and f"autounet: {message}" in err
    # the new spellings say nothing, and the old ones are not in --help
    new = {"--configurations": "-c", "--configuration": "-c", "--preset": "--recipe"}
    assert getattr(build_parser().parse_args([new.get(a, a) for a in args]), dest) == value
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        build_parser().parse_args([args[0], "--help"])
    assert args[2] not in capsys.readouterr().out  # hidden from --help


def test_old_spellings_run_the_command(tiny_msd: Path, tmp_path: Path, capsys):
    work = tmp_path / "W"
    assert run("plan", tiny_msd, "--work", work, "-j", "1", "--preset", "nnunet") == 0
    assert "autounet: --preset is deprecated, use --recipe" in capsys.readouterr().err
    assert run("preprocess", "tiny", "--work", work, "-j", "1", "--configurations", "3d_fullres") == 0
    captured = capsys.readouterr()
    assert "autounet: --configurations is deprecated, use -c/--configs" in captured.err
    assert "3d_fullres: 5 case(s) written" in captured.out and "2d:" not in captured.out


def test_train_needs_one_configuration(capsys):
    with pytest.raises(SystemExit) as exc:
        run("train", "D", "-f", "0")
    assert exc.value.code == 2 and "-c/--configs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run("train", "D", "-c", "2d", "3d_fullres", "-f", "0")
    assert exc.value.code == 2


def test_patch_size_has_the_recipes_dimensionality(tiny_msd: Path, tmp_path: Path, capsys):
    assert run("plan", tiny_msd, "--work", tmp_path / "A", "-j", "1") == 0
    fp = tmp_path / "A" / "tiny" / "fingerprint.json"
    capsys.readouterr()
    args = ["plan", "--fingerprint", fp, "--work", tmp_path / "B", "--name", "b", "--recipe", "brats"]
    assert run(*args, "--patch-size", "16", "16") == 2
    assert "--patch-size needs 3 values (Z Y X) for the 3D patch of --recipe brats, got 2" in capsys.readouterr().err
    assert (
        run("plan", "--fingerprint", fp, "--work", tmp_path / "B", "--name", "b", "--patch-size", "16", "16", "16") == 2
    )
    assert "--patch-size applies to --recipe brats only" in capsys.readouterr().err
    assert not (tmp_path / "B").exists()


def test_the_cli_imports_nothing_but_the_api():
    """The CLI is a face of the API; the generic builder of its options (signature_cli) knows no autounet module."""
    import ast

    import autounet.cli
    import autounet.signature_cli

    def ours(module) -> list[str]:
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        imported = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, "no relative imports"
                names = [f"{node.module}.{a.name}" for a in node.names]
                imported += names if node.module == "autounet" else [node.module]
        return sorted(m for m in imported if m == "autounet" or m.startswith("autounet."))

    assert ours(autounet.cli) == ["autounet.__version__", "autounet.api", "autounet.signature_cli"]
    assert ours(autounet.signature_cli) == []


def test_every_api_function_has_explicit_arguments_and_a_docstring():
    import inspect

    from autounet import api

    functions = [
        f for name, f in inspect.getmembers(api, inspect.isfunction) if f.__module__ == api.__name__ and name[0] != "_"
    ]
    commands = {"check", "plan", "preprocess", "train", "validate", "predict", "evaluate", "show", "select"}
    commands |= {"postprocess", "run", "demo", "report", "make_synthetic"}
    assert commands <= {f.__name__ for f in functions}
    for f in functions:
        kinds = {p.kind for p in inspect.signature(f).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{f.__name__} takes **kwargs"
        assert inspect.Parameter.VAR_POSITIONAL not in kinds, f"{f.__name__} takes *args"
        assert (f.__doc__ or "").strip(), f"{f.__name__} has no docstring"
    import autounet

    for name in commands:
        assert getattr(autounet, name) is getattr(api, name)


def test_running_out_of_memory_is_one_line_and_exit_2(tmp_path: Path, monkeypatch, capsys):
    def exhausted(*args, **kwargs):
        raise MemoryError

    import autounet.api

    monkeypatch.setattr(autounet.api, "check", exhausted)
    assert main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "autounet check: error: out of memory (the machine could not allocate enough)"
