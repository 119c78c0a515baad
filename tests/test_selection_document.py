"""``selection.json`` as typed data: what `select` writes loads back equal, saves back byte for
byte, and a corrupt or incomplete file is one error naming the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autounet import api
from autounet.data.dataset import load_raw_dataset
from autounet.data.image_io import read_label, write_image
from autounet.data.probabilities import save_probability_file
from autounet.errors import AutounetError
from autounet.evaluation.evaluate import evaluate_arrays, save_evaluation
from autounet.postprocessing.apply import apply_to_folder
from autounet.postprocessing.brats_et import grid_search_et_rule
from autounet.regions import brats_2017
from autounet.selection.select import format_selection, select
from autounet.selection_document import (
    ComponentsPostprocessing,
    EtGridSearch,
    EtPostprocessing,
    Selection,
    Winner,
    load_selection,
    postprocessing_of,
    save_selection,
)
from autounet.utils.atomic import atomic_write_json
from autounet.utils.plain_data import from_plain
from autounet.workspace import Workspace, validation_dir

NAME = "syn"
CONFIGS = ("2d", "3d_fullres")


def _prediction(config: str, index: int, ref: np.ndarray) -> np.ndarray:
    pred = ref.copy()
    if config == "2d" and index == 0:
        pred[pred == 2] = 0  # one imperfect case
    if config == "3d_fullres" and index == 1:
        pred[0, 0, 0] = 1  # a stray component: "keep the largest" has something to remove
    return pred


@pytest.fixture(scope="module")
def selected(tmp_path_factory) -> tuple[Workspace, Selection]:
    """A planned synthetic workspace with two configurations' cross-validation predictions, selected."""
    root = tmp_path_factory.mktemp("sel")
    raw = api.make_synthetic(root / "raw", cases=4, shape=(12, 16, 14), classes=3, modality="CT")
    api.plan(raw, work=root / "w", name=NAME, workers=1)
    ws = Workspace.at(root / "w", NAME)
    dataset = load_raw_dataset(raw)
    cases = [c.case_id for c in dataset.cases]
    labels = {c.case_id: c.label for c in dataset.cases}
    splits = [{"train": cases[2:], "val": cases[:2]}, {"train": cases[:2], "val": cases[2:]}]
    atomic_write_json(ws.splits_json, splits)
    for config in CONFIGS:
        for fold, split in enumerate(splits):
            folder = validation_dir(ws.fold_dir(config, fold))
            folder.mkdir(parents=True)
            pairs = []
            for case in split["val"]:
                ref, geometry = read_label(labels[case])
                pred = _prediction(config, cases.index(case), ref)
                write_image(folder / f"{case}.nii.gz", pred, geometry)
                one_hot = np.stack([(pred == k).astype(np.float32) for k in (0, 1, 2)])
                save_probability_file(folder / f"{case}.npz", one_hot, [0, 1, 2], "softmax")
                pairs.append((case, pred, ref, geometry.spacing))
            save_evaluation(evaluate_arrays(pairs, labels=[1, 2]), folder / "summary.json")
    return ws, select(ws, workers=1)


def test_select_writes_the_documented_keys_and_loads_back_equal(selected):
    ws, selection = selected
    data = json.loads(ws.selection_json.read_text())
    assert list(data) == [
        "schema_version",
        "dataset",
        "metric",
        "n_cases",
        "ranking",
        "winner",
        "postprocessing",
        "predict_command",
    ]
    assert [r["name"] for r in data["ranking"]] == [r.name for r in selection.ranking]
    assert {r.name for r in selection.ranking} == {"2d", "3d_fullres", "2d+3d_fullres"}
    assert list(data["ranking"][0]) == ["name", "members", "foreground_dice", "per_class", "n_cases", "complete"]
    assert list(data["winner"]) == ["name", "members", "folds"]
    pp = data["postprocessing"]
    assert list(pp) == [
        "kind",
        "decision",
        "rule",
        "regions",
        "candidates_from_training_labels",
        "dice_before",
        "dice_after",
        "per_class_before",
        "per_class_after",
    ]
    assert pp["kind"] == "components" and pp["rule"] is None and pp["regions"] is None
    assert isinstance(selection.postprocessing, ComponentsPostprocessing)
    assert selection.postprocessing.evidence.foreground.cases_changed >= 0
    assert selection == load_selection(ws.selection_json)
    assert selection.winner == Winner(selection.ranking[0].name, selection.ranking[0].members, [0, 1])
    assert f"selected: {selection.winner.name} (folds 0, 1)" in format_selection(selection)


def test_saving_a_loaded_selection_gives_the_same_bytes(selected, tmp_path):
    ws, _ = selected
    save_selection(load_selection(ws.selection_json), tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == ws.selection_json.read_bytes()


def test_postprocessing_of_the_workspace_is_what_the_selection_chose(selected, tmp_path):
    ws, selection = selected
    pp = postprocessing_of(ws.root)
    assert pp.kind == "components" and pp.decision == selection.postprocessing.decision
    source = validation_dir(ws.fold_dir("3d_fullres", 1))
    written = apply_to_folder(source, tmp_path / "out", pp, workers=1)
    assert sorted(p.name for p in written) == sorted(p.name for p in source.glob("*.nii.gz"))


def test_the_et_kind_round_trips(tmp_path):
    shape = (16, 16, 16)
    ref = np.zeros(shape, np.uint8)
    ref[2:14, 2:14, 2:14] = 2
    ref[4:12, 4:12, 4:12] = 1
    ref[5:9, 5:9, 5:9] = 4
    probs = np.zeros((3, *shape), np.float32)
    probs[0][ref > 0] = 0.9
    probs[1][np.isin(ref, [1, 4])] = 0.9
    probs[2][ref == 4] = 0.8
    probs[2][11:13, 11:13, 11:13] = 0.6  # a false-positive ET blob
    regions = brats_2017()
    rule, table = grid_search_et_rule([(probs, ref)] * 2, regions, component_voxels=range(0, 12), total_voxels=[0])
    search = from_plain(EtGridSearch, table.summary(), "grid_search")
    selection = Selection(
        dataset="b",
        metric="mean foreground Dice over the cross-validation cases",
        n_cases=2,
        ranking=[],
        winner=Winner("3d_fullres", ["3d_fullres"], [0, 1]),
        postprocessing=EtPostprocessing(rule, regions, search, search.no_rule_score, search.best_score),
        predict_command="autounet predict -i IMAGES -o OUT -m W/b",
    )
    path = save_selection(selection, tmp_path / "selection.json")
    data = json.loads(path.read_text())
    assert list(data["postprocessing"]) == [
        "kind",
        "decision",
        "rule",
        "regions",
        "grid_search",
        "dice_before",
        "dice_after",
    ]
    assert data["postprocessing"]["decision"] is None
    assert data["postprocessing"]["grid_search"] == json.loads(json.dumps(table.summary()))
    back = load_selection(path)
    assert back == selection
    assert back.chosen_postprocessing().rule == rule and back.chosen_postprocessing().regions == regions
    save_selection(back, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


def _broken(ws: Workspace, tmp_path: Path, edit) -> Path:
    data = json.loads(ws.selection_json.read_text())
    edit(data)
    path = tmp_path / "selection.json"
    path.write_text(json.dumps(data))
    return path


def _set(keys: list, value):
    def edit(data):
        for k in keys[:-1]:
            data = data[k]
        data[keys[-1]] = value

    return edit


def _drop(keys: list):
    def edit(data):
        for k in keys[:-1]:
            data = data[k]
        del data[keys[-1]]

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop(["winner", "members"]), ".winner: missing field 'members'"),
        (_drop(["postprocessing"]), ": missing field 'postprocessing'"),
        (_set(["ranking", 0, "n_cases"], "many"), ".ranking[0].n_cases: expected an integer"),
        (_set(["winner", "checkpoints"], ["final"]), ".winner: unknown field(s) ['checkpoints']"),
        (_set(["postprocessing", "kind"], "median"), ".postprocessing.kind: must be one of"),
        (_set(["postprocessing", "rule"], {"et_threshold": 0.5}), ".postprocessing.rule: must be null"),
        (_drop(["postprocessing", "decision", "evidence", "final"]), ".postprocessing.decision.evidence: missing"),
        (_drop(["postprocessing", "dice_after"]), ".postprocessing: missing field 'dice_after'"),
        (_set(["schema_version"], 2), "selection schema version 2 is not supported"),
    ],
)
def test_a_corrupt_or_incomplete_selection_names_the_file_and_the_field(selected, tmp_path, edit, message):
    ws, _ = selected
    path = _broken(ws, tmp_path, edit)
    with pytest.raises(AutounetError) as info:
        load_selection(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_a_missing_or_unparsable_selection_is_one_clear_error(tmp_path):
    with pytest.raises(AutounetError, match="selection file not found.*autounet select"):
        load_selection(tmp_path / "selection.json")
    with pytest.raises(AutounetError, match="selection file not found"):
        postprocessing_of(tmp_path)
    (tmp_path / "selection.json").write_text('{"schema_version": 1, "dataset": ')
    with pytest.raises(AutounetError, match="not valid JSON"):
        load_selection(tmp_path / "selection.json")
