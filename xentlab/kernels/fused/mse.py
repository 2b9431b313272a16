"""Squared error on the CPU, against one-hot or probability targets, on softmax probabilities or on logits.

Through the softmax the gradient of g = dL/dp is p (g - sum_k g_k p_k) (`through_softmax`). Routes by size as
the softmax family's (`xentlab.kernels.fused.sizes`): PyTorch's softmax and mse_loss with autograd for the
smallest batches, `_SmallMse` (one pass) up to SMALL_ELEMS elements, the chunked sweep above.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from xentlab.kernels import compute_dtype, reference
from xentlab.kernels.fused import sizes
from xentlab.kernels.fused.softmax import softmax_into, softmax_parts, through_softmax
from xentlab.kernels.fused.sweep import FusedLoss, differentiable_gradient, has_ignored, reduced

Tensor = torch.Tensor


@dataclass(eq=False)
class _Mse:
    """Squared error e = pred - goal, pred = softmax(x) (probs) or x (logits). Through the softmax,
    dL/dx = p * (g - sum_k g_k p_k) with g = 2 e * scale. Ignored rows have e = 0 and leave the count."""

    target: Tensor
    valid: Tensor | None
    all_valid: bool
    on: str
    n_classes: int
    elementwise = True
    slots = 1

    def denominator(self) -> Tensor:
        rows = self.target.shape[0] if self.valid is None else self.valid.sum()
        return torch.as_tensor(rows * self.n_classes, device=self.target.device)

    def chunk(self, x, rows, out, ws, s):
        (err,) = ws
        pred = softmax_into(x, out) if self.on == "probs" else x
        if self.valid is None:
            torch.sub(pred, self.target[rows], out=err)
        else:
            valid = self.valid[rows, None].to(x.dtype)
            err.copy_(pred).scatter_add_(1, self.target[rows, None], -valid)
            if not self.all_valid:
                err.mul_(valid)
        if s is None:
            return err.square_()
        loss = torch.linalg.vecdot(err, err)
        g = err.mul_(2 * s)  # s: 0-d, or (rows, C) in the backward of reduction="none"
        out.copy_(through_softmax(g, out if self.on == "probs" else None))
        return loss


def mse_loss(input, target, ignore_index, reduction, on):
    """Elementwise (pred - onehot(y))^2 with pred = softmax(x) (on="probs") or x (on="logits"), or against a
    probability target; `mean` divides by (non-ignored rows) * C."""
    if sizes.is_tiny(input):
        return _tiny_mse(input, target, ignore_index, reduction, on)
    composable = functools.partial(reference.mse_loss, target=target, ignore_index=ignore_index,
                                   reduction=reduction, on=on)
    if sizes.is_one_shot(input):
        return _SmallMse.apply(input, (target, ignore_index, on), reduction, composable)
    if target.dtype.is_floating_point:
        kernel = _Mse(target, None, True, on, input.shape[1])
    else:
        valid = target != ignore_index
        kernel = _Mse(torch.where(valid, target, 0), valid, bool(valid.all()), on, input.shape[1])
    return FusedLoss.apply(input, kernel, reduction, composable)


def _tiny_mse(input, target, ignore_index, reduction, on):
    """The smallest batches (as for the softmax family): PyTorch's softmax and mse_loss ops with autograd,
    ignored rows zeroed on both sides; one_hot range-checks the class indices. An all-ignored batch has a NaN
    mean and a zero gradient."""
    cdt = compute_dtype(input.dtype)
    z = input if input.dtype == cdt else input.to(cdt)
    pred = torch.softmax(z, 1) if on == "probs" else z
    if target.dtype.is_floating_point:
        loss = torch.nn.functional.mse_loss(pred, target.to(cdt), reduction=reduction)
        return loss if loss.dtype == input.dtype else loss.to(input.dtype)
    if not has_ignored(target, ignore_index):  # the training loop's case: the plain composition
        goal = torch.nn.functional.one_hot(target, z.shape[1]).to(cdt)
        return reduced(torch.nn.functional.mse_loss(pred, goal, reduction=reduction), input.dtype)
    valid = target != ignore_index
    kept = valid[:, None]
    goal = torch.nn.functional.one_hot(torch.where(valid, target, 0), z.shape[1]).mul_(kept)
    summed = "sum" if reduction == "mean" else reduction
    loss = torch.nn.functional.mse_loss(pred * kept, goal, reduction=summed)
    if reduction == "mean":
        count = valid.sum() * z.shape[1]
        loss = torch.where(count > 0, loss / count.clamp(min=1), torch.nan)
    return loss if loss.dtype == input.dtype else loss.to(input.dtype)


class _SmallMse(torch.autograd.Function):
    """Small inputs: err = pred - goal in a few whole-batch ops (the one-hot goal by one scatter, whose index
    check is the target range check), and for `mean`/`sum` the gradient in the forward: 2 err through the
    softmax, p (g - sum_k g_k p_k). Backward only scales it (`none` forms it there, per element)."""

    @staticmethod
    def forward(ctx, input: Tensor, problem, reduction: str, composable) -> Tensor:
        target, ignore_index, on = problem
        cdt = compute_dtype(input.dtype)
        z = input if input.dtype == cdt else input.to(cdt)
        if on == "probs":
            _, _, e, s = softmax_parts(z)
            pred = e if s is None else e.div_(s)
        else:
            pred = z
        if target.dtype.is_floating_point:
            err = pred - target.to(cdt)
            count = float(err.numel())
        else:  # ignored rows scatter nowhere (index 0, value 0) and are zeroed; others are range-checked
            valid = target != ignore_index
            kept = valid.to(cdt)
            err = pred.clone().scatter_add_(1, torch.where(valid, target, 0)[:, None], kept.neg()[:, None])
            err = err.mul_(kept[:, None])
            count = kept.sum().mul_(pred.shape[1])
        if reduction == "none":
            loss = err.square()
        else:
            flat = err.view(-1)
            loss = torch.dot(flat, flat)
            loss = loss / count if reduction == "mean" else loss
        ctx.reduction, ctx.dtype, ctx.composable = reduction, input.dtype, composable
        probs = pred if on == "probs" else None
        if reduction == "none" or not ctx.needs_input_grad[0]:
            ctx.save_for_backward(input, err, probs)
            return loss.to(input.dtype)
        # an empty or all-ignored batch: zero gradient, as PyTorch's
        scale = 2.0 if reduction == "sum" else 2 / (count.clamp(min=1) if isinstance(count, Tensor) else
                                                        max(count, 1.0))
        ctx.save_for_backward(input, through_softmax(err.mul_(scale), probs), None)
        return loss.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if torch.is_grad_enabled():
            return differentiable_gradient(ctx, grad_output), None, None, None
        _, saved, probs = ctx.saved_tensors
        go = grad_output.to(saved.dtype)
        if ctx.reduction == "none":
            grad = through_softmax(saved * (2 * go), probs)
        else:
            grad = saved * go
        return grad.to(ctx.dtype), None, None, None
