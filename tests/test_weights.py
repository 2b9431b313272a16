"""Class weights, focal alpha and pos_weight from counts: the formulas, the normalisation and the errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from xentlab import functional as XF
from xentlab.weights import METHODS, class_weights, pos_weight_from_counts

COUNTS = [900, 90, 9, 1]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("counts", [COUNTS, torch.tensor(COUNTS), np.array(COUNTS), (5.0, 5.0)])
def test_weights_sum_to_the_number_of_classes(counts, method):
    w = class_weights(counts, method)
    assert w.dtype == torch.float32 and w.shape == (len(counts),)
    assert_close(w.sum().item(), float(len(counts)))
    assert torch.all(w[:-1] <= w[1:]), "rarer classes never get less weight"


def test_each_method_follows_its_formula():
    n = torch.tensor(COUNTS, dtype=torch.float64)
    for method, raw in [("inverse_frequency", 1 / n), ("sqrt_inverse", 1 / n.sqrt()),
                        ("effective_number", (1 - 0.99) / (1 - 0.99**n))]:
        assert_close(class_weights(COUNTS, method, beta=0.99), (raw * 4 / raw.sum()).float())


def test_balanced_counts_give_unit_weights_and_beta_zero_is_uniform():
    assert_close(class_weights([7, 7, 7]), torch.ones(3))
    assert_close(class_weights(COUNTS, "effective_number", beta=0.0), torch.ones(4))


def test_effective_number_approaches_inverse_frequency_as_beta_goes_to_one():
    close = class_weights(COUNTS, "effective_number", beta=1 - 1e-9)
    assert_close(close, class_weights(COUNTS, "inverse_frequency"), rtol=1e-4, atol=1e-5)


def test_weights_feed_weighted_cross_entropy_and_focal_alpha():
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3] * 2)
    w = class_weights(COUNTS)
    assert torch.equal(XF.focal_loss(x, y, gamma=0.0, alpha=w), XF.cross_entropy(x, y, weight=w))


def test_pos_weight_is_negatives_over_positives():
    assert_close(pos_weight_from_counts([10, 25, 50, 100], 100), torch.tensor([9.0, 3.0, 1.0, 0.0]))


@pytest.mark.parametrize("call, message", [
    (lambda: class_weights([5, 0, 3]), r"class 1 has count 0"),
    (lambda: class_weights([5, -2, 3]), r"class 1 has count -2"),
    (lambda: class_weights([5, math.nan]), r"class 1 has count nan"),
    (lambda: class_weights([]), r"non-empty 1-D"),
    (lambda: class_weights([[1, 2]]), r"non-empty 1-D"),
    (lambda: class_weights(COUNTS, "inverse"), r"method must be one of.*'effective_number'.*'inverse'"),
    (lambda: class_weights(COUNTS, "effective_number", beta=1.0), r"beta.*\[0, 1\).*1.0"),
    (lambda: class_weights(COUNTS, "effective_number", beta=-0.5), r"beta"),
    (lambda: pos_weight_from_counts([3, 0], 10), r"label 1 has count 0"),
    (lambda: pos_weight_from_counts([3, 20], 10), r"total must be an int >= .*20.*10"),
])
def test_bad_counts_name_the_class_and_the_valid_range(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_numeric_counts_are_a_type_error():
    with pytest.raises(TypeError, match="real numbers"):
        class_weights(torch.tensor([True, False]))
