import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autounet.errors import AutounetError
from autounet.training.augmentation import intensity as I
from autounet.training.augmentation.cascade import morphology, remove_random_component
from autounet.training.augmentation.pipeline import Augmenter
from autounet.training.augmentation.preset import AugmentationPreset, load_augmentation_preset, preset_names
from autounet.training.augmentation.spatial import affine_matrices, apply_spatial, sample_size, sampling_grid

PAPER = load_augmentation_preset("paper")


def only(preset: AugmentationPreset, **probabilities) -> AugmentationPreset:
    """The preset with every probability 0 except those given (field -> p)."""
    fields = {}
    for f in dataclasses.fields(preset):
        value = getattr(preset, f.name)
        if dataclasses.is_dataclass(value):
            changes = {k: 0.0 for k in ("p", "p_per_axis", "p_morphology", "p_remove_component") if hasattr(value, k)}
            changes.update(probabilities.get(f.name, {}))
            fields[f.name] = dataclasses.replace(value, **changes)
    return dataclasses.replace(preset, **fields)


NOTHING = only(PAPER)


def labelled_blocks(batch=3, shape=(24, 28, 20), classes=4, seed=0, block=4):
    """A label map of blocks and an image whose intensity equals the label."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (batch, 1, *[max(1, s // block) for s in shape]), generator=g)
    seg = F.interpolate(coarse.float(), size=shape, mode="nearest").to(torch.uint8)
    return seg.float(), seg


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("patch", [[16, 20, 12], [20, 16]])
def test_probability_zero_is_the_identity_crop(patch):
    image, seg = labelled_blocks(shape=[p + 6 for p in patch])
    image = image + torch.randn(image.shape)
    aug = Augmenter(NOTHING, patch)
    assert aug.sample_size == patch
    out_image, out_seg = apply_spatial(image, seg, patch, NOTHING, False, gen())
    crop = tuple([slice(None), slice(None)] + [slice(3, 3 + p) for p in patch])
    assert torch.equal(out_image, image[crop]) and torch.equal(out_seg, seg[crop])
    small = tuple([slice(None), slice(None)] + [slice(0, p) for p in patch])
    a, b = aug(image[small], seg[small], seed=1)
    assert torch.equal(a, image[small]) and torch.equal(b, seg[small])


@pytest.mark.parametrize(
    "enabled",
    [
        {"rotation": {"p": 1.0}},
        {"scaling": {"p": 1.0}},
        {"elastic": {"p": 1.0}},
        {"mirror": {"p_per_axis": 0.5}},
        {"gamma": {"p": 1.0}},
        {"brightness": {"p": 1.0}},
        {"contrast": {"p": 1.0}},
        {"noise": {"p": 1.0}},
        {"blur": {"p": 1.0, "p_per_channel": 1.0}},
        {"low_resolution": {"p": 1.0, "p_per_channel": 1.0}},
    ],
)
def test_every_transform_preserves_label_values(enabled):
    preset = only(PAPER, **enabled)
    patch = [16, 20, 12]
    aug = Augmenter(preset, patch)
    image, seg = labelled_blocks(shape=aug.sample_size)
    out_image, out_seg = aug(image, seg, seed=3)
    assert out_seg.dtype == torch.uint8 and out_image.shape[2:] == out_seg.shape[2:] == torch.Size(patch)
    assert set(out_seg.unique().tolist()) <= set(seg.unique().tolist())
    assert torch.isfinite(out_image).all()


def test_image_and_label_stay_aligned_under_the_spatial_transform():
    preset = only(PAPER, rotation={"p": 1.0}, scaling={"p": 1.0}, elastic={"p": 1.0}, mirror={"p_per_axis": 0.5})
    patch = [20, 24, 16]
    size = sample_size(patch, preset)
    image, seg = labelled_blocks(batch=4, shape=size)
    # the same grid with nearest interpolation for both: exactly equal
    g = gen(5)
    from autounet.training.augmentation.spatial import elastic_displacement

    matrices, _ = affine_matrices(4, 3, False, preset, g, "cpu")
    grid = sampling_grid(matrices, elastic_displacement(4, patch, False, preset, g, "cpu"), patch, size)
    nearest = F.grid_sample(image, grid, mode="nearest", align_corners=True)
    labels = F.grid_sample(seg.float(), grid, mode="nearest", align_corners=True)
    assert torch.equal(nearest, labels)
    # through the augmenter (linear for the image): for a binary label, nearly every voxel agrees
    image, seg = labelled_blocks(batch=4, shape=size, classes=2, block=6)
    out_image, out_seg = apply_spatial(image, seg, patch, preset, False, gen(6))
    agree = (out_image.round() == out_seg.float()).float().mean().item()
    assert agree > 0.95


def test_mirroring_twice_is_the_identity():
    patch = [12, 10, 8]
    image = torch.randn(2, 2, *patch)
    flip = torch.diag(torch.tensor([-1.0, 1.0, -1.0])).repeat(2, 1, 1)
    grid = sampling_grid(flip, None, patch, patch)
    once = F.grid_sample(image, grid, mode="nearest", align_corners=True)
    assert torch.equal(once, torch.flip(image, [2, 4]))
    assert torch.equal(F.grid_sample(once, grid, mode="nearest", align_corners=True), image)
    preset = only(PAPER, mirror={"p_per_axis": 1.0})
    a, _ = apply_spatial(image, image[:, :1].to(torch.uint8), patch, preset, False, gen())
    b, _ = apply_spatial(a, image[:, :1].to(torch.uint8), patch, preset, False, gen())
    assert torch.equal(b, image)


def test_in_plane_augmentation_never_moves_voxels_between_slices():
    preset = only(PAPER, rotation={"p": 1.0}, scaling={"p": 1.0}, elastic={"p": 1.0})
    patch = [6, 32, 32]
    size = sample_size(patch, preset, in_plane=True)
    assert size[0] == 6 and size[1] > 32
    z = torch.arange(6, dtype=torch.float32).reshape(1, 1, 6, 1, 1).expand(2, 1, 6, *size[1:]).contiguous()
    out, _ = apply_spatial(z, torch.zeros_like(z, dtype=torch.uint8), patch, preset, True, gen(2))
    inside = out != 0  # padding outside the rotated region is 0
    expected = torch.arange(6, dtype=torch.float32).reshape(1, 1, 6, 1, 1).expand_as(out)
    assert torch.allclose(out[inside], expected[inside], atol=1e-4)


def test_sample_size_leaves_room_for_rotation_and_scaling_with_the_patch_parity():
    assert sample_size([40, 56, 40], NOTHING) == [40, 56, 40]
    size = sample_size([40, 56, 40], PAPER)
    assert all(s >= p and (s - p) % 2 == 0 for s, p in zip(size, [40, 56, 40]))
    assert size[1] >= 56 * PAPER.scaling.range[1]


def test_intensity_transforms_do_what_they_say():
    g = gen(0)
    x = torch.randn(4, 2, 10, 12, 14) * 3 + 5
    gamma = I.gamma(x.clone(), only(PAPER, gamma={"p": 1.0}), g)
    assert torch.allclose(gamma.mean((2, 3, 4)), x.mean((2, 3, 4)), atol=1e-3)  # stats retained
    assert torch.allclose(gamma.std((2, 3, 4)), x.std((2, 3, 4)), atol=1e-3)
    assert not torch.allclose(gamma, x)
    contrast = I.contrast(x.clone(), only(PAPER, contrast={"p": 1.0}), g)
    assert (contrast.amin((2, 3, 4)) >= x.amin((2, 3, 4)) - 1e-5).all() and (
        contrast.amax((2, 3, 4)) <= x.amax((2, 3, 4)) + 1e-5
    ).all()
    blur = I.gaussian_blur(x.clone(), only(PAPER, blur={"p": 1.0, "p_per_channel": 1.0}), g)
    assert (blur.std((2, 3, 4)) < x.std((2, 3, 4))).all()
    bright = I.brightness(x.clone(), only(PAPER, brightness={"p": 1.0}), g)
    ratio = bright / x
    assert torch.allclose(ratio, ratio[..., :1, :1, :1].expand_as(ratio), atol=1e-4)
    noisy = I.gaussian_noise(x.clone(), only(PAPER, noise={"p": 1.0}), g)
    assert 0 < (noisy - x).std() < 0.2
    low = I.low_resolution(x.clone(), only(PAPER, low_resolution={"p": 1.0, "p_per_channel": 1.0}), g)
    assert low.shape == x.shape and not torch.allclose(low, x)
    for transform in (I.gamma, I.contrast, I.gaussian_blur, I.brightness, I.gaussian_noise, I.low_resolution):
        assert torch.equal(transform(x.clone(), NOTHING, g), x)


def test_cascade_channels_are_perturbed_by_morphology_and_component_removal():
    blob = torch.zeros(1, 1, 20, 20, 20)
    blob[0, 0, 5:15, 5:15, 5:15] = 1
    preset = only(PAPER, cascade={"p_morphology": 1.0})
    changed = [morphology(blob, 0, preset, gen(s)).sum().item() for s in range(12)]
    assert any(c > blob.sum() for c in changed) and any(c < blob.sum() for c in changed)
    onehot = np.zeros((1, 20, 20, 20), np.float32)
    onehot[0, 1:4, 1:4, 1:4] = 1
    onehot[0, 10:13, 10:13, 10:13] = 1
    out = remove_random_component(onehot, np.random.default_rng(0), p=1.0, max_fraction=0.15)
    assert out.sum() == 27 and onehot.sum() == 54  # one of the two cubes removed, input untouched


def test_augmenter_keeps_previous_stage_channels_out_of_intensity_transforms():
    preset = only(PAPER, brightness={"p": 1.0}, noise={"p": 1.0})
    aug = Augmenter(preset, [8, 8, 8], image_channels=1)
    image = torch.ones(2, 3, 8, 8, 8)
    out, _ = aug(image, torch.zeros(2, 1, 8, 8, 8, dtype=torch.uint8), seed=0)
    assert not torch.equal(out[:, :1], image[:, :1]) and torch.equal(out[:, 1:], image[:, 1:])


def test_same_seed_same_augmentation():
    aug = Augmenter(PAPER, [16, 16, 16])
    image, seg = labelled_blocks(shape=aug.sample_size)
    a = aug(image, seg, seed=11)
    b = aug(image, seg, seed=11)
    c = aug(image, seg, seed=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_presets_are_plain_data_files_and_bad_ones_are_refused(tmp_path: Path):
    assert {"paper", "extended", "nvidia"} <= set(preset_names())
    nvidia = load_augmentation_preset("nvidia")
    assert nvidia.foreground.mode == "probability" and nvidia.foreground.value == 0.4
    assert nvidia.rotation.p == 0 and nvidia.noise.p == 0.15
    with pytest.raises(AutounetError, match="unknown augmentation preset"):
        load_augmentation_preset("nope")
    data = json.loads(
        Path(load_augmentation_preset.__module__.replace(".", "/")).name
        and (Path(__file__).parents[1] / "src/autounet/presets/augmentation/paper.json").read_text()
    )
    data["gamma"]["p"] = 1.5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(AutounetError, match="gamma.p = 1.5 is not a probability"):
        load_augmentation_preset(bad)
    del data["gamma"]
    bad.write_text(json.dumps(data))
    with pytest.raises(AutounetError, match="missing field 'gamma'"):
        load_augmentation_preset(bad)
