"""The static memory estimate of nnU-Net v2's planner: how many feature-map values one sample's
forward pass writes, counted per convolution output.

nnU-Net v2 sizes patches and batches by comparing this count with a reference value measured on
its default network (scaled by the GPU memory target), not by running the network. The count is
a pure function of the topology, written out here for the two encoders it plans:

* plain: every encoder stage has ``convs_per_stage`` convolutions, each writing ``features x
  voxels`` at the stage's resolution (the first one is strided);
* residual: a stem convolution at full resolution, then per stage ``blocks`` residual blocks of
  two convolutions each, plus one more map for the first block's projection when it changes the
  channels or the resolution.

The decoder adds, per level: its convolutions, the transposed convolution and, when the level
has an output (every level with deep supervision, else only the top), a map of ``num_outputs``
channels. Sizes shrink by integer division, as the network's strides do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _stage_sizes(patch: Sequence[int], strides: Sequence[Sequence[int]]) -> list[list[int]]:
    """Spatial size of every stage's output; ``strides[0]`` is the first stage's (all ones)."""
    sizes, current = [], [int(p) for p in patch]
    for stride in strides:
        current = [c // int(s) for c, s in zip(current, stride)]
        sizes.append(current)
    return sizes


def feature_map_voxels(
    patch: Sequence[int],
    strides: Sequence[Sequence[int]],
    features: Sequence[int],
    encoder_blocks: Sequence[int] | None,
    encoder_convs: Sequence[int],
    decoder_convs: Sequence[int],
    num_outputs: int,
    deep_supervision: bool = False,
) -> int:
    """Feature-map values written per sample. ``strides``: one per stage (the first all ones);
    ``encoder_blocks``: residual blocks per stage (None: the plain encoder with ``encoder_convs``
    convolutions per stage); ``decoder_convs``: per decoder level, deepest first."""
    sizes = _stage_sizes(patch, strides)
    n = len(features)
    total = 0
    if encoder_blocks is None:
        for s in range(n):
            total += int(encoder_convs[s]) * int(features[s]) * math.prod(sizes[s])
    else:
        before = [int(p) for p in patch]
        total += int(features[0]) * math.prod(before)  # the stem
        cin = int(features[0])
        for s in range(n):
            voxels = int(features[s]) * math.prod(sizes[s])
            projected = cin != int(features[s]) or sizes[s] != before
            total += 2 * voxels * int(encoder_blocks[s]) + (voxels if projected else 0)
            cin, before = int(features[s]), sizes[s]
    for level in range(n - 1):  # deepest decoder level first
        target = n - 2 - level
        voxels = math.prod(sizes[target])
        total += int(decoder_convs[level]) * int(features[target]) * voxels  # its convolutions
        total += int(features[target]) * voxels  # the transposed convolution
        if deep_supervision or level == n - 2:
            total += int(num_outputs) * voxels
    return total
