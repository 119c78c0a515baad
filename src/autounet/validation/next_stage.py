"""Predictions of a cascade's first stage for the second (seed 001 §2.1, Fig. 1).

Each low-resolution fold predicts its validation cases in full (sliding window); the class
probabilities are resampled from the low-resolution grid to the full-resolution one (both cover
the same crop box in the same axis order) and their argmax is stored as
``results/3d_lowres/next_stage/CASE_previous.npy``. Every training case is thus predicted by the
fold that did not train on it. The fold's end-of-training validation (which predicts exactly
these cases) hands its probabilities to :func:`next_stage_writer`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch

from autounet.inference.predictor import argmax_on_grid
from autounet.planning.plans import Plans
from autounet.preprocessing.store import read_properties
from autounet.utils.atomic import atomic_write, make_folder
from autounet.utils.temporary import remove_stale_temporaries
from autounet.workspace import Workspace, manifest_path, previous_stage_path


def next_stage_writer(ws: Workspace, plans: Plans, configuration: str) -> Callable[[str, torch.Tensor], None] | None:
    """A function ``(case, probabilities)`` that stores the next stage's input for a case of
    ``configuration`` (probabilities in its preprocessed space), or None when ``configuration``
    has no next stage or the next stage is not preprocessed."""
    plan = plans.configuration(configuration)
    if not plan.next_stage:
        return None
    target = plans.configuration(plan.next_stage)
    full_dir = ws.preprocessed_dir(target.data_identifier)
    if not manifest_path(full_dir).is_file():
        print(
            f"note: {target.data_identifier} is not preprocessed; skipping the predictions for {target.name}",
            file=sys.stderr,
        )
        return None
    out_dir = ws.next_stage_dir(configuration)
    make_folder(out_dir)
    remove_stale_temporaries(out_dir)  # of a killed validation (a live one's are kept)

    def write(case: str, probs: torch.Tensor) -> None:
        shape = read_properties(full_dir, case).shape_after_resampling
        array = argmax_on_grid(probs, shape)
        atomic_write(previous_stage_path(out_dir, case), lambda p, a=array: np.save(p, a))

    return write
