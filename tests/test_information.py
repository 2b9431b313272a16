"""Entropy, cross-entropy and KL between distributions: H(P, Q) = H(P) + KL(P || Q), zeros without NaN."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from xentlab import functional as XF
from xentlab.lab.information import cross_entropy_between, entropy, kl_divergence


def distributions(seed: int, shape=(5, 6), zeros: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(shape, generator=gen, dtype=torch.float64)
    if zeros:
        p[torch.rand(shape, generator=gen) < 0.3] = 0.0
        p[..., 0] += 0.1  # no all-zero row
    return p / p.sum(-1, keepdim=True)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 40))
def test_cross_entropy_is_entropy_plus_kl(seed, n_classes):
    p = distributions(seed, (3, n_classes))
    q = distributions(seed + 1, (3, n_classes), zeros=False)
    h_pq = cross_entropy_between(p, q)
    assert torch.isfinite(h_pq).all()
    assert_close(h_pq, entropy(p) + kl_divergence(p, q))
    assert (kl_divergence(p, q) >= -1e-12).all()


def test_known_values():
    uniform = torch.full((4,), 0.25)
    assert_close(entropy(uniform), torch.tensor(math.log(4)))
    assert_close(entropy(torch.tensor([1.0, 0.0, 0.0])), torch.tensor(0.0))
    assert_close(kl_divergence(uniform, uniform), torch.tensor(0.0))
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    assert_close(kl_divergence(p, q), torch.tensor(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)))


def test_zero_probabilities_give_no_nan():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], requires_grad=True)
    q = torch.tensor([[0.0, 0.7, 0.3], [0.2, 0.8, 0.0]], requires_grad=True)
    values = torch.stack([entropy(p), cross_entropy_between(p, q), kl_divergence(p, q)])
    assert torch.isfinite(values).all()
    for fn in (cross_entropy_between, kl_divergence):
        p.grad = q.grad = None
        fn(p, q).sum().backward()
        assert not p.grad.isnan().any() and not q.grad.isnan().any(), fn.__name__
    (g,) = torch.autograd.grad(entropy(p).sum(), p)
    assert not g.isnan().any()
    # p > 0 where q = 0: the divergence is infinite, not NaN
    assert kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])) == math.inf


def test_cross_entropy_between_one_hot_and_softmax_is_the_classification_loss():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 4, 2, 1, 3, 0])
    one_hot = torch.nn.functional.one_hot(y, 5).double()
    assert_close(cross_entropy_between(one_hot, torch.softmax(x, 1)).mean(), XF.cross_entropy(x, y))
    q = torch.softmax(x, 1)
    assert_close(kl_divergence(one_hot, q), cross_entropy_between(one_hot, q))


def test_dim_argument():
    p = distributions(3, (4, 5))
    assert_close(entropy(p.T, dim=0), entropy(p))


@pytest.mark.parametrize("call, error, message", [
    (lambda: entropy([0.5, 0.5]), TypeError, "torch.Tensor"),
    (lambda: entropy(torch.tensor([1, 0])), TypeError, "floating-point"),
    (lambda: entropy(torch.tensor([1.5, -0.5])), ValueError, r">= 0, got -0.5"),
    (lambda: kl_divergence(torch.ones(3) / 3, torch.ones(4) / 4), ValueError, r"same shape.*\(3,\).*\(4,\)"),
])
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()
