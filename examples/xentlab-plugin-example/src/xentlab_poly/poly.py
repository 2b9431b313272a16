"""Poly-2 cross-entropy (Leng et al. 2022, "PolyLoss"): CE plus the first two polynomial terms in (1 - p_y).

A loss of the true-class probability alone is a `RowLoss` (its value and slope as functions of log p_y);
`xentlab.functional.softmax_loss` then runs it on every backend, with the closed-form gradient on the fused
CPU and Triton paths, and ignore_index, class weights and reductions handled as for cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xentlab import functional as F


@dataclass(frozen=True)
class Poly2:
    """phi(l) = -l + e1 (1 - p) + e2 (1 - p)^2 with p = e^l; slope d phi / dl = -1 - e1 p - 2 e2 (1-p) p."""

    epsilon1: float
    epsilon2: float

    def value(self, logpt: torch.Tensor) -> torch.Tensor:
        rest = -torch.expm1(logpt)  # 1 - p, accurate as p -> 1
        return -logpt + self.epsilon1 * rest + self.epsilon2 * rest**2

    def slope(self, logpt: torch.Tensor) -> torch.Tensor:
        p = logpt.exp()
        return -1 - self.epsilon1 * p + 2 * self.epsilon2 * torch.expm1(logpt) * p


class Poly2CrossEntropy(nn.Module):
    """Poly-2: l_i = CE_i + epsilon1 (1 - p_{i,y_i}) + epsilon2 (1 - p_{i,y_i})^2, averaged over the
    non-ignored rows. Both epsilons 0 is cross-entropy. The defaults live in conf/loss/poly2.yaml; the entry
    point `poly2 = xentlab_poly.poly:Poly2CrossEntropy` registers the class."""

    xentlab_tasks = ("multiclass", "binary")

    def __init__(self, *, epsilon1: float, epsilon2: float, ignore_index: int = -100,
                 reduction: str = "mean"):
        super().__init__()
        if reduction not in F.REDUCTIONS:
            raise ValueError(f"reduction must be one of {F.REDUCTIONS}, got {reduction!r}")
        if epsilon1 + 2 * min(epsilon2, 0.0) < -1:
            # the slope at p -> 1 is -1 - e1 and its most positive value -1 - e1 - 2 min(e2, 0): keep it <= 0
            raise ValueError(f"epsilon1 + 2 min(epsilon2, 0) must be >= -1 (below, the loss rewards wrong "
                             f"answers), got epsilon1={epsilon1}, epsilon2={epsilon2}")
        self.row_loss = Poly2(float(epsilon1), float(epsilon2))
        self.ignore_index, self.reduction = ignore_index, reduction

    @property
    def epsilon1(self) -> float:
        return self.row_loss.epsilon1

    @property
    def epsilon2(self) -> float:
        return self.row_loss.epsilon2

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.is_floating_point():
            raise TypeError(f"poly2 takes class-index targets (an integer tensor), got dtype {target.dtype}")
        return F.softmax_loss(input, target, self.row_loss, ignore_index=self.ignore_index,
                              reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"epsilon1={self.epsilon1}, epsilon2={self.epsilon2}, reduction={self.reduction!r}"
