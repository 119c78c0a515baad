"""Every command of the tutorials (docs/tutorials/*.md) runs, in order, on small synthetic data.

How a page is run (`run_page`):

* Its fenced ```` ```bash ```` blocks are split into commands (a line ending in ``\\`` continues on
  the next one; ``#`` starts a comment). Every ``autounet ...`` command is run in-process through
  :func:`autounet.cli.main`, in the page's order, in one working folder shared by the whole module
  (so that the fine-tuning page starts from the model the first-dataset page trained), and must
  exit 0. Any other command must be listed, with its exact text, in ``SKIPPED`` (installation and
  download lines); an unlisted one fails the test, and so does a listed one that no page has.
* ```` ```python ```` blocks are executed in the same folder, in their place in that order. Other
  fences may only be ``text`` or ``json`` (examples of output and of files), so that no command can
  hide in a fence of another language.
* Placeholders: where a page names a case of the real dataset, it says which case of the
  synthetic stand-in to use instead (``where this page names `hippocampus_002`, use `synth_020```);
  ``CASE_NAMES`` makes exactly these replacements, and the test checks that the page says so.
* Budget: options appended at the end of a command, where argparse takes the last value, so they
  override the page's own: ``train`` and ``run`` get ``TRAINING_BUDGET`` (one epoch of two
  iterations, a quarter of the network's width, no mirroring in validation), ``predict`` gets
  ``--no-tta`` (no mirroring), ``make-synthetic`` gets ``--shape 12 14 16``, a command that gives ``--patch-size`` gets ``16 16 16`` instead, and
  commands with worker processes get ``-j 1``. Nothing else in a command is changed.

After a page has run, the files it says appear are checked, with what it says about them.
`test_every_tutorial_command_parses` also parses every ``autounet`` command of every page, in the
code blocks and in the prose, with :func:`autounet.cli.build_parser`, so that a misspelled or
deprecated option fails even where no command is run.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autounet.cli import build_parser, main
from conftest import REPO

TUTORIALS = REPO / "docs" / "tutorials"
PAGES = ("first-dataset.md", "brats.md", "sparse-labels.md", "fine-tuning.md")

# Commands a page shows that the test does not run: setting up the environment and fetching data.
SKIPPED = {
    "python3 -m venv .venv",
    '.venv/bin/pip install torch==2.13.0 -e ".[onnx,openvino]"',
    "source .venv/bin/activate",
    "mkdir -p data",
    "tar -xf Task04_Hippocampus.tar -C data",
}
CASE_NAMES = {"hippocampus_002": "synth_020", "BRATS_485": "synth_010"}
TRAINING_BUDGET = [
    "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1", "--width-multiplier", "0.25", "--no-validation-tta",
]  # fmt: skip
BUDGET = {
    "train": TRAINING_BUDGET,
    "run": TRAINING_BUDGET,
    "predict": ["--no-tta"],
    "make-synthetic": ["--shape", "12", "14", "16"],
}
WITH_WORKERS = {"check", "plan", "preprocess", "select", "evaluate", "run"}
FENCE = re.compile(r"^```(\w*)\s*$")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Step:
    kind: str  # "shell" or "python"
    text: str  # the command (continuations joined) or the Python source


def read_steps(page: Path) -> list[Step]:
    """The shell commands and Python blocks of a page, in order."""
    steps: list[Step] = []
    language, block = None, []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        fence = FENCE.match(line)
        if language is None:
            if fence:
                language, block = fence.group(1), []
                assert language in ("bash", "python", "text", "json"), f"{page.name}:{number}: ```{language} fence"
            continue
        if not fence or fence.group(1):
            block.append(line)
            continue
        if language == "python":
            steps.append(Step("python", "\n".join(block) + "\n"))
        elif language == "bash":
            steps.extend(Step("shell", command) for command in shell_commands(block))
        language = None
    assert language is None, f"{page.name}: a ``` fence is not closed"
    return steps


def shell_commands(lines: list[str]) -> list[str]:
    """Commands of a bash block: continuations joined, comment-only and blank lines dropped."""
    commands, parts = [], []
    for line in lines:
        parts.append(line.strip().removesuffix("\\").strip())
        if line.rstrip().endswith("\\"):
            continue
        command, parts = " ".join(p for p in parts if p), []
        if shlex.split(command, comments=True):
            commands.append(command)
    assert not parts, f"a bash block ends with a continuation: {parts!r}"
    return commands


def argv_of(command: str) -> list[str]:
    """The arguments after ``autounet``, with the stand-in's case names."""
    for real, stand_in in CASE_NAMES.items():
        command = command.replace(real, stand_in)
    words = shlex.split(command, comments=True)
    assert words[0] == "autounet", command
    return words[1:]


def with_budget(argv: list[str]) -> list[str]:
    extra = list(BUDGET.get(argv[0], []))
    if "--patch-size" in argv:
        extra += ["--patch-size", "16", "16", "16"]
    if argv[0] in WITH_WORKERS:
        extra += ["-j", "1"]
    return argv + extra


def run_page(name: str) -> dict[str, str]:
    """Run every step of a page in the current folder; the standard output of each command."""
    outputs: dict[str, str] = {}
    for step in read_steps(TUTORIALS / name):
        if step.kind == "python":
            exec(compile(step.text, f"{name} (python block)", "exec"), {"__name__": "__tutorial__"})
            continue
        if not step.text.startswith("autounet "):
            assert step.text in SKIPPED, f"{name}: `{step.text}` is neither an autounet command nor in SKIPPED"
            continue
        argv = with_budget(argv_of(step.text))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        assert code == 0, f"{name}: `autounet {' '.join(argv)}` exited {code}:\n{err.getvalue()[-3000:]}"
        outputs[step.text] = out.getvalue()
    return outputs


def inline_commands(page: Path) -> list[str]:
    """``autounet COMMAND ARGS`` quoted in the prose (outside code blocks), except ``--help`` ones."""
    prose, inside = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            prose.append(line)
    text = re.sub(r"\s+", " ", " ".join(prose))
    spans = re.findall(r"`(autounet [^`]+)`", text)
    return [c for c in spans if "--help" not in c and len(c.split()) > 2]  # not a bare `autounet run`


def labels_of(path: Path) -> set[int]:
    return {int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))}


# --- every command parses ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAGES)
def test_every_tutorial_command_parses(name: str):
    page = TUTORIALS / name
    commands = [s.text for s in read_steps(page) if s.kind == "shell" and s.text.startswith("autounet ")]
    commands += inline_commands(page)
    assert len(commands) >= 5, f"{name}: only {len(commands)} autounet commands found"
    parser = build_parser()
    for command in commands:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                args = parser.parse_args(argv_of(command))
            except SystemExit:
                pytest.fail(f"{name}: `{command}` does not parse: {err.getvalue().strip()}")
        assert getattr(args, "run", None), f"{name}: `{command}` names no command"
        assert "deprecated" not in err.getvalue(), f"{name}: `{command}`: {err.getvalue().strip()}"


@pytest.mark.parametrize("name", PAGES)
def test_the_page_names_the_stand_in_of_every_real_case_it_uses(name: str):
    text = (TUTORIALS / name).read_text(encoding="utf-8")
    for real, stand_in in CASE_NAMES.items():
        if real in text:
            assert f"names `{real}`, use `{stand_in}`" in " ".join(text.split()), (name, real)


def test_every_skipped_command_is_on_some_page():
    shown = {s.text for name in PAGES for s in read_steps(TUTORIALS / name) if s.kind == "shell"}
    assert SKIPPED <= shown, SKIPPED - shown


# --- every page runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The user's working folder: the pages' relative paths (data/, autounet_work/) are under it."""
    root = tmp_path_factory.mktemp("tutorials")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("AUTOUNET_WORK", raising=False)
        mp.setenv("AUTOUNET_CACHE", str(root / "cache"))
        mp.setenv("AUTOUNET_PROGRESS", "0")
        yield root


@pytest.fixture(scope="module")
def first_dataset(folder: Path) -> dict[str, str]:
    return run_page("first-dataset.md")


def test_first_dataset(folder: Path, first_dataset: dict[str, str]):
    ws = folder / "autounet_work" / "Task04_Hippocampus"
    for path in ("dataset.json", "fingerprint.json", "plans.json", "selection.json", "report.md", "report.html"):
        assert (ws / path).is_file(), path
    for config in ("2d", "3d_fullres"):  # step 6 trained the nine folds step 5 had not
        for fold in range(5):
            fold_dir = ws / "results" / config / f"fold_{fold}"
            for path in ("checkpoint_final.pt", "log.jsonl", "progress.png", "validation/summary.json"):
                assert (fold_dir / path).is_file(), fold_dir / path
    assert "selected: " in first_dataset["autounet run data/Task04_Hippocampus"]
    cases = sorted(p.name for p in (folder / "data" / "Task04_Hippocampus" / "imagesTs").iterdir())
    assert cases == [f"synth_0{i}.nii.gz" for i in range(20, 25)]
    assert sorted(p.name for p in (folder / "predictions").glob("*.nii.gz")) == cases
    assert (folder / "synth_020.png").is_file() and (folder / "predictions" / "evaluation.json").is_file()
    assert (folder / "hippocampus.zip").is_file()
    for case in cases:  # "The segmentations are the same as those of step 8."
        a, b = (
            sitk.GetArrayFromImage(sitk.ReadImage(str(folder / d / case)))
            for d in ("predictions", "predictions_from_zip")
        )
        assert np.array_equal(a, b), case


def test_fine_tuning(folder: Path, first_dataset: dict[str, str]):
    outputs = run_page("fine-tuning.md")
    source = "autounet_work/Task04_Hippocampus"
    plans = json.loads((folder / "autounet_work" / "SmallHippocampus" / "plans.json").read_text())
    assert plans["notes"][0].startswith(f"plans from {source}")
    tuned = next(out for command, out in outputs.items() if command.startswith("autounet train SmallHippocampus "))
    assert f"initialised from {source}" in tuned
    scratch = outputs["autounet train SmallHippocampus_scratch -c 3d_fullres -f 0"]
    assert "initialised from" not in scratch
    assert source in outputs["autounet info autounet_work/SmallHippocampus"]
    for fold in range(5):
        assert (
            folder / "autounet_work/SmallHippocampus/results/3d_fullres" / f"fold_{fold}" / "checkpoint_final.pt"
        ).is_file()
    assert len(list((folder / "small_predictions").glob("*.nii.gz"))) == 2


def test_brats(folder: Path):
    run_page("brats.md")
    work = folder / "autounet_work"
    plans = json.loads((work / "Task01_BrainTumour" / "plans.json").read_text())
    assert list(plans["configurations"]) == ["3d_fullres"]
    for name, folds in (("BrainTumour_smoke", [0]), ("Task01_BrainTumour", range(5)), ("BrainTumour_attention", [0])):
        for fold in folds:
            assert (work / name / "results/3d_fullres" / f"fold_{fold}" / "checkpoint_final.pt").is_file(), (name, fold)
    for case in ("synth_010.nii.gz", "synth_011.nii.gz"):
        assert labels_of(folder / "brats_predictions" / case) <= {0, 1, 2, 3}
    evaluation = json.loads((folder / "brats_predictions" / "evaluation.json").read_text())
    assert set(evaluation["mean"]) == {"WT", "TC", "ET"}
    assert (folder / "synth_010.png").is_file()


def test_sparse_labels(folder: Path):
    run_page("sparse-labels.md")
    raw = folder / "data" / "Dataset010_SparseHippocampus"
    assert json.loads((raw / "dataset.json").read_text())["labels"]["ignore"] == 3
    assert 3 in labels_of(raw / "labelsTr" / "synth_000.nii.gz")
    predictions = sorted((folder / "sparse_predictions").glob("*.nii.gz"))
    assert len(predictions) == 5
    for path in predictions:  # "none gets the ignore value"
        assert labels_of(path) <= {0, 1, 2}
    evaluation = json.loads((folder / "sparse_predictions" / "evaluation.json").read_text())
    assert evaluation["settings"]["ignore_label"] == 3
