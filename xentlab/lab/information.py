"""Information-theory helpers on probability distributions, in nats, along a dimension.

H(P, Q) = H(P) + KL(P || Q): cross-entropy is the entropy of the labels plus the divergence the model adds,
which is why minimising cross-entropy against fixed labels minimises KL. Terms with p = 0 contribute 0 (the
limit of p log p and of p log q), so zero probabilities never produce NaN.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """H(P) = -sum_c p_c log p_c along `dim`, with 0 log 0 = 0."""
    _check("p", p)
    return torch.special.entr(p).sum(dim)


def cross_entropy_between(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    """H(P, Q) = -sum_c p_c log q_c along `dim`, with 0 log q = 0 (even for q = 0); +inf where p > 0 = q."""
    _check_pair(p, q)
    return -torch.xlogy(p, _where_p_positive(p, q)).sum(dim)


def kl_divergence(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    """KL(P || Q) = sum_c p_c (log p_c - log q_c) along `dim`; terms with p_c = 0 are 0, and p > 0 = q gives
    +inf."""
    _check_pair(p, q)
    return (-torch.special.entr(p) - torch.xlogy(p, _where_p_positive(p, q))).sum(dim)


def _where_p_positive(p: Tensor, q: Tensor) -> Tensor:
    # q where p > 0, else 1: terms with p = 0 are 0 either way, but autograd through log(q) at q = 0 would
    # give 0 * inf = NaN for q's gradient there
    return torch.where(p > 0, q, torch.ones_like(q))


def _check(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must hold floating-point probabilities, got dtype {t.dtype}")
    if bool((t < 0).any()):
        raise ValueError(f"{name} must hold probabilities >= 0, got {t[t < 0][0].item()}")


def _check_pair(p, q) -> None:
    _check("p", p)
    _check("q", q)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
