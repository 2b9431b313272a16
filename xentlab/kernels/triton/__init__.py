"""Triton kernels: every loss computes its value and its gradient in one launch.

On a GPU, loss forward+backward is memory-bound: the least it can move is one read of the logits and one
write of the gradient, the same bytes as `x.clone()`. So each loss here is one kernel that reads the logits
once (twice at most, for very long rows), forms the loss, and writes the gradient during the forward; the
backward only scales that saved gradient by `grad_output`.

Softmax family (`cross_entropy`, `focal_loss`, `mse_loss`): the row statistic lse = logsumexp(x) is formed
online (running max m and rescaled sum s = sum exp(x - m), plus the few extra sums a loss needs), then an
epilogue writes dl/dx from p = exp(x - lse). Two layouts share one kernel:
  * short rows (next_power_of_2(C) within a register budget): a [ROWS, BLOCK_C] tile holds several whole
    rows, so the logits are read exactly once and small-C problems still give each program enough work;
  * long rows: one row per program, walked in BLOCK_C blocks twice; the second walk runs backwards so it
    starts on the blocks just read, which are still in L2. On CUDA the grid is capped at a few programs per
    SM (each loops over rows) so the rows in flight stay within L2.
Sigmoid family (`binary_cross_entropy_with_logits`, `sigmoid_focal_loss`): element-wise over 2-D tiles.

Arithmetic is float32 (float64 for float64 inputs); the true-class term p_y - 1 is formed in that precision
before the gradient is stored in the input dtype. Python float parameters travel as a float32 (hi, lo) pair
so float64 runs keep ~48 bits of them (Triton's CPU interpreter passes Python floats as float32).

Reductions and the backward run without host synchronisation, so forward and backward can be captured in a
CUDA graph. The `mean` denominator is computed on the device: a small pre-kernel (reading only the targets)
sums w[y], or counts the non-ignored rows, into per-block partials that every program of the main kernel
adds up in a fixed order; the gradient is stored already divided by it, each program stores one partial sum
of its rows' losses, and `torch.sum` adds those up, so results are deterministic (no atomics).

The backward launches a kernel that reads grad_output on the device and rescales the saved gradient in
place only when the factor differs from 1, so `loss.backward()` costs one launch whose programs exit at
once: no memory pass, no copy, no host sync. The scale already applied is kept on the device, so a second
backward through a retained graph is still exact (but a gradient returned by the first
`torch.autograd.grad(..., retain_graph=True)` is the same buffer and is rescaled by the second). The saved
gradient is released after the backward, so autograd hands it to a leaf's `.grad` without copying. With
`reduction="none"` the gradient depends on the per-row (or per-element) grad_output, so the forward writes
only the losses and the backward runs the same kernel again with grad_output folded in: one read of the
logits and one gradient write, fewer bytes than saving a gradient and rescaling it.

In-place gradient (opt-in): pass `inplace_backward=True` to a function here, or wrap calls that reach this
backend through `xentlab.functional` in `with use_inplace_backward():`. The gradient is then written into
the logits' own storage instead of a new buffer, so forward+backward allocates nothing gradient-sized. The
logits are destroyed: after the forward (the backward, for `reduction="none"`) `input` holds dl/dinput. Its
version counter is bumped, so any other autograd use of those logits (an op that saved them) raises
PyTorch's "modified by an inplace operation" error instead of computing with garbage. Use it only on logits
that are an intermediate result nothing else reads afterwards (typically the output of the last linear
layer); a leaf tensor that requires grad is refused, since its `.grad` would alias its own data. (If the
logits are a view, `loss.backward()` works but `torch.autograd.grad(loss, view)` does not: PyTorch gives a
view whose data changed in place a new grad_fn.)

Importing this module imports Triton; `xentlab` imports it only when the Triton backend is chosen. To run
the kernels on CPU tensors in Triton's interpreter, set TRITON_INTERPRET=1 before `triton` is first imported
in the process (Triton reads it when `@triton.jit` decorates its own library and these kernels; note that
pytorch_lightning imports triton); otherwise CPU tensors are refused with a ValueError.
"""

from __future__ import annotations

from xentlab.kernels.triton.autograd import _apply_sigmoid, _apply_softmax, use_inplace_backward
from xentlab.kernels.triton.launch import _INTERPRETED, _TUNING, _Spec
from xentlab.kernels.triton.rows import _BCE, _CE, _FOCAL, _MSE_LOGITS, _MSE_PROBS, _SIGMOID_FOCAL

__all__ = ["binary_cross_entropy_with_logits", "cross_entropy", "focal_loss", "mse_loss",
           "sigmoid_focal_loss", "use_inplace_backward", "_INTERPRETED", "_TUNING"]


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, *, inplace_backward=None):
    """Cross-entropy in one launch: l_i = (1-eps) w[y_i] (lse_i - x_iy) + (eps/C) sum_c w_c (lse_i - x_ic) for
    class indices (ignored rows 0, `mean` over D = sum of w[y_i] on kept rows), or l_i = -sum_c w_c t'_ic
    log p_ic with t' = (1-eps) t + eps/C for probability targets (`mean` over N); the gradient
    (1-eps) w_y (p - onehot_y) + (eps/C)(W p - w) (divided by D for `mean`) is written during the forward."""
    spec = _Spec(int(_CE), reduction, ignore_index=int(ignore_index), eps=float(label_smoothing))
    return _apply_softmax(input, target, weight, spec, inplace_backward)


def focal_loss(input, target, gamma, alpha, ignore_index, reduction, *, inplace_backward=None):
    """Softmax focal loss l_i = -a[y_i] (1 - p_iy)^gamma log p_iy in one launch, `mean` over the sum of
    a[y_i] on kept rows; gradient s_i (p_i - onehot_y) with s_i = a[y_i] [(1-pt)^gamma - gamma pt
    (1-pt)^(gamma-1) log pt], where 1 - pt is summed over the other classes and the (1-pt)^(gamma-1) log pt
    factor stays finite as pt -> 1."""
    spec = _Spec(int(_FOCAL), reduction, ignore_index=int(ignore_index), gamma=float(gamma))
    return _apply_softmax(input, target, alpha, spec, inplace_backward)


def mse_loss(input, target, ignore_index, reduction, on, *, inplace_backward=None):
    """Squared error (softmax(x) - t)^2 (on="probs") or (x - t)^2 (on="logits") against the one-hot or
    probability target t, element-wise for `none`, ignored rows 0, `mean` over (kept rows) * C; the gradient
    through the softmax is 2 p_c ((p_c - t_c) - sum_k p_k (p_k - t_k)) per unit of upstream gradient."""
    spec = _Spec(int(_MSE_PROBS if on == "probs" else _MSE_LOGITS), reduction, ignore_index=int(ignore_index))
    return _apply_softmax(input, target, None, spec, inplace_backward)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction, *, inplace_backward=None):
    """l = weight [pos_weight t softplus(-x) + (1-t) softplus(x)] element-wise (PyTorch's BCE with logits),
    `mean` over all N*C elements; gradient weight [(1-t) sigmoid(x) - pos_weight t sigmoid(-x)]."""
    spec = _Spec(int(_BCE), reduction)
    return _apply_sigmoid(input, target, weight, pos_weight, spec, inplace_backward)


def sigmoid_focal_loss(input, target, alpha, gamma, reduction, *, inplace_backward=None):
    """torchvision's sigmoid focal loss alpha_t ce (1 - p_t)^gamma with ce the BCE with logits, p_t = p t +
    (1-p)(1-t), alpha_t = alpha t + (1-alpha)(1-t) (alpha < 0: 1); gradient alpha_t [(p - t)(1-p_t)^gamma +
    gamma ce (1-p_t)^(gamma-1) (1-2t) p (1-p)], the second term taken as 0 where 1 - p_t == 0."""
    spec = _Spec(int(_SIGMOID_FOCAL), reduction, alpha=float(alpha), gamma=float(gamma))
    return _apply_sigmoid(input, target, None, None, spec, inplace_backward)
