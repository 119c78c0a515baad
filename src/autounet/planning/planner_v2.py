"""nnU-Net v2's experiment planner and its residual-encoder presets (``--recipe nnunetv2``,
``resenc-m``, ``resenc-l``, ``resenc-xl``): fingerprint in, plans out, equal to nnU-Net v2.8.1's
in spacing, patch, batch, strides, kernels, features and blocks per stage
(``tests/test_planner_v2.py`` compares them with plans made by nnU-Net itself).

Rules (nnU-Net v2, ``documentation/resenc_presets.md`` for the presets):

* Target spacing: the median spacing; when one axis is both > 3x coarser than the others and has
  < 1/3 of their voxels, that axis takes the 10th percentile of its spacings instead (never finer
  than the other axes). Axes are transposed so that the coarsest comes first.
* Median shape: the median of every case's cropped shape resampled to the target spacing (each
  case rounded first; the median may end in .5).
* Initial patch: the aspect ratio of ``1 / spacing``, scaled to the volume of 256³ (2048² in
  2D), clipped to the median shape; then :func:`topology_v2.v2_topology`.
* Memory: :func:`feature_maps.feature_map_voxels` of the network for one sample, against a
  reference value x (target GB / the reference's GB). While ``estimate x 2 / reference batch``
  (the plain U-Net; ResEnc: the estimate itself) exceeds it, the axis largest relative to the median shape loses one pooling multiple (the
  multiple of the patch one step smaller, so that no valid edge is skipped) and the topology is
  recomputed.
* Batch: ``round(reference / estimate x reference batch)`` (12 in 2D, 2 in 3D), at most the
  batch whose voxels are ``max_dataset_covered`` of the dataset (5 %; 100 % for ResEnc), at
  least 2.
* Features: 32 doubling per stage, at most 320 (3D) / 512 (2D).
* ``3d_lowres``: while the full-resolution patch covers < 25 % of the median shape, the spacing
  grows by 3 % per step (only the axes more than 2x finer than the coarsest, while there are
  any) and the configuration is planned again; it is dropped when the median shape shrank by
  less than 2x. With it: ``3d_cascade_fullres``, and Dice over the batch for ``3d_fullres``.
* Normalisation: CT channels by the dataset's foreground statistics, others a per-case z-score,
  inside the nonzero mask when cropping shrank the median case below 3/4 (not for CT).

The presets differ in the network and the memory reference: plain U-Net (two convolutions per
stage, 8 GB); ResEnc M / L / XL (residual encoder with 1, 3, 4, 6, 6, 6, ... blocks, one
convolution per decoder level; 8 / 24 / 40 GB). ResEnc plans name the ``2d`` and ``3d_fullres``
data like the default plans (same spacing and normalisation, so preprocessing reuses them).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import numpy as np

from autounet.data.dataset import ignore_label_of, without_ignore
from autounet.errors import AutounetError
from autounet.planning.feature_maps import feature_map_voxels
from autounet.planning.fingerprint import Fingerprint
from autounet.planning.planner import _validate, channel_normalizations
from autounet.planning.plans import ChannelNormalization, ConfigurationPlan, Plans, ResamplingPlan
from autounet.planning.topology_v2 import V2Topology, v2_topology

RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)


@dataclass(frozen=True)
class V2Preset:
    """One of nnU-Net v2's planners: its network and memory reference."""

    recipe: str
    nnunet_planner: str  # nnU-Net's class name, for the notes
    reference_3d: float  # feature-map values of the reference network at ``reference_gb``
    reference_2d: float
    reference_gb: float
    default_gb: float
    residual: bool
    decoder_convs: int
    max_dataset_covered: float
    # nnU-Net's default planner shrinks the patch while estimate x 2 / reference batch exceeds the
    # reference; its ResEnc planners compare the estimate with the reference directly.
    batch_corrected_shrinking: bool


PRESETS = {
    "nnunetv2": V2Preset("nnunetv2", "ExperimentPlanner", 560e6, 85e6, 8, 8, False, 2, 0.05, True),
    "resenc-m": V2Preset("resenc-m", "nnUNetPlannerResEncM", 680e6, 135e6, 8, 8, True, 1, 1.0, False),
    "resenc-l": V2Preset("resenc-l", "nnUNetPlannerResEncL", 2100e6, 380e6, 24, 24, True, 1, 1.0, False),
    "resenc-xl": V2Preset("resenc-xl", "nnUNetPlannerResEncXL", 3600e6, 560e6, 40, 40, True, 1, 1.0, False),
}


@dataclass(frozen=True)
class V2Constants:
    base_features: int = 32
    max_features_2d: int = 512
    max_features_3d: int = 320
    min_edge: int = 4
    reference_batch_2d: int = 12
    reference_batch_3d: int = 2
    min_batch_size: int = 2
    plain_convs_per_stage: int = 2
    anisotropy_threshold: float = 3.0
    lowres_patch_fraction: float = 0.25
    lowres_spacing_step: float = 1.03
    lowres_min_shrink: float = 2.0
    initial_edge_3d: int = 256
    initial_edge_2d: int = 2048
    nonzero_mask_max_crop_fraction: float = 0.75


def v2_target_spacing(fp: Fingerprint, threshold: float = 3.0) -> np.ndarray:
    """Full-resolution target spacing, raw axis order (see the module docstring)."""
    spacings = fp.spacings()
    target = np.percentile(spacings, 50, axis=0)
    median_size = np.percentile(fp.shapes_after_crop(), 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    coarse_spacing = target[worst] > threshold * max(target[a] for a in others)
    few_voxels = median_size[worst] * threshold < min(median_size[a] for a in others)
    if coarse_spacing and few_voxels:
        tenth = float(np.percentile(spacings[:, worst], 10))
        finest_allowed = max(target[a] for a in others)
        target[worst] = max(finest_allowed, tenth) + 1e-5 if tenth < finest_allowed else tenth
    return target


def resampled_median_shape(fp: Fingerprint, spacing: np.ndarray) -> np.ndarray:
    """Median over cases of the cropped shape at ``spacing`` (raw order), each case rounded first."""
    shapes = [
        [round(float(old) / float(new) * float(n)) for old, new, n in zip(c.spacing, spacing, c.shape_after_crop)]
        for c in fp.cases
    ]
    return np.median(np.asarray(shapes, dtype=float), axis=0)


def _features(stages: int, dims: int, k: V2Constants) -> list[int]:
    cap = k.max_features_2d if dims == 2 else k.max_features_3d
    return [min(cap, k.base_features * 2**s) for s in range(stages)]


def _blocks(stages: int, preset: V2Preset, k: V2Constants) -> tuple[list[int], list[int]]:
    """Encoder blocks (ResEnc) or convolutions (plain) per stage, and decoder convolutions per level."""
    if len(RESENC_BLOCKS) < stages:
        raise AutounetError(f"nnU-Net v2 presets stop at {len(RESENC_BLOCKS)} stages; this patch needs {stages}")
    encoder = list(RESENC_BLOCKS[:stages]) if preset.residual else [k.plain_convs_per_stage] * stages
    return encoder, [preset.decoder_convs] * (stages - 1)


@dataclass
class _Sized:
    topology: V2Topology
    estimate: int
    batch_size: int
    reference: float
    reference_batch: int


def _estimate(topo: V2Topology, dims: int, preset: V2Preset, k: V2Constants, outputs: int) -> int:
    encoder, decoder = _blocks(topo.num_stages, preset, k)
    return feature_map_voxels(
        topo.patch_size,
        topo.strides,
        _features(topo.num_stages, dims, k),
        encoder if preset.residual else None,
        encoder,
        decoder,
        outputs,
    )


def size_configuration(
    spacing: np.ndarray,
    median_shape: np.ndarray,
    dataset_voxels: float,
    preset: V2Preset,
    memory_gb: float,
    outputs: int,
    k: V2Constants,
) -> _Sized:
    """Patch, topology and batch of one configuration (network order; 2 or 3 axes)."""
    dims = len(spacing)
    inverse = 1 / np.asarray(spacing, dtype=float)
    edge = k.initial_edge_3d if dims == 3 else k.initial_edge_2d
    initial = [round(float(v)) for v in inverse * (edge**dims / np.prod(inverse)) ** (1 / dims)]
    initial = np.minimum(initial, np.asarray(median_shape, dtype=float)[:dims])
    topo = v2_topology(spacing, initial, k.min_edge)
    estimate = _estimate(topo, dims, preset, k, outputs)
    reference_raw = preset.reference_2d if dims == 2 else preset.reference_3d
    reference = reference_raw * (memory_gb / preset.reference_gb)
    reference_batch = k.reference_batch_2d if dims == 2 else k.reference_batch_3d

    def too_large(estimate: int) -> bool:  # in nnU-Net's order of operations, for equal rounding
        return (estimate / reference_batch * 2 if preset.batch_corrected_shrinking else estimate) > reference

    while too_large(estimate):
        ratios = [p / m for p, m in zip(topo.patch_size, list(median_shape)[:dims])]
        axis = int(np.argsort(ratios)[-1])
        smaller = list(topo.patch_size)
        smaller[axis] -= topo.divisor[axis]
        step = v2_topology(spacing, smaller, k.min_edge).divisor[axis]
        patch = list(topo.patch_size)
        patch[axis] -= step
        topo = v2_topology(spacing, patch, k.min_edge)
        estimate = _estimate(topo, dims, preset, k, outputs)
    batch = round(reference / estimate * reference_batch)
    covered = round(dataset_voxels * preset.max_dataset_covered / np.prod(topo.patch_size, dtype=np.float64))
    batch = max(min(batch, covered), k.min_batch_size)
    return _Sized(topo, estimate, batch, reference_raw / preset.reference_gb, reference_batch)


def _normalization(fp: Fingerprint, k: V2Constants) -> list[ChannelNormalization]:
    median_fraction = float(np.median([c.crop_voxel_fraction for c in fp.cases]))
    return channel_normalizations(
        fp, lambda scheme: scheme == "zscore" and median_fraction < k.nonzero_mask_max_crop_fraction
    )


def _plan(
    name: str,
    identifier: str,
    spacing3: np.ndarray,
    median3: np.ndarray,
    dims: int,
    sized: _Sized,
    preset: V2Preset,
    k: V2Constants,
    common: dict,
) -> ConfigurationPlan:
    topo = sized.topology
    encoder, decoder = _blocks(topo.num_stages, preset, k)
    network: dict = {"downsampling": "strided_conv", "decoder_convs_per_stage": preset.decoder_convs}
    if preset.residual:
        network["encoder_blocks_per_stage"] = encoder
    patch = [int(p) for p in topo.patch_size]
    memory = sized.estimate * sized.batch_size / sized.reference_batch / sized.reference
    return ConfigurationPlan(
        name=name,
        network_dims=dims,
        data_identifier=identifier,
        spacing=[float(s) for s in spacing3],
        median_shape=[int(round(float(s))) for s in median3],
        patch_size=patch,
        batch_size=int(sized.batch_size),
        num_pool_per_axis=list(topo.num_pool_per_axis),
        pool_op_kernel_sizes=[list(s) for s in topo.strides[1:]],
        conv_kernel_sizes=[list(c) for c in topo.conv_kernel_sizes],
        features_per_stage=_features(topo.num_stages, dims, k),
        batch_dice=True,
        in_plane_augmentation=dims == 3 and max(patch) / patch[0] > k.anisotropy_threshold,
        network=network,
        training_preset="poly",
        feature_map_voxels=int(sized.estimate),
        estimated_memory_gb=round(float(memory), 3),
        **copy.deepcopy(common),
    )


def plan_v2(
    fp: Fingerprint, recipe: str = "nnunetv2", gpu_memory_target_gb: float | None = None, k: V2Constants | None = None
) -> Plans:
    """Plans of nnU-Net v2's planner ``recipe`` (a key of :data:`PRESETS`) from a fingerprint."""
    k = k or V2Constants()
    if recipe not in PRESETS:
        raise AutounetError(f"unknown nnU-Net v2 recipe {recipe!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[recipe]
    memory = float(preset.default_gb if gpu_memory_target_gb is None else gpu_memory_target_gb)
    if not (math.isfinite(memory) and memory > 0):
        raise AutounetError(f"--gpu-memory-target must be a positive number of GB, got {gpu_memory_target_gb}")
    _validate(fp)
    target = v2_target_spacing(fp, k.anisotropy_threshold)
    forward = [int(np.argmax(target))] + [a for a in range(3) if a != int(np.argmax(target))]
    backward = [forward.index(a) for a in range(3)]
    spacing = target[forward]
    median = resampled_median_shape(fp, target)[forward]
    dataset_voxels = float(np.prod(median, dtype=np.float64) * fp.num_cases)
    outputs = len(fp.labels)  # nnU-Net counts every label of dataset.json, the ignore label too
    classes = without_ignore(fp.labels)
    common = {
        "transpose_forward": forward,
        "transpose_backward": backward,
        "normalization": _normalization(fp, k),
        "resampling": ResamplingPlan(anisotropy_threshold=k.anisotropy_threshold),
        "num_input_channels": fp.num_channels,
        "num_classes": len(classes),
        "ignore_label": ignore_label_of(fp.labels),
    }
    shared = preset.residual  # ResEnc reuses the default plans' 2d / 3d_fullres data

    def ident(name: str) -> str:
        return name if name != "3d_lowres" or not shared else f"{recipe}_{name}"

    configs: dict[str, ConfigurationPlan] = {}
    notes = [
        f"{recipe}: nnU-Net v2's {preset.nnunet_planner} with a {memory:g} GB memory target "
        f"(reference {preset.reference_gb:g} GB)."
    ]
    sized2 = size_configuration(spacing[1:], median[1:], dataset_voxels, preset, memory, outputs, k)
    configs["2d"] = _plan("2d", ident("2d"), spacing, median, 2, sized2, preset, k, common)
    if median[0] == 1:
        notes.append("3D configurations skipped: the median case has a single slice (2D data).")
    else:
        full_sized = size_configuration(spacing, median, dataset_voxels, preset, memory, outputs, k)
        full = _plan("3d_fullres", ident("3d_fullres"), spacing, median, 3, full_sized, preset, k, common)
        low = _lowres(spacing, median, full_sized, fp.num_cases, preset, memory, outputs, k)
        if low is not None:
            low_spacing, low_median, low_sized = low
            lowres = _plan("3d_lowres", ident("3d_lowres"), low_spacing, low_median, 3, low_sized, preset, k, common)
            lowres.batch_dice = False
            lowres.next_stage = "3d_cascade_fullres"
            configs["3d_lowres"] = lowres
            configs["3d_fullres"] = full
            configs["3d_cascade_fullres"] = replace(
                copy.deepcopy(full),
                name="3d_cascade_fullres",
                previous_stage="3d_lowres",
                num_input_channels=fp.num_channels + len(classes) - 1,
            )
            notes.append(f"cascade planned: low-res spacing {tuple(round(float(s), 4) for s in low_spacing)} mm.")
        else:
            full.batch_dice = False
            configs["3d_fullres"] = full
            notes.append("no cascade: the full-resolution patch covers enough of the median case.")
    return Plans(
        dataset_name=fp.dataset_name,
        planner=f"nnunetv2-{preset.nnunet_planner}",
        channel_names=list(fp.channel_names),
        labels=dict(classes),
        original_median_spacing=[float(s) for s in np.median(fp.spacings(), axis=0)],
        original_median_shape=[int(round(float(s))) for s in np.median(fp.shapes_after_crop(), axis=0)],
        configurations=configs,
        notes=notes,
        recipe=recipe,
        gpu_memory_target_gb=memory,
    )


def _lowres(
    spacing: np.ndarray,
    median: np.ndarray,
    full: _Sized,
    num_cases: int,
    preset: V2Preset,
    memory: float,
    outputs: int,
    k: V2Constants,
) -> tuple[np.ndarray, np.ndarray, _Sized] | None:
    """The ``3d_lowres`` spacing, median shape and sizing, or None when v2 plans none."""
    median_voxels = float(np.prod(median, dtype=np.float64))
    patch_voxels = float(np.prod(full.topology.patch_size, dtype=np.float64))
    low_spacing = np.asarray(spacing, dtype=float).copy()
    sized, low_median = None, median
    while patch_voxels / median_voxels < k.lowres_patch_fraction:
        fine = low_spacing.max() / low_spacing > 2
        if np.any(fine):
            low_spacing[fine] *= k.lowres_spacing_step
        else:
            low_spacing *= k.lowres_spacing_step
        scaled = spacing / low_spacing * median
        median_voxels = float(np.prod(scaled, dtype=np.float64))
        low_median = np.asarray([round(float(v)) for v in scaled], dtype=float)
        sized = size_configuration(low_spacing, low_median, median_voxels * num_cases, preset, memory, outputs, k)
        patch_voxels = float(np.prod(sized.topology.patch_size, dtype=np.float64))
    if sized is None or float(np.prod(median, dtype=np.float64)) / median_voxels < k.lowres_min_shrink:
        return None
    return low_spacing, low_median, sized
