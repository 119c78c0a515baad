"""How much host memory predicting a case takes, from its header alone, and how it is kept within
``--memory-limit`` (issue 22; the formula is in the README, "Memory").

A case of ``N`` input voxels (``B`` of them in the crop box) and ``C`` channels, predicted by
members whose preprocessed volumes have ``V_m`` voxels and ``K`` outputs each (accumulated in
``a`` bytes per value), needs at most, above what the process holds before it starts (``R0``:
Python, PyTorch, the networks)::

    read    = 12·C·N + 12·C·ΣV_g                 image, its copies while preprocessed, results
    network = 4·C·ΣV_g + a·K·ΣV_mem + (4·C + 12)·max V_m + tiles            (in memory)
            = 4·C·ΣV_g + a·K·ΣV_mem + 4·C·max V_m + roll + tiles             (spilled)
    tiles   = 4·T·P·(3·K + 4·F)                  one batch of T tiles of P voxels, F features (T: 4 in 3D,
                                                 32 in 2D, fewer where 4·T·P·K > 256 MiB)
    roll    = (a·(K + 1) + 8)·p0·A_m             a rolling accumulator's window: p0 rows of A_m voxels
    export  = a·K·ΣV_mem + 3·N + S + 96 MiB      (+ 6·B + 64 MiB with --save-probabilities)
    case    = max(read, network, export)

``V_mem`` counts the members whose accumulators stay in memory; the others spill: their rolling
accumulator (:func:`~autounet.inference.sliding_window.predict_volume` with a sink) holds the
rows of axis 0 one tile spans and writes finished rows to a float16 file on disk
(:mod:`autounet.inference.spill`, ``2·K·V_m`` bytes of disk). They spill when ``a·K·ΣV_m``, all
members' accumulators, exceeds a quarter of the limit (without ``--memory-limit``: a quarter of
what is free, and at most :data:`IN_MEMORY_BYTES`). The export builds the segmentation slab by
slab (:mod:`autounet.inference.streaming`): ``3·N`` are the label volume, its copy while written
and post-processing; ``S`` the slab's float buffers, ``24`` bytes per voxel of the slab, with
slabs of ``S = min(256 MiB, max(32 MiB, limit / 32))`` (:func:`export_slab_bytes`). With
``--save-probabilities`` the running argmax over the crop box (float32) and the class being
written (float16) add ``6·B``. (``V_g``: the distinct preprocessed images; 2d and 3d_fullres share
one.) Before the crop box is known the whole image counts as the box, so the estimate errs high
for bodies in much air. Overlapping cases (the next one read and preprocessed while the network
runs, the previous one exported) add ``read`` of the next and ``export`` of the previous case to
``network``.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from autounet.errors import AutounetError
from autounet.inference.inputs import InputCase, case_grid
from autounet.inference.model import StageModel, stage_chain
from autounet.inference.sliding_window import ACCUMULATOR_DTYPE, tiles_per_batch_for
from autounet.preprocessing.case import PreprocessOptions, label_values, preprocess_key
from autounet.preprocessing.resample import SLAB_VOXELS, resampled_shape

GB = 1024**3
MiB = 1024**2
PROBABILITY_STREAM_BYTES = 64 * MiB  # ProbabilityStream's float16 rows and deflate buffers
EXPORT_FIXED_BYTES = 96 * MiB  # the resampler's gathered slabs (3 x 4 x SLAB_VOXELS) and writers' buffers
# Without --memory-limit, accumulators beyond this (all members together) spill to disk.
IN_MEMORY_BYTES = GB
SLAB_MIN_BYTES, SLAB_MAX_BYTES = 32 * MiB, 256 * MiB
assert 3 * 4 * SLAB_VOXELS <= EXPORT_FIXED_BYTES


def export_slab_bytes(limit: int) -> int:
    """``S``: what the export's float buffers of one slab may take under a memory ``limit``."""
    return int(min(SLAB_MAX_BYTES, max(SLAB_MIN_BYTES, limit // 32)))


def in_memory_budget(limit: int | None) -> int:
    """Accumulators (all members' ``a·K·V_m``) up to this many bytes stay in memory; beyond, they
    spill to disk. ``limit``: ``--memory-limit`` in bytes, None: what is free (at most
    :data:`IN_MEMORY_BYTES` then)."""
    if limit is not None:
        return limit // 4
    return min(available_bytes() // 4, IN_MEMORY_BYTES)


@dataclass
class CaseMemory:
    """The formula's terms for one case, in bytes (``base`` is ``R0``); ``spill``: whether its
    members' accumulators go to disk, and ``disk`` the bytes they take there; ``slab``: ``S``."""

    case_id: str
    base: int
    read: int
    network: int
    export: int
    spill: bool = False
    disk: int = 0
    slab: int = SLAB_MAX_BYTES

    @property
    def alone(self) -> int:
        """Peak with no other case in memory."""
        return self.base + max(self.read, self.network, self.export)


def input_grid(case: InputCase) -> tuple[list[int], list[float], int]:
    """``(shape z, y, x)``, ``spacing`` and channels of a case from its header(s) alone
    (:func:`~autounet.inference.inputs.case_grid`: a DICOM series' files are not opened again)."""
    return case_grid(case)


def estimate_case(
    members: Sequence[StageModel],
    case_id: str,
    shape: Sequence[int],
    spacing: Sequence[float],
    channels: int,
    base: int,
    save_probabilities: bool = False,
    limit: int | None = None,
) -> CaseMemory:
    """The terms of the formula above for a case of ``shape`` at ``spacing``, under ``limit``
    bytes (``--memory-limit``; None: what the machine has free)."""
    n = 1
    for s in shape:
        n *= int(s)
    a = ACCUMULATOR_DTYPE.itemsize
    groups: dict[tuple, int] = {}
    outputs = largest = tiles = roll = 0
    for m in members:
        key = tuple(preprocess_key(s.plan, label_values(s.labels), PreprocessOptions()) for s in stage_chain(m))
        for s in stage_chain(m):
            tf = s.plan.transpose_forward
            size = resampled_shape([shape[t] for t in tf], [spacing[t] for t in tf], s.plan.spacing)
            v = math.prod(size)
            groups[(key, s.configuration)] = v
            largest = max(largest, v)
            if s is m:
                outputs += m.num_outputs * v
                rows = s.plan.patch_size[0] if s.plan.network_dims == 3 else 1
                roll = max(roll, (a * (m.num_outputs + 1) + 8) * rows * (v // max(1, size[0])))
            three_d = s.plan.network_dims == 3
            patch = math.prod(s.plan.patch_size)
            batch = tiles_per_batch_for(three_d, s.num_outputs, s.plan.patch_size)
            tiles = max(tiles, 4 * batch * patch * (3 * s.num_outputs + 4 * s.spec.features_per_stage[0]))
    prepared = 4 * channels * sum(groups.values())
    read = 12 * channels * n + 3 * prepared
    spill = a * outputs > in_memory_budget(limit)
    slab = export_slab_bytes(limit if limit is not None else available_bytes())
    if spill:
        network = prepared + 4 * channels * largest + roll + tiles
        held = 0
    else:
        network = prepared + a * outputs + (4 * channels + 12) * largest + tiles
        held = a * outputs
    export = held + 3 * n + slab + EXPORT_FIXED_BYTES
    if save_probabilities:
        export += 6 * n + PROBABILITY_STREAM_BYTES
    disk = 2 * outputs if spill else 0
    return CaseMemory(case_id, base, read, network, export, spill, disk, slab)


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


def check_disk(estimates: Sequence[CaseMemory], folder: Path, overlap: bool) -> None:
    """Refuse, before anything is written, cases whose spilled probabilities would not fit on the
    disk of ``folder`` (the output folder, or the nearest folder above it that exists); with
    ``overlap`` two cases' files may be there at once."""
    from autounet.inference.spill import SPARE_DISK_BYTES

    disks = [e.disk for e in estimates if e.spill]
    if not disks:
        return
    need = max(disks) + (sorted(disks)[-2] if overlap and len(disks) > 1 else 0)
    probe = Path(folder).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as exc:
        raise AutounetError(f"{probe}: cannot check the free disk space ({exc})") from None
    if free < need + SPARE_DISK_BYTES:
        case = max((e for e in estimates if e.spill), key=lambda e: e.disk).case_id
        raise AutounetError(
            f"{case}: its probabilities do not fit in the memory limit and need {need / GB:.1f} GB ({need} bytes) "
            f"of disk in {probe} while exported, but only {free / GB:.1f} GB are free; nothing was predicted. "
            "Free space there, write to a larger disk, or raise --memory-limit"
        )
