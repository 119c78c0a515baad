"""The seams the code promises (docs/architecture.md): one home for the workspace layout, and
stages that import only downward."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "autounet"

# Names of files and folders of the workspace layout (workspace.py's docstring). `dataset.json`
# is left out: it is also the raw dataset's descriptor, which the data readers own.
WORKSPACE_NAMES = {
    "plans.json",
    "fingerprint.json",
    "splits.json",
    "selection.json",
    "manifest.json",
    "summary.json",
    "cv_summary.json",
    "log.jsonl",
    "progress.png",
    "report.md",
    "next_stage",
    "ensembles",
    "console.log",
}
# Pieces of names built with an f-string.
WORKSPACE_PIECES = ("checkpoint_", "_previous.npy", "fold_", ".autounet-shared-")


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def workspace_literals(path: Path) -> list[str]:
    """String constants in ``path`` that name a piece of the workspace layout (not messages)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            for part in node.values:
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    skip.add(id(part))
                    if part.value in WORKSPACE_PIECES or part.value.startswith(WORKSPACE_PIECES[0]):
                        found.append(f"{path.name}:{node.lineno}: f-string piece {part.value!r}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if node.value in WORKSPACE_NAMES:
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    return found


def test_no_module_but_workspace_builds_a_workspace_path():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "workspace.py":
            continue
        offenders += [f"{path.relative_to(SRC)}: {hit}" for hit in workspace_literals(path)]
    assert not offenders, "workspace paths built outside workspace.py:\n" + "\n".join(offenders)


def test_the_literal_check_finds_a_planted_path(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        '"""Docstring naming selection.json is fine."""\n'
        'def f(root, kind):\n    """So is plans.json here."""\n'
        '    print("no selection.json yet")\n'
        '    return root / "selection.json", root / f"checkpoint_{kind}.pt"\n'
    )
    hits = workspace_literals(planted)
    assert len(hits) == 2 and "'selection.json'" in hits[0] and "checkpoint_" in hits[1]


@pytest.mark.skipif(
    shutil.which("lint-imports") is None and not Path(sys.executable).with_name("lint-imports").exists(),
    reason="import-linter not installed",
)
def test_import_contracts_hold():
    """Stages import only downward, no stage has an import cycle, and the CLI imports only the API."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([exe, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
