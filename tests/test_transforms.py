"""The losses inside PyTorch's other ways of running autograd: torch.func transforms, torch.compile, and the
edge inputs where the fused routes must agree with PyTorch and torchvision.

Every case runs with the default backend and validation on, as a user would call it; the route-driving
`chunking` fixture (tests/conftest.py) puts the eager side on each fused route in turn.
"""

from __future__ import annotations

import math

import pytest
import torch
from _cases import (
    make_binary_target,
    make_index_target,
    make_logits,
    make_weight,
    torchvision_sigmoid_focal_loss,
)
from torch import nn
from torch.func import grad, jvp, vmap
from torch.testing import assert_close

from xentlab import functional as XF
from xentlab.kernels import spec
from xentlab.losses import build_loss

SEEDS, N, C = 10, 12, 5
LOG_PRIOR = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]).log()
MARGINS = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
WEIGHT = make_weight(C).float()
SCALED = spec.LogitTransform(2.0)

# Every functional loss, as f(logits (N, C), class indices (N,), soft targets (N, C)).
LOSSES = {
    "cross_entropy": lambda x, y, t: XF.cross_entropy(x, y),
    "cross_entropy-weighted-smoothed": lambda x, y, t: XF.cross_entropy(x, y, WEIGHT, label_smoothing=0.1),
    "cross_entropy-probs": lambda x, y, t: XF.cross_entropy(x, t.softmax(1)),
    "focal_loss": lambda x, y, t: XF.focal_loss(x, y),
    "focal_loss-alpha": lambda x, y, t: XF.focal_loss(x, y, 0.5, WEIGHT),
    "poly1_loss": lambda x, y, t: XF.poly1_loss(x, y),
    "gce_loss": lambda x, y, t: XF.gce_loss(x, y),
    "logit_adjusted_loss": lambda x, y, t: XF.logit_adjusted_loss(x, y, LOG_PRIOR),
    "ldam_loss": lambda x, y, t: XF.ldam_loss(x, y, MARGINS, 3.0),
    "softmax_loss": lambda x, y, t: XF.softmax_loss(x, y, spec.Focal(1.0), transform=SCALED),
    "mse_loss": lambda x, y, t: XF.mse_loss(x, y),
    "mse_loss-logits": lambda x, y, t: XF.mse_loss(x, y, on="logits"),
    "binary_cross_entropy_with_logits": lambda x, y, t: XF.binary_cross_entropy_with_logits(x, t),
    "sigmoid_focal_loss": lambda x, y, t: XF.sigmoid_focal_loss(x, t),
    "asymmetric_loss": lambda x, y, t: XF.asymmetric_loss(x, t),
}


@pytest.fixture(scope="module")
def seeds():
    """Ten seeds' logits, class indices and soft targets, stacked on a leading axis."""
    x = make_logits(SEEDS * N, C, torch.float32).reshape(SEEDS, N, C)
    y = make_index_target(SEEDS * N, C).reshape(SEEDS, N)
    t = make_binary_target(SEEDS * N, C, torch.float32, soft=True).reshape(SEEDS, N, C)
    return x, y, t


def _loop_grads(f, x, y, t):
    grads = []
    for k in range(x.shape[0]):
        xk = x[k].clone().requires_grad_()
        grads.append(torch.autograd.grad(f(xk, y[k], t[k]), xk)[0])
    return torch.stack(grads)


# ---------------------------------------------------------------- torch.func


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.usefixtures("chunking")
def test_vmap_and_vmap_of_grad_over_seeds_equal_a_loop(name, seeds):
    f = LOSSES[name]
    loop = torch.stack([f(*(a[k] for a in seeds)) for k in range(SEEDS)])
    assert_close(vmap(f)(*seeds), loop)
    assert_close(vmap(grad(f))(*seeds), _loop_grads(f, *seeds))


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.usefixtures("chunking")
def test_grad_and_jvp_equal_autograd(name, seeds):
    f = LOSSES[name]
    x, y, t = (a[0] for a in seeds)
    direction = seeds[0][1]
    expected = _loop_grads(f, x[None], y[None], t[None])[0]
    assert_close(grad(f)(x, y, t), expected)
    value, tangent = jvp(lambda x: f(x, y, t), (x,), (direction,))
    assert_close(value, f(x, y, t))
    assert_close(tangent, (expected * direction).sum())


def test_forward_mode_ad_and_a_hessian_equal_pytorchs():
    """Eager dual numbers (torch.autograd.forward_ad) on an input past the one-shot size, and torch.func's
    Hessian of a small one: both against F.cross_entropy."""
    from torch.autograd import forward_ad

    x = make_logits(2000, C, torch.float64)
    y = make_index_target(2000, C)
    tangent = make_logits(2000, C, torch.float64, seed=7)
    results = []
    for loss in (XF.cross_entropy, nn.functional.cross_entropy):
        with forward_ad.dual_level():
            out = forward_ad.unpack_dual(loss(forward_ad.make_dual(x, tangent), y))
        results.append((out.primal, out.tangent))
    for got, expected in zip(*results, strict=True):
        assert_close(got, expected)
    small, y_small = x[:6], y[:6]
    expected = torch.autograd.functional.hessian(lambda z: nn.functional.cross_entropy(z, y_small), small)
    assert_close(torch.func.hessian(lambda z: XF.focal_loss(z, y_small, 0.0))(small), expected)


def test_validation_still_runs_under_vmap():
    """The value checks read every sample behind vmap's wrapper: a bad class index in one seed is refused."""
    x = make_logits(3 * N, C, torch.float32).reshape(3, N, C)
    y = make_index_target(3 * N, C).reshape(3, N)
    y[2, 4] = C
    with pytest.raises(ValueError, match=f"class index {C}, outside"):
        vmap(XF.focal_loss)(x, y)
    with pytest.raises(ValueError, match="binary targets must be in"):
        vmap(XF.sigmoid_focal_loss)(x, x)


# ---------------------------------------------------------------- torch.compile


def _graph_breaks(f, *args) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(f)(*args).graph_break_count


@pytest.mark.parametrize("name", list(LOSSES))
def test_compiled_losses_have_no_graph_break_and_match_eager(name, seeds):
    f = LOSSES[name]
    x, y, t = (a[0] for a in seeds)
    assert _graph_breaks(f, x, y, t) == 0
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    value = compiled(xc, y, t)
    assert_close(value, f(xe, y, t))
    value.backward()
    f(xe, y, t).backward()
    assert_close(xc.grad, xe.grad)


TRAINING_LOSSES = {"ce": {}, "weighted_ce": {"weights": "inverse_frequency"}, "label_smoothing": {},
                   "focal": {}, "bce": {}, "mse": {}, "logit_adjusted": {}, "ldam": {}, "poly1": {},
                   "gce": {}, "sigmoid_focal": {}, "asl": {}}


@pytest.mark.parametrize("name", list(TRAINING_LOSSES))
def test_a_compiled_training_step_with_each_builtin_loss_matches_eager(name):
    """Model and built-in loss module compiled as one graph (fullgraph); the backward is compiled with it."""
    loss = build_loss(name, class_counts=torch.tensor([40, 20, 10, 5, 2]), num_examples=77,
                      **TRAINING_LOSSES[name])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, C))
    features, y = torch.randn(32, 8), torch.randint(0, C, (32,))

    def step(features, y):
        return loss(model(features), y)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    value = compiled(features, y)
    expected = step(features, y)
    assert_close(value, expected)
    params = list(model.parameters())
    expected_grads = torch.autograd.grad(expected, params)
    for got, want in zip(torch.autograd.grad(value, params), expected_grads, strict=True):
        assert_close(got, want)


def test_focal_compiles_with_inductor():
    """One compile with the default compiler (slow on two cores); the others use aot_eager, which finds the
    same graph breaks."""
    x = make_logits(64, C, torch.float32).requires_grad_()
    y = make_index_target(64, C)
    for f in (XF.focal_loss,):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True)
        value = compiled(x, y)
        (got,) = torch.autograd.grad(value, x)
        expected = f(x, y)
        assert_close(value, expected)
        assert_close(got, torch.autograd.grad(expected, x)[0])


# ---------------------------------------------------------------- edges, on every route


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.usefixtures("chunking")
def test_rows_whose_weights_are_all_zero_give_pytorchs_nan(smoothing):
    """Not ignored, weight 0: `mean` divides by 0 (a nonzero smoothing total too); PyTorch's loss is NaN, its
    gradient NaN on those rows and 0 on ignored ones."""
    x = make_logits(N, C).requires_grad_()
    y = make_index_target(N, C, ignore_index=-100)
    weight = torch.ones(C, dtype=torch.float64)
    weight[y[y >= 0].unique()] = 0
    expected_value = nn.functional.cross_entropy(x, y, weight, label_smoothing=smoothing)
    (expected,) = torch.autograd.grad(expected_value, x)
    losses = [lambda: XF.cross_entropy(x, y, weight, label_smoothing=smoothing),
              lambda: XF.cross_entropy(x, y, weight, label_smoothing=smoothing, backend="reference")]
    if not smoothing:
        losses.append(lambda: XF.focal_loss(x, y, 0.0, weight))
    for f in losses:
        value = f()
        (got,) = torch.autograd.grad(value, x)
        assert value.isnan() and expected_value.isnan()
        assert_close(got, expected, equal_nan=True)
        assert got[y >= 0].isnan().all() and (got[y < 0] == 0).all()


INFINITE = torch.tensor([[math.inf, -math.inf, math.inf, -math.inf, 30.0, -30.0, 0.0]], dtype=torch.float64)
INFINITE_TARGET = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5]], dtype=torch.float64)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 0.5), (0.25, 0.0)])
@pytest.mark.parametrize("rows", [1, 3000])  # the one-pass and the chunked sizes
def test_sigmoid_focal_at_infinite_logits_is_torchvisions(alpha, gamma, rows):
    x = INFINITE.repeat(rows, 1).requires_grad_()
    t = INFINITE_TARGET.repeat(rows, 1)
    expected = torchvision_sigmoid_focal_loss(x, t, alpha, gamma)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    for backend in ("auto", "reference"):
        value = XF.sigmoid_focal_loss(x, t, alpha, gamma, reduction="none", backend=backend)
        (got,) = torch.autograd.grad(value.sum(), x)
        assert_close(value, expected, equal_nan=True)
        assert_close(got, expected_grad, equal_nan=True)


@pytest.mark.parametrize("gamma_pos, gamma_neg, clip", [(0.0, 0.0, 0.0), (0.0, 4.0, 0.0), (1.0, 4.0, 0.05),
                                                      (0.0, 0.0, 0.1)])
@pytest.mark.parametrize("rows", [1, 3000])
def test_asl_at_infinite_logits_is_its_reference_formula(gamma_pos, gamma_neg, clip, rows):
    """ASL has no PyTorch version; its fused path gives what its formula gives through PyTorch's ops: NaN
    where a zero target weight meets an infinite term, the plain gradients -q, p at gamma = 0."""
    x = INFINITE.repeat(rows, 1).requires_grad_()
    t = INFINITE_TARGET.repeat(rows, 1)
    results = []
    for backend in ("auto", "reference"):
        value = XF.asymmetric_loss(x, t, gamma_pos, gamma_neg, clip, reduction="none", backend=backend)
        results.append((value, torch.autograd.grad(value.sum(), x)[0]))
    for got, expected in zip(*results, strict=True):
        assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.usefixtures("chunking")
def test_a_row_loss_that_learns_gets_its_gradient_on_every_route(smoothing):
    class LearntFocal:
        def __init__(self):
            self.gamma = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)

        def value(self, logpt):
            return -(-torch.expm1(logpt)).clamp(min=1e-30).pow(self.gamma) * logpt

        def slope(self, logpt):
            raise AssertionError("a learnt row loss is differentiated by autograd, never by its slope")

    row_loss = LearntFocal()
    x = make_logits(N, C)
    y = make_index_target(N, C)
    got = torch.autograd.grad(XF.softmax_loss(x, y, row_loss, label_smoothing=smoothing), row_loss.gamma)[0]
    logp = torch.log_softmax(x, 1)
    logpt = logp.gather(1, y[:, None]).squeeze(1)
    expected_loss = ((1 - smoothing) * row_loss.value(logpt) - smoothing / C * logp.sum(1)).mean()
    assert_close(got, torch.autograd.grad(expected_loss, row_loss.gamma)[0])


@pytest.mark.usefixtures("chunking")
def test_a_row_loss_that_is_not_elementwise_is_refused():
    class Reduced:
        def value(self, logpt):
            return -logpt.mean()

        def slope(self, logpt):
            return torch.full_like(logpt, -1.0 / logpt.numel())

    x, y = make_logits(N, C).requires_grad_(), make_index_target(N, C)
    for backend in ("auto", "reference"):
        with pytest.raises(ValueError, match=r"Reduced.value\(logpt\) must return one value per row"):
            XF.softmax_loss(x, y, Reduced(), backend=backend)


@pytest.mark.parametrize("field", ["bias", "margin", "scale"])
def test_a_transform_with_a_nan_is_refused(field):
    values = torch.zeros(C)
    values[2] = math.nan
    transform = spec.LogitTransform(**{field: values})
    with pytest.raises(ValueError, match=f"transform.{field} must be finite, got nan"):
        XF.softmax_loss(make_logits(N, C), make_index_target(N, C), spec.NLL(), transform=transform)


@pytest.mark.parametrize("loss", [XF.sigmoid_focal_loss, XF.asymmetric_loss,
                                  XF.binary_cross_entropy_with_logits])
def test_elementwise_losses_of_no_classes_are_pytorchs_empty_reductions(loss):
    x = torch.zeros(4, 0, requires_grad=True)
    assert loss(x, torch.zeros(4, 0)).isnan()
    assert loss(x, torch.zeros(4, 0), reduction="sum") == 0
    assert loss(x, torch.zeros(4, 0), reduction="none").shape == (4, 0)
    loss(x, torch.zeros(4, 0), reduction="sum").backward()
    assert x.grad.shape == (4, 0)
