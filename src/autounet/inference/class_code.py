"""Class codes packed into float32 probabilities: the export's running argmax
(:mod:`autounet.inference.streaming`) and precision ``auto``'s check
(:func:`autounet.inference.agreement.tie_risk`).

Class ``k``'s code ``mask - k`` replaces the lowest bits of the mantissa of each of its float32
values. For numbers >= 0 (and -inf) the order of the bit patterns as signed integers is the order
of the numbers, so one integer maximum per class keeps both the best value and its class, and of
equal values the first class wins (as ``np.argmax``). Values within ``2**(bits - 23)`` of each
other (relatively; ``2**-16`` for 128 classes, ``2**-15`` for 256) are told apart by the code
only: far finer than the float16 accumulators' own rounding (``2**-11``).
"""

from __future__ import annotations

import torch

PACKED_CLASSES = 256
"""The most classes packed; more take the export's slab path (eight bits of the mantissa)."""


def code_mask(classes: int) -> int:
    """The mask of the lowest bits that hold a code among ``classes`` classes (at least one bit)."""
    return (1 << max(1, (classes - 1).bit_length())) - 1


def pack_(bits: torch.Tensor, k: int, mask: int) -> torch.Tensor:
    """``bits`` (the int32 view of class ``k``'s float32 values, none NaN) with ``k``'s code in
    their lowest bits, in place."""
    return bits.bitwise_or_(mask).sub_(k)


def classes_of(packed: torch.Tensor, mask: int, in_place: bool = False) -> torch.Tensor:
    """The class index of each packed value (``packed`` itself where ``in_place``)."""
    codes = packed.bitwise_and_(mask) if in_place else packed & mask
    return codes.neg_().add_(mask)


def values_of(packed: torch.Tensor, mask: int) -> torch.Tensor:
    """The float32 values of ``packed`` with their code bits cleared (a new tensor)."""
    return (packed & ~mask).view(torch.float32)
