"""The augmentation pipeline: spatial (one grid) -> intensity -> cascade morphology, on one device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from autounet.training.augmentation.cascade import morphology
from autounet.training.augmentation.intensity import apply_intensity
from autounet.training.augmentation.preset import AugmentationPreset
from autounet.training.augmentation.spatial import apply_spatial, sample_size


class Augmenter:
    """Augments batches of samples read by the sampler into network-ready patches.

    ``in_plane``: 3D patches whose longest edge is more than twice the shortest are rotated,
    scaled and deformed in-plane only (slice-wise), as seed 001 §2.3 prescribes.
    ``image_channels``: channels after these get no intensity augmentation; the next
    ``passthrough_channels`` (seed 004's one-hot foreground channel) only the spatial transform,
    the rest (the previous cascade stage's one-hot maps) random morphology too.
    """

    def __init__(
        self,
        preset: AugmentationPreset,
        patch_size: Sequence[int],
        in_plane: bool = False,
        image_channels: int | None = None,
        device: str | torch.device = "cpu",
        passthrough_channels: int = 0,
    ):
        preset.validate()
        self.preset = preset
        self.patch_size = list(patch_size)
        self.in_plane = bool(in_plane) and len(patch_size) == 3
        self.image_channels = image_channels
        self.passthrough_channels = int(passthrough_channels)
        self.device = torch.device(device)
        self.sample_size = sample_size(self.patch_size, preset, self.in_plane)

    def __call__(self, image: torch.Tensor, seg: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` (B, C, *sample_size), ``seg`` (B, 1, *sample_size) -> (B, C, *patch), (B, 1, *patch)."""
        if list(image.shape[2:]) != self.sample_size:
            raise ValueError(f"samples of shape {list(image.shape[2:])}; this augmenter expects {self.sample_size}")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        image = image.to(self.device, non_blocking=True).float()
        seg = seg.to(self.device, non_blocking=True)
        image, seg = apply_spatial(image, seg, self.patch_size, self.preset, self.in_plane, gen)
        n = image.shape[1] if self.image_channels is None else self.image_channels
        out = apply_intensity(image[:, :n], self.preset, gen)
        m = min(image.shape[1], n + self.passthrough_channels)
        parts = [out]
        if m > n:
            parts.append(image[:, n:m])
        if m < image.shape[1]:
            parts.append(morphology(image[:, m:], 0, self.preset, gen))
        out = torch.cat(parts, dim=1) if len(parts) > 1 else out
        return out.contiguous(), seg.contiguous()
