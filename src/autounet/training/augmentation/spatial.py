"""Spatial augmentation as one sampling grid and one ``grid_sample`` per batch.

The sampler reads a patch somewhat larger than the network's (the *sample size*, enough for the
largest rotation and scaling of the preset). For each sample an affine map (mirroring, rotation,
scaling) plus an optional smooth elastic displacement takes the output patch's voxel coordinates
to coordinates in the sample; one ``grid_sample`` then crops and transforms the whole batch at
once: images with linear interpolation, labels with nearest neighbour. Coordinates are in voxels
of the patch (as in the public nnU-Net), axes in array order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from autounet.training.augmentation.preset import AugmentationPreset
from autounet.training.augmentation.sync import kernel_sigma, nothing_chosen


def _rotation(axis_angles: Sequence[float], dims: int) -> np.ndarray:
    """Rotation about array axes 0, 1, 2 (3D, applied in that order) or in the plane (2D)."""
    if dims == 2:
        (a,) = axis_angles
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    out = np.eye(3)
    for axis, a in enumerate(axis_angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def _rotation_plan(dims: int, in_plane: bool, preset: AugmentationPreset) -> tuple[list[int], float]:
    """Axes rotated about, and the largest angle (radians)."""
    if dims == 2:
        return [0], math.radians(max(abs(a) for a in preset.rotation.degrees_2d))
    if in_plane:
        return [0], math.radians(max(abs(a) for a in preset.rotation.degrees_2d))
    return [0, 1, 2], math.radians(max(abs(a) for a in preset.rotation.degrees_3d))


def sample_size(patch: Sequence[int], preset: AugmentationPreset, in_plane: bool = False) -> list[int]:
    """Size of the region to read so that the largest rotation and scaling stay inside it."""
    dims = len(patch)
    extent = np.asarray(patch, dtype=float)
    if preset.rotation.p > 0:
        axes, max_angle = _rotation_plan(dims, in_plane, preset)
        corners = np.array(list(itertools.product(*[(-p / 2, p / 2) for p in patch])))
        angles = np.linspace(-max_angle, max_angle, 25)
        for combo in itertools.product(angles, repeat=len(axes)):
            full = [0.0] * (1 if dims == 2 else 3)
            for ax, a in zip(axes, combo):
                full[ax] = a
            if dims == 3 and in_plane:
                r = np.eye(3)
                r[1:, 1:] = _rotation([full[0]], 2)
            else:
                r = _rotation(full, dims)
            rotated = corners @ r.T
            extent = np.maximum(extent, rotated.max(0) - rotated.min(0))
    if preset.scaling.p > 0:
        scale = max(1.0, preset.scaling.range[1])
        if dims == 3 and in_plane:
            extent[1:] *= scale
        else:
            extent *= scale
    size = [max(int(p), int(math.ceil(e - 1e-6))) for p, e in zip(patch, extent)]
    # Same parity as the patch, so that the patch sits exactly (not half a voxel off) in the middle.
    return [s + (s - p) % 2 for s, p in zip(size, patch)]


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def _chosen(n: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < p


def _plane_rotations(angles: torch.Tensor, dims: int, i: int, j: int) -> torch.Tensor:
    """(B, d, d) rotations by ``angles`` (B,) in the plane of axes ``i`` and ``j``."""
    r = torch.eye(dims, device=angles.device).repeat(angles.shape[0], 1, 1)
    c, s = torch.cos(angles), torch.sin(angles)
    r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
    return r


def affine_matrices(
    batch: int, dims: int, in_plane: bool, preset: AugmentationPreset, gen: torch.Generator, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample matrices (B, d, d) for mirror, rotation and scaling, and which samples are warped
    (rotation or scaling applied; mirroring alone needs no interpolation). Built with batched
    tensor operations: no per-sample synchronisation with the device."""
    mirror = torch.where(_chosen(batch * dims, preset.mirror.p_per_axis, gen, device), -1.0, 1.0).reshape(batch, dims)
    rotate = _chosen(batch, preset.rotation.p, gen, device)
    scale = _chosen(batch, preset.scaling.p, gen, device)
    axes, _ = _rotation_plan(dims, in_plane, preset)
    degrees = preset.rotation.degrees_2d if (dims == 2 or in_plane) else preset.rotation.degrees_3d
    angles = torch.deg2rad(_uniform(batch * len(axes), degrees[0], degrees[1], gen, device)).reshape(batch, len(axes))
    angles = angles * rotate[:, None]  # angle 0: no rotation
    factors = _uniform(batch, preset.scaling.range[0], preset.scaling.range[1], gen, device)
    factors = torch.where(scale, factors, torch.ones_like(factors))
    m = torch.diag_embed(mirror)
    if dims == 2:
        m = _plane_rotations(angles[:, 0], 2, 0, 1) @ m
    elif in_plane:
        m = _plane_rotations(angles[:, 0], 3, 1, 2) @ m
    else:
        for axis in range(3):  # about axis 0, then 1, then 2 (as in _rotation)
            i, j = [k for k in range(3) if k != axis]
            m = _plane_rotations(angles[:, axis], 3, i, j) @ m
    s = factors[:, None].expand(batch, dims).clone()
    if dims == 3 and in_plane:
        s[:, 0] = 1.0
    return torch.diag_embed(s) @ m, rotate | scale


def gaussian_kernels(sigmas: torch.Tensor, truncate: float = 4.0, kernel_sigma: float | None = None) -> torch.Tensor:
    """1D Gaussian kernels (N, k), one per sigma (sigma 0: identity), of one common length: ``truncate``
    times the largest sigma, or ``kernel_sigma`` when given (no read-back of ``sigmas``)."""
    if kernel_sigma is None:
        kernel_sigma = float(sigmas.max()) if sigmas.numel() else 0.0
    radius = max(1, int(math.ceil(truncate * kernel_sigma)))
    x = torch.arange(-radius, radius + 1, device=sigmas.device, dtype=torch.float32)
    s = sigmas.float().clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (x[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)
    identity = torch.zeros_like(k)
    identity[:, radius] = 1.0
    return torch.where((sigmas > 0)[:, None], k, identity)


def gaussian_smooth(
    x: torch.Tensor,
    sigmas: torch.Tensor,
    axes: Sequence[int],
    padding: str = "zeros",
    kernel_sigma: float | None = None,
) -> torch.Tensor:
    """Smooth each channel of ``x`` (N, C, *S) with its own sigma ``sigmas`` (N*C,) along ``axes``
    (spatial axis indices), as separable depthwise convolutions (``kernel_sigma``: see
    :func:`gaussian_kernels`)."""
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    kernels = gaussian_kernels(sigmas, kernel_sigma=kernel_sigma)
    k = kernels.shape[1]
    flat = x.reshape(1, n * c, *spatial)
    conv = F.conv3d if len(spatial) == 3 else F.conv2d
    for axis in axes:
        shape = [1] * len(spatial)
        shape[axis] = k
        weight = kernels.reshape(n * c, 1, *shape)
        pad = [0] * (2 * len(spatial))
        pad[2 * (len(spatial) - 1 - axis)] = pad[2 * (len(spatial) - 1 - axis) + 1] = k // 2
        flat = F.pad(flat, pad, mode="constant" if padding == "zeros" else "replicate")
        flat = conv(flat, weight, groups=n * c)
    return flat.reshape(n, c, *spatial)


def elastic_displacement(
    batch: int, patch: Sequence[int], in_plane: bool, preset: AugmentationPreset, gen: torch.Generator, device
) -> torch.Tensor | None:
    """Smooth random displacements (B, d, *patch) in voxels, zero for samples not deformed; None if none is."""
    dims = len(patch)
    chosen = _chosen(batch, preset.elastic.p, gen, device)
    if preset.elastic.p <= 0 or nothing_chosen(chosen):
        return None
    two_d = dims == 2 or in_plane
    alpha_r = preset.elastic.alpha_2d if two_d else preset.elastic.alpha_3d
    sigma_r = preset.elastic.sigma_2d if two_d else preset.elastic.sigma_3d
    # on the CPU only the chosen samples are deformed; on a GPU every sample is, then masked
    idx = torch.nonzero(chosen).flatten() if chosen.device.type == "cpu" else torch.arange(batch, device=device)
    m = idx.numel()
    alpha = _uniform(m, alpha_r[0], alpha_r[1], gen, device)
    sigma = _uniform(m, sigma_r[0], sigma_r[1], gen, device)
    field_shape = list(patch[1:]) if (dims == 3 and in_plane) else list(patch)
    components = len(field_shape)
    noise = torch.rand((m, components, *field_shape), generator=gen, device=device) * 2 - 1
    sigmas = sigma.repeat_interleave(components)
    smooth = gaussian_smooth(
        noise, sigmas, range(len(field_shape)), padding="zeros", kernel_sigma=kernel_sigma(sigmas, sigma_r[1])
    )
    smooth = smooth * alpha.reshape(m, *([1] * (1 + len(field_shape))))
    if chosen.device.type != "cpu":
        smooth = smooth * chosen.reshape(m, *([1] * (1 + len(field_shape))))
    out = torch.zeros((batch, dims, *patch), device=device)
    if dims == 3 and in_plane:
        out[idx, 1:] = smooth[:, :, None].expand(-1, -1, patch[0], -1, -1)
    else:
        out[idx] = smooth
    return out


def sampling_grid(
    matrices: torch.Tensor, displacement: torch.Tensor | None, patch: Sequence[int], sample: Sequence[int]
) -> torch.Tensor:
    """``grid_sample`` grid (B, *patch, d) mapping output voxels into the sample (align_corners=True)."""
    device = matrices.device
    axes = [torch.arange(p, device=device, dtype=torch.float32) - (p - 1) / 2 for p in patch]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*patch, d)
    coords = torch.einsum("bij,...j->b...i", matrices, coords)
    if displacement is not None:
        coords = coords + displacement.movedim(1, -1)
    size = torch.tensor(sample, device=device, dtype=torch.float32)
    coords = coords + (size - 1) / 2
    normalized = torch.where(size > 1, coords / (size - 1).clamp_min(1) * 2 - 1, torch.zeros_like(coords))
    return normalized.flip(-1)  # grid_sample wants (x, y, z): the reversed array axis order


def center_crop(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    index = [slice(None), slice(None)]
    for s, p in zip(x.shape[2:], patch):
        start = (s - p) // 2
        index.append(slice(start, start + p))
    return x[tuple(index)]


def apply_spatial(
    image: torch.Tensor,
    seg: torch.Tensor,
    patch: Sequence[int],
    preset: AugmentationPreset,
    in_plane: bool,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop the samples (B, C, *sample) to ``patch`` with the preset's spatial augmentation.

    When no sample of the batch is rotated, scaled or deformed, the crop and the mirroring are
    done by indexing (exact, and cheaper than interpolation).
    """
    batch, dims, device = image.shape[0], len(patch), image.device
    matrices, warped = affine_matrices(batch, dims, in_plane, preset, gen, device)
    displacement = elastic_displacement(batch, patch, in_plane, preset, gen, device)
    if displacement is None and nothing_chosen(warped):
        image, seg = center_crop(image, patch), center_crop(seg, patch)
        flips = torch.diagonal(matrices, dim1=1, dim2=2) < 0
        for a in range(dims):  # each axis flipped for the samples that drew it
            chosen = flips[:, a].reshape(batch, *([1] * (image.ndim - 1)))
            image = torch.where(chosen, torch.flip(image, [2 + a]), image)
            seg = torch.where(chosen, torch.flip(seg, [2 + a]), seg)
        return image, seg
    grid = sampling_grid(matrices, displacement, patch, image.shape[2:])
    out_image = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out_seg = F.grid_sample(seg.float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return out_image, out_seg.round().to(seg.dtype)
