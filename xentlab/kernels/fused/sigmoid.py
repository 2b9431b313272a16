"""The sigmoid family on the CPU, element-wise: BCE with logits, sigmoid focal loss and the asymmetric loss.

No row statistic: each element's loss and closed-form gradient come from sigmoid(x) and softplus(+-x), formed
stably. BCE at training shapes is PyTorch's own op; the others, and BCE above SMALL_ELEMS elements
(`xentlab.kernels.fused.sizes`), run on the chunked sweep.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from xentlab.kernels import compute_dtype, reference
from xentlab.kernels.fused import sizes
from xentlab.kernels.fused.sweep import REDUCTION_ENUM, FusedLoss

Tensor = torch.Tensor


def _softplus(x: Tensor, out: Tensor) -> Tensor:
    # Above the threshold log1p(exp(x)) equals x to the dtype's precision, so nothing is lost.
    return torch.ops.aten.softplus.out(x, 1, 40.0 if x.dtype == torch.float64 else 20.0, out=out)


class _PerElement:
    """The element-wise (sigmoid) losses: a loss per element, and `mean` over every element of the target."""

    elementwise = True

    def denominator(self) -> Tensor:
        return torch.tensor(float(self.target.numel()), device=self.target.device)


@dataclass(eq=False)
class _Bce(_PerElement):
    """l = w [(1 - t) x + k softplus(-x)] with k = pw t + 1 - t, PyTorch's own form of -w [pw t log s(x) +
    (1-t) log s(-x)] (so x = +-inf gives what PyTorch gives: inf for x = +inf, t = 0, NaN where a zero
    weight meets an infinite x); the gradient is w [sigmoid(x) k - pw t]."""

    target: Tensor
    weight: Tensor | None
    pos_weight: Tensor | None
    slots = 2

    def chunk(self, x, rows, out, ws, s):
        loss, k = ws
        # In the compute dtype: 1 - t rounded to a bfloat16 target's precision would cost ~2% of the loss.
        t = self.target[rows].to(x.dtype)
        w = None if self.weight is None else self.weight.expand(self.target.shape)[rows]
        _softplus(torch.neg(x, out=loss), loss)
        if self.pos_weight is not None:
            torch.mul(t, self.pos_weight - 1, out=k).add_(1)
            loss.mul_(k)
        loss.addcmul_(torch.rsub(t, 1), x)
        if w is not None:
            loss.mul_(w)
        if s is None:
            return loss
        g = torch.sigmoid(x, out=out)
        if self.pos_weight is None:
            g.sub_(t)
        else:
            g.mul_(k).addcmul_(t, self.pos_weight, value=-1)
        g.mul_(s if w is None else w * s)
        return loss.sum(1)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction):
    """PyTorch's BCE-with-logits, l = -w [pw t log sigmoid(x) + (1-t) log sigmoid(-x)], mean over elements."""
    cdt = compute_dtype(input.dtype)
    weight = None if weight is None else weight.to(cdt)
    pos_weight = None if pos_weight is None else pos_weight.to(cdt)
    if sizes.is_one_shot(input):
        return _small_bce(input, target, weight, pos_weight, reduction)
    composable = functools.partial(reference.binary_cross_entropy_with_logits, target=target, weight=weight,
                                   pos_weight=pos_weight, reduction=reduction)
    return FusedLoss.apply(input, _Bce(target, weight, pos_weight), reduction, composable)


def _small_bce(input, target, weight, pos_weight, reduction):
    """At training shapes BCE is PyTorch's own element-wise op with its native autograd node, as
    cross-entropy is (`xentlab.kernels.fused.softmax`); half inputs are computed in float32."""
    cdt = compute_dtype(input.dtype)
    x = input if input.dtype == cdt else input.to(cdt)
    t = target if target.dtype == cdt else target.to(cdt)
    loss = torch.binary_cross_entropy_with_logits(x, t, weight, pos_weight, REDUCTION_ENUM[reduction])
    return loss if loss.dtype == input.dtype else loss.to(input.dtype)


@dataclass(eq=False)
class _SigmoidFocal(_PerElement):
    """torchvision's sigmoid focal loss ce * m^g * alpha_t, with m = 1 - p_t = s(x)(1-t) + s(-x) t formed
    without cancellation; dL/dx = alpha_t [(s - t) m^g + g m^g (ce/m) s(x) s(-x) (1 - 2t)], where ce/m -> 1
    as m -> 0. ce is PyTorch's own form (1-t) x + softplus(-x), so +-inf logits give torchvision's values
    (inf for x = +inf, t = 0; NaN where its BCE is NaN) and its NaN gradients wherever a product of an
    infinite ce and a vanishing derivative appears (none for gamma = 0, where the gradient is (s - t))."""

    target: Tensor
    alpha: float
    gamma: float
    slots = 5

    def chunk(self, x, rows, out, ws, s):
        ce, sig_neg, m, modulator, loss = ws
        t = self.target[rows].to(x.dtype)  # in the compute dtype, as _Bce's (and written into its buffers)
        _softplus(torch.neg(x, out=ce), ce).addcmul_(torch.neg(t, out=sig_neg).add_(1), x)
        sig = torch.sigmoid(x, out=out)
        torch.sigmoid(torch.neg(x, out=sig_neg), out=sig_neg)
        torch.addcmul(sig, sig, t, value=-1, out=m).addcmul_(sig_neg, t)
        torch.pow(m, self.gamma, out=modulator)
        torch.mul(ce, modulator, out=loss)
        if s is not None:
            sig_s = sig.mul(sig_neg) if self.gamma else None
            sig.sub_(t).mul_(modulator)
            if self.gamma:
                # gamma m^(gamma-1) ce is formed as gamma m^gamma (ce/m), with ce/m -> 1 where m -> 0 (NaN
                # where ce is: ce * 0 + 1)
                ratio = torch.where(m == 0, ce.mul(0).add_(1), ce.div_(m))
                ratio.mul_(modulator).mul_(sig_s)
                ratio.addcmul_(ratio, t, value=-2)  # times (1 - 2t)
                sig.add_(ratio, alpha=self.gamma)
            sig.mul_(s)
        if self.alpha >= 0:  # alpha_t = alpha t + (1-alpha)(1-t) reuses sig_neg's buffer, no longer needed
            alpha_t = torch.mul(t, 2 * self.alpha - 1, out=sig_neg).add_(1 - self.alpha)
            loss.mul_(alpha_t)
            if s is not None:
                out.mul_(alpha_t)
        return loss if s is None else loss.sum(1)


def sigmoid_focal_loss(input, target, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss: alpha_t (1 - p_t)^gamma BCE(x, t), mean over all elements."""
    composable = functools.partial(reference.sigmoid_focal_loss, target=target, alpha=alpha, gamma=gamma,
                                   reduction=reduction)
    return FusedLoss.apply(input, _SigmoidFocal(target, float(alpha), float(gamma)), reduction, composable)


@dataclass(eq=False)
class _Asl(_PerElement):
    """Asymmetric loss, with p = s(x), q = 1 - p = s(-x) and p_m = max(p - clip, 0):
    l = t q^g+ softplus(-x) - (1-t) p_m^g- log(1 - p_m). dl/dx = t q^g+ (-g+ p softplus(-x) - q) +
    (1-t) [p_m > 0] p_m^g- p q (1 / (1 - p_m) - g- r) with r = log(1 - p_m) / p_m (-> -1 as p_m -> 0, so
    p_m^(g-1) is never formed) and 1 - p_m = q + clip there. The terms mix as t a + (1 - t) b, so +-inf
    logits give the reference's values: NaN where a zero target weight meets an infinite term (as PyTorch's
    BCE, which ASL is at g+ = g- = clip = 0), and at g = 0 the plain gradients (-q, p), never a 0 * inf."""

    target: Tensor
    gamma_pos: float
    gamma_neg: float
    clip: float
    slots = 0

    def chunk(self, x, rows, out, ws, s):
        t = self.target[rows].to(x.dtype)
        neg_logp = _softplus(-x, torch.empty_like(x))
        p, q = torch.sigmoid(x), torch.sigmoid(-x)
        q_pow = q.pow(self.gamma_pos)
        if self.clip > 0:
            p_m = (p - self.clip).clamp_(min=0)
            rest = q + self.clip
            log_rest = torch.where(p_m > 0, rest.log(), 0.0)
        else:
            p_m, rest = p, q
            log_rest = -_softplus(x, torch.empty_like(x))
        p_m_pow = p_m.pow(self.gamma_neg)
        negative = -p_m_pow * log_rest
        loss = t * (q_pow * neg_logp) + (1 - t) * negative
        if s is None:
            return loss
        d_positive = q_pow * (-self.gamma_pos * p * neg_logp - q) if self.gamma_pos else q.neg()
        pq = p * q  # p q / (1 - p_m) is p when clip = 0, where 1 - p_m = q can underflow
        slope = p if self.clip == 0 else pq / rest
        if self.gamma_neg:
            ratio = torch.where(p_m > 0, log_rest / p_m, -1.0)
            slope = p_m_pow * (slope - self.gamma_neg * ratio * pq)
        d_negative = torch.where(p_m > 0, slope, 0.0)
        torch.add(t * d_positive, (1 - t) * d_negative, out=out).mul_(s)
        return loss.sum(1)


def asl_loss(input, target, gamma_pos, gamma_neg, clip, reduction):
    """Asymmetric loss (Ridnik et al. 2021) per element, `mean` over all elements; see `_Asl`."""
    composable = functools.partial(reference.asl_loss, target=target, gamma_pos=gamma_pos,
                                   gamma_neg=gamma_neg, clip=clip, reduction=reduction)
    kernel = _Asl(target, float(gamma_pos), float(gamma_neg), float(clip))
    return FusedLoss.apply(input, kernel, reduction, composable)
