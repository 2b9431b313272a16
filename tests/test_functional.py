"""xentlab.functional against PyTorch/torchvision: values and gradients, every option, every backend on CPU.

Parity cases come from tests/_cases.py so that backend suites (tests/test_triton.py) can reuse them.
"""

from __future__ import annotations

import inspect
import itertools
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from _cases import (
    BACKENDS,
    LOW_PRECISION,
    REDUCTIONS,
    TOLERANCES,
    check_parity,
    generator,
    make_binary_target,
    make_index_target,
    make_logits,
    make_prob_target,
    make_weight,
    ridnik_asl,
    torch_bce,
    torch_cross_entropy,
    torch_focal_loss,
    torch_gce,
    torch_ldam,
    torch_logit_adjusted,
    torch_mse_loss,
    torch_poly1,
    torchvision_sigmoid_focal_loss,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from xentlab import functional as XF
from xentlab import kernels, weights
from xentlab.kernels import fused, spec
from xentlab.kernels.fused import sizes

N, C = 23, 7  # small and odd so that nothing lines up with a chunk or a vector width by luck
IGN = -100


# ---------------------------------------------------------------- parity, every option combination


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("ignore", [False, True], ids=["all-rows", "ignore-rows"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_cross_entropy_matches_pytorch(kind, weighted, ignore, label_smoothing, reduction, backend, chunking):
    x = make_logits(N, C)
    weight = make_weight(C) if weighted else None
    if kind == "index":
        target, ignore_index = make_index_target(N, C, ignore_index=IGN if ignore else None), IGN
    else:  # ignore_index must stay negative with probabilities and then changes nothing
        target, ignore_index = make_prob_target(N, C), -1 if ignore else IGN
    kwargs = dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing)
    check_parity(lambda x: XF.cross_entropy(x, target, **kwargs, backend=backend),
                 lambda x: torch_cross_entropy(x, target, **kwargs), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore", [False, True], ids=["all-rows", "ignore-rows"])
@pytest.mark.parametrize("with_alpha", [False, True], ids=["no-alpha", "alpha"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_matches_cross_entropy_composition(gamma, with_alpha, ignore, reduction, backend,
                                                     chunking):
    x, target = make_logits(N, C), make_index_target(N, C, ignore_index=IGN if ignore else None)
    alpha = make_weight(C) if with_alpha else None
    kwargs = dict(gamma=gamma, alpha=alpha, ignore_index=IGN, reduction=reduction)
    check_parity(lambda x: XF.focal_loss(x, target, **kwargs, backend=backend),
                 lambda x: torch_focal_loss(x, target, **kwargs), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore", [False, True], ids=["all-rows", "ignore-rows"])
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("on", ["probs", "logits"])
def test_mse_loss_matches_pytorch(on, kind, ignore, reduction, backend):
    x = make_logits(N, C)
    target = make_index_target(N, C, ignore_index=IGN if ignore else None) if kind == "index" \
        else make_prob_target(N, C)
    check_parity(lambda x: XF.mse_loss(x, target, IGN, reduction, on=on, backend=backend),
                 lambda x: torch_mse_loss(x, target, IGN, reduction, on=on), x)


BCE_WEIGHTS = {
    "none": lambda: None,
    "per-class": lambda: make_weight(C),
    "per-row": lambda: make_weight(N)[:, None],
    "expanded": lambda: make_weight(C)[None, :].expand(N, C),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("with_pos_weight", [False, True], ids=["no-pos-weight", "pos-weight"])
@pytest.mark.parametrize("weight_kind", list(BCE_WEIGHTS))
def test_bce_with_logits_matches_pytorch(weight_kind, with_pos_weight, soft, reduction, backend):
    x, target = make_logits(N, C), make_binary_target(N, C, soft=soft)
    weight, pos_weight = BCE_WEIGHTS[weight_kind](), make_weight(C, seed=9) if with_pos_weight else None
    check_parity(lambda x: XF.binary_cross_entropy_with_logits(x, target, weight, pos_weight, reduction,
                                                               backend=backend),
                 lambda x: torch_bce(x, target, weight, pos_weight, reduction), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_sigmoid_focal_loss_matches_torchvision(alpha, gamma, soft, reduction, backend):
    x, target = make_logits(N, C), make_binary_target(N, C, soft=soft)
    check_parity(lambda x: XF.sigmoid_focal_loss(x, target, alpha, gamma, reduction, backend=backend),
                 lambda x: torchvision_sigmoid_focal_loss(x, target, alpha, gamma, reduction), x)


# ---------------------------------------------------------------- dtypes, shapes, chunking

LOSS_CASES = {  # name: (ours(x, target, **kw), ground truth(x, target), target kind)
    "ce": (lambda x, y, **kw: XF.cross_entropy(x, y, make_weight(x.shape[1]), IGN, label_smoothing=0.1, **kw),
           lambda x, y: torch_cross_entropy(x, y, make_weight(x.shape[1]), IGN, label_smoothing=0.1),
           "index"),
    "ce-probs": (lambda x, y, **kw: XF.cross_entropy(x, y, **kw), torch_cross_entropy, "probs"),
    "focal": (lambda x, y, **kw: XF.focal_loss(x, y, 2.0, make_weight(x.shape[1]), **kw),
              lambda x, y: torch_focal_loss(x, y, 2.0, make_weight(x.shape[1])), "index"),
    "mse": (lambda x, y, **kw: XF.mse_loss(x, y, **kw), torch_mse_loss, "index"),
    "mse-logits": (lambda x, y, **kw: XF.mse_loss(x, y, on="logits", **kw),
                   lambda x, y: torch_mse_loss(x, y, on="logits"), "index"),
    "bce": (lambda x, y, **kw: XF.binary_cross_entropy_with_logits(x, y, pos_weight=make_weight(x.shape[1]),
                                                                   **kw),
            lambda x, y: torch_bce(x, y, pos_weight=make_weight(x.shape[1])), "binary"),
    "sigmoid-focal": (lambda x, y, **kw: XF.sigmoid_focal_loss(x, y, **kw),
                      lambda x, y: torchvision_sigmoid_focal_loss(x, y, reduction="mean"), "binary"),
    "logit-adjusted": (lambda x, y, **kw: XF.logit_adjusted_loss(x, y, log_prior(x.shape[1]), 1.5, **kw),
                       lambda x, y: torch_logit_adjusted(x, y, log_prior(x.shape[1]), 1.5), "index"),
    "ldam": (lambda x, y, **kw: XF.ldam_loss(x, y, margins(x.shape[1]), 2.0, make_weight(x.shape[1]),
                                             **kw),
             lambda x, y: torch_ldam(x, y, margins(x.shape[1]), 2.0, make_weight(x.shape[1])),
             "index"),
    "poly1": (lambda x, y, **kw: XF.poly1_loss(x, y, 2.0, **kw), lambda x, y: torch_poly1(x, y, 2.0),
              "index"),
    "gce": (lambda x, y, **kw: XF.gce_loss(x, y, 0.5, **kw), lambda x, y: torch_gce(x, y, 0.5), "index"),
    "asl": (lambda x, y, **kw: XF.asymmetric_loss(x, y, 1.0, 4.0, 0.05, **kw),
            lambda x, y: ridnik_asl(x, y, 1.0, 4.0, 0.05), "multihot"),
}


def make_target(kind: str, n: int, c: int, dtype, ignore: bool = True):
    if kind == "index":
        return make_index_target(n, c, ignore_index=IGN if ignore else None)
    if kind == "probs":
        return make_prob_target(n, c, dtype)
    return make_binary_target(n, c, dtype, soft=kind == "binary")


def long_tail(c: int) -> torch.Tensor:
    """Class counts halving from class to class, over and over for many classes (1000 down to 2)."""
    return 1000 * 2.0 ** -(torch.arange(c, dtype=torch.float64) % 9)


def log_prior(c: int) -> torch.Tensor:
    return weights.log_priors(long_tail(c)).double()


def margins(c: int) -> torch.Tensor:
    return weights.ldam_margins(long_tail(c), 0.5).double()


NEW_LOSSES = {  # name: (ours(x, y, reduction, backend), truth(x, y, reduction), target kind)
    "logit-adjusted": (lambda x, y, r, b: XF.logit_adjusted_loss(x, y, log_prior(C), 0.7, None, IGN, r,
                                                                 backend=b),
                       lambda x, y, r: torch_logit_adjusted(x, y, log_prior(C), 0.7, IGN, r), "index"),
    "ldam": (lambda x, y, r, b: XF.ldam_loss(x, y, margins(C), 3.0, make_weight(C), IGN, r, backend=b),
             lambda x, y, r: torch_ldam(x, y, margins(C), 3.0, make_weight(C), IGN, r), "index"),
    "poly1": (lambda x, y, r, b: XF.poly1_loss(x, y, 1.0, None, IGN, r, backend=b),
              lambda x, y, r: torch_poly1(x, y, 1.0, IGN, r), "index"),
    "poly1-neg": (lambda x, y, r, b: XF.poly1_loss(x, y, -1.0, None, IGN, r, backend=b),
                  lambda x, y, r: torch_poly1(x, y, -1.0, IGN, r), "index"),
    "gce": (lambda x, y, r, b: XF.gce_loss(x, y, 0.7, None, IGN, r, backend=b),
            lambda x, y, r: torch_gce(x, y, 0.7, IGN, r), "index"),
    "gce-mae": (lambda x, y, r, b: XF.gce_loss(x, y, 1.0, None, IGN, r, backend=b),
                lambda x, y, r: torch_gce(x, y, 1.0, IGN, r), "index"),
    "asl": (lambda x, y, r, b: XF.asymmetric_loss(x, y, 0.0, 4.0, 0.05, r, backend=b),
            lambda x, y, r: ridnik_asl(x, y, 0.0, 4.0, 0.05, r), "multihot"),
    "asl-no-clip": (lambda x, y, r, b: XF.asymmetric_loss(x, y, 1.0, 0.5, 0.0, r, backend=b),
                    lambda x, y, r: ridnik_asl(x, y, 1.0, 0.5, 0.0, r), "multihot"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", list(NEW_LOSSES))
def test_new_losses_match_their_published_formulas(loss, backend, chunking):
    ours, truth, kind = NEW_LOSSES[loss]
    x, target = make_logits(N, C), make_target(kind, N, C, torch.float64)
    for reduction in REDUCTIONS:
        check_parity(lambda x, r=reduction: ours(x, target, r, backend),
                     lambda x, r=reduction: truth(x, target, r), x)


@pytest.mark.parametrize("loss", list(NEW_LOSSES))
def test_new_losses_gradcheck_on_every_backend(loss):
    ours, _, kind = NEW_LOSSES[loss]
    x = make_logits(4, C, scale=1.0).requires_grad_()
    target = make_target(kind, 4, C, torch.float64)
    for backend, reduction in itertools.product(BACKENDS, ("mean", "none")):
        assert torch.autograd.gradcheck(lambda z, r=reduction, b=backend: ours(z, target, r, b), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_numbers_of_the_new_losses_in_docs_losses_md(backend):
    x, y = torch.tensor([[2.0, 1.0, 0.1]]), torch.tensor([0])
    prior = torch.tensor([0.5, 0.3, 0.2]).log()
    for value, expected in ((XF.focal_loss(x, y, 2.0, backend=backend), 0.0485),
                            (XF.poly1_loss(x, y, 1.0, backend=backend), 0.7580),
                            (XF.gce_loss(x, y, 0.7, backend=backend), 0.3617),
                            (XF.logit_adjusted_loss(x, y, prior, 1.0, backend=backend), 0.2473)):
        assert round(value.item(), 4) == expected


def test_asl_without_focusing_or_clip_is_bce_and_the_balanced_softmax_is_tau_one():
    x, t = make_logits(N, C), make_binary_target(N, C, soft=True)
    assert_close(XF.asymmetric_loss(x, t, 0.0, 0.0, 0.0), F.binary_cross_entropy_with_logits(x, t))
    y = make_index_target(N, C)
    counts = torch.tensor([500.0, 200, 100, 50, 20, 10, 5])
    prior = counts / counts.sum()
    assert_close(XF.logit_adjusted_loss(x, y, weights.log_priors(counts).double()),
                 F.cross_entropy(x + prior.log().double(), y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("loss", list(LOSS_CASES))
def test_low_precision_inputs_match_float64_truth(loss, dtype, backend, chunking):
    ours, truth, kind = LOSS_CASES[loss]
    for n, c in ((64, 101), (N, C)):  # C above and below sizes.SMALL_C take different softmax paths
        x, target = make_logits(n, c, dtype), make_target(kind, n, c, dtype)
        check_parity(lambda x, t=target: ours(x, t, backend=backend), lambda x, t=target: truth(x, t), x,
                     scale=0.37)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_dimension_one_convention(backend):
    x = make_logits(4, C).reshape(2, 2, C).movedim(-1, 1).contiguous()  # (N=2, C, d=2)
    x4 = make_logits(12, C).reshape(2, 3, 2, C).movedim(-1, 1).contiguous()  # (N=2, C, 3, 2)
    y4 = make_index_target(12, C, ignore_index=IGN).reshape(2, 3, 2)
    check_parity(lambda x: XF.cross_entropy(x, y4, reduction="none", label_smoothing=0.1, backend=backend),
                 lambda x: torch_cross_entropy(x, y4, reduction="none", label_smoothing=0.1), x4)
    t4 = make_prob_target(12, C).reshape(2, 3, 2, C).movedim(-1, 1)
    check_parity(lambda x: XF.cross_entropy(x, t4, backend=backend), lambda x: torch_cross_entropy(x, t4), x4)
    flat = lambda t: t.movedim(1, -1).reshape(-1, C)  # noqa: E731
    check_parity(lambda x: XF.focal_loss(x, y4, reduction="none", backend=backend),
                 lambda x: torch_focal_loss(flat(x), y4.reshape(-1), reduction="none").reshape(2, 3, 2), x4)
    check_parity(lambda x: XF.mse_loss(x, y4, reduction="none", backend=backend),
                 lambda x: torch_mse_loss(flat(x), y4.reshape(-1), reduction="none").reshape(2, 3, 2, C)
                 .movedim(-1, 1), x4)
    t = make_binary_target(4, C).reshape(2, 2, C).movedim(-1, 1)
    per_example = make_weight(2)[:, None, None]
    check_parity(lambda x: XF.binary_cross_entropy_with_logits(x, t, per_example, reduction="none",
                                                               backend=backend),
                 lambda x: torch_bce(x, t, per_example, reduction="none"), x)
    check_parity(lambda x: XF.sigmoid_focal_loss(x, t, reduction="sum", backend=backend),
                 lambda x: torchvision_sigmoid_focal_loss(x, t, reduction="sum"), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_and_one_logit_inputs(backend):
    x = make_logits(1, C)[0]
    for reduction in REDUCTIONS:
        check_parity(partial(XF.cross_entropy, target=torch.tensor(3), reduction=reduction, backend=backend),
                     partial(torch_cross_entropy, target=torch.tensor(3), reduction=reduction), x)
    check_parity(lambda x: XF.mse_loss(x, torch.tensor(3), reduction="none", backend=backend),
                 lambda x: torch_mse_loss(x[None], torch.tensor([3]), reduction="none")[0], x)
    logit, t = make_logits(N, 1)[:, 0], make_binary_target(N, 1)[:, 0]  # binary task, one logit per example
    check_parity(lambda x: XF.binary_cross_entropy_with_logits(x, t, pos_weight=torch.tensor([3.0]),
                                                               reduction="none", backend=backend),
                 lambda x: torch_bce(x, t, pos_weight=torch.tensor([3.0]), reduction="none"), logit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_may_be_a_real_class_and_targets_may_be_any_integer_type(backend):
    x, target = make_logits(N, C), make_index_target(N, C).to(torch.int32)
    check_parity(lambda x: XF.cross_entropy(x, target, ignore_index=2, label_smoothing=0.1, backend=backend),
                 lambda x: torch_cross_entropy(x, target.long(), ignore_index=2, label_smoothing=0.1), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_and_bool_multi_hot_targets_count_as_their_float_values(backend):
    x, target = make_logits(N, C), make_binary_target(N, C)
    expected = XF.binary_cross_entropy_with_logits(x, target, backend=backend)
    for as_int in (target.long(), target.bool()):
        assert_close(XF.binary_cross_entropy_with_logits(x, as_int, backend=backend), expected)
        assert_close(XF.sigmoid_focal_loss(x, as_int, backend=backend),
                     XF.sigmoid_focal_loss(x, target, backend=backend))


# ---------------------------------------------------------------- gradcheck, scaled grad, double backward

GRADCHECK_CASES = {
    "ce": lambda x, r: XF.cross_entropy(x, make_index_target(6, 5, ignore_index=IGN), make_weight(5), IGN, r,
                                        0.3, backend="fused"),
    "ce-probs": lambda x, r: XF.cross_entropy(x, make_prob_target(6, 5), make_weight(5), reduction=r,
                                              label_smoothing=0.3, backend="fused"),
    "focal": lambda x, r: XF.focal_loss(x, make_index_target(6, 5, ignore_index=IGN), 2.0, make_weight(5),
                                        reduction=r, backend="fused"),
    "focal-gamma-0.5": lambda x, r: XF.focal_loss(x, make_index_target(6, 5), 0.5, reduction=r,
                                                  backend="fused"),
    "mse": lambda x, r: XF.mse_loss(x, make_index_target(6, 5, ignore_index=IGN), reduction=r,
                                    backend="fused"),
    "mse-probs-target": lambda x, r: XF.mse_loss(x, make_prob_target(6, 5), reduction=r, backend="fused"),
    "mse-logits": lambda x, r: XF.mse_loss(x, make_index_target(6, 5), reduction=r, on="logits",
                                           backend="fused"),
    "bce": lambda x, r: XF.binary_cross_entropy_with_logits(x, make_binary_target(6, 5, soft=True),
                                                            make_weight(5), make_weight(5, seed=7), r,
                                                            backend="fused"),
    "sigmoid-focal": lambda x, r: XF.sigmoid_focal_loss(x, make_binary_target(6, 5), 0.25, 2.0, r,
                                                        backend="fused"),
    "sigmoid-focal-soft-gamma-0.5": lambda x, r: XF.sigmoid_focal_loss(x, make_binary_target(6, 5, soft=True),
                                                                       -1.0, 0.5, r, backend="fused"),
    "asl": lambda x, r: XF.asymmetric_loss(x, make_binary_target(6, 5, soft=True), 1.0, 3.0, 0.05, r,
                                       backend="fused"),
    "poly1": lambda x, r: XF.poly1_loss(x, make_index_target(6, 5, ignore_index=IGN), 1.5, make_weight(5),
                                        reduction=r, backend="fused"),
    "gce": lambda x, r: XF.gce_loss(x, make_index_target(6, 5), 0.5, reduction=r, backend="fused"),
    "ldam": lambda x, r: XF.ldam_loss(x, make_index_target(6, 5), make_weight(5) / 10, 3.0, reduction=r,
                                      backend="fused"),
    "logit-adjusted": lambda x, r: XF.logit_adjusted_loss(x, make_index_target(6, 5), make_weight(5).log(),
                                                          0.5, reduction=r, backend="fused"),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", list(GRADCHECK_CASES))
def test_fused_gradcheck_float64(loss, reduction, chunking):
    x = make_logits(6, 5, scale=1.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: GRADCHECK_CASES[loss](x, reduction), (x,))


# Second order: the closed-form backward of every route differentiates the reference composition when it runs
# under create_graph=True, so gradgradcheck holds on each route (the chunking fixture). "sum" takes "mean"'s
# path, and focal-gamma-0.5 focal's (it is the slowest to check).
SECOND_ORDER = [name for name in GRADCHECK_CASES if name != "focal-gamma-0.5"]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss", SECOND_ORDER)
def test_fused_gradgradcheck_float64_on_every_route(loss, reduction, chunking):
    x = make_logits(6, 5, scale=1.5).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: GRADCHECK_CASES[loss](x, reduction), (x,))


def test_a_meta_gradient_through_large_cross_entropy_equals_pytorchs():
    """A Hessian-vector product (what MAML-style meta-gradients take) through a (512, 8) x C = 10 input, far
    past the sizes where PyTorch's own kernels are used, equals the one through F.cross_entropy."""
    x = make_logits(512, 10, scale=2.0).reshape(64, 8, 10).movedim(2, 1).contiguous().requires_grad_()
    y = make_index_target(512, 10).reshape(64, 8)
    v = make_logits(512, 10, seed=5).reshape(64, 8, 10).movedim(2, 1)

    def hvp(loss):
        (g,) = torch.autograd.grad(loss(x, y), x, create_graph=True)
        return torch.autograd.grad((g * v).sum(), x)[0]

    expected = hvp(F.cross_entropy)
    assert expected.abs().max() > 1e-3  # the second-order term is really there
    assert_close(hvp(XF.cross_entropy), expected)
    assert_close(torch.autograd.functional.hvp(lambda x: XF.cross_entropy(x, y), x, v)[1], expected)


@pytest.mark.parametrize("loss", ["focal", "sigmoid-focal", "mse", "ce-probs", "asl"])
def test_second_order_above_the_one_shot_size_matches_the_reference(loss):
    """The chunked route (far above SMALL_ELEMS would be slow in gradgradcheck): its Hessian-vector product
    equals the reference backend's, which autograd differentiates twice."""
    big = 1 << 14
    x = make_logits(big // 4 + 1, 4, scale=1.5).requires_grad_()
    args = {"focal": (lambda: make_index_target(x.shape[0], 4), XF.focal_loss),
            "sigmoid-focal": (lambda: make_binary_target(x.shape[0], 4), XF.sigmoid_focal_loss),
            "mse": (lambda: make_index_target(x.shape[0], 4), XF.mse_loss),
            "ce-probs": (lambda: make_prob_target(x.shape[0], 4), XF.cross_entropy),
            "asl": (lambda: make_binary_target(x.shape[0], 4, soft=True), XF.asymmetric_loss)}[loss]
    target, fn = args[0](), args[1]
    v = make_logits(*x.shape, seed=9)
    products = []
    for backend in ("fused", "reference"):
        (g,) = torch.autograd.grad(fn(x, target, backend=backend), x, create_graph=True)
        products.append(torch.autograd.grad((g * v).sum(), x)[0])
    assert_close(*products)


def test_reference_backend_supports_double_backward_as_the_error_message_promises():
    x = make_logits(6, 5, scale=1.5).requires_grad_()
    y = make_index_target(6, 5, ignore_index=IGN)
    assert torch.autograd.gradgradcheck(
        lambda x: XF.cross_entropy(x, y, label_smoothing=0.1, backend="reference"), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_grad_output_and_retained_graph(backend):
    x = make_logits(N, C, torch.float32).requires_grad_()
    target = make_index_target(N, C, ignore_index=IGN)
    loss = XF.cross_entropy(x, target, label_smoothing=0.1, backend=backend)
    (once,) = torch.autograd.grad(loss, x, retain_graph=True)
    (scaled,) = torch.autograd.grad(0.37 * loss, x, retain_graph=True)
    (again,) = torch.autograd.grad(loss, x)  # the saved gradient was not modified in place
    assert_close(scaled, 0.37 * once)
    assert_close(again, once, rtol=0, atol=0)


def test_no_grad_forward_equals_training_forward():
    x = make_logits(N, C, torch.float32)
    target = make_index_target(N, C, ignore_index=IGN)
    with torch.no_grad():
        evaluated = XF.focal_loss(x, target, backend="fused")
    trained = XF.focal_loss(x.clone().requires_grad_(), target, backend="fused")
    assert_close(evaluated, trained.detach())


# ---------------------------------------------------------------- random shapes, dtypes and parameters


@st.composite
def loss_problems(draw):
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
    c = draw(st.integers(1, 2000))
    n = draw(st.integers(0, min(300, 30000 // c)))
    loss = draw(st.sampled_from(list(LOSS_CASES)))
    reduction = draw(st.sampled_from(REDUCTIONS))
    chunk = draw(st.sampled_from([None, 0, 97, 4096]))  # defaults, one-shot path, chunk sizes
    seed = draw(st.integers(0, 2**16))
    return dtype, n, c, loss, reduction, chunk, seed


@settings(max_examples=150, deadline=None)
@given(loss_problems(), st.floats(0.0, 1.0), st.floats(0.0, 4.0))
def test_fused_matches_reference_on_random_problems(problem, label_smoothing, gamma):
    dtype, n, c, loss, reduction, chunk, seed = problem
    x = make_logits(n, c, dtype, seed=seed)
    kind = LOSS_CASES[loss][2]
    target = make_target(kind, n, c, dtype)
    call = {
        "ce": lambda x, b: XF.cross_entropy(x, target, make_weight(c), IGN, reduction, label_smoothing,
                                            backend=b),
        "focal": lambda x, b: XF.focal_loss(x, target, gamma, make_weight(c), IGN, reduction, backend=b),
        "sigmoid-focal": lambda x, b: XF.sigmoid_focal_loss(x, target, 0.25, gamma, reduction, backend=b),
    }.get(loss, lambda x, b: LOSS_CASES[loss][0](x, target, reduction=reduction, backend=b))
    old = sizes.CHUNK_ELEMS, sizes.SMALL_ELEMS, sizes.TINY_ELEMS
    if chunk is not None:
        sizes.TINY_ELEMS = 0
    if chunk:
        sizes.CHUNK_ELEMS, sizes.SMALL_ELEMS = chunk, 0
    try:  # the float64 "truth" here is the reference backend run on the same dtype
        check_parity(partial(call, b="fused"), lambda x: call(x.to(dtype), "reference").double(), x,
                     tol=TOLERANCES[dtype] if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5))
    finally:
        sizes.CHUNK_ELEMS, sizes.SMALL_ELEMS, sizes.TINY_ELEMS = old


# ---------------------------------------------------------------- docs/losses.md numbers and corner cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_numbers_of_losses_md(backend):
    x = torch.tensor([[2.0, 1.0, 0.1], [0.0, 5.0, 0.2]], requires_grad=True)
    loss = XF.cross_entropy(x, torch.tensor([0, 1]), backend=backend)
    loss.backward()
    assert round(loss.item(), 4) == 0.2159
    assert_close(x.grad, (torch.softmax(x.detach(), 1) - torch.eye(3)[[0, 1]]) / 2)

    x = torch.tensor([[2.0, 1.0], [2.0, 1.0]], requires_grad=True)
    loss = XF.cross_entropy(x, torch.tensor([1, 1]), weight=torch.tensor([1.0, 10.0]), backend=backend)
    loss.backward()
    assert round(loss.item(), 4) == 1.3133
    assert_close(x.grad, torch.tensor([[0.3655, -0.3655]] * 2), atol=1e-4, rtol=0)

    for p_true, expected in [(0.9, 0.105), (0.5, 0.693), (0.1, 2.303), (0.01, 4.605)]:
        logits = torch.tensor([[math.log(p_true), math.log(1 - p_true)]])
        assert round(XF.cross_entropy(logits, torch.tensor([0]), backend=backend).item(), 3) == expected


EXTREME = torch.tensor([[1e4, -1e4, 0.0, 1.0],  # one huge logit, the true class
                        [-1e4, 1e4, 0.0, 1.0],  # one huge logit, a wrong class
                        [1e4, 1e4, -1e4, -1e4],
                        [0.0, 0.0, 1e4, 0.0]])
EXTREME_CASES = {
    "ce": lambda x, b: XF.cross_entropy(x, torch.tensor([0, 0, 2, 2]), backend=b),
    "ce-smoothed-weighted": lambda x, b: XF.cross_entropy(x, torch.tensor([0, 0, 2, IGN]), torch.ones(4),
                                                          label_smoothing=0.1, backend=b),
    "ce-probs": lambda x, b: XF.cross_entropy(x, torch.full((4, 4), 0.25, dtype=x.dtype), backend=b),
    "focal": lambda x, b: XF.focal_loss(x, torch.tensor([0, 0, 2, 2]), backend=b),
    "mse": lambda x, b: XF.mse_loss(x, torch.tensor([0, 0, 2, 2]), backend=b),
    "mse-logits": lambda x, b: XF.mse_loss(x, torch.tensor([0, 0, 2, 2]), on="logits", backend=b),
    "bce": lambda x, b: XF.binary_cross_entropy_with_logits(x, torch.eye(4, dtype=x.dtype),
                                                            pos_weight=torch.full((4,), 2.0), backend=b),
    "sigmoid-focal": lambda x, b: XF.sigmoid_focal_loss(x, torch.eye(4, dtype=x.dtype), backend=b),
    "asl": lambda x, b: XF.asymmetric_loss(x, torch.eye(4, dtype=x.dtype), 1.0, 4.0, 0.05, backend=b),
    "poly1": lambda x, b: XF.poly1_loss(x, torch.tensor([0, 0, 2, 2]), backend=b),
    "gce": lambda x, b: XF.gce_loss(x, torch.tensor([0, 0, 2, 2]), backend=b),
    "logit-adjusted": lambda x, b: XF.logit_adjusted_loss(x, torch.tensor([0, 0, 2, 2]),
                                                          torch.tensor([0.4, 0.3, 0.2, 0.1]).log(),
                                                          backend=b),
    "ldam": lambda x, b: XF.ldam_loss(x, torch.tensor([0, 0, 2, 2]), torch.tensor([0.1, 0.2, 0.3, 0.5]), 30.0,
                                      backend=b),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("loss", list(EXTREME_CASES))
def test_extreme_logits_give_finite_loss_and_gradient(loss, dtype, backend):
    """Finite gradients always, and a finite loss wherever the exact loss is within the dtype's range;
    beyond it (float16 ends at 65504: MSE on logits ~1e8, LDAM with s = 30 ~3e5) the loss is inf, the
    exact loss correctly rounded, never NaN."""
    x = EXTREME.to(dtype).clone().requires_grad_()
    value = EXTREME_CASES[loss](x, backend)
    value.backward()
    truth = EXTREME_CASES[loss](EXTREME.double(), "reference")
    assert torch.isfinite(x.grad).all(), x.grad
    if truth > torch.finfo(dtype).max:
        assert value == math.inf, (value, truth)
    else:
        assert torch.isfinite(value).all(), (value, truth)
    if dtype == torch.float32:  # and right, not merely finite
        assert_close(value.double(), truth, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9])
def test_focal_gamma_below_one_stays_finite_as_pt_goes_to_one(gamma, dtype):
    x = torch.tensor([[60.0, 0.0, 0.0], [16.0, 0.0, 0.0], [8.0, 0.0, 0.0], [1e4, 0.0, -1e4]], dtype=dtype)
    for loss in (lambda x: XF.focal_loss(x, torch.zeros(4, dtype=torch.long), gamma, backend="fused"),
                 lambda x: XF.sigmoid_focal_loss(x, torch.ones_like(x), 0.25, gamma, backend="fused"),
                 lambda x: XF.sigmoid_focal_loss(-x, torch.zeros_like(x), -1, gamma, backend="fused")):
        xg = x.clone().requires_grad_()
        value = loss(xg)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(xg.grad).all(), (value, xg.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_with_gamma_zero_is_weighted_cross_entropy_exactly(reduction, backend):
    x = make_logits(N, C, torch.float32).requires_grad_()
    target, weight = make_index_target(N, C, ignore_index=IGN), make_weight(C).float()
    ce = XF.cross_entropy(x, target, weight, IGN, reduction, backend=backend)
    focal = XF.focal_loss(x, target, 0.0, weight, IGN, reduction, backend=backend)
    g = torch.rand(ce.shape)
    assert torch.equal(focal, ce)
    (g_focal,), (g_ce,) = torch.autograd.grad(focal, x, g), torch.autograd.grad(ce, x, g)
    assert torch.equal(g_focal, g_ce)


EMPTY_CASES = {  # (ours, PyTorch) on x, with an empty batch or every row ignored
    "ce": (lambda x, y, r, b: XF.cross_entropy(x, y, reduction=r, backend=b),
           lambda x, y, r: F.cross_entropy(x, y, reduction=r)),
    "ce-weighted-smoothed": (
        lambda x, y, r, b: XF.cross_entropy(x, y, torch.arange(1.0, 4.0), reduction=r, label_smoothing=0.1,
                                            backend=b),
        lambda x, y, r: F.cross_entropy(x, y, torch.arange(1.0, 4.0), reduction=r, label_smoothing=0.1)),
    "mse": (lambda x, y, r, b: XF.mse_loss(x, y, reduction=r, backend=b),
            lambda x, y, r: F.mse_loss(torch.softmax(x, 1)[y >= 0], F.one_hot(y[y >= 0], 3).float(),
                                       reduction=r)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch", ["empty", "all-ignored"])
@pytest.mark.parametrize("loss", list(EMPTY_CASES))
def test_empty_and_all_ignored_batches_behave_as_pytorch(loss, batch, reduction, backend):
    n = 0 if batch == "empty" else 4
    x, y = make_logits(n, 3, torch.float32), torch.full((n,), IGN)
    ours, theirs = EMPTY_CASES[loss]
    a, _ = check_parity(lambda x: ours(x, y, reduction, backend),
                        lambda x: theirs(x.float(), y, reduction).double(), x)
    assert a.isnan() if reduction == "mean" else a == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches_of_every_loss(backend):
    x = torch.zeros(0, 4, requires_grad=True)
    y, t = torch.zeros(0, dtype=torch.long), torch.zeros(0, 4)
    for fn in (partial(XF.cross_entropy, x, y), partial(XF.cross_entropy, x, t), partial(XF.focal_loss, x, y),
               partial(XF.mse_loss, x, y), partial(XF.binary_cross_entropy_with_logits, x, t),
               partial(XF.sigmoid_focal_loss, x, t)):
        assert fn(backend=backend).isnan()
        assert fn(reduction="sum", backend=backend) == 0
        none = fn(reduction="none", backend=backend)
        assert none.shape[0] == 0
        (grad,) = torch.autograd.grad(fn(reduction="sum", backend=backend), x)
        assert grad.shape == x.shape


# ---------------------------------------------------------------- argument checks

X = make_logits(4, 3, torch.float32)
Y = torch.tensor([0, 1, 2, 1])
T = make_binary_target(4, 3, torch.float32)

# Class indices out of range: at training shapes PyTorch's own kernels find them (as in F.cross_entropy,
# without a separate host-synchronising pass) and xentlab turns their error into this ValueError.
INDEX_ERRORS = [  # (loss, its keyword arguments, 4 class indices with a bad one, the message)
    (XF.cross_entropy, {}, [0, 1, 3, 1], r"class index 3.*\[0, 3\).*C=3"),
    (XF.cross_entropy, {}, [0, -1, 2, 1], r"class index -1"),
    (XF.cross_entropy, {"ignore_index": -1, "label_smoothing": 0.1, "weight": [1.0, 2.0, 3.0]}, [0, -1, 9, 1],
     r"class index 9"),
    (XF.cross_entropy, {"weight": [1.0, 2.0, 3.0]}, [0, 1, 2, 3], r"class index 3"),
    (XF.focal_loss, {}, [0, 7, 2, 1], r"class index 7"),
    (XF.focal_loss, {}, [-100, 3, 2, 1], r"class index 3"),
    (XF.mse_loss, {}, [0, 1, 2, 5], r"class index 5"),
    (XF.mse_loss, {}, [-100, -2, 2, 1], r"class index -2"),
    (XF.ldam_loss, {"margins": torch.ones(3)}, [0, 1, 2, 4], r"class index 4"),
    (XF.logit_adjusted_loss, {"log_prior": torch.zeros(3)}, [0, 3, 2, 1], r"class index 3"),
]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("rows", [4, 40_000], ids=["training-shape", "large"])
@pytest.mark.parametrize("loss, kwargs, target, message", INDEX_ERRORS,
                         ids=[f"index-{i}" for i in range(len(INDEX_ERRORS))])
def test_out_of_range_class_index_is_a_value_error_on_every_path(loss, kwargs, target, message, rows,
                                                                 backend):
    """Small fused inputs are checked inside PyTorch's kernels, large ones (and other backends) by one check
    before the kernel; the caller sees the same ValueError either way, whatever the weights, transform,
    smoothing or ignore_index."""
    x = X.repeat(rows // 4, 1).requires_grad_()
    with pytest.raises(ValueError, match=message):
        loss(x, torch.tensor(target).repeat(rows // 4), **kwargs, backend=backend)


def test_valid_class_indices_at_training_shapes_cost_no_separate_check(monkeypatch):
    """At training shapes the range check is the kernel's: valid targets never run the host-synchronising
    check (which would cost more than the loss itself there); large inputs run it once."""
    calls = []
    monkeypatch.setattr(XF, "_bad_index_message", lambda *a: calls.append(a) or None)
    x, y = make_logits(128, 5).requires_grad_(), make_index_target(128, 5, ignore_index=IGN)
    for loss in (XF.cross_entropy, XF.focal_loss, XF.mse_loss, XF.poly1_loss):
        loss(x, y, ignore_index=IGN).backward()
    XF.cross_entropy(x, y, ignore_index=IGN, label_smoothing=0.2, weight=make_weight(5)).backward()
    assert calls == []
    big_x, big_y = make_logits(20_000, 5), make_index_target(20_000, 5)
    XF.cross_entropy(big_x, big_y)
    assert len(calls) == 1


ERRORS = [
    (lambda: XF.cross_entropy(X, Y[:3]), ValueError, r"shape \(4,\)"),
    (lambda: XF.cross_entropy(X, Y.float()), ValueError, r"class indices must be an integer tensor"),
    (lambda: XF.cross_entropy(X, Y.bool()), TypeError, r"class indices"),
    (lambda: XF.cross_entropy(X, make_prob_target(4, 3)), TypeError, r"float64 must match the input dtype"),
    (lambda: XF.cross_entropy(X, make_prob_target(4, 3).float()[:, :2]), ValueError, r"input's shape"),
    (lambda: XF.cross_entropy(X, make_prob_target(4, 3).float(), ignore_index=0), ValueError, r"negative"),
    (lambda: XF.cross_entropy(X, Y, label_smoothing=1.5), ValueError, r"label_smoothing.*\[0.0, 1.0\].*1.5"),
    (lambda: XF.cross_entropy(X, Y, label_smoothing=float("nan")), ValueError, r"label_smoothing"),
    (lambda: XF.cross_entropy(X, Y, label_smoothing="0.1"), TypeError, r"label_smoothing"),
    (lambda: XF.cross_entropy(X, Y, weight=torch.ones(4)), ValueError, r"weight.*\(3,\).*\(4,\)"),
    (lambda: XF.cross_entropy(X, Y, weight=torch.tensor([1.0, -1.0, 1.0])), ValueError, r"weight.*-1"),
    (lambda: XF.cross_entropy(X, Y, weight=[1.0, math.nan, 1.0]), ValueError, r"weight.*nan"),
    (lambda: XF.cross_entropy(X, Y, weight=[1.0, math.inf, 1.0]), ValueError, r"weight.*inf"),
    (lambda: XF.cross_entropy(X, Y, weight="heavy"), TypeError, r"weight"),
    (lambda: XF.cross_entropy(X, Y, reduction="avg"), ValueError, r"reduction.*'none', 'mean', 'sum'.*'avg'"),
    (lambda: XF.cross_entropy(X, Y, ignore_index=1.5), TypeError, r"ignore_index"),
    (lambda: XF.cross_entropy(X, Y, backend="cuda"), ValueError, r"backend.*'auto', 'fused', 'triton'"),
    (lambda: XF.cross_entropy(X.long(), Y), TypeError, r"input dtype"),
    (lambda: XF.cross_entropy(X.numpy(), Y), TypeError, r"input must be a torch.Tensor"),
    (lambda: XF.cross_entropy(torch.tensor(1.0), Y), ValueError, r"class dimension"),
    (lambda: XF.cross_entropy(torch.zeros(4, 0), Y), ValueError, r"at least one class"),
    (lambda: XF.focal_loss(X, Y, gamma=-1.0), ValueError, r"gamma.*-1.0"),
    (lambda: XF.focal_loss(X, Y, alpha=[1.0, 2.0]), ValueError, r"alpha.*\(3,\)"),
    (lambda: XF.focal_loss(X, Y, alpha=torch.tensor([1.0, float("nan"), 1.0])), ValueError, r"alpha.*nan"),
    (lambda: XF.focal_loss(X, make_prob_target(4, 3).float()), TypeError, r"class indices"),
    (lambda: XF.mse_loss(X, Y, on="softmax"), ValueError, r"on must be one of.*'softmax'"),
    (lambda: XF.binary_cross_entropy_with_logits(X, T.clamp(min=1.5)), ValueError, r"\[0, 1\], got 1.5"),
    (lambda: XF.binary_cross_entropy_with_logits(X, T - 1), ValueError, r"\[0, 1\], got -"),
    (lambda: XF.binary_cross_entropy_with_logits(X, T[:, :2]), ValueError, r"target shape"),
    (lambda: XF.binary_cross_entropy_with_logits(X, T, weight=torch.ones(2)), ValueError, r"broadcast"),
    (lambda: XF.binary_cross_entropy_with_logits(X, T, weight=torch.full((3,), float("nan"))), ValueError,
     r"weight.*nan"),
    (lambda: XF.binary_cross_entropy_with_logits(X, T, pos_weight=torch.ones(4)), ValueError,
     r"pos_weight.*\(3,\)"),
    (lambda: XF.binary_cross_entropy_with_logits(X, T, pos_weight=-torch.ones(3)), ValueError,
     r"pos_weight.*-1"),
    (lambda: XF.sigmoid_focal_loss(X, T, alpha=1.5), ValueError, r"alpha.*1.5"),
    (lambda: XF.sigmoid_focal_loss(X, T, gamma=-0.1), ValueError, r"gamma.*-0.1"),
    (lambda: XF.sigmoid_focal_loss(X, T, reduction=None), ValueError, r"reduction"),
]


@pytest.mark.parametrize("call, error, message", ERRORS, ids=[f"error-{i}" for i in range(len(ERRORS))])
def test_bad_arguments_raise_before_any_kernel(call, error, message, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel was selected before the arguments were checked")

    if "backend" not in message:
        monkeypatch.setattr("xentlab.functional.get_backend", no_kernel)
    with pytest.raises(error, match=message):
        call()


def test_backend_choice():
    cpu = torch.zeros(2, 3)
    assert kernels.get_backend("auto", cpu) is fused
    assert kernels.get_backend("fused", cpu) is fused
    assert kernels.get_backend("reference", cpu).__name__ == "xentlab.kernels.reference"
    with pytest.raises(ValueError, match="'auto', 'fused', 'triton', 'reference'.*'gpu'"):
        kernels.get_backend("gpu", cpu)


# ---------------------------------------------------------------- the shared row losses and logit transforms

ROW_LOSSES = [spec.NLL(), spec.Focal(0.0), spec.Focal(0.5), spec.Focal(2.0), spec.Poly1(1.0),
              spec.Poly1(-1.0), spec.GCE(0.7), spec.GCE(1.0)]


@pytest.mark.parametrize("row_loss", ROW_LOSSES, ids=repr)
def test_every_row_loss_slope_is_the_derivative_of_its_value(row_loss):
    logpt = torch.cat([-torch.logspace(-12, 2, 60, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    logpt.requires_grad_()
    (autograd,) = torch.autograd.grad(row_loss.value(logpt).sum(), logpt)
    slope = row_loss.slope(logpt.detach())
    assert torch.isfinite(slope).all()
    assert_close(slope, autograd, rtol=1e-9, atol=1e-12)


def _transforms(c):
    g = generator(7)
    return {
        "identity": None,
        "bias": spec.LogitTransform(bias=torch.randn(c, generator=g, dtype=torch.float64)),
        "margin-scale": spec.LogitTransform(scale=3.0,
                                            margin=torch.rand(c, generator=g, dtype=torch.float64)),
        "all": spec.LogitTransform(scale=0.5 + torch.rand(c, generator=g, dtype=torch.float64),
                                   bias=torch.randn(c, generator=g, dtype=torch.float64),
                                   margin=torch.rand(c, generator=g, dtype=torch.float64)),
    }


def _softmax_loss_truth(x, target, row_loss, weight, transform, reduction, eps):
    """The spec's formula written out in float64, independently of every backend."""
    valid = target != IGN
    y = target.clamp(min=0)
    z = x
    if transform is not None:
        onehot = F.one_hot(y, x.shape[1]).double()
        margin = 0 if transform.margin is None else onehot * transform.margin
        z = transform.scale * (z - margin) + (0 if transform.bias is None else transform.bias)
    logp = torch.log_softmax(z, 1)
    w = torch.ones(x.shape[1], dtype=torch.float64) if weight is None else weight
    w_y = w[y] * valid
    loss = (1 - eps) * w_y * row_loss.value(logp.gather(1, y[:, None]).squeeze(1))
    loss = torch.where(valid, loss - eps / x.shape[1] * (logp * w).sum(1), 0.0)
    return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / w_y.sum()}[reduction]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", ["identity", "bias", "margin-scale", "all"])
@pytest.mark.parametrize("row_loss", [spec.Focal(0.5), spec.Focal(2.0), spec.Poly1(1.0), spec.GCE(0.7)],
                         ids=repr)
def test_softmax_loss_matches_its_formula(row_loss, transform, backend, chunking):
    x, target = make_logits(N, C), make_index_target(N, C, ignore_index=IGN)
    weight, t = make_weight(C), _transforms(C)[transform]
    for eps, reduction in itertools.product((0.0, 0.3), REDUCTIONS):
        args = (row_loss, weight, t, IGN, reduction, eps)
        check_parity(lambda x, args=args: XF.softmax_loss(x, target, *args, backend=backend),
                     lambda x, r=reduction, e=eps: _softmax_loss_truth(x, target, row_loss, weight, t, r, e),
                     x)


@pytest.mark.parametrize("row_loss", [spec.Focal(0.5), spec.Poly1(1.0), spec.GCE(0.7)], ids=repr)
def test_softmax_loss_gradcheck_with_a_transform(row_loss):
    x, target = make_logits(4, 3, scale=1.0).requires_grad_(), make_index_target(4, 3, ignore_index=IGN)
    t = _transforms(3)["all"]
    for backend, reduction in itertools.product(BACKENDS, ("mean", "none")):
        args = (row_loss, make_weight(3), t, IGN, reduction, 0.1)
        assert torch.autograd.gradcheck(
            lambda z, a=args, b=backend: XF.softmax_loss(z, target, *a, backend=b), (x,))


def test_row_loss_parameters_are_checked():
    for make, bad in ((spec.Focal, -1.0), (spec.Poly1, -1.5), (spec.GCE, 0.0), (spec.GCE, 1.5),
                      (spec.Focal, math.nan)):
        with pytest.raises(ValueError, match="must be a finite number"):
            make(bad)
    with pytest.raises(TypeError, match="value.*slope"):
        XF.softmax_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), object())
    with pytest.raises(ValueError, match=r"transform.bias must have shape \(C,\)"):
        XF.softmax_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), spec.NLL(),
                        transform=spec.LogitTransform(bias=torch.zeros(4)))


# ---------------------------------------------------------------- arguments that require grad, odd layouts


def _target_grads(ours, truth, x, t):
    """Gradients of the target from ours and from PyTorch's composition, for the same inputs."""
    ta, tb = t.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ga = torch.autograd.grad(ours(xa, ta), (xa, ta))
    gb = torch.autograd.grad(truth(xb, tb), (xb, tb))
    return ga, gb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["ce-probs", "mse-probs", "bce", "sigmoid-focal", "asl"])
def test_a_target_that_requires_grad_gets_its_gradient_as_in_pytorch(loss, backend):
    x = make_logits(N, C)
    w, soft = make_weight(C), partial(make_binary_target, soft=True)
    cases = {
        "ce-probs": (lambda x, t: XF.cross_entropy(x, t, w, label_smoothing=0.1, backend=backend),
                     lambda x, t: F.cross_entropy(x, t, w, label_smoothing=0.1), make_prob_target),
        "mse-probs": (lambda x, t: XF.mse_loss(x, t, backend=backend),
                      lambda x, t: F.mse_loss(torch.softmax(x, 1), t), make_prob_target),
        "bce": (lambda x, t: XF.binary_cross_entropy_with_logits(x, t, pos_weight=w, backend=backend),
                lambda x, t: F.binary_cross_entropy_with_logits(x, t, pos_weight=w), soft),
        "sigmoid-focal": (lambda x, t: XF.sigmoid_focal_loss(x, t, backend=backend),
                          lambda x, t: torchvision_sigmoid_focal_loss(x, t, reduction="mean"), soft),
        "asl": (lambda x, t: XF.asymmetric_loss(x, t, 0.0, 0.0, 0.0, backend=backend),
                lambda x, t: F.binary_cross_entropy_with_logits(x, t), soft),
    }
    ours, truth, make = cases[loss]
    (gx_a, gt_a), (gx_b, gt_b) = _target_grads(ours, truth, x, make(N, C))
    assert_close(gx_a, gx_b)
    assert_close(gt_a, gt_b)


@pytest.mark.parametrize("call", [
    lambda w: XF.cross_entropy(make_logits(4, 3), torch.tensor([0, 1, 2, 0]), weight=w),
    lambda w: XF.focal_loss(make_logits(4, 3), torch.tensor([0, 1, 2, 0]), alpha=w),
    lambda w: XF.binary_cross_entropy_with_logits(make_logits(4, 3), make_binary_target(4, 3), weight=w),
    lambda w: XF.binary_cross_entropy_with_logits(make_logits(4, 3), make_binary_target(4, 3), pos_weight=w),
    lambda w: XF.softmax_loss(make_logits(4, 3), torch.tensor([0, 1, 2, 0]), spec.NLL(),
                              transform=spec.LogitTransform(bias=w)),
], ids=["weight", "alpha", "bce-weight", "pos_weight", "transform-bias"])
def test_a_constant_that_requires_grad_is_refused_by_name_not_silently_dropped(call):
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"requires grad.*constant.*detach\(\)"):
        call(w)
    with torch.no_grad():  # no graph, nothing to drop: fine, as in PyTorch
        call(w)


def test_sparse_and_meta_tensors_are_a_clear_type_error_up_front():
    x, y = make_logits(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(TypeError, match=r"input must be a dense \(strided\) tensor.*to_dense"):
        XF.cross_entropy(x.to_sparse(), y)
    with pytest.raises(TypeError, match=r"target must be a dense"):
        XF.binary_cross_entropy_with_logits(x, make_binary_target(4, 3).to_sparse())
    with pytest.raises(TypeError, match=r"input is a meta tensor"):
        XF.focal_loss(torch.empty(4, 3, device="meta"), y.to("meta"))
    with pytest.raises(TypeError, match=r"weight must be a dense"):
        XF.cross_entropy(x, y, weight=torch.ones(3, dtype=torch.float64).to_sparse())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bce_at_infinite_logits_is_pytorchs_value(backend):
    inf = math.inf
    x = torch.tensor([[inf, -inf, inf, -inf, 0.0, 40.0, -40.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.5, 0.0, 1.0]], dtype=torch.float64)
    for pos_weight in (None, torch.tensor([2.0], dtype=torch.float64)):
        ours = XF.binary_cross_entropy_with_logits(x, t, pos_weight=pos_weight, reduction="none",
                                                   backend=backend)
        theirs = F.binary_cross_entropy_with_logits(x, t, pos_weight=pos_weight, reduction="none")
        assert_close(ours, theirs, equal_nan=True)
    assert XF.binary_cross_entropy_with_logits(x[:, :1], t[:, :1], backend=backend).item() == inf


# ---------------------------------------------------------------- validate=False (CUDA-graph callers)


def _value_checks_calls(call) -> list[str]:
    """The host reads of tensor values (`bool(t)`, `t.item()`, `t.tolist()`) that `call` makes outside the
    kernels."""
    reads = []
    originals = {name: getattr(torch.Tensor, name) for name in ("__bool__", "item", "tolist")}

    def spy(name, original):
        def read(self, *args):
            reads.append(name)
            return original(self, *args)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, spy(name, original))
    try:
        call()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return reads


@pytest.mark.parametrize("name", ["cross_entropy", "focal_loss", "bce", "asl"])
def test_validate_false_skips_exactly_the_checks_that_read_tensor_values(name):
    x = make_logits(8, 5, torch.float32)
    y, w = make_index_target(8, 5), torch.rand(5) + 0.1
    multi_hot = (torch.rand(8, 5) > 0.5).float()
    call = {
        "cross_entropy": lambda **k: XF.cross_entropy(x, y, w, backend="reference", **k),
        "focal_loss": lambda **k: XF.focal_loss(x, y, alpha=w, backend="reference", **k),
        "bce": lambda **k: XF.binary_cross_entropy_with_logits(x, multi_hot, backend="reference", **k),
        "asl": lambda **k: XF.asymmetric_loss(x, multi_hot, backend="reference", **k),
    }[name]
    assert "validate" in inspect.signature(getattr(XF, name if name in ("cross_entropy", "focal_loss")
                                                  else "asymmetric_loss")).parameters
    assert _value_checks_calls(call) != []  # the default checks read values (one sync each on a GPU)
    assert _value_checks_calls(lambda: call(validate=False)) == []
    assert_close(call(validate=False), call())


def test_validate_false_keeps_the_metadata_checks_and_validate_must_be_a_bool():
    x = make_logits(4, 3, torch.float32)
    with pytest.raises(ValueError, match="class index 7"):
        XF.cross_entropy(x, torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ValueError, match="shape"):
        XF.cross_entropy(x, torch.tensor([0, 1]), validate=False)
    with pytest.raises(ValueError, match="reduction"):
        XF.cross_entropy(x, torch.tensor([0, 1, 2, 0]), reduction="avg", validate=False)
    with pytest.raises(TypeError, match="validate must be True or False"):
        XF.cross_entropy(x, torch.tensor([0, 1, 2, 0]), validate="no")
