"""The CPU fast path, split by idea: `sweep` (the chunked autograd engine), `sizes` (the thresholds that pick
each input's route), `softmax` (the softmax family, index and probability targets), `mse` and `sigmoid`
(BCE, sigmoid focal, ASL).

Every loss computes its row statistic once, in float32 (float64 for float64 inputs), and its closed-form
gradient (docs/losses.md) from it, either in one pass over a small batch or chunk by chunk over a large one.
At the shapes the lab trains on, dispatch rather than arithmetic is the cost, so there plain cross-entropy
and BCE are PyTorch's own ops (nothing written in Python can undercut one native op and its C++ autograd
node), and the other losses compute loss and gradient in one pass.

Double backward is not supported: differentiating the gradient again raises a RuntimeError saying so
(backend="reference" is plain autograd and supports it), except where the small path is PyTorch's own op.
"""

from xentlab.kernels.fused.mse import mse_loss
from xentlab.kernels.fused.sigmoid import asl_loss, binary_cross_entropy_with_logits, sigmoid_focal_loss
from xentlab.kernels.fused.softmax import checks_targets, cross_entropy, focal_loss, softmax_loss
from xentlab.kernels.fused.sweep import workspace_bytes

__all__ = ["asl_loss", "binary_cross_entropy_with_logits", "checks_targets", "cross_entropy", "focal_loss",
           "mse_loss", "sigmoid_focal_loss", "softmax_loss", "workspace_bytes"]
