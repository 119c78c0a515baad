"""``W/NAME/report.html``: one self-contained page with the summary, the training curves, every
cross-validation case and a viewer of the worst ones. Built on the hand-made trained workspace of
test_reporting (real raw images and validation predictions); the page's text is checked here, its
behaviour in a real browser in test_report_browser."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from autounet import api
from autounet.cli import main
from autounet.reporting import render_html, write_html_report
from autounet.reporting.html import script_json
from autounet.workspace import Workspace, validation_summary_path
from test_reporting import _planned, _trained

INJECT_LABEL = "<img src=x onerror=alert(1)>"
INJECT_CASE = "x</script><script>alert(2)</script>"


def page_data(text: str) -> dict:
    block = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    return json.loads(block.group(1))


def png_array(uri: str) -> np.ndarray:
    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_script_json_cannot_close_its_script_block():
    value = {"a": "</script><!-- & \u2028\u2029 >", "<b>": [1.5, None]}
    text = script_json(value)
    assert not set(text) & {"<", ">", "&", "\u2028", "\u2029"}
    assert json.loads(text) == value


def test_the_page_lists_every_case_worst_first_and_embeds_them(tmp_path: Path):
    ws, _ = _trained(tmp_path)
    path = write_html_report(ws)
    assert path == ws.root / "report.html" and not list(ws.root.glob(".autounet-tmp.*"))
    text = path.read_text(encoding="utf-8")
    data = page_data(text)

    # self-contained: no address outside the page, and a policy that forbids fetching any
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "default-src 'none'" in text and "<style>" in text and "function drawPanel" in text

    # the selected model's four cross-validation cases, worst mean Dice first
    rows = data["table"]["rows"]
    assert data["table"]["model"] == "3d_fullres" and len(rows) == 4
    means = [r["mean"] for r in rows]
    assert means == sorted(means) and means[0] == pytest.approx(0.5)
    assert [c["key"] for c in data["table"]["classes"]] == ["1", "2"]
    summary = json.loads(validation_summary_path(ws.fold_dir("3d_fullres", 0)).read_text())
    worst = rows[0]
    assert worst["scores"]["2"]["dice"] == summary["per_case"][worst["case"]]["2"]["dice"] == 0.0
    assert set(worst["scores"]["1"]) == {"dice", "hd95", "surface_dice"}

    # every case is embedded (4 < the default 20): image, truth in red, prediction in green
    assert all(r["view"] >= 0 for r in rows) and len(data["volumes"]) == 4
    volume = data["volumes"][rows[0]["view"]]
    z, y, x = volume["shape"]
    picture = png_array(volume["images"][0])
    labels = png_array(volume["labels"])
    rows_of_tiles = -(-z // volume["cols"])
    assert picture.shape == (rows_of_tiles * y, volume["cols"] * x) and picture.dtype == np.uint8
    assert labels.shape == (*picture.shape, 3)
    assert set(np.unique(labels[..., 0])) == {0, 1, 2}  # the truth has both classes
    assert 2 not in set(np.unique(labels[..., 1]))  # the prediction of the worst case lost class 2
    assert "CT: dataset foreground" in volume["windows"][0]  # CT at the plans' clip window

    # training curves: every fold of every configuration
    assert [c["label"] for c in data["curves"]] == ["2d fold 0", "3d_fullres fold 0", "3d_fullres fold 1"]
    assert data["curves"][1]["epochs"] == [1, 2, 3]
    # summary: dataset, plans, cross-validation per class, selection and post-processing
    for needle in ("4 training cases", "3d_fullres", "Winner:", "keep the largest foreground component"):
        assert needle in text


def test_cases_caps_what_is_embedded(tmp_path: Path):
    ws, _ = _trained(tmp_path)
    data = page_data(render_html(ws, worst=1))
    rows = data["table"]["rows"]
    assert len(rows) == 4 and len(data["volumes"]) == 2  # the worst one and a sample of one more
    assert rows[0]["view"] == 0
    assert [r["note"] for r in rows if r["view"] < 0] == ["scores only (not embedded)"] * 2
    assert len(page_data(render_html(ws, worst=0))["volumes"]) == 0


def test_a_workspace_without_validation_results_still_gets_a_page(tmp_path: Path):
    ws = _planned(tmp_path)
    text = write_html_report(ws).read_text(encoding="utf-8")
    assert "Missing: no training log yet" in text and "Missing: no trained fold yet" in text
    assert page_data(text)["table"]["rows"] == []

    ws, _ = _trained(tmp_path / "b")
    for fold in (0, 1):
        validation_summary_path(ws.fold_dir("3d_fullres", fold)).unlink()
    text = render_html(ws)
    assert "Missing: no validation results of 3d_fullres yet" in text
    assert "3d_fullres fold 0: no validation results (summary.json) yet" in text


def test_a_case_whose_image_cannot_be_read_is_listed_with_the_reason(tmp_path: Path):
    ws, _ = _trained(tmp_path)
    raw = Path(json.loads(ws.dataset_json.read_text())["raw_path"])
    image = raw / "imagesTr" / "synth_000.nii.gz"
    image.write_bytes(image.read_bytes()[:200])
    rows = page_data(render_html(ws))["table"]["rows"]
    broken = next(r for r in rows if r["case"] == "synth_000")
    assert broken["view"] == -1 and broken["note"].startswith("cannot be shown: ") and "synth_000" in broken["note"]
    assert sum(r["view"] >= 0 for r in rows) == 3


def injected(tmp_path: Path) -> Workspace:
    """The trained workspace with a label named like markup and a case id that closes a script."""
    ws, _ = _trained(tmp_path)
    for document in (ws.plans_json, ws.fingerprint_json):
        content = json.loads(document.read_text())
        content["labels"]["2"] = INJECT_LABEL
        document.write_text(json.dumps(content))
    path = validation_summary_path(ws.fold_dir("3d_fullres", 1))
    summary = json.loads(path.read_text())
    summary["per_case"][INJECT_CASE] = summary["per_case"].pop(next(iter(summary["per_case"])))
    path.write_text(json.dumps(summary))
    return ws


def test_names_from_the_data_cannot_inject_markup_or_script(tmp_path: Path):
    ws = injected(tmp_path)
    text = render_html(ws)
    assert INJECT_LABEL not in text and "<img" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text  # shown, as text
    assert text.count("</script>") == 2 and "<script>alert" not in text  # only the page's own two blocks
    data = page_data(text)
    assert INJECT_CASE in [r["case"] for r in data["table"]["rows"]]
    assert {c["name"] for c in data["classes"]} == {"class_1", INJECT_LABEL}


def test_report_command_writes_the_page_without_retraining(tmp_path: Path, capsys):
    ws, _ = _trained(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in ws.root.rglob("*") if p.is_file()}
    assert main(["report", str(ws.root), "--html", "--cases", "1"]) == 0
    assert f"wrote {ws.report_html}" in capsys.readouterr().out
    assert len(page_data(ws.report_html.read_text())["volumes"]) == 2 and not ws.report_md.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing else rewritten

    assert main(["report", str(ws.root)]) == 0
    assert ws.report_md.is_file() and len(page_data(ws.report_html.read_text())["volumes"]) == 4
    assert api.report(ws.name, work=ws.work, markdown=False, cases=0) == ws.report_html

    assert main(["report", str(tmp_path / "w" / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "workspace not found" in err[0] and str(tmp_path / "w" / "nothing") in err[0]
    assert main(["report", str(ws.root), "--cases", "-1"]) == 2
    assert "--cases must be >= 0" in capsys.readouterr().err


def test_the_image_budget_caps_the_page(tmp_path: Path, monkeypatch):
    from autounet.reporting import html_cases

    ws, _ = _trained(tmp_path)
    monkeypatch.setattr(html_cases, "IMAGE_BUDGET", 1)  # spent by the first case
    rows = page_data(render_html(ws))["table"]["rows"]
    assert [r["view"] for r in rows] == [0, -1, -1, -1]
    assert {r["note"] for r in rows[1:]} == {"not embedded: the page's image budget is spent"}


def test_a_pair_ensemble_winner_is_scored_from_its_own_predictions(tmp_path: Path):
    import shutil

    ws, selection = _trained(tmp_path)
    ensemble = ws.ensemble_dir(["2d", "3d_fullres"])
    ensemble.mkdir(parents=True)
    for fold in (0, 1):
        for p in (ws.fold_dir("3d_fullres", fold) / "validation").glob("*.nii.gz"):
            shutil.copy(p, ensemble / p.name)
    selection["winner"] = {"name": "2d+3d_fullres", "members": ["2d", "3d_fullres"], "folds": [0, 1]}
    ws.selection_json.write_text(json.dumps(selection))
    data = page_data(render_html(ws))
    rows = data["table"]["rows"]
    assert data["table"]["model"] == "2d+3d_fullres" and len(rows) == 4
    # the same predictions as 3d_fullres's, so the same scores, with the folds of 3d_fullres
    assert [r["mean"] for r in rows] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert sorted(r["fold"] for r in rows) == ["0", "0", "1", "1"] and len(data["volumes"]) == 4
