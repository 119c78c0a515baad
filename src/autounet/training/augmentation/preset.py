"""Augmentation presets: the schema, and loading by name (``presets/augmentation/NAME.json``) or path.

Every probability is per sample (``p_per_channel`` then per channel of a chosen sample);
ranges are ``[low, high]`` sampled uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autounet import presets
from autounet.errors import AutounetError

PRESET_SCHEMA_VERSION = 1


@dataclass
class ForegroundSampling:
    mode: str  # "batch_fraction": that fraction of every batch (rounded up) is foreground-centred;
    #            "probability": each sample is, with that probability (seed 004's biased crop)
    value: float


@dataclass
class Rotation:
    p: float
    degrees_3d: list[float]  # about each axis of a 3D patch
    degrees_2d: list[float]  # in-plane (2D patches, and 3D patches augmented slice-wise)


@dataclass
class Scaling:
    p: float
    range: list[float]  # coordinate scale: > 1 samples a larger region (zoom out), < 1 zooms in


@dataclass
class Elastic:
    p: float
    alpha_3d: list[float]  # displacement magnitude (voxels before smoothing)
    sigma_3d: list[float]  # smoothing of the random displacement field (voxels)
    alpha_2d: list[float]
    sigma_2d: list[float]


@dataclass
class Mirror:
    p_per_axis: float


@dataclass
class Gamma:
    p: float
    range: list[float]
    p_invert: float  # of the gamma applications, this share works on the inverted image
    retain_stats: bool  # restore each channel's mean and std afterwards


@dataclass
class Multiplier:
    p: float
    range: list[float]


@dataclass
class Contrast:
    p: float
    range: list[float]
    preserve_range: bool  # clip to the channel's original min/max
    around_mean: bool  # scale deviations from the channel mean (nnU-Net) or the values themselves (seed 004)


@dataclass
class Noise:
    p: float
    std: list[float]


@dataclass
class Blur:
    p: float
    sigma: list[float]
    p_per_channel: float


@dataclass
class LowResolution:
    p: float
    zoom: list[float]
    p_per_channel: float


@dataclass
class CascadePerturbation:
    """Perturbation of the previous stage's one-hot channels (seed 001 §2.3)."""

    p_morphology: float  # random erosion / dilation / opening / closing, per class channel
    radius: list[int]
    p_remove_component: float  # remove one random connected component, per class channel
    max_component_fraction: float  # ... only if it covers at most this fraction of the patch


@dataclass
class AugmentationPreset:
    name: str
    description: str
    foreground: ForegroundSampling
    rotation: Rotation
    scaling: Scaling
    elastic: Elastic
    mirror: Mirror
    gamma: Gamma
    brightness: Multiplier
    contrast: Contrast
    noise: Noise
    blur: Blur
    low_resolution: LowResolution
    cascade: CascadePerturbation
    schema_version: int = PRESET_SCHEMA_VERSION

    def validate(self) -> None:
        probabilities = {
            "foreground.value": self.foreground.value,
            "rotation.p": self.rotation.p,
            "scaling.p": self.scaling.p,
            "elastic.p": self.elastic.p,
            "mirror.p_per_axis": self.mirror.p_per_axis,
            "gamma.p": self.gamma.p,
            "gamma.p_invert": self.gamma.p_invert,
            "brightness.p": self.brightness.p,
            "contrast.p": self.contrast.p,
            "noise.p": self.noise.p,
            "blur.p": self.blur.p,
            "blur.p_per_channel": self.blur.p_per_channel,
            "low_resolution.p": self.low_resolution.p,
            "low_resolution.p_per_channel": self.low_resolution.p_per_channel,
            "cascade.p_morphology": self.cascade.p_morphology,
            "cascade.p_remove_component": self.cascade.p_remove_component,
        }
        for key, p in probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise AutounetError(f"augmentation preset {self.name}: {key} = {p} is not a probability")
        if self.foreground.mode not in ("batch_fraction", "probability"):
            raise AutounetError(
                f"augmentation preset {self.name}: foreground.mode must be batch_fraction or probability"
            )
        ranges = {
            "rotation.degrees_3d": self.rotation.degrees_3d,
            "rotation.degrees_2d": self.rotation.degrees_2d,
            "scaling.range": self.scaling.range,
            "elastic.alpha_3d": self.elastic.alpha_3d,
            "elastic.sigma_3d": self.elastic.sigma_3d,
            "elastic.alpha_2d": self.elastic.alpha_2d,
            "elastic.sigma_2d": self.elastic.sigma_2d,
            "gamma.range": self.gamma.range,
            "brightness.range": self.brightness.range,
            "contrast.range": self.contrast.range,
            "noise.std": self.noise.std,
            "blur.sigma": self.blur.sigma,
            "low_resolution.zoom": self.low_resolution.zoom,
            "cascade.radius": self.cascade.radius,
        }
        for key, r in ranges.items():
            if len(r) != 2 or r[0] > r[1]:
                raise AutounetError(f"augmentation preset {self.name}: {key} must be [low, high], got {r}")
        if self.scaling.range[0] <= 0 or self.gamma.range[0] <= 0 or min(self.low_resolution.zoom) <= 0:
            raise AutounetError(f"augmentation preset {self.name}: scales, gammas and zooms must be positive")


def preset_names() -> list[str]:
    return presets.names("augmentation")


def load_augmentation_preset(name_or_path: str | Path) -> AugmentationPreset:
    """A built-in preset by name (``paper``, ``extended``, ``nvidia``) or a JSON file."""
    return presets.load("augmentation", name_or_path, AugmentationPreset, PRESET_SCHEMA_VERSION)
