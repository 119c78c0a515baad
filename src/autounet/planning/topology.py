"""Patch size, pooling and kernel rules of the paper's planner (seed 001 §2.1), as pure functions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autounet.planning.plans import ConfigurationPlan


def pools_for_size(size: int, max_pools: int, min_feature_map: int = 8) -> int:
    """Poolings along an axis of ``size``: pool until the feature map is smaller than ``min_feature_map``.

    Seed 001 §2.1: "pool along each axis until the feature map size for that axis is smaller
    than 8 (but not more than a maximum of 6 [2D] / 5 [3D] pooling operations)". A map of 8 or
    more is pooled again, so the bottleneck ends between 4 and 7 voxels.
    """
    p, s = 0, float(size)
    while p < max_pools and s >= min_feature_map:
        s /= 2
        p += 1
    return p


def round_up_to_pools(target: float, max_pools: int, min_feature_map: int = 8) -> int:
    """Smallest size >= ``target`` that is a multiple of 2**pools, pools counted on that size itself.

    Counting pools on the rounded size (not the target) reproduces Table 1: Heart 2D's median
    232 rounds to 256 with 6 pools, since 256 / 2**5 = 8 is not yet below 8.
    """
    s = max(1, math.ceil(target - 1e-9))
    while True:
        p = pools_for_size(s, max_pools, min_feature_map)
        n = math.ceil(s / 2**p) * 2**p
        if n == s:
            return s
        s = n


def fit_patch(target: Sequence[float], max_voxels: float, max_pools: int, min_feature_map: int = 8) -> list[int]:
    """Patch near ``target`` whose edges are multiples of 2**pools and whose volume is <= ``max_voxels``.

    Each edge is rounded up to its pooling multiple; while the volume is too large, the edge that
    rounding enlarged most (in voxels) loses one pooling multiple. The paper gives the volume cap
    and the rounding but not which edge to shorten; this rule reproduces Table 1's BrainTumour
    128x128x128 and Heart 80x192x128.
    """
    patch = [round_up_to_pools(t, max_pools, min_feature_map) for t in target]
    while math.prod(patch) > max_voxels:
        excess = [patch[i] - target[i] for i in range(len(patch))]
        shrinkable = [i for i in range(len(patch)) if patch[i] > 1]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda i: (excess[i], i))
        step = 2 ** pools_for_size(patch[axis], max_pools, min_feature_map)
        patch[axis] = max(1, patch[axis] - step)
    return patch


def stage_kernels(
    spacing: Sequence[float], num_pool_per_axis: Sequence[int], anisotropy_ratio: float = 2.0
) -> tuple[list[list[int]], list[list[int]]]:
    """Pooling kernels per down-sampling step and convolution kernels per stage.

    The paper fixes only how many times each axis is pooled. Which steps pool an axis, and the
    kernel sizes, follow the public nnU-Net: an axis whose current spacing is ``anisotropy_ratio``
    times coarser than the finest pooled axis waits (pooled later, convolved with kernel 1) until
    the others catch up, unless it would otherwise run out of steps. Isotropic data pools every
    axis from the first step and uses 3x3(x3) convolutions throughout.
    """
    n = len(spacing)
    steps = max(num_pool_per_axis) if num_pool_per_axis else 0
    remaining = list(num_pool_per_axis)
    current = [float(s) for s in spacing]
    pool_kernels: list[list[int]] = []
    conv_kernels: list[list[int]] = []
    for step in range(steps + 1):
        finest = min(current)
        conv_kernels.append([3 if current[a] / finest < anisotropy_ratio else 1 for a in range(n)])
        if step == steps:
            break
        left = steps - step
        candidates = [a for a in range(n) if remaining[a] > 0]
        finest_candidate = min(current[a] for a in candidates)
        kernel = []
        for a in range(n):
            pool = remaining[a] > 0 and (remaining[a] >= left or current[a] / finest_candidate < anisotropy_ratio)
            kernel.append(2 if pool else 1)
            if pool:
                remaining[a] -= 1
                current[a] *= 2
        pool_kernels.append(kernel)
    return pool_kernels, conv_kernels


def features_per_stage(num_stages: int, base: int, cap: int) -> list[int]:
    """``base`` features at full resolution, doubling per stage, at most ``cap``."""
    return [min(base * 2**s, cap) for s in range(num_stages)]


# seed 004 §2.3: the deeper encoder of the BraTS recipe
NVIDIA_FEATURES = (64, 96, 128, 192, 256, 384, 512)


def extra_pool(size: list[int]) -> list[int]:
    """The next 2x down-sampling of the deepened encoder: axes with >= 2 voxels left after it, no remainder."""
    return [2 if s >= 2 * 2 and s % 2 == 0 else 1 for s in size]


def max_stages(plan: ConfigurationPlan) -> int:
    """How many stages the plan's patch allows when the encoder is deepened (see :func:`autounet.networks.spec.spec_from_plan`)."""
    size = list(plan.patch_size)
    for k in plan.pool_op_kernel_sizes:
        size = [s // p for s, p in zip(size, k)]
    stages = len(plan.conv_kernel_sizes)
    while True:
        k = extra_pool(size)
        if k == [1] * len(k):
            return stages
        size = [s // p for s, p in zip(size, k)]
        stages += 1
