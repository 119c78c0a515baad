"""Intensity augmentation of a batch ``(B, C, *S)`` float32, in place where possible, on its device.

Each transform draws whether it applies per sample (and per channel where the preset says so)
and its parameters per sample and channel; unchosen samples are left untouched exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autounet.training.augmentation.preset import AugmentationPreset
from autounet.training.augmentation.spatial import gaussian_smooth
from autounet.training.augmentation.sync import kernel_sigma, nothing_chosen


def _per_channel(x: torch.Tensor, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    b, c = x.shape[:2]
    return (low + (high - low) * torch.rand((b, c), generator=gen, device=x.device)).reshape(
        b, c, *([1] * (x.ndim - 2))
    )


def _chosen(x: torch.Tensor, p: float, gen: torch.Generator, p_per_channel: float = 1.0) -> torch.Tensor:
    """(B, C, 1, ...) boolean: sample chosen with ``p``, then each of its channels with ``p_per_channel``."""
    b, c = x.shape[:2]
    sample = torch.rand((b, 1), generator=gen, device=x.device) < p
    channel = torch.rand((b, c), generator=gen, device=x.device) < p_per_channel
    return (sample & channel).reshape(b, c, *([1] * (x.ndim - 2)))


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dims = tuple(range(2, x.ndim))
    return x.mean(dims, keepdim=True), x.std(dims, keepdim=True), x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)


def gaussian_noise(x: torch.Tensor, preset: AugmentationPreset, gen: torch.Generator) -> torch.Tensor:
    chosen = _chosen(x, preset.noise.p, gen)
    if nothing_chosen(chosen):
        return x
    std = _per_channel(x[:, :1], preset.noise.std[0], preset.noise.std[1], gen)  # one std per sample
    noise = torch.randn(x.shape, generator=gen, device=x.device) * std
    return x + noise * chosen


def gaussian_blur(x: torch.Tensor, preset: AugmentationPreset, gen: torch.Generator) -> torch.Tensor:
    chosen = _chosen(x, preset.blur.p, gen, preset.blur.p_per_channel)
    if nothing_chosen(chosen):
        return x
    sigma = _per_channel(x, preset.blur.sigma[0], preset.blur.sigma[1], gen) * chosen
    size_for = kernel_sigma(sigma, preset.blur.sigma[1])
    return gaussian_smooth(x, sigma.flatten(), range(x.ndim - 2), padding="replicate", kernel_sigma=size_for)


def brightness(x: torch.Tensor, preset: AugmentationPreset, gen: torch.Generator) -> torch.Tensor:
    chosen = _chosen(x, preset.brightness.p, gen)
    factor = _per_channel(x, preset.brightness.range[0], preset.brightness.range[1], gen)
    return torch.where(chosen, x * factor, x)


def contrast(x: torch.Tensor, preset: AugmentationPreset, gen: torch.Generator) -> torch.Tensor:
    chosen = _chosen(x, preset.contrast.p, gen)
    if nothing_chosen(chosen):
        return x
    factor = _per_channel(x, preset.contrast.range[0], preset.contrast.range[1], gen)
    mean, _, lo, hi = _stats(x)
    out = (x - mean) * factor + mean if preset.contrast.around_mean else x * factor
    if preset.contrast.preserve_range:
        out = torch.maximum(torch.minimum(out, hi), lo)
    return torch.where(chosen, out, x)


def low_resolution(x: torch.Tensor, preset: AugmentationPreset, gen: torch.Generator) -> torch.Tensor:
    """Down-sample (nearest) by a zoom in [low, high] and up-sample back (linear), per chosen channel."""
    chosen = _chosen(x, preset.low_resolution.p, gen, preset.low_resolution.p_per_channel)
    if nothing_chosen(chosen):
        return x
    zoom = _per_channel(x, preset.low_resolution.zoom[0], preset.low_resolution.zoom[1], gen)
    out = x.clone()
    spatial = x.shape[2:]
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    # the down-sampled sizes are host integers: one read-back of the draws (not one per channel)
    zooms = zoom.reshape(x.shape[:2]).cpu()
    for b, c in torch.nonzero(chosen.reshape(x.shape[:2]).cpu()).tolist():
        small = [max(1, round(s * float(zooms[b, c]))) for s in spatial]
        low = F.interpolate(x[b : b + 1, c : c + 1], size=small, mode="nearest-exact")
        out[b, c] = F.interpolate(low, size=spatial, mode=mode, align_corners=False)[0, 0]
    return out


def gamma(x: torch.Tensor, preset: AugmentationPreset, gen: torch.Generator) -> torch.Tensor:
    """``((x - min) / range) ** gamma * range + min`` per channel, optionally on the inverted image,
    optionally restoring the channel's mean and std."""
    chosen = _chosen(x, preset.gamma.p, gen)
    if nothing_chosen(chosen):
        return x
    g = _per_channel(x, preset.gamma.range[0], preset.gamma.range[1], gen)
    invert = torch.where(_chosen(x[:, :1], preset.gamma.p_invert, gen), -1.0, 1.0)  # per sample
    y = x * invert
    mean, std, lo, hi = _stats(y)
    span = (hi - lo).clamp_min(1e-7)
    out = ((y - lo) / span).clamp_min(0) ** g * span + lo
    if preset.gamma.retain_stats:
        new_mean, new_std, _, _ = _stats(out)
        out = (out - new_mean) / new_std.clamp_min(1e-7) * std + mean
    return torch.where(chosen, out * invert, x)


def apply_intensity(x: torch.Tensor, preset: AugmentationPreset, gen: torch.Generator) -> torch.Tensor:
    """Noise, blur, brightness, contrast, low resolution, gamma (the public nnU-Net's order)."""
    for transform in (gaussian_noise, gaussian_blur, brightness, contrast, low_resolution, gamma):
        x = transform(x, preset, gen)
    return x
