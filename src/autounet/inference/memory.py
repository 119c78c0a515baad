"""How much host memory predicting a case takes, from its header alone (issue 22; the formula is
in the README, "Memory").

With the streaming export (:mod:`autounet.inference.streaming`) a case of ``N`` input voxels and
``C`` channels, predicted by members whose preprocessed volumes have ``V_m`` voxels and ``K``
outputs each (accumulated in ``a`` bytes per value), needs at most, above what the process holds
before it starts (``R0``: Python, PyTorch, the networks)::

    read    = 12·C·N + 12·C·ΣV_g                    image, its copies while preprocessed, results
    network = 4·C·ΣV_g + a·K·ΣV_m + (4·C + 12)·max V_m + a·K·V_m(folds > 1) + tiles
    tiles   = 4·T·P·(3·K + 4·F)                     one batch of T tiles of P voxels, F features
    export  = a·K·ΣV_m + 12·max V_m + 16·N + 96 MiB  (+ 64 MiB with --save-probabilities)
    case    = max(read, network, export)

(``V_g``: the distinct preprocessed images; 2d and 3d_fullres share one.) Before the crop box is
known the whole image counts as the box, so the estimate errs high for bodies in much air.
Overlapping cases (the next one read and preprocessed while the network runs, the previous one
exported) add ``read`` of the next and ``export`` of the previous case to ``network``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from autounet.errors import AutounetError
from autounet.inference.inputs import InputCase, header_of
from autounet.inference.model import StageModel, stage_chain
from autounet.preprocessing.case import PreprocessOptions, label_values, preprocess_key
from autounet.preprocessing.resample import SLAB_VOXELS, resampled_shape

GB = 1024**3
PROBABILITY_STREAM_BYTES = 64 * 1024**2  # ProbabilityStream's float16 rows and deflate buffers
SLAB_BYTES = 3 * 4 * SLAB_VOXELS  # the export resampler's gathered slabs


@dataclass
class CaseMemory:
    """The formula's terms for one case, in bytes (``base`` is ``R0``)."""

    case_id: str
    base: int
    read: int
    network: int
    export: int

    @property
    def alone(self) -> int:
        """Peak with no other case in memory."""
        return self.base + max(self.read, self.network, self.export)


def input_grid(case: InputCase) -> tuple[list[int], list[float], int]:
    """``(shape z, y, x)``, ``spacing`` and channels of a case from its header(s) alone."""
    reader = header_of(case, case.files[0])
    size, spacing = list(reader.GetSize()), list(reader.GetSpacing())
    if len(size) == 2:
        size, spacing = [*size, 1], [*spacing, 1.0]
    if case.series is not None:  # one file per slice
        size[2] = len(case.files)
    channels = size[3] if len(size) == 4 else reader.GetNumberOfComponents() * len(case.files)
    if case.series is not None:
        channels = 1
    return size[2::-1], spacing[2::-1], channels


def _accumulator_bytes() -> int:
    try:
        from autounet.inference.sliding_window import ACCUMULATOR_DTYPE

        return ACCUMULATOR_DTYPE.itemsize
    except ImportError:
        return 4


def estimate_case(
    members: Sequence[StageModel],
    case_id: str,
    shape: Sequence[int],
    spacing: Sequence[float],
    channels: int,
    base: int,
    save_probabilities: bool = False,
) -> CaseMemory:
    """The terms of the formula above for a case of ``shape`` at ``spacing``."""
    n = 1
    for s in shape:
        n *= int(s)
    a = _accumulator_bytes()
    groups: dict[tuple, int] = {}
    outputs = largest = folds = tiles = 0
    for m in members:
        key = tuple(preprocess_key(s.plan, label_values(s.labels), PreprocessOptions()) for s in stage_chain(m))
        for s in stage_chain(m):
            tf = s.plan.transpose_forward
            v = 1
            for d in resampled_shape([shape[t] for t in tf], [spacing[t] for t in tf], s.plan.spacing):
                v *= d
            groups[(key, s.configuration)] = v
            largest = max(largest, v)
            if s is m:
                outputs += m.num_outputs * v
                if len(m.networks) > 1:  # the next fold's probabilities while they are added
                    folds = max(folds, a * m.num_outputs * v)
            three_d = s.plan.network_dims == 3
            batch, patch = (4 if three_d else 32), 1
            for d in s.plan.patch_size:
                patch *= d
            tiles = max(tiles, 4 * batch * patch * (3 * s.num_outputs + 4 * s.spec.features_per_stage[0]))
    prepared = 4 * channels * sum(groups.values())
    read = 12 * channels * n + 3 * prepared
    network = prepared + a * outputs + (4 * channels + 12) * largest + folds + tiles
    export = a * outputs + 12 * largest + 16 * n + SLAB_BYTES
    if save_probabilities:
        export += PROBABILITY_STREAM_BYTES
    return CaseMemory(case_id, base, read, network, export)


def available_bytes() -> int:
    """What the machine has free now, plus what this process holds (its estimate counts it)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available + psutil.Process().memory_info().rss)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") + resident_bytes())


def resident_bytes() -> int:
    """This process's resident memory now."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def plan_memory(estimates: Sequence[CaseMemory], limit: int) -> bool:
    """Whether the next case may be read while the network runs (True) or every case must run
    alone (False); a case that does not fit even alone stops everything, naming it."""
    for e in estimates:
        if e.alone > limit:
            raise AutounetError(
                f"{e.case_id}: predicting it needs about {e.alone / GB:.1f} GB (read {e.read / GB:.1f}, network "
                f"{e.network / GB:.1f}, export {e.export / GB:.1f}, process {e.base / GB:.1f} GB), more than the "
                f"memory limit of {limit / GB:.1f} GB; nothing was predicted. Raise --memory-limit, free memory, "
                "or predict it on a larger machine"
            )
    for i, e in enumerate(estimates):
        previous = estimates[i - 1].export if i > 0 else 0
        following = estimates[i + 1].read if i + 1 < len(estimates) else 0
        if e.base + e.network + previous + following > limit:
            return False
    return True
