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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from autounet.inference.sliding_window import HALF_ACCUMULATION_TIE

# What a float32 engine with float16 accumulators may move a probability margin by.
FP32_TIE = HALF_ACCUMULATION_TIE + 1e-4
# The least Dice per class a half-precision run must keep against the reference.
MIN_DICE = 0.99


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
    reference's margin (:func:`decision_margin`) is at least ``tie``; ``counts``: per label value
    ``[voxels of both, of the reference, of the candidate]``.
    """

    tie: float
    labels: list[int]
    voxels: int = 0
    differing: int = 0
    differing_not_tie: int = 0
    counts: dict[int, list[int]] = field(default_factory=dict)

    def add(self, reference: np.ndarray, candidate: np.ndarray, margin: np.ndarray) -> None:
        """One case: the reference's and the candidate's labels and the reference's margins."""
        if reference.shape != candidate.shape or reference.shape != margin.shape:
            raise ValueError(f"shapes differ: {reference.shape}, {candidate.shape}, {margin.shape}")
        differ = reference != candidate
        self.voxels += int(reference.size)
        self.differing += int(differ.sum())
        self.differing_not_tie += int((differ & (margin >= self.tie)).sum())
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
            "tie": self.tie,
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
