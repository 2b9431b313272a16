"""Autograd glue: the autograd.Functions over the kernels, the in-place gradient context, the input checks.

Every Function here has the same shape: the forward reads the logits once and computes the loss only
(plus, for the index-target family, the per-row statistics and gradient coefficients, (N,) vectors); the
backward runs one element-wise or row kernel that reads the logits again and writes the gradient with
grad_output folded in. No gradient-sized buffer lives between forward and backward, each backward is
computed afresh from the saved inputs (so any sequence of grad_output values through a retained graph is
exact, and a returned gradient is never touched again), and nothing synchronises with the host, so forward
and backward can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass, replace

import torch

from xentlab.kernels import compute_dtype, mean_over, reference, spec
from xentlab.kernels.triton.launch import (
    _INTERPRETED,
    _launch_row_stats,
    _launch_sigmoid,
    _launch_softmax,
    _launch_softmax_grad,
    _softmax_launch,
    _Spec,
    _tile_grid,
    _transform_args,
)
from xentlab.kernels.triton.rows import _MSE_LOGITS, _MSE_PROBS, _OUT_ELEM, _OUT_PARTIAL, _OUT_ROW

Tensor = torch.Tensor

_inplace_default: contextvars.ContextVar[bool] = contextvars.ContextVar("xentlab_inplace_backward",
                                                                        default=False)


@contextlib.contextmanager
def use_inplace_backward(enabled: bool = True):
    """Within this context, losses on the Triton backend write their gradient into the logits' storage (see
    the package docstring); an explicit `inplace_backward=` argument still wins."""
    token = _inplace_default.set(bool(enabled))
    try:
        yield
    finally:
        _inplace_default.reset(token)


def _check_input(x: Tensor, inplace: bool) -> None:
    if not x.is_cuda and not _INTERPRETED:
        raise ValueError(
            f"the triton backend needs CUDA tensors, got a tensor on {x.device}; use backend='fused' on the "
            "CPU, or set TRITON_INTERPRET=1 before triton and xentlab.kernels.triton are first imported "
            "to run the kernels in Triton's CPU interpreter")
    if inplace and x.is_leaf and x.requires_grad:
        raise ValueError("inplace_backward=True needs logits produced by an operation, got a leaf tensor "
                         "that requires grad (its .grad would alias its own data)")


def _check_no_grad(**tensors) -> None:
    """Class weights, pos_weight and transform vectors are constants here, as in PyTorch (which refuses a
    weight that requires grad); say so instead of returning no gradient for them."""
    if not torch.is_grad_enabled():
        return
    for name, value in tensors.items():
        if isinstance(value, Tensor) and value.requires_grad:
            raise ValueError(f"{name} requires grad, but the triton backend treats it as a constant and "
                             "computes no gradient for it; detach it, or use backend='reference' (plain "
                             "autograd) to differentiate with respect to it")


def _inplace(flag: bool | None) -> bool:
    return _inplace_default.get() if flag is None else bool(flag)


def _write_grad(ctx, x: Tensor) -> Tensor:
    """The buffer the backward writes dL/dx into: a new one, or the logits themselves (in-place mode, whose
    version counter is then bumped so any other saved use of them raises instead of reading the gradient)."""
    return x if ctx.inplace else torch.empty_like(x)


def _done_inplace(ctx, x: Tensor) -> None:
    if ctx.inplace:
        torch.autograd.graph.increment_version(x)


def _differentiable_backward(ctx, grad_output: Tensor, n_outputs: int) -> tuple:
    """The backward under create_graph=True (a Hessian-vector product, a meta-gradient): the kernels'
    gradients are not themselves differentiable, so the gradients in the logits and the target are taken by
    autograd through `ctx.composable`, the reference composition of the same loss, from the saved logits and
    target: exact to any order. Nothing is written in place."""
    needed = ctx.needs_input_grad[:2]
    grads = reference.gradient_of(ctx.composable, ctx.saved_tensors[:2], needed, grad_output)
    return *grads, *(None,) * (n_outputs - 2)


# ------------------------------------------------------------------------------ index-target softmax family


@dataclass(frozen=True)
class _RowArgs:
    """The non-tensor arguments of one softmax_loss call."""

    row_loss: object
    ignore_index: int
    reduction: str
    eps: float
    inplace: bool


class _SoftmaxLoss(torch.autograd.Function):
    """softmax_loss: row statistics by kernel, phi and its slope by the RowLoss's own torch code on (N,)
    vectors, the gradient by one element-wise kernel in the backward."""

    @staticmethod
    def forward(ctx, x, target, weight, scale, bias, margin, args: _RowArgs, composable):
        ctx.composable = composable
        n, c = x.shape
        vectors = (scale, bias, margin)
        smooth = args.eps > 0
        lse, logpt, w_y, smoothing, kept = _launch_row_stats(x, target, weight, vectors, args.ignore_index,
                                                             smooth)
        # ignored rows arrive with w_y = 0, log p_y = 0 (phi finite there) and a zero smoothing sum
        if ctx.needs_input_grad[0]:  # both, from one computation where the row loss shares them (focal)
            value, slope = spec.value_and_slope(args.row_loss, logpt)
        else:
            value = spec.row_value(args.row_loss, logpt)
        loss = w_y * value
        if smooth:
            loss = (1 - args.eps) * loss + (args.eps / c) * smoothing
        denominator = w_y.sum()
        if ctx.needs_input_grad[0]:
            # d l_i / d z'_c = c_p p'_c - c_y [c == y] - c_w w_c, before grad_output and the denominator
            c_y = -w_y * slope
            if smooth:
                c_y = (1 - args.eps) * c_y
            c_w = kept * (args.eps / c) if smooth else None
            # 1/D per row, 0 on ignored rows: where D = 0 (no weight on any kept row) the kept rows' gradient
            # is NaN and the ignored rows' 0, as PyTorch's
            inv = torch.where(target != args.ignore_index, 1 / denominator, 0.0) \
                if args.reduction == "mean" else None
            ctx.save_for_backward(x, target, weight, scale, bias, margin, lse, c_y, c_w, inv)
            ctx.args, ctx.inplace = args, args.inplace
            ctx.total_weight = c if weight is None else weight.sum()
        if args.reduction == "none":
            return loss.to(x.dtype)
        total = loss.sum()
        return (mean_over(total, denominator) if args.reduction == "mean" else total).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, grad_output, 8)
        x, target, weight, scale, bias, margin, lse, c_y, c_w, inv = ctx.saved_tensors
        k = grad_output.to(lse.dtype)
        if inv is not None:
            k = k * inv
        c_y = c_y * k
        c_p, c_w = (c_y, None) if c_w is None else (c_y + c_w * k * ctx.total_weight, c_w * k)
        grad = _write_grad(ctx, x)
        c_w = None if c_w is None else c_w.contiguous()
        _launch_softmax_grad(x, target, weight, (scale, bias, margin), ctx.args.ignore_index, lse,
                             c_p.contiguous(), c_y.contiguous(), c_w, grad)
        _done_inplace(ctx, x)
        return grad, None, None, None, None, None, None, None


def _apply_softmax_loss(x, target, row_loss, weight, transform, ignore_index, reduction, label_smoothing,
                        inplace_backward):
    inplace = _inplace(inplace_backward)
    _check_input(x, inplace)
    scale, bias, margin = _transform_args(transform, x)
    _check_no_grad(weight=weight, **{f"transform.{k}": v for k, v in
                                     zip(("scale", "bias", "margin"), (scale, bias, margin), strict=True)})
    weight = None if weight is None else weight.contiguous()
    args = _RowArgs(row_loss, int(ignore_index), reduction, float(label_smoothing), inplace)
    composable = functools.partial(reference.softmax_loss, row_loss=row_loss, weight=weight,
                                   transform=transform, ignore_index=ignore_index, reduction=reduction,
                                   label_smoothing=label_smoothing)
    return _SoftmaxLoss.apply(x.contiguous(), target, weight, scale, bias, margin, args, composable)


# ----------------------------------------------------- probability-target CE, MSE; element-wise losses


def _scalar_loss(parts: Tensor, count: int, reduction: str, dtype: torch.dtype) -> Tensor:
    if count == 0 and reduction == "mean":  # PyTorch's empty-batch mean is nan
        return torch.full((), float("nan"), dtype=dtype, device=parts.device)
    return parts.sum().to(dtype)


def _backward(ctx, grad_output: Tensor, launch) -> tuple[Tensor | None, Tensor | None]:
    """dL/dx (and dL/dtarget when the target requires grad): `launch` again over the saved inputs with
    grad_output as the upstream (a scalar for mean/sum, per row or per element for `none`)."""
    x, target = ctx.saved_tensors[:2]
    grad = _write_grad(ctx, x) if ctx.needs_input_grad[0] else None
    tgrad = torch.empty(target.shape, dtype=target.dtype, device=target.device) \
        if ctx.needs_input_grad[1] else None
    launch(*ctx.saved_tensors, ctx.spec, grad=grad, tgrad=tgrad, upstream=grad_output)
    if grad is not None:
        _done_inplace(ctx, x)
    return grad, tgrad


class _SoftmaxFamily(torch.autograd.Function):
    """Cross-entropy with probability targets and MSE (index or probability targets)."""

    @staticmethod
    def forward(ctx, x, target, weight, spec, composable):
        ctx.spec, ctx.inplace, ctx.composable = spec, spec.inplace, composable
        n, c = x.shape
        ctx.save_for_backward(x, target, weight)
        if spec.reduction == "none":
            per_element = spec.loss in (_MSE_PROBS, _MSE_LOGITS)
            loss = x.new_empty((n, c) if per_element else (n,))
            _launch_softmax(x, target, weight, spec, loss=loss,
                            loss_out=_OUT_ELEM if per_element else _OUT_ROW)
            return loss
        parts = torch.empty(_softmax_launch(x)[1], dtype=compute_dtype(x.dtype), device=x.device)
        _launch_softmax(x, target, weight, spec, loss=parts, loss_out=_OUT_PARTIAL)
        return _scalar_loss(parts, n, spec.reduction, x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, grad_output, 5)
        return *_backward(ctx, grad_output, _launch_softmax), None, None, None


class _SigmoidFamily(torch.autograd.Function):
    """BCE with logits, sigmoid focal loss, ASL."""

    @staticmethod
    def forward(ctx, x, target, weight, pos_weight, spec, composable):
        ctx.spec, ctx.inplace, ctx.composable = spec, spec.inplace, composable
        ctx.save_for_backward(x, target, weight, pos_weight)
        if spec.reduction == "none":
            loss = torch.empty_like(x)
            _launch_sigmoid(x, target, weight, pos_weight, spec, loss=loss, loss_out=_OUT_ELEM)
            return loss
        grid, _, _ = _tile_grid(*x.shape)
        parts = torch.zeros(grid[0] * grid[1], dtype=compute_dtype(x.dtype), device=x.device)
        _launch_sigmoid(x, target, weight, pos_weight, spec, loss=parts, loss_out=_OUT_PARTIAL)
        return _scalar_loss(parts, x.numel(), spec.reduction, x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, grad_output, 6)
        return *_backward(ctx, grad_output, _launch_sigmoid), None, None, None, None


def _apply_softmax(x, target, weight, spec: _Spec, inplace_backward, composable):
    # the kernels assume unit column strides for the logits and the class weights (no-ops when contiguous)
    spec = replace(spec, inplace=_inplace(inplace_backward))
    _check_input(x, spec.inplace)
    _check_no_grad(weight=weight)
    weight = None if weight is None else weight.contiguous()
    return _SoftmaxFamily.apply(x.contiguous(), target, weight, spec, composable)


def _apply_sigmoid(x, target, weight, pos_weight, spec: _Spec, inplace_backward, composable):
    spec = replace(spec, inplace=_inplace(inplace_backward))
    _check_input(x, spec.inplace)
    _check_no_grad(weight=weight, pos_weight=pos_weight)
    return _SigmoidFamily.apply(x.contiguous(), target, weight, pos_weight, spec, composable)
