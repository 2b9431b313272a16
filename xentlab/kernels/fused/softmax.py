"""The softmax family on the CPU: index targets (any row loss of `xentlab.kernels.spec` after a logit
transform, with class weights and label smoothing) and probability targets.

Per row the gradient with respect to the transformed logits z' is coef p' - [c == y] coef_y - smooth w, with
coef_y = -(1-eps) w_y slope(log p'_y), smooth = eps/C on kept rows and coef = coef_y + smooth W
(`softmax_gradient`, the one place it is formed); the transform's scale multiplies it on the way back to z.
Routes by size (`xentlab.kernels.fused.sizes`): PyTorch's own row kernels with autograd for the smallest
batches, `_SmallSoftmax` (one pass over the whole batch) up to SMALL_ELEMS elements, the chunked sweep above.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from xentlab.kernels import compute_dtype, mean_over, reference, spec
from xentlab.kernels.fused import sizes
from xentlab.kernels.fused.sweep import (
    REDUCTION_ENUM,
    FusedLoss,
    differentiable_gradient,
    has_ignored,
    reduced,
)

Tensor = torch.Tensor

_NLL = spec.NLL()


def softmax_into(x: Tensor, out: Tensor) -> Tensor:
    """softmax(x) over rows, written into `out`."""
    if not sizes.few_classes(x.shape[1]):
        return torch.softmax(x, 1, out=out)
    torch.sub(x, x.amax(1, keepdim=True), out=out).exp_()
    return out.div_(out.sum(1, keepdim=True))


def log_softmax_into(x: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    """log_softmax(x) over rows, written into `out` (`scratch`: a buffer of x's shape)."""
    if not sizes.few_classes(x.shape[1]):
        return torch.log_softmax(x, 1, out=out)
    torch.sub(x, x.amax(1, keepdim=True), out=out)
    return out.sub_(torch.exp(out, out=scratch).sum(1, keepdim=True).log_())


def softmax_parts(z: Tensor):
    """(a, b, e, s) with log softmax(z) = a - b and softmax(z) = e / s, b = log s ((N, 1)). With few classes
    from whole-tensor elementwise ops and two row reductions (PyTorch's row-softmax kernels spend ~60 ns of
    fixed cost per row there); otherwise from log_softmax, with b = None and s = None (i.e. 1)."""
    if not sizes.few_classes(z.shape[1]):
        a = torch.log_softmax(z, 1)
        return a, None, a.exp(), None
    a = z - z.amax(1, keepdim=True)
    e = a.exp()
    s = e.sum(1, keepdim=True)
    return a, s.log(), e, s


def through_softmax(g: Tensor, probs: Tensor | None) -> Tensor:
    """dL/dx from g = dL/dpred, in place on g: p (g - sum_k g_k p_k) when pred = softmax(x) (`probs` given),
    g itself when pred = x."""
    if probs is None:
        return g
    return g.sub_(torch.linalg.vecdot(g, probs)[:, None]).mul_(probs)


def softmax_gradient(p: Tensor, y: Tensor, coef_y: Tensor, smooth: Tensor | None, weight: Tensor | None,
                     transform: spec.LogitTransform | None, row_sum: Tensor | None = None) -> Tensor:
    """The index-target softmax family's gradient, formed in place on p = softmax(z') (or on its unnormalised
    exp e with `row_sum` s, p = e / s): dL/dz_c = scale_c [coef p'_c - [c == y] coef_y - smooth w_c] with
    coef = coef_y + smooth W, W = sum_c w_c (C unweighted). coef_y and smooth are per row ((rows,)) and
    already carry grad_output and 1/D; `y` is (rows, 1)."""
    coef = coef_y if smooth is None else coef_y + smooth * (p.shape[1] if weight is None else weight.sum())
    p.mul_(coef[:, None] if row_sum is None else coef[:, None] / row_sum)
    if smooth is not None and weight is None:
        p.sub_(smooth[:, None])
    elif smooth is not None:
        p.addr_(smooth, weight, alpha=-1)
    p.scatter_add_(1, y, coef_y.neg()[:, None])
    scale = transform.scale if transform is not None else 1.0
    if isinstance(scale, Tensor) or scale != 1.0:
        p.mul_(scale)
    return p


def _log_true_class(p: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """log p[y] without a host sync: lse = x_k - log p_k at the row's argmax k, where p_k >= 1/C is never too
    small for an accurate log, so log p[y] = x[y] - x_k + log p_k even when p[y] underflows."""
    top, k = x.max(1, keepdim=True)
    return (x.gather(1, y) - top + p.gather(1, k).log_()).squeeze(1)


@dataclass(eq=False)
class _SoftmaxIndex:
    """The index-target softmax family of `xentlab.kernels.spec`: a row loss phi of log p'_y after a logit
    transform z -> z', with class weights and PyTorch's label smoothing.

    target has ignored rows sent to class 0; w_y is the true class's weight (alpha for focal), 0 on ignored
    rows. Per row the gradient with respect to z' is coef p' - [c == y] coef_y - smooth w (the last only
    with label smoothing), with coef_y = -(1-eps) w_y slope(log p'_y) and coef = coef_y + smooth W; the
    transform's scale multiplies it on the way back to z."""

    target: Tensor
    valid: Tensor
    w_y: Tensor
    weight: Tensor | None
    eps: float
    row_loss: spec.RowLoss
    transform: spec.LogitTransform | None
    elementwise = False

    @property
    def slots(self) -> int:
        return self.transform is not None

    def denominator(self) -> Tensor:
        return self.w_y.sum()

    def chunk(self, x, rows, out, ws, s):
        y, w_y = self.target[rows, None], self.w_y[rows]
        if self.transform is not None:
            x = self._transformed(x, y, ws.pop() if ws else None)
        p = softmax_into(x, out)
        logpt = _log_true_class(p, x, y)
        nll = isinstance(self.row_loss, spec.NLL)
        if nll:
            value = -logpt
        elif s is None:
            value = spec.row_value(self.row_loss, logpt)
        else:  # both, from one computation where the row loss shares them (focal)
            value, slope = spec.value_and_slope(self.row_loss, logpt)
        keep = 1 - self.eps
        loss = w_y * value if keep == 1 else (keep * w_y) * value
        smooth = None
        if self.eps:
            smooth, row_sum = self._smoothing(x, y, logpt, rows)
            loss = loss - smooth * row_sum
        if s is None:
            return torch.where(self.valid[rows], loss, 0.0)
        coef_y = w_y if nll else w_y * -slope
        if keep != 1:
            coef_y = keep * coef_y
        # s: 0-d, or (rows,) in the backward of reduction="none"; 1/D is inf where D = 0, and an ignored row's
        # gradient is 0 even then (PyTorch's), a kept row's NaN
        s = torch.where(self.valid[rows], s, 0.0)
        coef_y = coef_y * s
        softmax_gradient(p, y, coef_y, None if smooth is None else smooth * s, self.weight, self.transform)
        return torch.where(self.valid[rows], loss, 0.0)

    def _transformed(self, x, y, buffer):
        """z' = scale (z - [c == y] margin) + bias, in `buffer` when given (a chunk workspace slot)."""
        t = self.transform
        z = x if buffer is None else buffer.copy_(x)
        if t.margin is not None:
            z = z.scatter_add(1, y, -t.margin[y]) if buffer is None else z.scatter_add_(1, y, -t.margin[y])
        if isinstance(t.scale, Tensor) or t.scale != 1.0:
            z = z * t.scale if z is x else z.mul_(t.scale)
        if t.bias is not None:
            z = z + t.bias if z is x else z.add_(t.bias)
        return z

    def _smoothing(self, x, y, logpt, rows):
        """smooth_i = valid_i eps/C and sum_c w_c log p'_ic (the smoothing term's row sum)."""
        n_classes = x.shape[1]
        smooth = self.valid[rows].to(x.dtype) * (self.eps / n_classes)
        total_w = n_classes if self.weight is None else self.weight.sum()
        # sum_c w_c log p_c = sum_c w_c x_c - W lse, with lse = x_y - log p_y
        lse = x.gather(1, y).squeeze(1) - logpt
        row_sum = (x.sum(1) if self.weight is None else x @ self.weight) - total_w * lse
        return smooth, row_sum


def softmax_loss(input, target, row_loss, weight, transform, ignore_index, reduction, label_smoothing):
    """The index-target softmax family (`xentlab.kernels.spec`): per non-ignored row l_i = (1-eps) w[y_i]
    phi(log p'_iy) + (eps/C) sum_c w_c (lse'_i - z'_ic) on the transformed logits z'; `mean` divides by the
    sum of w[y_i] over non-ignored rows. Gradient in closed form from the row loss's slope. Small inputs
    (`checks_targets`) get their class indices range-checked inside PyTorch's nll kernel, as F.cross_entropy
    does; an out-of-range index raises IndexError there."""
    cdt = compute_dtype(input.dtype)
    weight = None if weight is None else weight.to(cdt)
    if transform is not None and transform.is_identity:
        transform = None
    if sizes.pytorch_rows_win(input):
        if transform is None and spec.is_nll(row_loss):
            return _small_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
        if not label_smoothing:
            return _row_loss_by_autograd(input, target, row_loss, weight, transform, ignore_index, reduction)
    composable = functools.partial(reference.softmax_loss, target=target, row_loss=row_loss, weight=weight,
                                   transform=transform, ignore_index=ignore_index, reduction=reduction,
                                   label_smoothing=label_smoothing)
    if checks_targets(input):
        problem = (target, row_loss, weight, transform, ignore_index, label_smoothing)
        return _SmallSoftmax.apply(input, problem, reduction, composable)
    valid = target != ignore_index
    y = torch.where(valid, target, 0)
    w_y = valid.to(cdt) if weight is None else weight[y] * valid
    kernel = _SoftmaxIndex(y, valid, w_y, weight, label_smoothing, row_loss, transform)
    return FusedLoss.apply(input, kernel, reduction, composable)


def checks_targets(input: Tensor) -> bool:
    """Whether softmax_loss and mse_loss on this (validated, (N, C)) input range-check the class indices
    themselves (inside PyTorch's kernels, raising IndexError or RuntimeError), so xentlab.functional need
    not spend a host sync on it."""
    return sizes.is_one_shot(input)


def _small_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing):
    """(Weighted, label-smoothed) cross-entropy at training shapes is PyTorch's own op, log_softmax + nll_loss
    with native autograd nodes: at 128 x 5 a whole forward and backward costs about thirty microseconds,
    most of it fixed per-op and autograd cost that a Python autograd.Function adds to, never removes. It is
    the same row logsumexp computed once; half inputs are computed in float32 as everywhere else."""
    cdt = compute_dtype(input.dtype)
    z = input if input.dtype == cdt else input.to(cdt)
    loss = torch._C._nn.cross_entropy_loss(z, target, weight, REDUCTION_ENUM[reduction], ignore_index,
                                           label_smoothing)
    return loss if loss.dtype == input.dtype else loss.to(input.dtype)


def _row_loss_by_autograd(input, target, row_loss, weight, transform, ignore_index, reduction):
    """The smallest batches (at most sizes.TINY_ELEMS elements, e.g. 128 x 5) and small batches of many
    classes: -log p'_y per row from PyTorch's cross-entropy op (0 on ignored rows, where phi is then
    evaluated at p = 1 and weighted by 0; and the range check), phi through autograd. Inside a whole training
    step of the default model this costs what PyTorch's eager composition costs, where the one-shot closed
    form's two dozen extra dispatched ops cost ~20% more (docs/benchmarks.md). The logit transform, too, is
    differentiated by autograd."""
    cdt = compute_dtype(input.dtype)
    z = input if input.dtype == cdt else input.to(cdt)
    y = target.clamp(0, z.shape[1] - 1)  # ignored rows may hold any index; their weight is 0
    if transform is not None:
        z = transform.apply(z, y)
    neg_logpt = torch._C._nn.cross_entropy_loss(z, target, None, 0, ignore_index, 0.0)
    loss = neg_logpt if isinstance(row_loss, spec.NLL) else spec.row_value(row_loss, neg_logpt.neg())
    if weight is None and not has_ignored(target, ignore_index):  # the training loop: every row counts
        return reduced(loss.sum() if reduction == "sum" else loss.mean() if reduction == "mean" else loss,
                        input.dtype)
    valid = target != ignore_index
    w_y = valid.to(cdt) if weight is None else weight.gather(0, y).mul_(valid)
    loss = loss * w_y
    if reduction != "none":
        loss = loss.sum() if reduction == "sum" else loss.sum() / w_y.sum()
    return reduced(loss, input.dtype)


class _SmallSoftmax(torch.autograd.Function):
    """Small inputs: the whole batch in a few dispatched ops (at 128 x 5 each op's dispatch costs more than
    its math, so the op count is the cost). nll_loss gives -log p'_y per row (0 on ignored rows, where the
    row loss is then evaluated at p_y = 1 and weighted by 0) and does the target range check. Per row the
    gradient is coef_y (p' - onehot(y)) + s (W p' - w) with coef_y = (1-eps) w_y (-slope(log p'_y)) and the
    smoothing share s = eps/C, built in the forward as p' * (coef_y + s W) plus one scatter at y.
    Backward only scales the saved gradient."""

    @staticmethod
    def forward(ctx, input: Tensor, problem, reduction: str, composable) -> Tensor:
        target, row_loss, weight, transform, ignore_index, eps = problem
        cdt = compute_dtype(input.dtype)
        z = input if input.dtype == cdt else input.to(cdt)
        n_classes = z.shape[1]
        # Ignored rows may hold any index; their weight is 0, so any column will do for them.
        y = target.clamp(0, n_classes - 1)[:, None]
        if transform is not None:
            z = transform.apply(z, y[:, 0])
        a, b, e, s = softmax_parts(z)
        logp = a if b is None else a - b
        neg_logpt = torch._C._nn.nll_loss_nd(logp, target, None, 0, ignore_index)
        valid = target != ignore_index
        w_y = valid.to(cdt) if weight is None else weight.gather(0, y[:, 0]).mul_(valid)
        w_kept = w_y if not eps else w_y * (1 - eps)
        nll = isinstance(row_loss, spec.NLL)
        if nll:
            loss = neg_logpt.mul_(w_kept)
        else:
            value, slope = spec.value_and_slope(row_loss, neg_logpt.neg_())
            loss = value * w_kept  # value and slope may be a plugin's tensors: never written in place
        if eps:  # the smoothing share s_i = eps/C of sum_c w_c (-log p'_c)
            smooth = valid.to(cdt).mul_(eps / n_classes)
            loss = loss.sub_(smooth * (logp.sum(1) if weight is None else logp @ weight))
        denominator = w_y.sum() if reduction == "mean" else None
        if reduction != "none":
            loss = loss.sum() if denominator is None else mean_over(loss.sum(), denominator)
        if ctx.needs_input_grad[0]:
            # coef_y = -slope w_y (1-eps) / D; an empty or all-ignored batch: NaN mean loss, zero gradient
            if nll:
                coef_y = w_kept
            else:
                coef_y = (slope * w_kept).neg_()
            if denominator is not None:  # 1/D (inf where D = 0) on kept rows: NaN there, as PyTorch's
                inverse = torch.where(valid, 1 / denominator, 0.0)
                coef_y = coef_y * inverse
                smooth = smooth.mul_(inverse) if eps else None
            grad = softmax_gradient(e, y, coef_y, smooth if eps else None, weight, transform, row_sum=s)
            ctx.save_for_backward(input, grad)
        ctx.reduction, ctx.dtype, ctx.composable = reduction, input.dtype, composable
        return loss if loss.dtype == input.dtype else loss.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if torch.is_grad_enabled():
            return differentiable_gradient(ctx, grad_output), None, None, None
        grad = ctx.saved_tensors[1]
        # scaled in the compute dtype, rounded once to the input's dtype
        go = grad_output if grad_output.dtype == grad.dtype else grad_output.to(grad.dtype)
        grad = grad * (go[:, None] if ctx.reduction == "none" else go)
        return (grad if grad.dtype == ctx.dtype else grad.to(ctx.dtype)), None, None, None


@dataclass(eq=False)
class _SoftmaxProbs:
    """Cross-entropy against probability targets t' = (1-eps) t + eps/C: l = -sum_c w_c t'_c log p_c, whose
    gradient is p * sum_c(w_c t'_c) - w * t'."""

    target: Tensor
    weight: Tensor | None
    eps: float
    elementwise = False
    slots = 1

    def denominator(self) -> Tensor:
        return torch.tensor(float(self.target.shape[0]), device=self.target.device)

    def chunk(self, x, rows, out, ws, s):
        (wt,) = ws
        logp = log_softmax_into(x, out, wt)
        torch.mul(self.target[rows], 1 - self.eps, out=wt).add_(self.eps / x.shape[1])
        if self.weight is not None:
            wt.mul_(self.weight)
        loss = -torch.linalg.vecdot(wt, logp)
        if s is not None:
            s = s[:, None] if s.dim() == 1 else s
            p = logp.exp_()
            p.mul_(wt.sum(1, keepdim=True) * s).addcmul_(wt, s, value=-1)
        return loss


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing):
    """Index targets: softmax_loss with phi = -log p_y (PyTorch's cross-entropy). Probability targets:
    l_i = -sum_c w_c t'_ic log p_ic with t' = (1-eps) t + eps/C, `mean` over rows."""
    if not target.dtype.is_floating_point:
        return softmax_loss(input, target, _NLL, weight, None, ignore_index, reduction, label_smoothing)
    weight = None if weight is None else weight.to(compute_dtype(input.dtype))
    composable = functools.partial(reference.cross_entropy, target=target, weight=weight,
                                   ignore_index=ignore_index, reduction=reduction,
                                   label_smoothing=label_smoothing)
    return FusedLoss.apply(input, _SoftmaxProbs(target, weight, label_smoothing), reduction, composable)


def focal_loss(input, target, gamma, alpha, ignore_index, reduction):
    """Softmax focal loss: softmax_loss with phi = -(1 - p_y)^gamma log p_y and alpha as the class weight."""
    return softmax_loss(input, target, spec.Focal(gamma), alpha, None, ignore_index, reduction, 0.0)
