"""The Triton backend: the loss kernels for CUDA tensors (or Triton's CPU interpreter).

On a GPU, loss forward+backward is memory-bound, so every loss here reads the logits once in the forward
(loss only) and once more in the backward, which writes the gradient with grad_output folded in (the
probability-target CE/MSE kernel walks a very long row twice, the second walk mostly from L2): two reads
and one write of the logits, against at least two reads and two writes for PyTorch's log_softmax + nll_loss
(which also keeps an (N, C) log-probability buffer between forward and backward).

Index-target softmax family (`softmax_loss`; `cross_entropy` with class indices and `focal_loss` are calls
of it): each loss is a `RowLoss` phi(log p_y) and a `LogitTransform` z' = scale (z - [c == y] margin) + bias
(see `xentlab.kernels.spec`), written once, in torch. The forward's kernel (`rows.py`) forms per row of z'
the online logsumexp lse', log p'_y (from the other classes' mass when p'_y is near 1, so focal's 1 - p_y
keeps its precision) and the label-smoothing sum; phi and its slope are then the RowLoss's own code on
those (N,) vectors. The backward's kernel (`epilogues.py`) is element-wise:
    dL/dz_c = scale_c * k_i * ( -slope_i (1-eps) w_y (p'_c - [c == y]) + (eps/C) (W p'_c - w_c) ),
with k_i grad_output (divided by D = sum of w[y_i] on kept rows for `mean`). A single sweep that wrote the
gradient during the forward (the design before RowLoss) moved one read fewer, but it needs phi's slope
inside the kernel, i.e. a copy of every loss's math in Triton. Probability-target CE and MSE keep their
fused row kernel; BCE, sigmoid focal and ASL are element-wise. Long rows are walked in blocks (`launch.py`).

Arithmetic is float32 (float64 for float64 inputs); the true-class term p_y - 1 is formed in that precision
before the gradient is stored in the input dtype. Python float parameters travel as a float32 (hi, lo) pair
so float64 runs keep ~48 bits of them (Triton's CPU interpreter passes Python floats as float32).

Nothing synchronises with the host: the `mean` denominator stays a device tensor, each kernel's programs
store their partial sums in a fixed order (deterministic, no atomics) and grad_output is read on the device,
so forward and backward can be captured in a CUDA graph. No gradient-sized buffer is kept between forward
and backward; each backward is computed afresh from the saved logits, so any sequence of backward calls
through a retained graph, with any grad_output (0 included), is exact. A backward run with grad mode on
(`create_graph=True`, a Hessian-vector product) instead differentiates the reference composition of the same
loss from the saved logits and target by autograd, so gradients of every order are exact (that backward is
plain PyTorch ops, not these kernels). Gradients of probability targets and
of BCE / sigmoid-focal / ASL targets that require grad are computed by the same backward kernels; class
weights, pos_weight and transform vectors that require grad are refused with a ValueError (PyTorch refuses
weight gradients too).

In-place gradient (opt-in): pass `inplace_backward=True` to a function here, or wrap calls that reach this
backend through `xentlab.functional` in `with use_inplace_backward():`. The backward then writes the gradient
into the logits' own storage instead of a new buffer, so forward+backward allocates nothing gradient-sized.
The logits are destroyed: after the backward `input` holds dl/dinput. Its version counter is bumped, so any
other autograd use of those logits that runs later (an op that saved them, or a second backward through a
retained graph) raises PyTorch's "modified by an inplace operation" error instead of computing with garbage.
Use it only on logits that are an intermediate result nothing else reads afterwards (typically the output of
the last linear layer); a leaf tensor that requires grad is refused, since its `.grad` would alias its own
data. (If the logits are a view, `loss.backward()` works but `torch.autograd.grad(loss, view)` does not:
PyTorch gives a view whose data changed in place a new grad_fn.)

Importing this package imports Triton; `xentlab` imports it only when the Triton backend is chosen. To run
the kernels on CPU tensors in Triton's interpreter, set TRITON_INTERPRET=1 before `triton` is first imported
in the process (Triton reads it when `@triton.jit` decorates its own library and these kernels; note that
pytorch_lightning imports triton); otherwise CPU tensors are refused with a ValueError.
"""

from __future__ import annotations

from functools import partial

from xentlab.kernels import reference
from xentlab.kernels.spec import NLL, Focal
from xentlab.kernels.triton import launch
from xentlab.kernels.triton.autograd import (
    _apply_sigmoid,
    _apply_softmax,
    _apply_softmax_loss,
    use_inplace_backward,
)
from xentlab.kernels.triton.launch import _INTERPRETED, _TUNING, _Spec
from xentlab.kernels.triton.rows import _ASL, _BCE, _CE_PROBS, _MSE_LOGITS, _MSE_PROBS, _SIGMOID_FOCAL

__all__ = ["asl_loss", "binary_cross_entropy_with_logits", "cross_entropy", "focal_loss", "mse_loss",
           "sigmoid_focal_loss", "softmax_loss", "use_inplace_backward", "launch", "_INTERPRETED", "_TUNING"]


def softmax_loss(input, target, row_loss, weight, transform, ignore_index, reduction, label_smoothing, *,
                 inplace_backward=None):
    """The index-target softmax family: per kept row, with z' = transform(input) and p' = softmax(z'),
    l_i = (1-eps) w[y_i] phi(log p'_iy) + (eps/C) sum_c w_c (lse'_i - z'_ic), phi = `row_loss`; ignored rows
    0, `mean` over D = sum of w[y_i] on kept rows. Gradient dL/dz_c = scale_c [-(1-eps) w_y phi'(log p'_y)
    (p'_c - [c == y]) + (eps/C)(W p'_c - w_c)] times grad_output (over D for `mean`), with
    phi' = `row_loss.slope`."""
    return _apply_softmax_loss(input, target, row_loss, weight, transform, ignore_index, reduction,
                               label_smoothing, inplace_backward)


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, *, inplace_backward=None):
    """Cross-entropy: for class indices softmax_loss with phi = -log p_y, i.e. l_i = (1-eps) w[y_i] (lse_i -
    x_iy) + (eps/C) sum_c w_c (lse_i - x_ic) (ignored rows 0, `mean` over D = sum of w[y_i] on kept rows);
    for probability targets l_i = -sum_c w_c t'_ic log p_ic with t' = (1-eps) t + eps/C (`mean` over N),
    gradient sum_c(w t') p - w t' per row, and d l / d t = -(1-eps) w log p for targets that require grad."""
    if not target.is_floating_point():
        return softmax_loss(input, target, NLL(), weight, None, ignore_index, reduction, label_smoothing,
                            inplace_backward=inplace_backward)
    spec = _Spec(int(_CE_PROBS), reduction, ignore_index=int(ignore_index), eps=float(label_smoothing))
    composable = partial(reference.cross_entropy, weight=weight, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing)
    return _apply_softmax(input, target, weight, spec, inplace_backward, composable)


def focal_loss(input, target, gamma, alpha, ignore_index, reduction, *, inplace_backward=None):
    """Softmax focal loss l_i = -a[y_i] (1 - p_iy)^gamma log p_iy: softmax_loss with `Focal(gamma)` and alpha
    as the class weight, `mean` over the sum of a[y_i] on kept rows."""
    return softmax_loss(input, target, Focal(gamma), alpha, None, ignore_index, reduction, 0.0,
                        inplace_backward=inplace_backward)


def mse_loss(input, target, ignore_index, reduction, on, *, inplace_backward=None):
    """Squared error (softmax(x) - t)^2 (on="probs") or (x - t)^2 (on="logits") against the one-hot or
    probability target t, element-wise for `none`, ignored rows 0, `mean` over (kept rows) * C; the gradient
    through the softmax is 2 p_c ((p_c - t_c) - sum_k p_k (p_k - t_k)) per unit of upstream gradient, and
    d l / d t = -2 (pred - t) for probability targets that require grad."""
    spec = _Spec(int(_MSE_PROBS if on == "probs" else _MSE_LOGITS), reduction, ignore_index=int(ignore_index))
    composable = partial(reference.mse_loss, ignore_index=ignore_index, reduction=reduction, on=on)
    return _apply_softmax(input, target, None, spec, inplace_backward, composable)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction, *, inplace_backward=None):
    """l = weight [pos_weight t softplus(-x) + (1-t) softplus(x)] element-wise (PyTorch's BCE with logits),
    `mean` over all N*C elements; gradient weight [(1-t) sigmoid(x) - pos_weight t sigmoid(-x)], and
    weight [pos_weight softplus(-x) - softplus(x)] with respect to a target that requires grad."""
    spec = _Spec(int(_BCE), reduction)
    composable = partial(reference.binary_cross_entropy_with_logits, weight=weight, pos_weight=pos_weight,
                         reduction=reduction)
    return _apply_sigmoid(input, target, weight, pos_weight, spec, inplace_backward, composable)


def sigmoid_focal_loss(input, target, alpha, gamma, reduction, *, inplace_backward=None):
    """torchvision's sigmoid focal loss alpha_t ce (1 - p_t)^gamma with ce the BCE with logits, p_t = p t +
    (1-p)(1-t), alpha_t = alpha t + (1-alpha)(1-t) (alpha < 0: 1); gradient alpha_t [(p - t)(1-p_t)^gamma +
    gamma ce (1-p_t)^(gamma-1) (1-2t) p (1-p)], the second term taken as 0 where 1 - p_t == 0."""
    spec = _Spec(int(_SIGMOID_FOCAL), reduction, alpha=float(alpha), gamma=float(gamma))
    composable = partial(reference.sigmoid_focal_loss, alpha=alpha, gamma=gamma, reduction=reduction)
    return _apply_sigmoid(input, target, None, None, spec, inplace_backward, composable)


def asl_loss(input, target, gamma_pos, gamma_neg, clip, reduction, *, inplace_backward=None):
    """Asymmetric loss (Ridnik et al. 2021), element-wise: l = -[t (1-p)^gamma_pos log p + (1-t) p_m^gamma_neg
    log(1 - p_m)] with p = sigmoid(x), p_m = max(p - clip, 0), log p = -softplus(-x) and log(1 - p_m) =
    -softplus(x) (clip = 0) or log(min(sigmoid(-x) + clip, 1)); `mean` over all elements. Gradient
    t (1-p)^gamma_pos (gamma_pos p log p - (1-p)) - (1-t) [p > clip] p (1-p) p_m^gamma_neg (gamma_neg
    log(1-p_m)/p_m - 1/(1-p_m))."""
    spec = _Spec(int(_ASL), reduction, gamma=float(gamma_pos), gamma_neg=float(gamma_neg), clip=float(clip))
    composable = partial(reference.asl_loss, gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip,
                         reduction=reduction)
    return _apply_sigmoid(input, target, None, None, spec, inplace_backward, composable)
