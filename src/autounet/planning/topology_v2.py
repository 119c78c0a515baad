"""nnU-Net v2's topology rule: strides, kernels and the padded patch from a spacing and a patch.

Unlike seed 001's rule (:mod:`autounet.planning.topology`), v2 decides stage by stage:

* an axis may be down-sampled while its feature map is at least twice the minimum edge (4);
* of those, only axes whose current spacing is within 2x of the finest one are down-sampled;
* when a single axis is left, it is down-sampled only while its map is at least 3x the minimum
  edge;
* an axis's kernel becomes 3 (and stays 3) once its spacing is within 2x of the finest; the
  bottleneck always has 3s;
* the patch is then padded up to a multiple of 2^pools per axis (a patch already divisible
  gains one more multiple, as v2 does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class V2Topology:
    num_pool_per_axis: list[int]
    strides: list[list[int]]  # one per stage; the first is all ones
    conv_kernel_sizes: list[list[int]]  # one per stage
    patch_size: list[int]  # padded to a multiple of 2^pools
    divisor: list[int]  # 2^pools per axis

    @property
    def num_stages(self) -> int:
        return len(self.strides)


def pad_to_multiple(patch: Sequence[float], divisor: Sequence[int]) -> list[int]:
    """The next multiple of ``divisor`` above each edge (an exact multiple stays)."""
    out = []
    for p, d in zip(patch, divisor):
        grown = p + d - p % d
        if p % d == 0:
            grown -= d
        out.append(int(grown))
    return out


def v2_topology(spacing: Sequence[float], patch: Sequence[float], min_edge: int = 4) -> V2Topology:
    """Strides, kernels and padded patch of nnU-Net v2 for ``patch`` at ``spacing`` (network order)."""
    dims = len(spacing)
    current_spacing = [float(s) for s in spacing]
    size = [float(p) for p in patch]
    pools = [0] * dims
    kernel = [1] * dims
    strides: list[list[int]] = [[1] * dims]
    kernels: list[list[int]] = []
    while True:
        poolable = [a for a in range(dims) if size[a] >= 2 * min_edge]
        if not poolable:
            break
        finest = min(current_spacing[a] for a in poolable)
        poolable = [a for a in poolable if current_spacing[a] / finest < 2]
        if len(poolable) == 1 and size[poolable[0]] < 3 * min_edge:
            break
        if not poolable:
            break
        overall_finest = min(current_spacing)
        kernel = [k if k == 3 else (3 if current_spacing[a] / overall_finest < 2 else 1) for a, k in enumerate(kernel)]
        stride = [1] * dims
        for a in poolable:
            stride[a] = 2
            pools[a] += 1
            current_spacing[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dims)
    divisor = [2**p for p in pools]
    return V2Topology(pools, strides, kernels, pad_to_multiple(patch, divisor), divisor)
