"""Poly-1 cross-entropy (Leng et al. 2022, "PolyLoss"): CE plus epsilon times the first polynomial term."""

from __future__ import annotations

import torch
from torch import nn

from xentlab import functional as F


class Poly1CrossEntropy(nn.Module):
    """Poly-1: l_i = CE_i + epsilon * (1 - p_{i,y_i}), averaged over the non-ignored rows.

    p_{i,y_i} = exp(-CE_i) exactly for unweighted, unsmoothed cross-entropy, so the whole loss comes from
    xentlab's fused cross-entropy; ignored rows have CE_i = 0 and so contribute 0 to both terms.
    epsilon = 0 is cross-entropy; epsilon > 0 pushes harder on confident examples, epsilon = -1 weakens it.
    The default lives in conf/loss/poly1.yaml; the entry point `poly1 = xentlab_poly.poly:Poly1CrossEntropy`
    registers the class.
    """

    xentlab_tasks = ("multiclass", "binary")

    def __init__(self, *, epsilon: float, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        if reduction not in F.REDUCTIONS:
            raise ValueError(f"reduction must be one of {F.REDUCTIONS}, got {reduction!r}")
        if epsilon < -1:
            raise ValueError(f"epsilon must be >= -1 (below, the loss rewards wrong answers), got {epsilon}")
        self.epsilon, self.ignore_index, self.reduction = float(epsilon), ignore_index, reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.is_floating_point():
            raise TypeError(f"poly1 takes class-index targets (an integer tensor), got dtype {target.dtype}")
        ce = F.cross_entropy(input, target, ignore_index=self.ignore_index, reduction="none")
        per_row = ce + self.epsilon * -torch.expm1(-ce)  # 1 - exp(-ce), accurate as ce -> 0
        if self.reduction == "none":
            return per_row
        total = per_row.sum()
        if self.reduction == "sum":
            return total
        return total / (target != self.ignore_index).sum()

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, reduction={self.reduction!r}"
