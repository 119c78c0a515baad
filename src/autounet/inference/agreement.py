"""The accuracy guard of inference engines and precisions (issue 22): how far the segmentations of
one engine and precision depart from a reference run's, and whether that is within what the
precision allows.

The reference is PyTorch in fp32 with float32 accumulators, kept with its probabilities. A voxel
where a candidate's label differs from the reference's is a *tie* when the reference could have
gone either way there: its two most probable classes (softmax) are within ``tie`` of each other,
or a region's probability (sigmoid) is within ``tie`` of 0.5. Rounding of that size cannot be
told from the right answer, so a run that only rounds may change ties and nothing else.

The rules (:func:`guard_problem`):

* **fp32** (PyTorch, onnxruntime, OpenVINO; float16 accumulators): every differing voxel is a tie
  within :data:`FP32_TIE`: the half-precision accumulators' bound
  (:data:`~autounet.inference.sliding_window.HALF_ACCUMULATION_TIE`) plus 1e-4 for the engines'
  own float32 rounding (another order of additions, fused kernels).
* **bf16, fp16**: Dice >= :data:`MIN_DICE` per class against the reference, pooled over cases
  (the network computes in 8 or 11 bits: features round, so labels move at class borders).

Precision ``auto`` keeps half precision only where a case's own probabilities show that it is
unlikely to break that rule (:func:`tie_risk`, :func:`risk_problem`): a voxel can change its label
only where its two best classes are within :data:`HALF_TIE` of each other, and of such voxels bf16
changed 4.2 % (a barely trained model) and 5.8–6.9 % (a moderately trained one) in the
measurements below. If they are at most :data:`RISK_SHARE` of each class's voxels, that class's
Dice against fp32 stays at least ``MIN_DICE`` even if :data:`MAX_FLIP_SHARE` of them changed. A
class that a case barely has (a few voxels, or none but near a tie) fails it: that is how a
barely trained model's second class (10 voxels in 52 cases) lost Dice in bf16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from autounet.inference.class_code import classes_of, code_mask, pack_, values_of
from autounet.inference.sliding_window import HALF_ACCUMULATION_TIE

# What a float32 engine with float16 accumulators may move a probability margin by.
FP32_TIE = HALF_ACCUMULATION_TIE + 1e-4
# The least Dice per class a half-precision run must keep against the reference.
MIN_DICE = 0.99
# How far bf16 moves a voxel's decision margin, at most: twice the widest margin of any voxel that
# bf16 changed against fp32, measured (benchmarks/precision.py, 52 hippocampus cases, a barely
# trained model, OpenVINO and PyTorch bf16: WIDEST_MEASURED).
WIDEST_MEASURED = 0.004
HALF_TIE = 2 * WIDEST_MEASURED
# The share of voxels within HALF_TIE that bf16 may change (about three times the most measured,
# 6.9 %: 52 held-out hippocampus cases, OpenVINO bf16 against fp32, with mirroring), and so the
# share of a class's voxels that may lie within HALF_TIE.
MAX_FLIP_SHARE = 0.2
RISK_SHARE = (1 - MIN_DICE) / MAX_FLIP_SHARE


def decision_margin(probabilities: np.ndarray, activation: str = "softmax") -> np.ndarray:
    """How far each voxel of ``probabilities`` ``(K, *spatial)`` is from another label: the best
    class's lead over the second (softmax), or the closest region probability's distance from
    0.5 (sigmoid). float32, ``spatial``."""
    p = np.asarray(probabilities, dtype=np.float32)
    if activation == "sigmoid":
        return np.abs(p - 0.5).min(axis=0)
    if p.shape[0] < 2:
        return np.full(p.shape[1:], np.inf, dtype=np.float32)
    top2 = np.partition(p, p.shape[0] - 2, axis=0)[-2:]
    return top2[1] - top2[0]


@dataclass
class Agreement:
    """A candidate's segmentations against the reference's, pooled over the cases added.

    ``differing``: voxels whose label differs; ``differing_not_tie``: those of them where the
    reference's margin (:func:`decision_margin`) is at least ``tie``; ``widest_differing``: the
    largest reference margin among them (how far the candidate moved a decision); ``counts``: per
    label value ``[voxels of both, of the reference, of the candidate]``.
    """

    tie: float
    labels: list[int]
    voxels: int = 0
    differing: int = 0
    differing_not_tie: int = 0
    widest_differing: float = 0.0
    counts: dict[int, list[int]] = field(default_factory=dict)

    def add(self, reference: np.ndarray, candidate: np.ndarray, margin: np.ndarray) -> None:
        """One case: the reference's and the candidate's labels and the reference's margins."""
        if reference.shape != candidate.shape or reference.shape != margin.shape:
            raise ValueError(f"shapes differ: {reference.shape}, {candidate.shape}, {margin.shape}")
        differ = reference != candidate
        self.voxels += int(reference.size)
        self.differing += int(differ.sum())
        self.differing_not_tie += int((differ & (margin >= self.tie)).sum())
        if differ.any():
            self.widest_differing = max(self.widest_differing, float(margin[differ].max()))
        for value in self.labels:
            a, b = reference == value, candidate == value
            both, ref, cand = self.counts.setdefault(value, [0, 0, 0])
            self.counts[value] = [both + int((a & b).sum()), ref + int(a.sum()), cand + int(b.sum())]

    def dice(self) -> dict[int, float]:
        """Dice per label value (1.0 where neither has the label)."""
        out = {}
        for value in self.labels:
            both, ref, cand = self.counts.get(value, [0, 0, 0])
            out[value] = 1.0 if ref + cand == 0 else 2 * both / (ref + cand)
        return out

    def summary(self) -> dict:
        """Plain numbers for a report."""
        return {
            "dice": {str(k): round(v, 5) for k, v in self.dice().items()},
            "voxels": self.voxels,
            "differing": self.differing,
            "differing_ties": self.differing - self.differing_not_tie,
            "differing_not_tie": self.differing_not_tie,
            "widest_differing": round(self.widest_differing, 6),
            "tie": self.tie,
            "label_voxels": {str(k): v[1:] for k, v in sorted(self.counts.items())},
        }


def agreement_for(precision: str, labels: list[int]) -> Agreement:
    """An empty :class:`Agreement` with the tie bound of ``precision`` (fp32: :data:`FP32_TIE`;
    bf16 and fp16 are judged by Dice, and their ties counted within the same bound)."""
    return Agreement(FP32_TIE, [int(v) for v in labels])


def guard_problem(agreement: Agreement, precision: str, min_dice: float = MIN_DICE) -> str | None:
    """What breaks the accuracy guard for a run in ``precision`` (one line), or None when it holds."""
    if precision == "fp32":
        if agreement.differing_not_tie:
            return (
                f"fp32: {agreement.differing_not_tie} of {agreement.voxels} voxels differ from the reference "
                f"where its decision margin is at least {agreement.tie:.2g} (not a tie)"
            )
        return None
    low = {v: d for v, d in agreement.dice().items() if d < min_dice}
    if low:
        shown = ", ".join(f"class {v}: {d:.4f}" for v, d in sorted(low.items()))
        return f"{precision}: Dice against the reference below {min_dice} ({shown})"
    return None


def tie_risk(
    probabilities,
    activation: str = "softmax",
    thresholds: Sequence[float] | None = None,
    tie: float = HALF_TIE,
    chunk_voxels: int = 1 << 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Per class (or region) of ``probabilities`` ``(K, z, y, x)`` (in memory, or anything with
    ``rows(k, z0, z1)`` such as a spilled volume): the voxels it labels (``sizes``) and the voxels
    where a change of less than ``tie`` could add or remove it (``risks``): softmax, it is one of
    the two best classes and they are within ``tie``; sigmoid, its probability is within ``tie``
    of its threshold (``thresholds``, default 0.5). Read about ``chunk_voxels`` per class at a time.

    Softmax: one pass over the classes keeps the best and the second best of each voxel, each
    class's index packed into the lowest bits of its float32 value as in the export's argmax
    (:mod:`autounet.inference.class_code`; values within 2**-15 relatively count as equal, far
    below ``tie``), so that six operations per class and voxel give both classes and their gap.
    """
    k_count, rows = int(probabilities.shape[0]), int(probabilities.shape[1])
    plane = int(np.prod(probabilities.shape[2:]))
    step = max(1, chunk_voxels // max(1, plane))
    sizes = np.zeros(k_count, np.int64)
    risks = np.zeros(k_count, np.int64)
    thresholds = [0.5] * k_count if thresholds is None else list(thresholds)
    mask = code_mask(k_count)

    def read(k: int, z0: int, z1: int) -> torch.Tensor:
        part = probabilities.rows(k, z0, z1) if hasattr(probabilities, "rows") else probabilities[k, z0:z1]
        part = part if isinstance(part, torch.Tensor) else torch.from_numpy(np.asarray(part))
        return part.to(torch.float32, copy=True)  # a copy of its own, changed in place below

    for z0 in range(0, rows, step):
        z1 = min(z0 + step, rows)
        if activation == "sigmoid":
            for k in range(k_count):
                p = read(k, z0, z1)
                sizes[k] += int((p >= thresholds[k]).sum())
                risks[k] += int(((p - thresholds[k]).abs() < tie).sum())
            continue
        best = second = low = None
        for k in range(k_count):
            bits = read(k, z0, z1).nan_to_num_(nan=-torch.inf).view(torch.int32)
            pack_(bits, k, mask)
            if best is None:
                best, second = bits, torch.full_like(bits, torch.iinfo(torch.int32).min)
                low = torch.empty_like(bits)
                continue
            torch.minimum(bits, best, out=low)
            torch.maximum(second, low, out=second)
            torch.maximum(best, bits, out=best)
        first_class = classes_of(best, mask).ravel()
        sizes += torch.bincount(first_class, minlength=k_count).numpy()
        if k_count < 2:
            continue
        gap = values_of(best, mask) - values_of(second, mask)
        close = (gap < tie).ravel()
        second_class = classes_of(second, mask).ravel()
        risks += torch.bincount(first_class[close], minlength=k_count).numpy()
        risks += torch.bincount(second_class[close], minlength=k_count).numpy()
    return sizes, risks


def risk_problem(sizes: np.ndarray, risks: np.ndarray, labels: Sequence[int], share: float = RISK_SHARE) -> str | None:
    """Why half precision could move a class's Dice against fp32 below :data:`MIN_DICE` (one
    line: the classes whose voxels within the tie exceed ``share`` of their own), or None."""
    over = [i for i in range(len(sizes)) if risks[i] > share * sizes[i]]
    if not over:
        return None
    shown = ", ".join(f"class {labels[i]}: {risks[i]} of {sizes[i]} voxels" for i in over[:4])
    more = f" and {len(over) - 4} more" if len(over) > 4 else ""
    return f"voxels within {HALF_TIE:.3g} of another label ({shown}{more})"
