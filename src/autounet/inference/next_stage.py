"""Predictions of a cascade's first stage for the second (seed 001 §2.1, Fig. 1).

Each low-resolution fold predicts its validation cases in full (sliding window); the class
probabilities are resampled from the low-resolution grid to the full-resolution one (both cover
the same crop box in the same axis order) and their argmax is stored as
``results/3d_lowres/next_stage/CASE_previous.npy``. Every training case is thus predicted by the
fold that did not train on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from autounet.inference.sliding_window import predict_volume
from autounet.planning.plans import Plans
from autounet.preprocessing.resample import resample_volume
from autounet.preprocessing.store import case_paths, read_properties
from autounet.training.sampler import previous_stage_path
from autounet.utils.atomic import atomic_write
from autounet.utils.progress import progress
from autounet.workspace import Workspace


def export_next_stage(
    network: torch.nn.Module,
    ws: Workspace,
    plans: Plans,
    configuration: str,
    cases: Sequence[str],
    device: torch.device,
    mirror: bool = True,
    amp_dtype: torch.dtype | None = None,
) -> Path:
    """Write the next stage's inputs for ``cases`` (the fold's validation cases); returns the folder."""
    plan = plans.configuration(configuration)
    target = plans.configuration(plan.next_stage)
    low_dir, full_dir = ws.preprocessed_dir(plan.data_identifier), ws.preprocessed_dir(target.data_identifier)
    out_dir = ws.next_stage_dir(configuration)
    out_dir.mkdir(parents=True, exist_ok=True)
    mirror_axes = tuple(range(len(plan.patch_size))) if mirror else ()
    for case in progress(cases, total=len(cases), desc="next-stage predictions"):
        image = np.load(case_paths(low_dir, case)["image"], mmap_mode="r")
        probs = predict_volume(
            network,
            image,
            plan.patch_size,
            plan.num_classes,
            mirror_axes=mirror_axes,
            device=device,
            amp_dtype=amp_dtype,
        )
        shape = read_properties(full_dir, case).shape_after_resampling
        best = torch.full(shape, -1.0, device=probs.device)
        label = torch.zeros(shape, dtype=torch.uint8, device=probs.device)
        for k in range(plan.num_classes):
            p = torch.as_tensor(resample_volume(probs[k].cpu().numpy(), shape, 1), device=probs.device)
            better = p > best
            best[better], label[better] = p[better], k
        array = label.cpu().numpy()
        atomic_write(previous_stage_path(out_dir, case), lambda p, a=array: np.save(p, a))
    return out_dir
