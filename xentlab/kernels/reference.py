"""Every loss as a plain PyTorch composition: the test oracle, never the fast path.

Autograd differentiates these compositions, so they check the closed-form gradients of the fused and Triton
backends. Arithmetic runs in float32 for 16/32-bit inputs and float64 for float64 inputs; the result is cast
back to the input dtype. Arguments arrive validated and flattened to (N, C) (see `xentlab.functional`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xentlab.kernels import spec
from xentlab.kernels.numerics import compute_dtype, mean_over
from xentlab.kernels.spec import NLL, Focal

Tensor = torch.Tensor


def gradient_of(loss_fn, inputs: tuple[Tensor, ...], needed: tuple[bool, ...], grad_output: Tensor):
    """The gradients of `loss_fn(*inputs)` (None where not `needed`) by autograd with create_graph=True.

    The fused and Triton backends call this from their backward when it runs with grad mode on, i.e. under
    `torch.autograd.grad(..., create_graph=True)`, `backward(create_graph=True)` or a Hessian-vector product:
    their closed-form gradients are not themselves differentiable, these are, exactly and to any order.
    `loss_fn` is this module's composition of the same loss with the same arguments."""
    wanted = [t for t, need in zip(inputs, needed, strict=True) if need]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(loss_fn(*inputs), wanted, grad_output, create_graph=True,
                                         materialize_grads=True))
    return tuple(next(grads) if need else None for need in needed)


def _reduce(loss: Tensor, reduction: str, denominator: Tensor | float) -> Tensor:
    if reduction == "none":
        return loss
    return loss.sum() / denominator if reduction == "mean" else loss.sum()


def softmax_loss(input, target, row_loss, weight, transform, ignore_index, reduction, label_smoothing):
    """The index-target softmax family (see `xentlab.kernels.spec`): per non-ignored row, with z' the
    transformed logits and p' = softmax(z'), l_i = (1-eps) w[y_i] phi(log p'_iy) + (eps/C) sum_c w_c
    (lse'_i - z'_ic); `mean` divides by sum of w[y_i] over non-ignored rows. phi is differentiated by autograd
    through log_softmax(z'), which is what checks every row loss's closed-form `slope`."""
    z = input.to(compute_dtype(input.dtype))
    valid = target != ignore_index
    y = torch.where(valid, target, 0)
    if transform is not None:
        z = transform.apply(z, y)
    logp = torch.log_softmax(z, dim=1)
    weight = None if weight is None else weight.to(logp.dtype)
    w_y = valid.to(logp.dtype) if weight is None else weight[y] * valid
    loss = (1 - label_smoothing) * w_y * spec.row_value(row_loss, logp.gather(1, y[:, None]).squeeze(1))
    if label_smoothing:
        smooth = -(logp if weight is None else logp * weight).sum(1)
        loss = loss + (label_smoothing / logp.shape[1]) * smooth
    loss = torch.where(valid, loss, 0.0)
    total = loss if reduction == "none" else loss.sum()
    return (mean_over(total, w_y.sum()) if reduction == "mean" else total).to(input.dtype)


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing):
    """Index targets: softmax_loss with phi = -log p_y. Probability targets: l_i = -sum_c w_c t'_ic log p_ic
    with t' = (1-eps) t + eps/C, and `mean` divides by N."""
    if not target.dtype.is_floating_point:
        return softmax_loss(input, target, NLL(), weight, None, ignore_index, reduction, label_smoothing)
    logp = torch.log_softmax(input.to(compute_dtype(input.dtype)), dim=1)
    smoothed = target.to(logp.dtype) * (1 - label_smoothing) + label_smoothing / logp.shape[1]
    if weight is not None:
        smoothed = smoothed * weight.to(logp.dtype)
    loss = -(smoothed * logp).sum(1)
    return _reduce(loss, reduction, logp.shape[0]).to(input.dtype)


def focal_loss(input, target, gamma, alpha, ignore_index, reduction):
    """Softmax focal loss: softmax_loss with phi = -(1 - p_y)^gamma log p_y and alpha as the class weight."""
    return softmax_loss(input, target, Focal(gamma), alpha, None, ignore_index, reduction, 0.0)


def mse_loss(input, target, ignore_index, reduction, on):
    """Squared error between softmax(x) (on="probs") or x (on="logits") and the one-hot or probability target;
    ignored rows are zero and `mean` divides by (non-ignored rows) * C."""
    x = input.to(compute_dtype(input.dtype))
    pred = torch.softmax(x, dim=1) if on == "probs" else x
    if target.dtype.is_floating_point:
        goal, valid = target.to(x.dtype), torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    else:
        valid = target != ignore_index
        # a comparison, not F.one_hot, whose range check reads values (no data-dependent ops under vmap)
        classes = torch.arange(x.shape[1], device=x.device)
        goal = (torch.where(valid, target, 0)[:, None] == classes).to(x.dtype)
    loss = torch.where(valid[:, None], (pred - goal) ** 2, 0.0)
    return _reduce(loss, reduction, valid.sum() * x.shape[1]).to(input.dtype)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction):
    """l = -weight [pos_weight t log sigmoid(x) + (1-t) log sigmoid(-x)], the mean over all elements,
    written as PyTorch does, (1-t) x - (pw t + 1 - t) log sigmoid(x), so +-inf logits give its results."""
    x = input.to(compute_dtype(input.dtype))
    t = target.to(x.dtype)
    log_weight = 1 if pos_weight is None else (pos_weight.to(x.dtype) - 1) * t + 1
    loss = (1 - t) * x - log_weight * F.logsigmoid(x)
    if weight is not None:
        loss = loss * weight.to(x.dtype)
    return _reduce(loss, reduction, loss.numel()).to(input.dtype)


def sigmoid_focal_loss(input, target, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss, written out: ce * (1 - p_t)^gamma * alpha_t with
    p_t = p t + (1-p)(1-t) and alpha_t = alpha t + (1-alpha)(1-t) (alpha < 0 disables it)."""
    x = input.to(compute_dtype(input.dtype))
    t = target.to(x.dtype)
    p = torch.sigmoid(x)
    ce_loss = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return _reduce(loss, reduction, loss.numel()).to(input.dtype)


def asl_loss(input, target, gamma_pos, gamma_neg, clip, reduction):
    """Asymmetric loss (Ridnik et al. 2021): l = -[t (1-p)^g+ log p + (1-t) p_m^g- log(1 - p_m)] with
    p = sigmoid(x), p_m = max(p - clip, 0); `mean` over all elements."""
    x = input.to(compute_dtype(input.dtype))
    t = target.to(x.dtype)
    tiny = torch.finfo(x.dtype).tiny  # clamps keep autograd's pow(0, g - 1) finite; they move no value
    positive = -torch.sigmoid(-x).clamp(min=tiny).pow(gamma_pos) * F.logsigmoid(x)
    if clip > 0:
        p_m = (torch.sigmoid(x) - clip).clamp(min=0)
        log_rest = torch.log1p(-p_m)
    else:  # 1 - p_m = sigmoid(-x), whose log stays exact as p -> 1
        p_m, log_rest = torch.sigmoid(x), F.logsigmoid(-x)
    negative = -p_m.clamp(min=tiny).pow(gamma_neg) * log_rest
    loss = t * positive + (1 - t) * negative
    return _reduce(loss, reduction, loss.numel()).to(input.dtype)
