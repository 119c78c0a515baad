"""The memory estimate (README "Memory") against a measured peak, and ``--memory-limit``."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from autounet.cli import main
from autounet.data.geometry import Geometry
from autounet.data.image_io import write_image

TESTS = Path(__file__).parent

# A child process (so that its peak resident set is its own): an untrained 1x1x1 network with 16
# classes predicts a 200^3 volume at 1.25 mm on a 1 mm grid (16 M voxels after resampling), with
# the streaming export; it prints the estimate's terms and ru_maxrss.
CHILD = textwrap.dedent(
    """
    import dataclasses, json, resource, sys
    import numpy as np, torch
    sys.path.insert(0, sys.argv[1])
    torch.set_num_threads(1)
    from test_memory_limit import tiny_stage
    from autounet.data.geometry import Geometry
    from autounet.data.image_io import write_image
    from autounet.inference.memory import estimate_case, input_grid, resident_bytes
    from autounet.inference.inputs import discover_cases
    from autounet.inference.predictor import Predictor

    folder = sys.argv[2]
    image = np.random.default_rng(0).normal(0, 1, (200, 200, 200)).astype(np.float32)
    write_image(folder + "/in/case.nii.gz", image, Geometry((1.25, 1.25, 1.25), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())))
    del image
    predictor = Predictor(members=[tiny_stage(16)], device="cpu", tta=False, engine="torch", precision="fp32", quiet=True)
    case = discover_cases([folder + "/in"], 1)[0]
    shape, spacing, channels = input_grid(case)
    e = estimate_case(predictor.members, case.case_id, shape, spacing, channels, resident_bytes())
    predictor.predict(folder + "/in", folder + "/out")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"estimate": e.alone, "base": e.base, "network": e.network, "export": e.export, "peak": peak}))
    """
)


def tiny_stage(classes: int, patch=(64, 64, 64)):
    """An untrained stage: the hippocampus 3d_fullres plan at 1 mm with ``classes`` outputs and a
    1x1x1 convolution as its network (fast, so that memory, not compute, is what is measured)."""
    import dataclasses

    import torch

    from autounet.inference.model import StageModel
    from autounet.networks.spec import spec_from_plan
    from test_unet import hippocampus_plans

    plan = hippocampus_plans().configurations["3d_fullres"]
    # 2 features at full resolution: the formula's tile term, for a network with hardly any
    plan = dataclasses.replace(
        plan,
        spacing=[1.0, 1.0, 1.0],
        patch_size=list(patch),
        num_classes=classes,
        features_per_stage=[2] * len(plan.features_per_stage),
    )
    return StageModel(
        configuration=plan.name,
        plan=plan,
        spec=spec_from_plan(plan),
        labels={str(k): f"c{k}" for k in range(classes)},
        channel_names=["CT"],
        networks=[torch.nn.Conv3d(1, classes, 1).eval()],
        sources=["untrained"],
        mirror_axes=(),
    )


def test_the_stated_memory_formula_is_within_25_percent_of_the_measured_peak(tmp_path):
    (tmp_path / "in").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(TESTS), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "1", "AUTOUNET_PROGRESS": "0", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["network"] > r["base"]  # the case, not the interpreter, dominates what is measured
    assert abs(r["estimate"] - r["peak"]) <= 0.25 * r["peak"], r
    assert (tmp_path / "out" / "case.nii.gz").is_file()


def test_a_case_beyond_the_memory_limit_exits_2_naming_it_before_writing_anything(tmp_path, capsys, monkeypatch):
    from autounet.inference.predictor import Predictor

    stage = tiny_stage(104, patch=(32, 32, 32))
    # the CLI's model: the untrained stage (``-m`` is not read)
    monkeypatch.setattr(
        "autounet.inference.predictor.Predictor",
        lambda *a, **k: Predictor(members=[stage], device="cpu", quiet=True, engine="torch", precision="fp32"),
    )
    path = tmp_path / "in" / "big.nii.gz"
    path.parent.mkdir()
    # 160 x 1024 x 1024 voxels at 1 mm: even spilled to disk, the rolling accumulator of 104 float16
    # classes over the 32 rows of one tile takes 7 GB
    write_image(
        path, np.zeros((40, 256, 256), np.float32), Geometry((4.0, 4.0, 4.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    )
    out = tmp_path / "out"
    code = main(["predict", "-i", str(path.parent), "-o", str(out), "-m", str(tmp_path), "--memory-limit", "2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "big:" in err and "more than the memory limit of 2.0 GB" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_the_estimate_grows_with_classes_members_and_probabilities():
    from autounet.inference.memory import estimate_case

    one, many = tiny_stage(4), tiny_stage(104)
    shape, spacing = [100, 120, 120], [1.0, 1.0, 1.0]
    small = estimate_case([one], "c", shape, spacing, 1, 0)
    big = estimate_case([many], "c", shape, spacing, 1, 0)
    pair = estimate_case([many, many], "c", shape, spacing, 1, 0)
    saved = estimate_case([many, many], "c", shape, spacing, 1, 0, save_probabilities=True)
    v = 100 * 120 * 120
    assert big.network - small.network >= 2 * 100 * v  # a = 2 bytes per accumulated probability
    assert pair.export - big.export == 2 * 104 * v and saved.export > pair.export


def test_a_memory_limit_that_is_not_positive_exits_2(tmp_path, capsys):
    code = main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tmp_path), "--memory-limit", "0"])
    assert code == 2
    assert "--memory-limit must be a positive number of GB, got 0" in capsys.readouterr().err
