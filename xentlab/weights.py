"""Class weights, focal alpha and pos_weight derived from training-split counts.

Imbalance-aware losses take a per-class weight w (weighted cross-entropy) or alpha (focal). Both come from the
class counts n_c of the training split by one of three rules, normalised so that sum_c w_c = C: then a
balanced dataset gets w = 1 and the loss scale stays comparable to the unweighted loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor

METHODS = ("inverse_frequency", "sqrt_inverse", "effective_number")


def class_weights(counts: Tensor | Sequence[float], method: str = "inverse_frequency", *,
                  beta: float = 0.999) -> Tensor:
    """Per-class weights from class counts n_c, normalised to sum_c w_c = C (float32, shape (C,)).

    `inverse_frequency`: w_c ~ 1/n_c; `sqrt_inverse`: w_c ~ 1/sqrt(n_c); `effective_number` (Cui et al. 2019):
    w_c ~ (1 - beta) / (1 - beta^n_c) with beta in [0, 1) (beta=0 gives uniform weights, beta -> 1 approaches
    inverse frequency). The result serves as `weight` for cross_entropy and as `alpha` for focal_loss. A class
    with n_c = 0 has no defined weight and is a ValueError naming the class."""
    n = _counts(counts, "class")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "inverse_frequency":
        raw = 1.0 / n
    elif method == "sqrt_inverse":
        raw = n.rsqrt()
    else:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
        raw = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(float(beta), dtype=n.dtype), n))
    return (raw * (n.numel() / raw.sum())).to(torch.float32)


def log_priors(counts: Tensor | Sequence[float]) -> Tensor:
    """Log class priors of the training split, log pi_c = log(n_c / sum_k n_k) (float32, shape (C,)): the
    bias of logit-adjusted cross-entropy and of post-hoc logit adjustment (argmax of z - tau log pi). A class
    with n_c = 0 is a ValueError naming the class (its log prior is -inf)."""
    n = _counts(counts, "class")
    return (n / n.sum()).log().to(torch.float32)


def ldam_margins(counts: Tensor | Sequence[float], max_margin: float = 0.5) -> Tensor:
    """LDAM's per-class margins (Cao et al. 2019), Delta_c proportional to n_c^(-1/4) and scaled so the
    rarest class gets `max_margin` (> 0) (float32, shape (C,))."""
    n = _counts(counts, "class")
    if isinstance(max_margin, bool) or not isinstance(max_margin, (int, float)) or not 0 < max_margin < 1e6:
        raise ValueError(f"max_margin must be a positive number, got {max_margin!r}")
    raw = n.pow(-0.25)
    return (raw * (max_margin / raw.max())).to(torch.float32)


def pos_weight_from_counts(positives: Tensor | Sequence[float], total: int) -> Tensor:
    """BCE pos_weight per label, negatives / positives = (N - n_l) / n_l, from the positive counts n_l of each
    label among N training examples (float32, shape (L,)). A label with no positives is a ValueError naming
    it; a label that is always positive gets 0."""
    n = _counts(positives, "label")
    if isinstance(total, bool) or not isinstance(total, int) or total < n.max().item():
        raise ValueError(f"total must be an int >= every positive count (max {n.max().item():g}), "
                         f"got {total!r}")
    return ((total - n) / n).to(torch.float32)


def _counts(counts, kind: str) -> Tensor:
    """A non-empty 1-D float64 tensor of finite, positive counts; a zero count names its {kind}."""
    values = torch.as_tensor(counts).detach().cpu()
    if values.dtype.is_complex or values.dtype == torch.bool:
        raise TypeError(f"counts must be real numbers, got dtype {values.dtype}")
    values = values.to(torch.float64)
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence (one per {kind}), "
                         f"got shape {tuple(values.shape)}")
    bad = ~torch.isfinite(values) | (values < 0)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise ValueError(f"{kind} {index} has count {values[index].item()}; counts must be finite and >= 0")
    zero = values == 0
    if bool(zero.any()):
        index = int(zero.nonzero()[0])
        raise ValueError(f"{kind} {index} has count 0: every {kind} needs at least one example to get "
                         f"a weight")
    return values
