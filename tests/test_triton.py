"""The Triton backend against PyTorch/torchvision ground truth (tests/_cases.py) and its own contracts.

Without a CUDA device the kernels run in Triton's CPU interpreter. TRITON_INTERPRET=1 must be in the
environment before `triton` is first imported (Triton decorates its own `tl.sum`, `tl.cdiv`, ... at import,
and our kernels when xentlab.kernels.triton is imported), so this module sets it before importing
anything from Triton (tests/conftest.py does the same for the whole session, because pytorch_lightning
imports triton too). With a CUDA device the same tests run on the GPU, plus the GPU-only ones at the end.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed: the Triton backend is not testable")

import _cases as cases  # noqa: E402

import xentlab.kernels.triton as tx  # noqa: E402
from xentlab import functional  # noqa: E402
from xentlab.kernels import reference  # noqa: E402
from xentlab.kernels.spec import GCE, NLL, Focal, LogitTransform, Poly1  # noqa: E402
from xentlab.kernels.triton import autograd as tx_autograd  # noqa: E402

if not ON_GPU and not tx._INTERPRETED:
    pytest.skip("no CUDA device, and triton was imported before TRITON_INTERPRET=1 was set "
                "(see tests/conftest.py)", allow_module_level=True)

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
REDUCTIONS = ["mean", "sum", "none"]
# "short": whole rows in one tile, 4 rows per program (the last block part empty); "long": rows walked in
# blocks of 8 columns (the last one partial), 4 rows per block, one program looping over both row blocks.
PATHS = {"short": {"rows": 4}, "long": {"one_block": False, "block_c": 8, "rows": 4, "max_programs": 1}}
# The long-row path shares all dtype handling with the short one; float32 covers it within the time budget.
SOFTMAX_PARAMS = [(path, dtype) for path in PATHS for dtype in DTYPES
                  if path == "short" or dtype == torch.float32]
N, C = 7, 11
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (none present)")


def _data(dtype, n=N, c=C):
    """Inputs from tests/_cases.py, on the CPU: logits, index targets with rows ignored (-100, or 1), class
    weights in the compute dtype, probability targets, soft and hard binary targets."""
    return SimpleNamespace(
        x=cases.make_logits(n, c, dtype), y=cases.make_index_target(n, c, ignore_index=-100),
        y1=cases.make_index_target(n, c, ignore_index=1),
        w=cases.make_weight(c).to(torch.float64 if dtype == torch.float64 else torch.float32),
        probs=cases.make_prob_target(n, c, dtype), soft=cases.make_binary_target(n, c, dtype, soft=True),
        hard=cases.make_binary_target(n, c, dtype))


def _on_device(fn, *args, **kwargs):
    """fn on DEVICE for CPU-held arguments, the result brought back (autograd follows both transfers)."""
    def move(a):
        return a.to(DEVICE) if isinstance(a, torch.Tensor) else a

    return lambda x: fn(move(x), *map(move, args), **kwargs).cpu()


# The ground truth of each backend function; it takes the same positional arguments (and makes them float64).
# ASL has no PyTorch version: its truth is the reference backend (autograd through its formula).
TRUTH = {"cross_entropy": cases.torch_cross_entropy, "focal_loss": cases.torch_focal_loss,
         "mse_loss": cases.torch_mse_loss, "binary_cross_entropy_with_logits": cases.torch_bce,
         "sigmoid_focal_loss": cases.torchvision_sigmoid_focal_loss, "asl_loss": reference.asl_loss}


def _softmax_case(case_id, d, r):
    """(function name, its arguments after the logits)."""
    return {
        "ce": ("cross_entropy", (d.y, None, -100, r, 0.0)),
        "ce_weight": ("cross_entropy", (d.y, d.w, -100, r, 0.0)),
        "ce_smooth": ("cross_entropy", (d.y, None, -100, r, 0.1)),
        "ce_weight_smooth_ignore1": ("cross_entropy", (d.y1, d.w, 1, r, 0.3)),
        "ce_probs": ("cross_entropy", (d.probs, None, -100, r, 0.0)),
        "ce_probs_weight_smooth": ("cross_entropy", (d.probs, d.w, -100, r, 0.2)),
        "focal_alpha": ("focal_loss", (d.y, 2.0, d.w, -100, r)),
        "focal_gamma_half": ("focal_loss", (d.y, 0.5, None, -100, r)),
        "mse_probs": ("mse_loss", (d.y, -100, r, "probs")),
        "mse_probs_soft": ("mse_loss", (d.probs, -100, r, "probs")),
        "mse_logits": ("mse_loss", (d.y, -100, r, "logits")),
        "mse_logits_soft": ("mse_loss", (d.probs, -100, r, "logits")),
    }[case_id]


def _sigmoid_case(case_id, d, r):
    return {
        "bce": ("binary_cross_entropy_with_logits", (d.soft, None, None, r)),
        "bce_weight_pos": ("binary_cross_entropy_with_logits", (d.hard, d.w, 2 * d.w, r)),
        "bce_row_weight": ("binary_cross_entropy_with_logits", (d.soft, d.w[:N, None], None, r)),
        "sigmoid_focal": ("sigmoid_focal_loss", (d.soft, 0.25, 2.0, r)),
        "sigmoid_focal_noalpha": ("sigmoid_focal_loss", (d.hard, -1.0, 0.5, r)),
        "asl": ("asl_loss", (d.soft, 0.0, 4.0, 0.05, r)),
        "asl_hard_noclip": ("asl_loss", (d.hard, 1.0, 2.0, 0.0, r)),
        "asl_focused_positives": ("asl_loss", (d.soft, 2.5, 1.0, 0.2, r)),
    }[case_id]


SOFTMAX_CASES = ["ce", "ce_weight", "ce_smooth", "ce_weight_smooth_ignore1", "ce_probs",
                 "ce_probs_weight_smooth", "focal_alpha", "focal_gamma_half", "mse_probs", "mse_probs_soft",
                 "mse_logits", "mse_logits_soft"]
SIGMOID_CASES = ["bce", "bce_weight_pos", "bce_row_weight", "sigmoid_focal", "sigmoid_focal_noalpha", "asl",
                 "asl_hard_noclip", "asl_focused_positives"]


def _parity(case, d, scale=0.7):
    """Value and gradient against the float64 ground truth (grad_output `scale` for scalar losses)."""
    name, args = case
    ours = _on_device(getattr(tx, name), *args)
    cases.check_parity(ours, lambda v: TRUTH[name](v, *args), d.x, scale=scale)


@pytest.mark.parametrize("case_id", SOFTMAX_CASES)
@pytest.mark.parametrize(("path", "dtype"), SOFTMAX_PARAMS, ids=lambda v: str(v).replace("torch.", ""))
def test_softmax_family_matches_pytorch(case_id, path, dtype, monkeypatch):
    for key, value in PATHS[path].items():
        monkeypatch.setitem(tx._TUNING, key, value)
    d = _data(dtype)
    for reduction in REDUCTIONS:
        _parity(_softmax_case(case_id, d, reduction), d)


def _row_case(case_id, d, dtype):
    """(row_loss, weight, transform, ignore_index, target, label_smoothing) of a softmax_loss case; tensors in
    `dtype` (the compute dtype for ours, float64 for the reference)."""
    gen, c = torch.Generator().manual_seed(6), d.x.shape[1]
    prior = torch.softmax(torch.randn(c, generator=gen, dtype=torch.float64), 0)
    counts = (1000 * prior).round() + 1
    margin = counts ** -0.25
    margin = 0.5 * margin / margin.max()  # LDAM's Delta, the largest margin 0.5
    per_class = 0.5 + torch.rand(c, generator=gen, dtype=torch.float64)
    w = d.w.to(dtype)
    adjusted = LogitTransform(bias=prior.log().to(dtype))
    ldam = LogitTransform(scale=5.0, margin=margin.to(dtype))
    bias = prior.log().to(dtype)
    everything = LogitTransform(scale=per_class.to(dtype), bias=bias, margin=margin.to(dtype))
    return {
        "nll_weight_smooth": (NLL(), w, None, -100, d.y, 0.1),
        "focal_alpha_ignore1": (Focal(2.0), w, None, 1, d.y1, 0.0),
        "poly1": (Poly1(1.0), None, None, -100, d.y, 0.0),
        "gce_weight": (GCE(0.7), w, None, -100, d.y, 0.0),
        "logit_adjusted": (NLL(), None, adjusted, -100, d.y, 0.0),
        "ldam_weight": (NLL(), w, ldam, -100, d.y, 0.0),
        "class_scale_bias_margin_smooth": (Focal(1.0), w, everything, -100, d.y, 0.2),
    }[case_id]


# Cross-entropy and focal loss are also checked against PyTorch above (they run on softmax_loss).
ROW_CASES = ["nll_weight_smooth", "focal_alpha_ignore1", "poly1", "gce_weight", "logit_adjusted",
             "ldam_weight", "class_scale_bias_margin_smooth"]
# float16 shares the 16-bit load/store path with bfloat16, which the PyTorch-parity test above also runs.
ROW_PARAMS = [(path, dtype) for path, dtype in SOFTMAX_PARAMS if dtype != torch.float16]


@pytest.mark.parametrize("case_id", ROW_CASES)
@pytest.mark.parametrize(("path", "dtype"), ROW_PARAMS, ids=lambda v: str(v).replace("torch.", ""))
def test_softmax_loss_matches_the_reference_backend(case_id, path, dtype, monkeypatch):
    """Every softmax-family loss from its one RowLoss/LogitTransform definition: value and input gradient
    against reference.softmax_loss (autograd through log_softmax, in float64), all reductions."""
    for key, value in PATHS[path].items():
        monkeypatch.setitem(tx._TUNING, key, value)
    d = _data(dtype)
    for reduction in REDUCTIONS:
        _row_parity(case_id, d, reduction, torch.float64 if dtype == torch.float64 else torch.float32)


def _row_parity(case_id, d, reduction, compute_dtype):
    row_loss, weight, transform, ignore_index, target, eps = _row_case(case_id, d, compute_dtype)
    _, t_weight, t_transform, _, _, _ = _row_case(case_id, d, torch.float64)
    ours = _on_device(tx.softmax_loss, target, row_loss, _moved(weight), _moved(transform), ignore_index,
                      reduction, eps)
    cases.check_parity(ours, lambda v: reference.softmax_loss(v, target, row_loss, t_weight, t_transform,
                                                              ignore_index, reduction, eps), d.x, scale=0.7)


def _moved(value):
    """A tensor, or a LogitTransform's tensors, on DEVICE."""
    if isinstance(value, LogitTransform):
        return LogitTransform(**{k: _moved(getattr(value, k)) for k in ("scale", "bias", "margin")})
    return value.to(DEVICE) if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("case_id", SIGMOID_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
def test_sigmoid_family_matches_pytorch(case_id, dtype):
    d = _data(dtype)
    for reduction in REDUCTIONS:
        _parity(_sigmoid_case(case_id, d, reduction), d)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case_id", ["ce_weight_smooth_ignore1", "ce_probs_weight_smooth", "focal_gamma_half",
                                     "mse_probs_soft", "bce_weight_pos", "sigmoid_focal", "asl", "ldam"])
def test_second_order_gradients_equal_the_reference_backends(case_id, reduction):
    """A backward under create_graph=True (here a Hessian-vector product, in the logits and, for soft
    targets, a mixed one in the target) is differentiable and equals the reference backend's, taken twice by
    autograd."""
    d = _data(torch.float64)
    if case_id == "ldam":
        transform = LogitTransform(scale=5.0, margin=d.w / 10)
        name, args = "softmax_loss", (d.y, NLL(), d.w, transform, -100, reduction, 0.1)
        truth = reference.softmax_loss
    else:
        name, args = (_softmax_case if case_id in SOFTMAX_CASES else _sigmoid_case)(case_id, d, reduction)
        truth = getattr(reference, name)
    target = args[0]
    soft = target.is_floating_point()
    v = torch.randn(d.x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def products(fn):
        x, t = d.x.clone().requires_grad_(), target.clone().requires_grad_(soft)
        loss = fn(x, t, *args[1:])
        go = torch.ones_like(loss) if reduction == "mean" else torch.linspace(0.5, 1.5, loss.numel(),
                                                                             dtype=loss.dtype).view(loss.shape)
        (g,) = torch.autograd.grad(loss, x, go, create_graph=True)
        return torch.autograd.grad((g * v).sum(), (x, t) if soft else (x,))

    for got, want in zip(products(_on_device_pair(getattr(tx, name))), products(truth), strict=True):
        torch.testing.assert_close(got, want)


def _on_device_pair(fn):
    """fn(x, target, *rest) on DEVICE for CPU-held arguments, the result brought back."""
    def call(x, target, *rest):
        moved = [_moved(a) for a in rest]
        return fn(x.to(DEVICE), target.to(DEVICE), *moved).cpu()

    return call


def _run(fn, x, args, grad_out):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args)
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    return loss.detach(), grad


# ------------------------------------------------------------------------------- contract numbers, edges


def test_losses_md_numbers():
    x = torch.tensor([[2.0, 1.0, 0.1], [0.0, 5.0, 0.2]], device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 1], device=DEVICE)
    loss = tx.cross_entropy(x, y, None, -100, "mean", 0.0)
    loss.backward()
    assert round(loss.item(), 4) == 0.2159
    expected = (torch.softmax(x.detach(), 1) - torch.nn.functional.one_hot(y, 3)) / 2
    torch.testing.assert_close(x.grad, expected)
    x = torch.tensor([[2.0, 1.0], [2.0, 1.0]], device=DEVICE, requires_grad=True)
    w = torch.tensor([1.0, 10.0], device=DEVICE)
    loss = tx.cross_entropy(x, torch.tensor([1, 1], device=DEVICE), w, -100, "mean", 0.0)
    loss.backward()
    assert round(loss.item(), 4) == 1.3133
    expected = torch.tensor([[0.3655, -0.3655]] * 2, device=DEVICE)
    torch.testing.assert_close(x.grad, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("p_true", [0.9, 0.5, 0.1, 0.01])
def test_true_class_probability_to_nll(p_true):
    x = torch.tensor([[0.0, float(torch.log(torch.tensor(p_true / (1 - p_true))))]], device=DEVICE)
    loss = tx.cross_entropy(x, torch.tensor([1], device=DEVICE), None, -100, "mean", 0.0)
    assert abs(loss.item() + torch.log(torch.tensor(p_true)).item()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_huge_logits_stay_finite(dtype, path, monkeypatch):
    for key, value in PATHS[path].items():
        monkeypatch.setitem(tx._TUNING, key, value)
    x = torch.tensor([[1e4, -1e4, 0.0, 5.0, -1e4, 1e4, 3.0, 0.0, 1.0]] * 3, dtype=dtype, device=DEVICE)
    y = torch.tensor([1, 0, 3], device=DEVICE)
    for name, args in [("cross_entropy", (y, None, -100, "mean", 0.1)),
                       ("focal_loss", (y, 0.5, None, -100, "sum")), ("mse_loss", (y, -100, "mean", "probs"))]:
        loss, grad = _run(getattr(tx, name), x, args, None)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), name


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # 1/0 and 0*inf make the nan, by design
def test_all_ignored_and_empty_batches():
    x = cases.make_logits(3, 4, torch.float32).to(DEVICE)
    ignored = torch.full((3,), -100, device=DEVICE)
    loss, grad = _run(tx.cross_entropy, x, (ignored, None, -100, "mean", 0.1), None)
    assert torch.isnan(loss) and (grad == 0).all()
    loss, grad = _run(tx.focal_loss, x, (ignored, 2.0, None, -100, "sum"), None)
    assert loss.item() == 0 and (grad == 0).all()
    empty = torch.empty(0, 4, device=DEVICE)
    no_target = torch.empty(0, dtype=torch.int64, device=DEVICE)
    for reduction in REDUCTIONS:
        grad_out = torch.empty(0, device=DEVICE) if reduction == "none" else torch.ones((), device=DEVICE)
        loss, grad = _run(tx.cross_entropy, empty, (no_target, None, -100, reduction, 0.0), grad_out)
        assert grad.shape == (0, 4), reduction
        assert {"mean": loss.isnan(), "sum": loss == 0, "none": loss.shape == (0,)}[reduction], reduction
    loss, grad = _run(tx.binary_cross_entropy_with_logits, empty, (empty, None, None, "mean"), None)
    assert torch.isnan(loss) and grad.shape == (0, 4)


INFINITE = torch.tensor([[math.inf, -math.inf, math.inf, -math.inf, 30.0, -30.0, 0.0]] * 3,
                        dtype=torch.float64)
INFINITE_TARGET = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5]] * 3, dtype=torch.float64)


@pytest.mark.parametrize(("name", "args"), [
    ("sigmoid_focal_loss", (0.25, 2.0)), ("sigmoid_focal_loss", (-1.0, 0.5)),
    ("sigmoid_focal_loss", (0.25, 0.0)),
    ("asl_loss", (0.0, 0.0, 0.0)), ("asl_loss", (0.0, 4.0, 0.0)), ("asl_loss", (1.0, 4.0, 0.05)),
    ("asl_loss", (0.0, 0.0, 0.1))])
def test_infinite_logits_give_the_peers_values_and_gradients(name, args):
    """torchvision's sigmoid focal loss (PyTorch's BCE inside: inf, NaN where it is NaN, p - t at gamma 0) and
    ASL's formula through PyTorch's ops: the same values, NaNs and gradients."""
    for dtype in (torch.float64, torch.float32):
        x = INFINITE.to(dtype)
        expected = _run(TRUTH[name], x, (INFINITE_TARGET.to(dtype), *args, "none"), torch.ones_like(x))
        got = _run(_on_device(getattr(tx, name), INFINITE_TARGET.to(dtype), *args, "none"), x, (),
                   torch.ones_like(x))
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e.to(dtype), equal_nan=True)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_rows_whose_weights_are_all_zero_give_pytorchs_nan(smoothing):
    """`mean` over kept rows of total weight 0: NaN loss, NaN gradient on kept rows, 0 on ignored ones."""
    x = cases.make_logits(6, 5, torch.float64)
    y = torch.tensor([0, -100, 2, 0, -100, 2])
    weight = torch.tensor([0.0, 1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    truth = torch.nn.functional.cross_entropy
    expected = _run(truth, x, (y, weight, None, -100, None, "mean", smoothing), None)
    got = _run(_on_device(tx.cross_entropy, y, weight, -100, "mean", smoothing), x, (), None)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, equal_nan=True)
    assert expected[1][y >= 0].isnan().all() and (expected[1][y < 0] == 0).all()


def _on(d):
    return SimpleNamespace(**{k: v.to(DEVICE) for k, v in vars(d).items()})


def test_focal_gamma_below_one_is_finite_at_certainty_and_gamma_zero_is_weighted_ce():
    x = torch.tensor([[100.0, 0.0, 0.0], [0.0, 1.0, 2.0]], device=DEVICE)  # p_y == 1 exactly in float32
    y = torch.tensor([0, 2], device=DEVICE)
    loss, grad = _run(tx.focal_loss, x, (y, 0.5, None, -100, "mean"), None)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[0] == 0).all()
    d = _on(_data(torch.float64))
    focal = _run(tx.focal_loss, d.x, (d.y, 0.0, d.w, -100, "mean"), None)
    ce = _run(tx.cross_entropy, d.x, (d.y, d.w, -100, "mean", 0.0), None)
    for a, b in zip(focal, ce, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_one_class_and_one_logit():
    """C = 1: a one-wide tile (binary BCE on a single logit; softmax of one class has zero loss)."""
    d = _data(torch.float32, c=1)
    y = torch.zeros(N, dtype=torch.int64)
    y[3] = -100
    for case in [("binary_cross_entropy_with_logits", (d.soft, None, None, "mean")),
                 ("sigmoid_focal_loss", (d.hard, 0.25, 2.0, "sum")),
                 ("cross_entropy", (y, None, -100, "mean", 0.1)), ("mse_loss", (y, -100, "none", "probs"))]:
        _parity(case, d)


def test_mean_denominator_spans_several_partial_blocks():
    d = _data(torch.float32, n=2500, c=3)
    y = torch.arange(2500) % 4 - 1  # every fourth row ignored (-1)
    _parity(("cross_entropy", (y, d.w, -1, "mean", 0.0)), d)


def test_out_of_range_targets_are_never_read_out_of_bounds():
    """Targets that skipped validation (a CUDA-graph caller's validate=False) with indices outside [0, C)
    count as ignored rows in every index-target kernel instead of addressing memory out of bounds. (What
    this observes is the torch side, which would index the weights out of bounds; Triton's interpreter reads
    past a buffer without complaint, so the kernels' own masks are checked by reading, not by this test.)"""
    d = _on(_data(torch.float32))
    bad, ignored = d.y.clone(), d.y.clone()
    bad[[0, 4]] = torch.tensor([C + 3, -5], device=DEVICE)
    ignored[[0, 4]] = -100
    transform = LogitTransform(scale=2.0, bias=d.w.log(), margin=0.5 * d.w)
    for fn, args in [(tx.softmax_loss, (Focal(2.0), d.w, transform, -100, "mean", 0.1)),
                     (tx.mse_loss, (-100, "mean", "probs"))]:
        got = _run(fn, d.x, (bad, *args), None)
        want = _run(fn, d.x, (ignored, *args), None)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- autograd and in-place


def test_leaf_grad_takes_the_backward_buffer_without_a_copy(monkeypatch):
    pointers = []
    write = tx_autograd._write_grad

    def record(ctx, x):
        grad = write(ctx, x)
        pointers.append(grad.data_ptr())
        return grad

    monkeypatch.setattr(tx_autograd, "_write_grad", record)
    d = _on(_data(torch.float32))
    x = d.x.requires_grad_()
    tx.cross_entropy(x, d.y, None, -100, "mean", 0.0).backward()
    assert len(pointers) == 1 and x.grad.data_ptr() == pointers[0]


def _loss_args(name, d, reduction):
    if name == "cross_entropy":
        return (d.y, d.w, -100, reduction, 0.1)
    if name == "cross_entropy_probs":
        return (d.probs, d.w, -100, reduction, 0.1)
    if name == "focal_loss":
        return (d.y, 0.5, d.w, -100, reduction)
    if name == "mse_loss":
        return (d.y, -100, reduction, "probs")
    if name == "asl_loss":
        return (d.soft, 1.0, 4.0, 0.05, reduction)
    return (d.soft, d.w, None, reduction)


def _fn(name):
    return getattr(tx, "cross_entropy" if name == "cross_entropy_probs" else name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", ["cross_entropy", "focal_loss", "cross_entropy_probs", "mse_loss",
                                  "binary_cross_entropy_with_logits", "asl_loss"])
def test_any_sequence_of_backwards_through_a_retained_graph_is_exact(name, reduction):
    """grad_output 0 first (once a stored scale of 0, then NaN), then others, each exact, and
    a gradient already returned is never modified by a later backward."""
    d = _on(_data(torch.float32))
    args = _loss_args(name, d, reduction)
    x = d.x.clone().requires_grad_()
    loss = _fn(name)(x, *args)
    base = torch.rand(loss.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE) + 0.5
    _, unit = _run(_fn(name), d.x, args, base)
    factors = [0.0, 2.0, 0.0, 0.5, 1.0]
    grads = [torch.autograd.grad(loss, x, f * base, retain_graph=True)[0] for f in factors]
    for f, grad in zip(factors, grads, strict=True):
        torch.testing.assert_close(grad, f * unit, msg=lambda m, f=f: f"grad_output factor {f}: {m}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_probs", "binary_cross_entropy_with_logits"])
def test_inplace_backward_writes_the_gradient_into_the_logits(name, reduction):
    d = _on(_data(torch.float32))
    args = _loss_args(name, d, reduction)
    probe = _fn(name)(d.x, *args)
    grad_out = torch.rand_like(probe) + 0.5
    want_loss, want_grad = _run(_fn(name), d.x, args, grad_out)
    leaf = d.x.clone().requires_grad_()
    logits = leaf * 1.0
    loss = _fn(name)(logits, *args, inplace_backward=True)
    loss.backward(grad_out)
    torch.testing.assert_close(loss.detach(), want_loss)
    torch.testing.assert_close(leaf.grad, want_grad)
    torch.testing.assert_close(logits.detach(), want_grad)  # the logits' storage now holds the gradient


def test_inplace_backward_is_guarded():
    d = _on(_data(torch.float32))
    leaf = d.x.clone().requires_grad_()
    with pytest.raises(ValueError, match="leaf tensor"):
        tx.cross_entropy(leaf, d.y, None, -100, "mean", 0.0, inplace_backward=True)
    logits = leaf * 1.0
    other = (logits * logits).sum()  # saves the logits, which the in-place backward then overwrites
    with tx.use_inplace_backward():
        loss = functional.cross_entropy(logits, d.y, backend="triton")
    assert logits._version == 0  # the forward only reads them
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()  # the loss's backward runs first, then Mul's finds its input overwritten
    assert logits._version > 0
    logits = leaf * 1.0
    loss = tx.cross_entropy(logits, d.y, None, -100, "mean", 0.0, inplace_backward=True)
    torch.autograd.grad(loss, logits, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, logits)  # a second backward would read the gradient as logits
    fresh = leaf * 1.0
    tx.cross_entropy(fresh, d.y, None, -100, "mean", 0.0)  # default: a new gradient buffer
    assert fresh._version == 0


TARGET_GRAD_CASES = {
    "ce_probs_weight_smooth": ("cross_entropy", lambda d, r: (d.probs, d.w, -100, r, 0.2)),
    "mse_probs": ("mse_loss", lambda d, r: (d.probs, -100, r, "probs")),
    "mse_logits": ("mse_loss", lambda d, r: (d.probs, -100, r, "logits")),
    "bce_weight_pos": ("binary_cross_entropy_with_logits", lambda d, r: (d.soft, d.w, 2 * d.w, r)),
    "sigmoid_focal": ("sigmoid_focal_loss", lambda d, r: (d.soft, 0.25, 2.0, r)),
    "sigmoid_focal_noalpha": ("sigmoid_focal_loss", lambda d, r: (d.soft, -1.0, 0.5, r)),
    "asl": ("asl_loss", lambda d, r: (d.soft, 1.0, 4.0, 0.05, r)),
}


@pytest.mark.parametrize("case_id", TARGET_GRAD_CASES)
def test_target_gradients_are_computed_not_dropped(case_id):
    """A probability or BCE target that requires grad gets d loss / d target (as PyTorch
    computes it), beside the logits' gradient, for every reduction."""
    name, make = TARGET_GRAD_CASES[case_id]
    d = _data(torch.float64)
    for reduction in REDUCTIONS:
        target, *rest = make(d, reduction)
        x, t = d.x.clone().to(DEVICE).requires_grad_(), target.clone().to(DEVICE).requires_grad_()
        loss = getattr(tx, name)(x, t, *[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in rest])
        xb, tb = d.x.clone().requires_grad_(), target.clone().requires_grad_()
        want = TRUTH[name](xb, tb, *rest)
        g = torch.rand(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) + 0.5
        got = torch.autograd.grad(loss, (x, t), g.to(DEVICE))
        expected = torch.autograd.grad(want, (xb, tb), g)
        for a, b, what in zip(got, expected, ("logits", "target"), strict=True):
            label = f"{reduction} {what}"
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12,
                                       msg=lambda m, label=label: f"{label}: {m}")


def test_constant_arguments_that_require_grad_are_refused():
    d = _on(_data(torch.float32))
    w = d.w.clone().requires_grad_()
    calls = [lambda: tx.cross_entropy(d.x, d.y, w, -100, "mean", 0.0),
             lambda: tx.cross_entropy(d.x, d.probs, w, -100, "mean", 0.0),
             lambda: tx.focal_loss(d.x, d.y, 2.0, w, -100, "sum"),
             lambda: tx.softmax_loss(d.x, d.y, NLL(), None, LogitTransform(bias=w), -100, "mean", 0.0),
             lambda: tx.binary_cross_entropy_with_logits(d.x, d.soft, None, w, "mean")]
    for call in calls:
        with pytest.raises(ValueError, match="requires grad.*backend='reference'"):
            call()
    with torch.no_grad():  # nothing is differentiated, so nothing is refused
        tx.cross_entropy(d.x, d.y, w, -100, "mean", 0.0)


# Tensor methods that copy a value to the host (a device synchronisation on CUDA tensors).
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "nonzero")


def test_backend_code_never_reads_a_tensor_value_on_the_host(monkeypatch):
    """Checked without a GPU: forward + backward of every Triton loss (all reductions)
    calls none of the Tensor methods that bring a value to the host, so on CUDA tensors they do not
    synchronise (the GPU-only test below also runs them under torch's sync-debug "error" mode)."""
    d = _on(_data(torch.float32))
    transform = LogitTransform(scale=2.0, bias=d.w.log(), margin=0.5 * d.w)
    calls = {"softmax_loss": lambda x, r: tx.softmax_loss(x, d.y, Focal(2.0), d.w, transform, -100, r, 0.1),
             "cross_entropy_probs": lambda x, r: tx.cross_entropy(x, d.probs, d.w, -100, r, 0.1),
             "mse_loss": lambda x, r: tx.mse_loss(x, d.y, -100, r, "probs"),
             "bce": lambda x, r: tx.binary_cross_entropy_with_logits(x, d.soft, d.w, d.w, r),
             "sigmoid_focal_loss": lambda x, r: tx.sigmoid_focal_loss(x, d.soft, 0.25, 2.0, r),
             "asl_loss": lambda x, r: tx.asl_loss(x, d.soft, 1.0, 4.0, 0.05, r)}
    seen = []

    def trap(name, original):
        def recorded(self, *args, **kwargs):
            seen.append(name)
            return original(self, *args, **kwargs)
        return recorded

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, trap(name, getattr(torch.Tensor, name)))
    for name, call in calls.items():
        for reduction in REDUCTIONS:
            x = d.x.clone().requires_grad_()
            loss = call(x, reduction)
            loss.backward(torch.ones_like(loss))
            assert not seen, f"{name}/{reduction} read {seen} on the host"
    monkeypatch.undo()
    assert bool(torch.ones(1))  # the trap is gone


# ------------------------------------------------------------------------------ through functional


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_functional_dispatch_with_spatial_inputs(reduction):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 2, generator=gen).to(DEVICE)
    y = torch.randint(0, 5, (2, 3, 2), generator=gen).to(DEVICE)
    soft = torch.rand(2, 5, 3, 2, generator=gen).to(DEVICE)
    calls = [("cross_entropy", (y,), {"label_smoothing": 0.1, "reduction": reduction}),
             ("focal_loss", (y,), {"reduction": reduction}),
             ("mse_loss", (y,), {"reduction": reduction}),
             ("binary_cross_entropy_with_logits", (soft,), {"reduction": reduction}),
             ("sigmoid_focal_loss", (soft,), {"reduction": reduction}),
             ("asymmetric_loss", (soft,), {"reduction": reduction, "gamma_pos": 1.0}),
             ("softmax_loss", (y, GCE(0.7)), {"reduction": reduction, "transform": LogitTransform(
                 scale=2.0, bias=torch.linspace(-1, 1, 5, device=DEVICE), margin=torch.full((5,), 0.3))})]
    for name, args, kwargs in calls:
        results = []
        for backend in ("triton", "reference"):
            call = functools.partial(getattr(functional, name), **kwargs, backend=backend)
            grad_out = None if reduction != "none" else torch.ones_like(call(x, *args))
            results.append(_run(call, x, args, grad_out))
        for a, b, what in zip(*results, ("loss", "gradient"), strict=True):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, msg=f"{name}/{reduction}: {what}")


@pytest.mark.parametrize("name", ["cross_entropy", "mse_loss", "binary_cross_entropy_with_logits",
                                  "sigmoid_focal_loss", "asymmetric_loss"])
def test_functional_target_gradients_on_the_triton_backend(name):
    """Through xentlab.functional, a target that requires grad: t.grad is PyTorch's, not None."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64).to(DEVICE)
    t = torch.softmax(torch.randn(2, 5, 3, generator=gen, dtype=torch.float64), 1).to(DEVICE)
    grads = []
    for backend in ("triton", "reference"):
        xs, ts = x.clone().requires_grad_(), t.clone().requires_grad_()
        getattr(functional, name)(xs, ts, backend=backend).backward()
        grads.append((xs.grad, ts.grad))
    assert grads[0][1] is not None
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------- without the interpreter (subprocess)

_NO_INTERPRETER = textwrap.dedent("""
    import json, sys, torch, triton
    import xentlab.kernels.triton as tx
    out = {"interpreted": tx._INTERPRETED, "compiled": []}
    try:
        tx.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), None, -100, "mean", 0.0)
    except ValueError as err:
        out["error"] = str(err)
    if sys.argv[1] == "compile" and "nvidia" in triton.backends.backends:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
        calls, target = [], GPUTarget("cuda", 90, 32)
        backend = make_backend(target)
        tx.autograd._check_input = lambda x, inplace: None
        tx.launch._launch = lambda kernel, grid, warps, *args, **meta: calls.append(
            (kernel, warps, args, meta))
        from xentlab.kernels.spec import Focal, LogitTransform
        bf = torch.bfloat16
        x, w = torch.randn(4, 40, dtype=bf, requires_grad=True), torch.rand(40)
        y, p = torch.randint(0, 40, (4,)), torch.rand(4, 40, dtype=bf, requires_grad=True)
        transform = LogitTransform(scale=torch.rand(40) + 0.5, bias=torch.randn(40), margin=torch.rand(40))
        tx.cross_entropy(x, y, w, -100, "mean", 0.1).backward()
        tx.softmax_loss(x, y, Focal(2.0), None, transform, -100, "none", 0.0).sum().backward()
        tx.cross_entropy(x, p, w, -100, "mean", 0.1).backward()
        tx.mse_loss(x, y, -100, "none", "probs").sum().backward()
        tx.binary_cross_entropy_with_logits(x, p, w, w, "mean").backward()
        tx.sigmoid_focal_loss(x, p, 0.25, 2.0, "none")
        tx.asl_loss(x, p, 0.0, 4.0, 0.05, "sum").backward()
        long = torch.randn(2, 40000, dtype=bf, requires_grad=True)
        tx.focal_loss(long, torch.tensor([1, 39999]), 2.0, None, -100, "mean").backward()
        for kernel, warps, args, meta in calls:
            bind = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, spec, opts = bind(*args, num_warps=warps, **meta)
            options, signature, constexprs, attrs = kernel._pack_args(backend, opts, bound, spec, opts)
            source = ASTSource(kernel, signature, constexprs, attrs)
            triton.compile(source, target=target, options=options.__dict__)
            out["compiled"].append(kernel.fn.__name__)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def no_interpreter():
    """The module in a fresh process without TRITON_INTERPRET: the CPU refusal, then sm_90 compiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    mode = "compile" if not ON_GPU else "error-only"
    done = subprocess.run([sys.executable, "-c", _NO_INTERPRETER, mode], capture_output=True, text=True,
                          env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(ON_GPU, reason="checked on CPU-only machines (the subprocess needs no GPU)")
def test_cpu_tensors_without_interpreter_raise_a_clear_error(no_interpreter):
    assert not no_interpreter["interpreted"]
    assert "needs CUDA tensors" in no_interpreter["error"] and "TRITON_INTERPRET=1" in no_interpreter["error"]


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels are compiled and run by the other tests")
def test_kernels_compile_for_sm90_ahead_of_time(no_interpreter):
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    kernels = {"_row_stats_kernel", "_softmax_grad_kernel", "_softmax_family_kernel",
               "_sigmoid_family_kernel"}
    assert set(no_interpreter["compiled"]) == kernels
    assert len(no_interpreter["compiled"]) >= 15


# ---------------------------------------------------------------------------------------- GPU only


@gpu_only
@pytest.mark.parametrize(("n", "c", "dtype"), [(16, 128256, torch.bfloat16), (32, 32000, torch.bfloat16),
                                               (256, 1000, torch.bfloat16), (4096, 10, torch.float32)])
def test_gpu_default_configurations_match_pytorch(n, c, dtype):
    d = _data(dtype, n=n, c=c)
    for case_id in ["ce", "ce_weight_smooth_ignore1", "ce_probs", "focal_alpha", "mse_probs"]:
        _parity(_softmax_case(case_id, d, "mean"), d, scale=1.0)
    _parity(_sigmoid_case("bce_weight_pos", d, "sum"), d, scale=1.0)
    _parity(_sigmoid_case("asl", d, "mean"), d, scale=1.0)
    for case_id in ["ldam_weight", "class_scale_bias_margin_smooth"]:
        _row_parity(case_id, d, "mean", torch.float32)


@gpu_only
def test_gpu_auto_backend_picks_triton():
    from xentlab.kernels import get_backend

    assert get_backend("auto", torch.zeros(1, 2, device="cuda")) is tx


def _graph_case(name, d):
    """(loss function of the logits) for the CUDA-graph and synchronisation checks, on DEVICE tensors."""
    ldam = LogitTransform(scale=5.0, margin=0.5 * torch.rand(d.x.shape[1], device=DEVICE))
    validate = {"validate": False} if _has_validate() else {}
    return {
        "cross_entropy": lambda x: tx.cross_entropy(x, d.y, d.w, -100, "mean", 0.1),
        "ldam_focal": lambda x: tx.softmax_loss(x, d.y, Focal(2.0), d.w, ldam, -100, "mean", 0.0),
        "ce_probs": lambda x: tx.cross_entropy(x, d.probs, None, -100, "sum", 0.0),
        "sigmoid_focal_loss": lambda x: tx.sigmoid_focal_loss(x, d.soft, 0.25, 2.0, "mean"),
        "asl_loss": lambda x: tx.asl_loss(x, d.soft, 0.0, 4.0, 0.05, "mean"),
        "functional_ce": lambda x: functional.cross_entropy(x, d.y, d.w, backend="triton", **validate),
    }[name]


def _has_validate() -> bool:
    return "validate" in inspect.signature(functional.cross_entropy).parameters


GRAPH_CASES = ["cross_entropy", "ldam_focal", "ce_probs", "sigmoid_focal_loss", "asl_loss", "functional_ce"]


@gpu_only
@pytest.mark.parametrize("name", GRAPH_CASES)
def test_gpu_forward_and_backward_capture_in_a_cuda_graph(name):
    """No host synchronisation anywhere in forward + backward (torch's sync debug mode
    raises on one), so the whole step captures in a CUDA graph and replays exactly on new logits."""
    if name == "functional_ce" and not _has_validate():
        pytest.skip("xentlab.functional has no validate=False fast path yet (its value checks synchronise)")
    d, fresh = _on(_data(torch.bfloat16, n=512, c=1000)), cases.make_logits(512, 1000, torch.bfloat16, seed=9)
    fn = _graph_case(name, d)
    static = d.x.clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels) outside the capture
        for _ in range(2):
            static.grad = None
            fn(static).backward()
    torch.cuda.current_stream().wait_stream(side)
    static.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(static).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    static.grad = None
    with torch.cuda.graph(graph):
        loss = fn(static)
        loss.backward()
    with torch.no_grad():
        static.copy_(fresh.to(DEVICE))
    graph.replay()
    torch.cuda.synchronize()
    want_loss, want_grad = _run(lambda x: fn(x), fresh.to(DEVICE), (), None)  # eager, on the same logits
    torch.testing.assert_close(loss.detach(), want_loss)
    torch.testing.assert_close(static.grad, want_grad)


@gpu_only
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_peak_extra_memory_is_at_most_one_gradient(inplace):
    d = _on(_data(torch.bfloat16, n=1024, c=32000))
    x, y = d.x, d.y
    logits = x.clone().requires_grad_().clone()  # a non-leaf, as the in-place variant requires
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = tx.cross_entropy(logits, y, None, -100, "mean", 0.1, inplace_backward=inplace)
    (grad,) = torch.autograd.grad(loss, logits)  # the loss's own memory, no .grad accumulation
    assert (grad.data_ptr() == logits.data_ptr()) == inplace
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    small = 1 << 20  # per-row losses, partial sums, scalars
    assert extra <= (0 if inplace else x.numel() * x.element_size()) + small
