"""Autograd glue: the autograd.Functions over the kernels, the in-place gradient context, the input checks."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import replace

import torch

from xentlab.kernels import compute_dtype
from xentlab.kernels.triton.launch import (
    _INTERPRETED,
    _launch_sigmoid,
    _launch_softmax,
    _rescale,
    _sigmoid_grid,
    _softmax_launch,
    _Spec,
)
from xentlab.kernels.triton.rows import _MSE_LOGITS, _MSE_PROBS, _OUT_ELEM, _OUT_PARTIAL, _OUT_ROW

Tensor = torch.Tensor

_inplace_default: contextvars.ContextVar[bool] = contextvars.ContextVar("xentlab_inplace_backward",
                                                                        default=False)


@contextlib.contextmanager
def use_inplace_backward(enabled: bool = True):
    """Within this context, losses on the Triton backend write their gradient into the logits' storage (see
    the module docstring); an explicit `inplace_backward=` argument still wins."""
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


def _inplace(flag: bool | None) -> bool:
    return _inplace_default.get() if flag is None else bool(flag)


def _scalar_loss(parts: Tensor, count: int, reduction: str, dtype: torch.dtype) -> Tensor:
    if count == 0 and reduction == "mean":  # PyTorch's empty-batch mean is nan
        return torch.full((), float("nan"), dtype=dtype, device=parts.device)
    return parts.sum().to(dtype)


def _saved_gradient(ctx, x: Tensor, grad: Tensor, spec: _Spec) -> None:
    """Save the gradient so autograd frees it after the backward (letting AccumulateGrad take it without a
    copy); the device scalar of the scale already applied is a plain attribute, as the backward updates it."""
    if spec.inplace:
        torch.autograd.graph.increment_version(x)
    ctx.save_for_backward(grad)
    ctx.applied = torch.ones((), dtype=compute_dtype(x.dtype), device=x.device)


def _backward(ctx, grad_output: Tensor, launch) -> Tensor:
    """The gradient w.r.t. the logits. reduction="none": `launch` again over the saved (x, target, ...)
    with grad_output as the upstream; otherwise the gradient saved by the forward, rescaled."""
    spec = ctx.spec
    if spec.reduction == "none":
        x = ctx.saved_tensors[0]
        grad = x if spec.inplace else torch.empty_like(x)
        launch(*ctx.saved_tensors, spec, grad=grad, upstream=grad_output)
        if spec.inplace:
            torch.autograd.graph.increment_version(x)
        return grad
    (grad,) = ctx.saved_tensors
    _rescale(grad, grad_output, ctx.applied)
    return grad


class _SoftmaxFamily(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, weight, spec):
        ctx.spec = spec
        n, c = x.shape
        if spec.reduction == "none":
            per_element = spec.loss in (_MSE_PROBS, _MSE_LOGITS)
            loss = x.new_empty((n, c) if per_element else (n,))
            _launch_softmax(x, target, weight, spec, loss=loss,
                            loss_out=_OUT_ELEM if per_element else _OUT_ROW)
            ctx.save_for_backward(x, target, weight)
            return loss
        grad = x if spec.inplace else torch.empty_like(x)
        parts = torch.empty(_softmax_launch(x)[1], dtype=compute_dtype(x.dtype), device=x.device)
        _launch_softmax(x, target, weight, spec, grad=grad, loss=parts, loss_out=_OUT_PARTIAL)
        _saved_gradient(ctx, x, grad, spec)
        return _scalar_loss(parts, n, spec.reduction, x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return _backward(ctx, grad_output, _launch_softmax), None, None, None


class _SigmoidFamily(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, weight, pos_weight, spec):
        ctx.spec = spec
        if spec.reduction == "none":
            loss = torch.empty_like(x)
            _launch_sigmoid(x, target, weight, pos_weight, spec, loss=loss, loss_out=_OUT_ELEM)
            ctx.save_for_backward(x, target, weight, pos_weight)
            return loss
        grad = x if spec.inplace else torch.empty_like(x)
        grid, _, _ = _sigmoid_grid(*x.shape)
        parts = torch.zeros(grid[0] * grid[1], dtype=compute_dtype(x.dtype), device=x.device)
        _launch_sigmoid(x, target, weight, pos_weight, spec, grad=grad, loss=parts, loss_out=_OUT_PARTIAL)
        _saved_gradient(ctx, x, grad, spec)
        return _scalar_loss(parts, x.numel(), spec.reduction, x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return _backward(ctx, grad_output, _launch_sigmoid), None, None, None, None


def _apply_softmax(x, target, weight, spec: _Spec, inplace_backward):
    # the kernels assume unit column strides for the logits and the class weights (no-ops when contiguous)
    spec = replace(spec, inplace=_inplace(inplace_backward))
    _check_input(x, spec.inplace)
    weight = None if weight is None else weight.contiguous()
    return _SoftmaxFamily.apply(x.contiguous(), target, weight, spec)


def _apply_sigmoid(x, target, weight, pos_weight, spec: _Spec, inplace_backward):
    spec = replace(spec, inplace=_inplace(inplace_backward))
    _check_input(x, spec.inplace)
    return _SigmoidFamily.apply(x.contiguous(), target, weight, pos_weight, spec)
