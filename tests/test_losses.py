import pytest
import torch
import torch.nn.functional as F

from autounet.training.losses import (
    CrossEntropyLoss,
    DeepSupervisionLoss,
    DiceCELoss,
    DiceLoss,
    RegionLoss,
    deep_supervision_weights,
    downsample_target,
    focal_with_logits,
    one_hot,
    soft_dice,
)


def target_and_perfect_logits(batch=2, classes=3, shape=(6, 7, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (batch, 1, *shape), generator=g)
    logits = one_hot(target, classes) * 40 - 20  # softmax ~ one-hot
    return target, logits


@pytest.mark.parametrize("batch_dice", [True, False])
def test_dice_loss_of_a_perfect_prediction_is_its_minimum(batch_dice):
    target, perfect = target_and_perfect_logits()
    loss = DiceLoss(batch_dice)
    best = loss(perfect, target)
    assert best.item() == pytest.approx(-1.0, abs=1e-5)
    for seed in range(5):
        noisy = perfect + torch.randn(perfect.shape, generator=torch.Generator().manual_seed(seed)) * 30
        assert loss(noisy, target) > best
    assert loss(torch.zeros_like(perfect), target) > best


def test_soft_dice_follows_equation_2():
    u = torch.tensor([[[0.8, 0.2, 0.0, 0.0]], [[0.2, 0.8, 1.0, 1.0]]]).permute(1, 0, 2)  # (B=1, K=2, 4)
    v = torch.tensor([[[1.0, 0.0, 0.0, 0.0]], [[0.0, 1.0, 1.0, 1.0]]]).permute(1, 0, 2)
    k0 = 2 * 0.8 / (1.0 + 1.0)
    k1 = 2 * (0.8 + 1 + 1) / (3.0 + 3.0)
    assert soft_dice(u, v, batch_dice=True, smooth=0).item() == pytest.approx((k0 + k1) / 2)
    assert soft_dice(u, v, batch_dice=True, include_background=False, smooth=0).item() == pytest.approx(k1)


def test_batch_and_sample_dice_differ_when_a_sample_lacks_a_class():
    target = torch.zeros((2, 1, 4, 4), dtype=torch.long)
    target[0, 0, :2] = 1  # class 1 only in sample 0
    probs = one_hot(target, 2)
    probs[1, 1, 0, 0], probs[1, 0, 0, 0] = 1.0, 0.0  # one false-positive voxel in sample 1
    onehot = one_hot(target, 2)
    per_sample = soft_dice(probs, onehot, batch_dice=False).item()
    batched = soft_dice(probs, onehot, batch_dice=True).item()
    assert per_sample < batched  # the per-sample Dice of the empty class is ruined by one voxel


def test_cross_entropy_and_the_sum():
    target, perfect = target_and_perfect_logits()
    logits = torch.randn(perfect.shape)
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(F.cross_entropy(logits, target[:, 0]).item())
    combined = DiceCELoss(batch_dice=True)(logits, target)
    assert combined.item() == pytest.approx(
        DiceLoss(True)(logits, target).item() + CrossEntropyLoss()(logits, target).item()
    )


def test_deep_supervision_weights_halve_and_targets_are_downsampled_by_nearest():
    assert deep_supervision_weights(3, normalize=False) == [1.0, 0.5, 0.25]
    assert sum(deep_supervision_weights(3)) == pytest.approx(1.0)
    target = torch.arange(16).reshape(1, 1, 4, 4)
    small = downsample_target(target, (2, 2))
    assert small.dtype == target.dtype and set(small.flatten().tolist()) <= set(target.flatten().tolist())
    target, perfect = target_and_perfect_logits(shape=(8, 8, 8))
    half = one_hot(downsample_target(target, (4, 4, 4)), 3) * 40 - 20
    ds = DeepSupervisionLoss(DiceLoss(True))
    assert ds([perfect, half], target).item() == pytest.approx(-1.0, abs=1e-5)
    unnormalized = DeepSupervisionLoss(DiceLoss(True), normalize=False)
    assert unnormalized([perfect, half], target).item() == pytest.approx(-1.5, abs=1e-5)
    assert ds(perfect, target).item() == pytest.approx(-1.0, abs=1e-5)  # a single output passes through


@pytest.mark.parametrize("focal", [False, True])
def test_region_losses_prefer_the_right_regions(focal):
    g = torch.Generator().manual_seed(1)
    regions = (torch.rand((2, 3, 6, 6, 6), generator=g) > 0.6).float()
    good = regions * 20 - 10
    loss = RegionLoss(focal=focal)
    assert loss(good, regions) < loss(-good, regions)
    assert loss(good, regions).item() == pytest.approx(0.0, abs=1e-3)
    logits = torch.randn(regions.shape, generator=g, requires_grad=True)
    loss(logits, regions).backward()
    assert logits.grad.abs().sum() > 0


def test_focal_loss_down_weights_easy_voxels():
    target = torch.ones(1000)
    logits = torch.linspace(-3, 3, 1000)
    assert focal_with_logits(logits, target).item() < F.binary_cross_entropy_with_logits(logits, target).item()


def test_losses_work_in_float32_from_half_precision_logits():
    target, perfect = target_and_perfect_logits()
    out = DiceCELoss(batch_dice=False)(perfect.half(), target)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def _sparse(seed: int = 0, shape=(2, 3, 6, 7, 8), ignore_index: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, requires_grad=True)
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.6] = ignore_index
    return logits, target


@pytest.mark.parametrize("focal", [False, True])
def test_ignore_index_losses_equal_the_masked_mean_they_replace(focal):
    from autounet.training.losses import FocalLoss

    logits, target = _sparse()
    annotated = (target != 3)[:, 0]
    safe = torch.where(target == 3, torch.zeros_like(target), target)[:, 0]
    ce = F.cross_entropy(logits, safe, reduction="none")
    voxelwise = (1 - torch.exp(-ce)) ** 2 * ce if focal else ce
    expected = (voxelwise * annotated).sum() / annotated.sum()
    loss = FocalLoss(ignore_index=3) if focal else CrossEntropyLoss(ignore_index=3)
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss(logits, target), logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("focal", [False, True])
def test_a_patch_without_annotated_voxels_has_a_zero_loss_and_no_nan_gradient(focal):
    """F.cross_entropy's own mean is NaN here (0 / 0): a coarse deep-supervision level can be all ignore."""
    from autounet.training.losses import FocalLoss

    logits, target = _sparse()
    target[:] = 3
    loss = (FocalLoss if focal else CrossEntropyLoss)(ignore_index=3)
    value = loss(logits, target)
    (grad,) = torch.autograd.grad(value, logits)
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
