"""Intensity normalisation per channel, as planned (seed 001 §2.2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autounet.errors import AutounetError
from autounet.planning.plans import ChannelNormalization

_EPS = 1e-8


def normalize(
    image: np.ndarray, mask: np.ndarray | None, plans: Sequence[ChannelNormalization]
) -> list[dict[str, float]]:
    """Normalise ``image`` ``(C, Z, Y, X)`` float32 in place; return the statistics applied per channel.

    ``ct``: clip to the dataset's foreground [0.5, 99.5] percentiles, subtract the foreground mean,
    divide by its std. ``zscore``: this case's mean and std (inside ``mask`` when the plan uses
    the nonzero mask). ``rescale_0_1``: this case's min-max range. With ``use_nonzero_mask`` every
    voxel outside ``mask`` is set to 0.
    """
    if image.shape[0] != len(plans):
        raise AutounetError(f"image has {image.shape[0]} channel(s), the plan normalises {len(plans)}")
    applied = []
    for c, plan in enumerate(plans):
        x = image[c]
        region = mask if plan.use_nonzero_mask and mask is not None else None
        if plan.scheme == "ct":
            np.clip(x, plan.clip_low, plan.clip_high, out=x)
            mean, std = float(plan.mean), float(plan.std)
        elif plan.scheme == "zscore":
            values = x[region] if region is not None else x
            mean = float(values.mean(dtype=np.float64)) if values.size else 0.0
            std = float(values.std(dtype=np.float64)) if values.size else 1.0
        elif plan.scheme == "rescale_0_1":
            values = x[region] if region is not None else x
            lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
            mean, std = lo, hi - lo
        elif plan.scheme == "none":
            mean, std = 0.0, 1.0
        else:
            raise AutounetError(f"unknown normalisation scheme {plan.scheme!r} for channel {c}")
        x -= np.float32(mean)
        x /= np.float32(max(std, _EPS))
        if region is not None:
            x[~region] = 0
        applied.append({"scheme": plan.scheme, "subtracted": mean, "divided_by": max(std, _EPS)})
    return applied
