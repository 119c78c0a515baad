"""Losses: soft Dice (seed 001 eq. 2), cross-entropy, their sum, region-based sigmoid losses
(seed 004 §2.4), and the deep-supervision wrapper.

Targets are class indices ``(B, 1, *spatial)`` for softmax losses and binary region maps
``(B, R, *spatial)`` for region losses. Losses are computed in float32 whatever the network's
precision.

Sparse annotations (nnU-Net v2's ignore label): unannotated voxels count in no loss term. Softmax
losses take ``ignore_index``, the class index that marks them (the number of network outputs);
region targets mark them with :data:`IGNORED_REGION_TARGET` in every region. The mask comes from
the target, so nearest down-sampling for deep supervision carries it to every level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

SMOOTH = 1e-5  # keeps Dice defined for classes absent from both prediction and target
# Region targets hold this (in every region) at unannotated voxels; real targets are 0 or 1.
IGNORED_REGION_TARGET = -1.0


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, 1, *S)`` class indices -> ``(B, K, *S)`` float one-hot."""
    out = torch.zeros((target.shape[0], num_classes, *target.shape[2:]), device=target.device, dtype=torch.float32)
    return out.scatter_(1, target.long(), 1.0)


Reduce = Callable[[torch.Tensor], torch.Tensor]


def annotated_targets(target: torch.Tensor, ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class indices with ignored voxels set to 0, and the ``(B, 1, *S)`` float mask of annotated
    voxels (None without an ignore index)."""
    if ignore_index is None:
        return target, None
    annotated = target != ignore_index
    return torch.where(annotated, target, torch.zeros_like(target)), annotated.float()


def _masked_mean(voxelwise: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the annotated voxels (0 when there are none: the term then has no gradient)."""
    if mask is None:
        return voxelwise.mean()
    mask = mask.expand_as(voxelwise)
    return (voxelwise * mask).sum() / mask.sum().clamp_min(1.0)


def soft_dice(
    probs: torch.Tensor,
    target_onehot: torch.Tensor,
    batch_dice: bool,
    include_background: bool = True,
    smooth: float = SMOOTH,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """Mean soft Dice over classes: ``2 sum(u v) / (sum u + sum v)`` (seed 001 eq. 2, without the sign).

    ``batch_dice``: the batch is one pseudo-volume; otherwise Dice per sample, then averaged.
    ``reduce``: sums the batch terms over processes (distributed training: the global batch).
    """
    axes = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0, *axes)
    intersection = (probs * target_onehot).sum(axes)
    denominator = probs.sum(axes) + target_onehot.sum(axes)
    if batch_dice and reduce is not None:
        intersection, denominator = reduce(intersection), reduce(denominator)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    if not include_background:
        dice = dice[..., 1:]
    return dice.mean()


class DiceLoss:
    """``-mean Dice`` of the softmax outputs (seed 001 eq. 2): -1 for a perfect prediction.

    ``ignore_index``: voxels of that class index count neither in the prediction nor the target.
    """

    def __init__(
        self,
        batch_dice: bool,
        include_background: bool = True,
        reduce: Reduce | None = None,
        ignore_index: int | None = None,
    ):
        self.batch_dice = batch_dice
        self.include_background = include_background
        self.reduce = reduce
        self.ignore_index = ignore_index

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=1)
        target, mask = annotated_targets(target, self.ignore_index)
        onehot = one_hot(target, logits.shape[1])
        if mask is not None:
            probs, onehot = probs * mask, onehot * mask
        return -soft_dice(probs, onehot, self.batch_dice, self.include_background, reduce=self.reduce)


def _annotated_mean(summed: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """A sum over the annotated voxels divided by their count (0 when there are none, without a
    host sync; ``F.cross_entropy``'s own mean would be NaN there, e.g. at a coarse deep-supervision
    level of a sparsely annotated patch)."""
    return summed / (target != ignore_index).sum().clamp_min(1)


class CrossEntropyLoss:
    """Mean cross-entropy over the voxels (the annotated ones, with ``ignore_index``)."""

    def __init__(self, ignore_index: int | None = None):
        self.ignore_index = ignore_index

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target[:, 0].long()
        if self.ignore_index is None:
            return F.cross_entropy(logits.float(), labels)
        summed = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction="sum")
        return _annotated_mean(summed, labels, self.ignore_index)


class FocalLoss:
    """Multi-class focal loss (Lin et al.) on softmax outputs: mean of ``-(1 - p_t)^gamma log p_t``
    (over the annotated voxels, with ``ignore_index``)."""

    def __init__(self, gamma: float = 2.0, ignore_index: int | None = None):
        self.gamma = gamma
        self.ignore_index = ignore_index

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target[:, 0].long()
        if self.ignore_index is None:
            ce = F.cross_entropy(logits.float(), labels, reduction="none")
            return ((1 - torch.exp(-ce)) ** self.gamma * ce).mean()
        # ignored voxels get ce = 0, hence a focal term of 0
        ce = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction="none")
        focal = (1 - torch.exp(-ce)) ** self.gamma * ce
        return _annotated_mean(focal.sum(), labels, self.ignore_index)


class DiceCELoss:
    """``L_dice + L_CE`` (seed 001 eq. 1); with ``focal``, Focal loss (gamma 2) instead of CE
    (seed 004 Table 2's ablation, for softmax outputs)."""

    def __init__(
        self,
        batch_dice: bool,
        include_background: bool = True,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        reduce: Reduce | None = None,
        focal: bool = False,
        gamma: float = 2.0,
        ignore_index: int | None = None,
    ):
        self.dice = DiceLoss(batch_dice, include_background, reduce, ignore_index)
        self.ce = FocalLoss(gamma, ignore_index) if focal else CrossEntropyLoss(ignore_index)
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.ce_weight * self.ce(logits, target)


def focal_with_logits(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary focal loss (Lin et al.), mean over voxels (those where ``mask`` is 1): ``-(1 - p_t)^gamma log p_t``."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)
    return _masked_mean((1 - p_t) ** gamma * bce, mask)


class RegionLoss:
    """Per region: BCE (or Focal, gamma 2) + (1 - batch Dice) on sigmoid outputs, averaged over
    regions (seed 004 §2.4). Targets are binary maps ``(B, R, *S)``; voxels holding
    :data:`IGNORED_REGION_TARGET` are unannotated and count in no term."""

    def __init__(self, focal: bool = False, gamma: float = 2.0, batch_dice: bool = True, reduce: Reduce | None = None):
        self.focal, self.gamma, self.batch_dice, self.reduce = focal, gamma, batch_dice, reduce

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        # Always masked (a mask of ones for dense labels): no host sync to find out.
        mask = (target[:, :1] >= 0).float()
        target, probs = target.clamp_min(0), torch.sigmoid(logits) * mask
        if self.focal:
            voxelwise = focal_with_logits(logits, target, self.gamma, mask)
        else:
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            voxelwise = _masked_mean(bce, mask)
        return voxelwise + 1 - soft_dice(probs, target, self.batch_dice, include_background=True, reduce=self.reduce)


def downsample_target(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour (voxel-centre) down-sampling of a target to ``shape``."""
    if tuple(target.shape[2:]) == tuple(shape):
        return target
    return F.interpolate(target.float(), size=tuple(shape), mode="nearest-exact").to(target.dtype)


def deep_supervision_weights(n: int, normalize: bool = True) -> list[float]:
    """1, 1/2, 1/4, ... per output (full resolution first), normalised to sum 1 if asked."""
    w = [0.5**i for i in range(n)]
    total = sum(w) if normalize else 1.0
    return [x / total for x in w]


class DeepSupervisionLoss:
    """Weighted sum of ``loss`` over the outputs of every decoder head, with targets down-sampled
    (nearest) to each output's shape. Weights halve per level (seed 004 eq. 1: 1, 1/2, 1/4);
    ``normalize`` scales them to sum 1 (the public nnU-Net)."""

    def __init__(
        self,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        normalize: bool = True,
        weights: Sequence[float] | None = None,
    ):
        self.loss, self.normalize, self.weights = loss, normalize, list(weights) if weights is not None else None

    def __call__(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = self.weights or deep_supervision_weights(len(outputs), self.normalize)
        if len(weights) != len(outputs):
            raise ValueError(f"{len(weights)} deep-supervision weights for {len(outputs)} outputs")
        total = 0.0
        for w, out in zip(weights, outputs):
            if w:
                total = total + w * self.loss(out, downsample_target(target, out.shape[2:]))
        return total
