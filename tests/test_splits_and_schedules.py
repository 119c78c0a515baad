import json
import math
from pathlib import Path

import pytest
import torch

from autounet.errors import AutounetError
from autounet.training.losses import one_hot, soft_dice
from autounet.training.schedule import Schedule, load_training_preset, make_optimizer, training_preset_names
from autounet.training.splits import fold_cases, load_or_create_splits, make_splits

CASES = [f"case_{i:02d}" for i in range(13)]


def test_five_folds_partition_the_cases_reproducibly():
    splits = make_splits(CASES)
    assert len(splits) == 5 and make_splits(list(reversed(CASES))) == splits
    vals = [c for f in splits for c in f["val"]]
    assert sorted(vals) == CASES  # every case validated exactly once
    for f in splits:
        assert set(f["train"]) | set(f["val"]) == set(CASES) and not set(f["train"]) & set(f["val"])
    assert {len(f["val"]) for f in splits} == {2, 3}
    assert len(make_splits(CASES[:3])) == 3
    with pytest.raises(AutounetError, match="at least 2 cases"):
        make_splits(CASES[:1])


def test_a_users_splits_file_is_respected_and_validated(tmp_path: Path):
    path = tmp_path / "splits.json"
    mine = [{"train": CASES[:10], "val": CASES[10:]}]
    path.write_text(json.dumps(mine))
    assert load_or_create_splits(path, CASES) == mine
    assert fold_cases(mine, 0, CASES) == (CASES[:10], CASES[10:])
    assert fold_cases(mine, "all", CASES) == (CASES, CASES)
    for bad, message in [
        ([{"train": CASES[:10], "val": ["ghost"]}], "not in the dataset"),
        ([{"train": CASES[:10], "val": CASES[9:]}], "in both train and val"),
        ([{"train": CASES}], "exactly the keys"),
        ({}, "non-empty list"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(AutounetError, match=message):
            load_or_create_splits(path, CASES)
    path.unlink()
    made = load_or_create_splits(path, CASES)
    assert json.loads(path.read_text()) == made


def test_plateau_schedule_divides_the_rate_and_stops_as_the_paper_says():
    preset = load_training_preset("paper")
    s = Schedule(preset.schedule, 3e-4, preset.max_epochs, 250)
    assert s.end_epoch(1.0, 1.0) is False
    for _ in range(29):
        s.end_epoch(1.0, 1.0)  # no improvement
    assert s.lr == pytest.approx(3e-4)
    s.end_epoch(1.0, 1.0)  # 30 epochs without improvement of the training average
    assert s.lr == pytest.approx(3e-4 / 5)
    s.lr = 5e-7  # below 1e-6: now 60 epochs without validation improvement stop training
    stops = [s.end_epoch(1.0, 1.0) for _ in range(60)]
    assert stops[-1] is True and s.lr_for(0, 0) == s.lr
    improving = Schedule(preset.schedule, 3e-4, 1000, 250)
    for e in range(100):
        improving.end_epoch(1.0 - 0.01 * e, 1.0 - 0.01 * e)
    assert improving.lr == pytest.approx(3e-4)


def test_warmup_cosine_and_poly_rates():
    nvidia = load_training_preset("nvidia")
    s = Schedule(nvidia.schedule, 5e-4, 10, 250)
    assert s.lr_for(0, 0) == pytest.approx(5e-4 / 1000)
    assert s.lr_for(3, 999) == pytest.approx(5e-4)
    assert s.lr_for(9, 2500 - 1) < 1e-8 * 10
    middle = 1000 + (2500 - 1000) // 2
    assert s.lr_for(5, middle) == pytest.approx(2.5e-4, rel=1e-2)
    poly = load_training_preset("poly")
    p = Schedule(poly.schedule, 0.01, 100, 250)
    assert p.lr_for(0, 0) == pytest.approx(0.01) and p.lr_for(50, 0) == pytest.approx(0.01 * 0.5**0.9)


def test_schedule_state_round_trips():
    preset = load_training_preset("paper")
    a = Schedule(preset.schedule, 3e-4, 1000, 250)
    for e in range(40):
        a.end_epoch(1.0 / (e + 1), 2.0)
    b = Schedule(preset.schedule, 3e-4, 1000, 250)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()


def test_presets_build_their_optimizers():
    assert set(training_preset_names()) >= {"paper", "nvidia", "poly"}
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer(params, load_training_preset("paper").optimizer), torch.optim.Adam)
    adamw = make_optimizer(params, load_training_preset("nvidia").optimizer)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 1e-4
    sgd = make_optimizer(params, load_training_preset("poly").optimizer)
    assert (
        isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.99
    )
    with pytest.raises(AutounetError, match="unknown training preset"):
        load_training_preset("adagrad")


def test_batch_dice_summed_across_processes_equals_the_global_batch_dice():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (4, 1, 5, 5, 5), generator=g)
    probs = torch.softmax(torch.randn(4, 3, 5, 5, 5, generator=g), 1)
    onehot = one_hot(target, 3)
    whole = soft_dice(probs, onehot, batch_dice=True)
    axes = (0, 2, 3, 4)
    other = {"i": (probs[2:] * onehot[2:]).sum(axes), "d": probs[2:].sum(axes) + onehot[2:].sum(axes)}
    calls = iter([other["i"], other["d"]])

    def reduce(local):  # stands in for the all-reduce: adds the other process's half
        return local + next(calls)

    half = soft_dice(probs[:2], onehot[:2], batch_dice=True, reduce=reduce)
    assert half.item() == pytest.approx(whole.item(), rel=1e-6)
    assert not math.isclose(soft_dice(probs[:2], onehot[:2], batch_dice=True).item(), whole.item(), rel_tol=1e-6)
