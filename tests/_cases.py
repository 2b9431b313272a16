"""Shared loss test cases: inputs, PyTorch/torchvision ground truth and the value-and-gradient parity check.

Used by tests/test_functional.py and meant for backend-specific suites too (tests/test_triton.py): a backend
passes when `check_parity(partial(XF.<loss>, backend=name), truth, x)` holds for the cases built here. Ground
truth always runs in float64 on the very values the backend sees (low-precision inputs are rounded first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.testing import assert_close

BACKENDS = ["fused", "reference"]
REDUCTIONS = ["none", "mean", "sum"]
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]

# rtol/atol of a backend's result (value or gradient, in the input dtype) against float64 ground truth
TOLERANCES = {
    torch.float64: dict(rtol=1e-7, atol=1e-9),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-4),
    torch.float16: dict(rtol=3e-3, atol=2e-5),
}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_logits(n: int, c: int, dtype=torch.float64, *, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return (scale * torch.randn(n, c, generator=generator(seed), dtype=torch.float64)).to(dtype)


def make_index_target(n: int, c: int, *, ignore_index: int | None = None, seed: int = 1) -> torch.Tensor:
    """Class indices in [0, C); with `ignore_index`, every third row (from the second) is ignored."""
    target = torch.randint(0, c, (n,), generator=generator(seed))
    if ignore_index is not None:
        target[1::3] = ignore_index
    return target


def make_prob_target(n: int, c: int, dtype=torch.float64, *, seed: int = 2) -> torch.Tensor:
    return torch.softmax(2 * torch.randn(n, c, generator=generator(seed), dtype=torch.float64), 1).to(dtype)


def make_binary_target(n: int, c: int, dtype=torch.float64, *, soft: bool = False, seed: int = 3):
    u = torch.rand(n, c, generator=generator(seed), dtype=torch.float64)
    return (u if soft else (u < 0.3).double()).to(dtype)


def make_weight(c: int, *, seed: int = 4) -> torch.Tensor:
    return 0.2 + 2 * torch.rand(c, generator=generator(seed), dtype=torch.float64)


# ---------------------------------------------------------------- ground truth (PyTorch / torchvision)


def torch_cross_entropy(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    if target.dtype.is_floating_point:
        target = target.double()
    weight = None if weight is None else weight.double()
    return F.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def torch_focal_loss(x, target, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean"):
    """Focal loss from F.cross_entropy's per-row nll: a_y (1 - exp(-nll))^gamma nll, mean over sum a_y."""
    nll = F.cross_entropy(x, target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    a_y = valid.double() if alpha is None else alpha.double()[target.clamp(min=0)] * valid
    loss = a_y * (1 - torch.exp(-nll)) ** gamma * nll
    return loss if reduction == "none" else loss.sum() / (a_y.sum() if reduction == "mean" else 1)


def torch_mse_loss(x, target, ignore_index=-100, reduction="mean", on="probs"):
    """F.mse_loss of softmax(x) (or x) against the one-hot/probability target over the non-ignored rows."""
    pred = torch.softmax(x, 1) if on == "probs" else x
    if target.dtype.is_floating_point:
        return F.mse_loss(pred, target.double(), reduction=reduction)
    valid = target != ignore_index
    goal = F.one_hot(target.clamp(min=0), x.shape[1]).double()
    if reduction == "none":
        return F.mse_loss(pred, goal, reduction="none") * valid[:, None]
    return F.mse_loss(pred[valid], goal[valid], reduction=reduction)


def torch_bce(x, target, weight=None, pos_weight=None, reduction="mean"):
    return F.binary_cross_entropy_with_logits(
        x, target.double(), None if weight is None else weight.double(),
        pos_weight=None if pos_weight is None else pos_weight.double(), reduction=reduction)


def torchvision_sigmoid_focal_loss(inputs, targets, alpha: float = 0.25, gamma: float = 2, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss (torchvision cannot be installed beside this torch), verbatim."""
    targets = targets.double()
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


def torch_logit_adjusted(x, target, log_prior, tau=1.0, ignore_index=-100, reduction="mean"):
    """Logit adjustment: PyTorch's cross-entropy of the shifted logits z + tau log pi."""
    shifted = x + tau * log_prior.double()
    return F.cross_entropy(shifted, target, ignore_index=ignore_index, reduction=reduction)


def torch_ldam(x, target, margins, scale=30.0, weight=None, ignore_index=-100, reduction="mean"):
    """LDAM as its authors wrote it (Cao et al. 2019, LDAMLoss.forward), with ignore_index added."""
    index = F.one_hot(target.clamp(min=0), x.shape[1]).bool()
    batch_m = margins.double()[target.clamp(min=0)][:, None]
    output = torch.where(index, x - batch_m, x)
    return F.cross_entropy(scale * output, target, None if weight is None else weight.double(),
                           ignore_index=ignore_index, reduction=reduction)


def _true_class_loss(phi, x, target, ignore_index, reduction):
    """phi(p_y) per row from F.cross_entropy's per-row nll (p_y = exp(-nll)), `mean` over non-ignored rows."""
    nll = F.cross_entropy(x, target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    loss = torch.where(valid, phi(nll, torch.exp(-nll)), 0.0)
    return loss if reduction == "none" else loss.sum() / (valid.sum() if reduction == "mean" else 1)


def torch_poly1(x, target, epsilon=1.0, ignore_index=-100, reduction="mean"):
    return _true_class_loss(lambda nll, p: nll + epsilon * (1 - p), x, target, ignore_index, reduction)


def torch_gce(x, target, q=0.7, ignore_index=-100, reduction="mean"):
    return _true_class_loss(lambda nll, p: (1 - p**q) / q, x, target, ignore_index, reduction)


def ridnik_asl(x, y, gamma_pos=0.0, gamma_neg=4.0, clip=0.05, reduction="mean", eps=1e-300):
    """AsymmetricLoss.forward of Ridnik et al.'s code (multi-hot targets), its sum made our reduction."""
    y = y.double()
    xs_pos = torch.sigmoid(x)
    xs_neg = 1 - xs_pos
    if clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    pt = xs_pos * y + xs_neg * (1 - y)
    loss = loss * torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    loss = -loss
    return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]


# ---------------------------------------------------------------- the check


def check_parity(ours, truth, x: torch.Tensor, *, scale: float = 1.0, tol: dict | None = None, seed: int = 5):
    """ours(x) against truth(x in float64): the value, its dtype and shape, and the input gradient.

    `reduction="none"` outputs are backpropagated with a random positive grad_output, scalars with `scale`
    (1.0 exercises the fused path's hand-over of the saved gradient)."""
    xa = x.detach().clone().requires_grad_(True)
    xb = x.detach().to(torch.float64).requires_grad_(True)
    a, b = ours(xa), truth(xb)
    assert a.dtype == x.dtype, f"output dtype {a.dtype} != input dtype {x.dtype}"
    assert a.shape == b.shape, f"output shape {tuple(a.shape)} != {tuple(b.shape)}"
    if b.dim():
        g = 0.5 + torch.rand(b.shape, generator=generator(seed), dtype=torch.float64)
    else:
        g = torch.tensor(scale, dtype=torch.float64)
    (ga,) = torch.autograd.grad(a, xa, g.to(a.dtype))
    (gb,) = torch.autograd.grad(b, xb, g, allow_unused=True)
    gb = torch.zeros_like(xb) if gb is None else gb
    tol = tol or TOLERANCES[x.dtype]
    assert_close(a.double(), b.detach(), equal_nan=True, **tol, msg=lambda m: f"loss value: {m}")
    assert_close(ga.double(), gb, equal_nan=True, **tol, msg=lambda m: f"input gradient: {m}")
    return a, ga
