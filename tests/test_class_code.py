"""Class codes packed into float32 probabilities (autounet.inference.class_code): one integer
maximum per class gives the first best class, as np.argmax, and its value to the code's precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autounet.inference.class_code import classes_of, code_mask, pack_, values_of


@pytest.mark.parametrize("classes", [2, 3, 104, 256])
def test_a_running_maximum_of_packed_values_is_the_first_argmax_and_keeps_the_value(classes):
    rng = np.random.default_rng(classes)
    p = rng.dirichlet(np.full(classes, 0.3), size=5000).T.astype(np.float32)
    p[:, :50] = 1.0 / classes  # exact ties everywhere: the first class wins
    p[1:, 50:60] = p[0, 50:60]  # the same with other values
    p[0, 60:70] = -np.inf  # a class ruled out (a NaN, as the export treats it)
    mask = code_mask(classes)
    best = None
    for k in range(classes):
        bits = pack_(torch.from_numpy(p[k].copy()).view(torch.int32), k, mask)
        best = bits if best is None else torch.maximum(best, bits)
    np.testing.assert_array_equal(classes_of(best, mask).numpy(), p.argmax(0))
    step = 2.0 ** (mask.bit_length() - 23)
    np.testing.assert_allclose(values_of(best, mask).numpy(), p.max(0), rtol=step, atol=0)


def test_the_mask_holds_every_class_code_in_the_fewest_bits():
    assert [code_mask(n) for n in (1, 2, 3, 4, 5, 104, 128, 129, 256)] == [1, 1, 3, 3, 7, 127, 127, 255, 255]


def test_unpacking_in_place_reuses_the_tensor_and_otherwise_leaves_it():
    packed = pack_(torch.tensor([0.25, 0.5], dtype=torch.float32).view(torch.int32), 2, code_mask(5))
    before = packed.clone()
    assert classes_of(packed, 7).tolist() == [2, 2] and torch.equal(packed, before)
    assert classes_of(packed, 7, in_place=True) is packed and packed.tolist() == [2, 2]
