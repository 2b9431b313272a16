"""The arithmetic conventions every backend shares: the dtype it computes in and the mean of PyTorch's
losses. Plain torch, importing nothing of xentlab, so every kernel module (the reference composition that
`xentlab.kernels` loads up front included) can use them without an import cycle."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend does its arithmetic in: float64 for float64 inputs, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mean_over(total: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """`mean` as PyTorch's losses give it: total / D, and NaN where D = 0 (nothing to average over), even
    where the total is not 0 (label smoothing over rows whose class weights are all 0), never inf. No host
    read."""
    return torch.where(denominator == 0, torch.nan, total / denominator)
