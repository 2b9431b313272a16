"""Triton kernels: every loss computes its value and its gradient in one launch.

On a GPU, loss forward+backward is memory-bound: the least it can move is one read of the logits and one
write of the gradient, the same bytes as `x.clone()`. So each loss here is one kernel that reads the logits
once (twice at most, for very long rows), forms the loss, and writes the gradient during the forward; the
backward only scales that saved gradient by `grad_output`.

Softmax family (`cross_entropy`, `focal_loss`, `mse_loss`): the row statistic lse = logsumexp(x) is formed
online (running max m and rescaled sum s = sum exp(x - m), plus the few extra sums a loss needs), then an
epilogue writes dl/dx from p = exp(x - lse). Two layouts share one kernel:
  * short rows (next_power_of_2(C) within a register budget): a [ROWS, BLOCK_C] tile holds several whole
    rows, so the logits are read exactly once and small-C problems still give each program enough work;
  * long rows: one row per program, walked in BLOCK_C blocks twice; the second walk runs backwards so it
    starts on the blocks just read, which are still in L2. On CUDA the grid is capped at a few programs per
    SM (each loops over rows) so the rows in flight stay within L2.
Sigmoid family (`binary_cross_entropy_with_logits`, `sigmoid_focal_loss`): element-wise over 2-D tiles.

Arithmetic is float32 (float64 for float64 inputs); the true-class term p_y - 1 is formed in that precision
before the gradient is stored in the input dtype. Python float parameters travel as a float32 (hi, lo) pair
so float64 runs keep ~48 bits of them (Triton's CPU interpreter passes Python floats as float32).

Reductions and the backward run without host synchronisation, so forward and backward can be captured in a
CUDA graph. The `mean` denominator is computed on the device: a small pre-kernel (reading only the targets)
sums w[y], or counts the non-ignored rows, into per-block partials that every program of the main kernel
adds up in a fixed order; the gradient is stored already divided by it, each program stores one partial sum
of its rows' losses, and `torch.sum` adds those up, so results are deterministic (no atomics).

The backward launches a kernel that reads grad_output on the device and rescales the saved gradient in
place only when the factor differs from 1, so `loss.backward()` costs one launch whose programs exit at
once: no memory pass, no copy, no host sync. The scale already applied is kept on the device, so a second
backward through a retained graph is still exact (but a gradient returned by the first
`torch.autograd.grad(..., retain_graph=True)` is the same buffer and is rescaled by the second). The saved
gradient is released after the backward, so autograd hands it to a leaf's `.grad` without copying. With
`reduction="none"` the gradient depends on the per-row (or per-element) grad_output, so the forward writes
only the losses and the backward runs the same kernel again with grad_output folded in: one read of the
logits and one gradient write, fewer bytes than saving a gradient and rescaling it.

In-place gradient (opt-in): pass `inplace_backward=True` to a function here, or wrap calls that reach this
backend through `xentlab.functional` in `with use_inplace_backward():`. The gradient is then written into
the logits' own storage instead of a new buffer, so forward+backward allocates nothing gradient-sized. The
logits are destroyed: after the forward (the backward, for `reduction="none"`) `input` holds dl/dinput. Its
version counter is bumped, so any other autograd use of those logits (an op that saved them) raises
PyTorch's "modified by an inplace operation" error instead of computing with garbage. Use it only on logits
that are an intermediate result nothing else reads afterwards (typically the output of the last linear
layer); a leaf tensor that requires grad is refused, since its `.grad` would alias its own data. (If the
logits are a view, `loss.backward()` works but `torch.autograd.grad(loss, view)` does not: PyTorch gives a
view whose data changed in place a new grad_fn.)

Importing this module imports Triton; `xentlab` imports it only when the Triton backend is chosen. To run
the kernels on CPU tensors in Triton's interpreter, set TRITON_INTERPRET=1 before `triton` is first imported
in the process (Triton reads it when `@triton.jit` decorates its own library and these kernels; note that
pytorch_lightning imports triton); otherwise CPU tensors are refused with a ValueError.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import struct
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from xentlab.kernels import compute_dtype

Tensor = torch.Tensor

_INTERPRETED = bool(triton.knobs.runtime.interpret)

# Loss kinds: constexpr selectors of the softmax-family and sigmoid-family kernels.
_CE = tl.constexpr(0)
_FOCAL = tl.constexpr(1)
_MSE_PROBS = tl.constexpr(2)
_MSE_LOGITS = tl.constexpr(3)
_BCE = tl.constexpr(10)
_SIGMOID_FOCAL = tl.constexpr(11)
# What a kernel stores as the loss: nothing, one value per row, one per element, one partial sum per program.
_OUT_NONE = tl.constexpr(0)
_OUT_ROW = tl.constexpr(1)
_OUT_ELEM = tl.constexpr(2)
_OUT_PARTIAL = tl.constexpr(3)
# How grad_output enters: not at all (scalar reductions, scaled later), per row, per element.
_UP_NONE = tl.constexpr(0)
_UP_ROW = tl.constexpr(1)
_UP_ELEM = tl.constexpr(2)
_NEG_INF = tl.constexpr(float("-inf"))

# Largest next_power_of_2(C) kept whole in registers, by element size; longer rows are walked in blocks.
# Set so ptxas (sm_90) reports no spills for plain cross-entropy: 32768 columns at 16 warps already spill.
_ONE_BLOCK_LIMIT = {2: 16384, 4: 16384, 8: 4096}
_LONG_BLOCK = {2: 8192, 4: 4096, 8: 2048}
_TILE = 4096  # elements per program for short rows: several rows share a program when C is small
_LONG_PROGRAMS_PER_SM = 2
_RESCALE_BLOCK = 8192
# Launch-configuration overrides: keys of `_SoftmaxConfig` plus "max_programs" (grid cap). Empty in normal
# use; tests set it to force the long-row path at tiny C, scripts/bench_gpu.py --tune to try configurations.
_TUNING: dict = {}

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


# ------------------------------------------------------------------------------------------ device helpers


@triton.jit
def _param(hi, lo, ACC: tl.constexpr):
    # A Python float split into two float32 halves on the host, rejoined in the compute precision.
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _log1p(z):
    # Goldberg's log1p: accurate for small |z| using only log (no libdevice dependency).
    u = 1.0 + z
    return tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _pow(base, gamma):
    # base ** gamma for base in [0, 1], with 0 ** 0 == 1 and without evaluating log(0).
    safe = tl.where(base > 0.0, base, 1.0)
    return tl.where(base > 0.0, tl.exp(gamma * tl.log(safe)), tl.where(gamma == 0.0, 1.0, 0.0))


@triton.jit
def _row_setup(X, stride_xn, Y, stride_yn, W, U, stride_un, stride_uc, rows, N, ignore_index, inv,
               LOSS: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               UPSTREAM: tl.constexpr, ACC: tl.constexpr):
    """Per row: the class index y (0 where ignored), which rows count, w[y], x[y], grad_output[y] and the
    gradient scale k (1/denominator, or the per-row grad_output, and 0 for ignored rows)."""
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    one = tl.full(rows.shape, 1.0, ACC)
    y = tl.zeros(rows.shape, tl.int64)
    valid = row_ok
    w_y, x_y, u_y = one, one * 0.0, one
    if not PROB_TARGET:
        y = tl.load(Y + rows64 * stride_yn, mask=row_ok, other=ignore_index)
        valid = row_ok & (y != ignore_index)
        y = tl.where(valid, y, 0)
        if HAS_WEIGHT:
            w_y = tl.load(W + y, mask=valid, other=0.0).to(ACC)
        if LOSS != _MSE_LOGITS:  # gathered before any store: G may alias X
            x_y = tl.load(X + rows64 * stride_xn + y, mask=valid, other=0.0).to(ACC)
        if UPSTREAM == _UP_ELEM:
            u_y = tl.load(U + rows64 * stride_un + y * stride_uc, mask=valid, other=0.0).to(ACC)
    k = tl.where(valid, inv, 0.0)  # ignored rows: zero gradient even when the denominator is 0
    if UPSTREAM == _UP_ROW:
        k = tl.where(valid, tl.load(U + rows64 * stride_un, mask=valid, other=0.0).to(ACC), 0.0)
    elif UPSTREAM == _UP_ELEM:
        k = tl.where(valid, 1.0, 0.0)
    return rows64, row_ok, y, valid, w_y, x_y, u_y, k


@triton.jit
def _load_block(X, stride_xn, Y, stride_yn, stride_yc, W, U, stride_un, stride_uc, rows64, row_ok, y, cols, C,
                eps, LOSS: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                SMOOTH: tl.constexpr, UPSTREAM: tl.constexpr, ACC: tl.constexpr):
    """A [ROWS, BLOCK_C] block: logits (-inf past the row end for the softmax losses), target t (one-hot or
    probabilities, smoothed when SMOOTH), class weights w (0 past the row end), element-wise grad_output u."""
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    cols64 = cols.to(tl.int64)[None, :]  # strided targets or upstream may pass 2**31 elements
    x = tl.load(X + rows64[:, None] * stride_xn + cols[None, :], mask=ok, other=0.0).to(ACC)
    if LOSS != _MSE_LOGITS:
        x = tl.where(col_ok[None, :], x, _NEG_INF)
    if PROB_TARGET:
        t = tl.load(Y + rows64[:, None] * stride_yn + cols64 * stride_yc, mask=ok, other=0.0).to(ACC)
        if SMOOTH:
            t = tl.where(col_ok[None, :], t * (1.0 - eps) + eps / C, 0.0)
    else:
        t = tl.where(cols[None, :] == y[:, None], 1.0, 0.0).to(ACC)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    else:
        w = tl.where(col_ok, 1.0, 0.0).to(ACC)[None, :]
    if UPSTREAM == _UP_ELEM:
        u = tl.load(U + rows64[:, None] * stride_un + cols64 * stride_uc, mask=ok, other=0.0).to(ACC)
    else:
        u = tl.full([1, 1], 1.0, ACC)
    return x, t, w, u, col_ok


@triton.jit
def _accumulate(m, s, e1, e2, a1, a2, x, t, w, u, col_ok, LOSS: tl.constexpr, PROB_TARGET: tl.constexpr,
                SMOOTH: tl.constexpr):
    """Fold one block into the online row sums: m = max x, s = sum e with e = exp(x - m); e1/e2 are sums of e
    and e^2 (rescaled with s) and a1/a2 sums of beta and beta (x - m) (shifted with m), as each loss needs."""
    m_new = tl.maximum(m, tl.max(x, 1))
    ref = tl.where(m_new == _NEG_INF, 0.0, m_new)  # a row that is all -inf so far must not give exp(nan)
    scale = tl.exp(m - ref)
    e = tl.exp(x - ref[:, None])
    s = s * scale + tl.sum(e, 1)
    if LOSS == _FOCAL:
        e1 = e1 * scale + tl.sum(e * (1.0 - t), 1)  # sum over c != y: 1 - p_y without cancellation
    if LOSS == _MSE_PROBS:
        if PROB_TARGET:
            e1 = e1 * scale + tl.sum(e * u * t, 1)
            e2 = e2 * scale * scale + tl.sum(e * e * u, 1)
        else:
            e1 = e1 * scale + tl.sum(e * (1.0 - t), 1)
            e2 = e2 * scale * scale + tl.sum(e * e * u * (1.0 - t), 1)
    if LOSS == _CE:
        if SMOOTH or PROB_TARGET:
            if PROB_TARGET:
                beta = w * t
            else:
                beta = w + tl.zeros_like(x)
            shift = tl.where(m == _NEG_INF, 0.0, m - ref)
            centred = tl.where(col_ok[None, :], x - ref[:, None], 0.0)
            a2 = a2 + a1 * shift + tl.sum(beta * centred, 1)
            a1 = a1 + tl.sum(beta, 1)
    return m_new, s, e1, e2, a1, a2


@triton.jit
def _row_terms(m, s, e1, e2, a1, a2, x_y, w_y, u_y, eps, gamma, C, LOSS: tl.constexpr,
               PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr):
    """From the row sums: lse, the row loss, and the epilogue coefficients, so that
    grad = k (c_p p - c_y t - c_b beta) for CE and focal, and grad = 2 k p (u (p - t) - g) for MSE on probs.
    """
    zero = tl.zeros_like(s)
    lse, loss, c_p, c_y, c_b, g = zero, zero, zero, zero, zero, zero
    if LOSS != _MSE_LOGITS:
        ref = tl.where(m == _NEG_INF, 0.0, m)
        log_s = tl.log(s)
        lse = ref + log_s
        if LOSS == _CE:
            if PROB_TARGET:  # -sum w t' log p = a1 lse - sum w t' x
                loss, c_p, c_b = a1 * log_s - a2, a1, zero + 1.0
            else:
                nll = (ref - x_y) + log_s
                if SMOOTH:  # the (eps/C) sum_c w_c (lse - x_c) term, as W log s - a2
                    if HAS_WEIGHT:
                        w_sum = a1
                    else:
                        w_sum = zero + C
                    loss = (1.0 - eps) * w_y * nll + (eps / C) * (w_sum * log_s - a2)
                    c_p, c_y, c_b = (1.0 - eps) * w_y + (eps / C) * w_sum, (1.0 - eps) * w_y, zero + eps / C
                else:
                    loss, c_p, c_y = w_y * nll, w_y, w_y
        elif LOSS == _FOCAL:
            # 1 - p_y comes from the sum over the other classes; log p_y from log1p when p_y is near 1.
            one_m_pt = e1 / s
            lpt = tl.where(one_m_pt < 0.25, _log1p(-tl.minimum(one_m_pt, 0.25)), (x_y - ref) - log_s)
            pt = tl.exp(lpt)
            focus = _pow(one_m_pt, gamma)
            # (1-pt)^(gamma-1) log pt = (1-pt)^gamma * log(pt)/(1-pt); the ratio tends to -1 as pt -> 1
            ratio = tl.where(one_m_pt > 0.0, lpt / tl.where(one_m_pt > 0.0, one_m_pt, 1.0), -1.0)
            loss = -w_y * focus * lpt
            c_p = w_y * (focus - gamma * pt * focus * ratio)
            c_y = c_p
        elif LOSS == _MSE_PROBS:  # g = sum_c u_c p_c (p_c - t_c)
            if PROB_TARGET:
                g = e2 / (s * s) - e1 / s
            else:
                g = e2 / (s * s) - u_y * tl.exp(x_y - lse) * (e1 / s)
    return lse, loss, c_p, c_y, c_b, g


@triton.jit
def _epilogue(x, t, w, u, lse, k, c_p, c_y, c_b, g, LOSS: tl.constexpr, PROB_TARGET: tl.constexpr,
              SMOOTH: tl.constexpr):
    """The gradient block and the element-wise squared error (MSE only) from the row terms."""
    if LOSS == _MSE_LOGITS:
        d = x - t
        grad = 2.0 * k[:, None] * u * d
        err = d * d
    else:
        p = tl.exp(x - lse[:, None])
        if LOSS == _MSE_PROBS:
            d = p - t
            grad = 2.0 * k[:, None] * p * (u * d - g[:, None])
            err = d * d
        else:
            grad = c_p[:, None] * p - c_y[:, None] * t  # p - 1 at the true class, formed in ACC
            if LOSS == _CE:
                if SMOOTH or PROB_TARGET:
                    if PROB_TARGET:
                        grad = grad - c_b[:, None] * (w * t)
                    else:
                        grad = grad - c_b[:, None] * w
            grad = k[:, None] * grad
            err = tl.zeros_like(grad)
    return grad, err


@triton.jit
def _store_block(G, L, rows64, stride_xn, cols, C, row_ok, col_ok, valid, grad, err, WRITE_GRAD: tl.constexpr,
                 LOSS_OUT: tl.constexpr):
    """Store the gradient and the element-wise loss of a block; return the block's per-row error sum."""
    ok = row_ok[:, None] & col_ok[None, :]
    err = tl.where(valid[:, None] & col_ok[None, :], err, 0.0)
    if WRITE_GRAD:
        tl.store(G + rows64[:, None] * stride_xn + cols[None, :], grad.to(G.dtype.element_ty), mask=ok)
    if LOSS_OUT == _OUT_ELEM:
        tl.store(L + rows64[:, None] * C + cols[None, :], err.to(L.dtype.element_ty), mask=ok)
    return tl.sum(err, 1)


# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _softmax_family_kernel(
    X, stride_xn, Y, stride_yn, stride_yc, W, U, stride_un, stride_uc, G, L, DEN, n_den, den_count,
    N, C, ignore_index, eps_hi, eps_lo, gamma_hi, gamma_lo,
    LOSS: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
    UPSTREAM: tl.constexpr, WRITE_GRAD: tl.constexpr, LOSS_OUT: tl.constexpr, ONE_BLOCK: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, DEN_BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Loss and gradient of the softmax family for blocks of ROWS rows; programs loop over row blocks. The
    mean denominator is den_count times the sum of DEN[:n_den] (the latter only when DEN_BLOCK > 0). Scalar
    reductions store one partial sum per program (in a fixed order, so the total is deterministic)."""
    eps = _param(eps_hi, eps_lo, ACC)
    gamma = _param(gamma_hi, gamma_lo, ACC)
    inv = 1.0 / tl.cast(den_count, ACC)
    if DEN_BLOCK > 0:
        part = tl.arange(0, DEN_BLOCK)
        inv = inv / tl.sum(tl.load(DEN + part, mask=part < n_den, other=0.0).to(ACC), 0)
    total = inv * 0.0
    for block in range(tl.program_id(0), tl.cdiv(N, ROWS), tl.num_programs(0)):
        rows = block * ROWS + tl.arange(0, ROWS)
        rows64, row_ok, y, valid, w_y, x_y, u_y, k = _row_setup(
            X, stride_xn, Y, stride_yn, W, U, stride_un, stride_uc, rows, N, ignore_index, inv, LOSS,
            PROB_TARGET, HAS_WEIGHT, UPSTREAM, ACC)
        m, s = tl.full([ROWS], _NEG_INF, ACC), tl.zeros([ROWS], ACC)
        e1, e2, a1, a2 = s, s, s, s
        if ONE_BLOCK:  # the whole row stays in registers: the logits are read once
            cols = tl.arange(0, BLOCK_C)
            x, t, w, u, col_ok = _load_block(X, stride_xn, Y, stride_yn, stride_yc, W, U, stride_un,
                                             stride_uc, rows64, row_ok, y, cols, C, eps, LOSS, PROB_TARGET,
                                             HAS_WEIGHT, SMOOTH, UPSTREAM, ACC)
            if LOSS != _MSE_LOGITS:
                m, s, e1, e2, a1, a2 = _accumulate(m, s, e1, e2, a1, a2, x, t, w, u, col_ok, LOSS,
                                                   PROB_TARGET, SMOOTH)
        elif LOSS != _MSE_LOGITS:
            for start in range(0, C, BLOCK_C):
                cols = start + tl.arange(0, BLOCK_C)
                x, t, w, u, col_ok = _load_block(X, stride_xn, Y, stride_yn, stride_yc, W, U, stride_un,
                                                 stride_uc, rows64, row_ok, y, cols, C, eps, LOSS,
                                                 PROB_TARGET, HAS_WEIGHT, SMOOTH, UPSTREAM, ACC)
                m, s, e1, e2, a1, a2 = _accumulate(m, s, e1, e2, a1, a2, x, t, w, u, col_ok, LOSS,
                                                   PROB_TARGET, SMOOTH)
        lse, loss, c_p, c_y, c_b, g = _row_terms(m, s, e1, e2, a1, a2, x_y, w_y, u_y, eps, gamma, C, LOSS,
                                                 PROB_TARGET, HAS_WEIGHT, SMOOTH)

        err_sum = tl.zeros([ROWS], ACC)
        if ONE_BLOCK:
            grad, err = _epilogue(x, t, w, u, lse, k, c_p, c_y, c_b, g, LOSS, PROB_TARGET, SMOOTH)
            err_sum = _store_block(G, L, rows64, stride_xn, cols, C, row_ok, col_ok, valid, grad, err,
                                   WRITE_GRAD, LOSS_OUT)
        else:
            n_blocks = tl.cdiv(C, BLOCK_C)
            for i in range(n_blocks):  # backwards: the blocks read last are the likeliest still in L2
                cols = (n_blocks - 1 - i) * BLOCK_C + tl.arange(0, BLOCK_C)
                x, t, w, u, col_ok = _load_block(X, stride_xn, Y, stride_yn, stride_yc, W, U, stride_un,
                                                 stride_uc, rows64, row_ok, y, cols, C, eps, LOSS,
                                                 PROB_TARGET, HAS_WEIGHT, SMOOTH, UPSTREAM, ACC)
                grad, err = _epilogue(x, t, w, u, lse, k, c_p, c_y, c_b, g, LOSS, PROB_TARGET, SMOOTH)
                err_sum += _store_block(G, L, rows64, stride_xn, cols, C, row_ok, col_ok, valid, grad, err,
                                        WRITE_GRAD, LOSS_OUT)
        if LOSS == _MSE_PROBS or LOSS == _MSE_LOGITS:
            loss = err_sum
        # times inv outside the where: an all-ignored batch gives 0 * inf = nan for `mean`, as PyTorch does
        loss = tl.where(valid, loss, 0.0) * inv
        if LOSS_OUT == _OUT_ROW:
            tl.store(L + rows64, loss.to(L.dtype.element_ty), mask=row_ok)
        elif LOSS_OUT == _OUT_PARTIAL:
            total += tl.sum(loss, 0)
    if LOSS_OUT == _OUT_PARTIAL:
        tl.store(L + tl.program_id(0), total)


@triton.jit
def _denominator_kernel(Y, stride_yn, W, OUT, N, ignore_index, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
                        ACC: tl.constexpr):
    """OUT[pid] = sum of w[y_i] (or the count) over the non-ignored rows of block pid."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    y = tl.load(Y + rows * stride_yn, mask=ok, other=ignore_index)
    valid = ok & (y != ignore_index)
    if HAS_WEIGHT:
        v = tl.load(W + tl.where(valid, y, 0), mask=valid, other=0.0).to(ACC)
    else:
        v = valid.to(ACC)
    tl.store(OUT + tl.program_id(0), tl.sum(v, 0))


@triton.jit
def _rescale_kernel(G, n, GRAD_OUT, APPLIED, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """G *= GRAD_OUT / APPLIED in place, skipped on the device when the factor is 1 (the usual backward)."""
    factor = tl.load(GRAD_OUT).to(ACC) / tl.load(APPLIED).to(ACC)
    if factor != 1.0:
        start = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for first in range(start, n, step):
            offs = first + tl.arange(0, BLOCK)
            ok = offs < n
            g = tl.load(G + offs, mask=ok, other=0.0).to(ACC)
            tl.store(G + offs, (g * factor).to(G.dtype.element_ty), mask=ok)


@triton.jit
def _sigmoid_family_kernel(
    X, stride_xn, T, stride_tn, stride_tc, W, stride_wn, stride_wc, PW, stride_pn, stride_pc,
    U, stride_un, stride_uc, G, L, N, C, den_count, alpha_hi, alpha_lo, gamma_hi, gamma_lo,
    LOSS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, HAS_ALPHA: tl.constexpr,
    UPSTREAM: tl.constexpr, WRITE_GRAD: tl.constexpr, LOSS_OUT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Element-wise BCE-with-logits or sigmoid focal loss and its derivative on a [ROWS, BLOCK_C] tile."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows < N)[:, None] & (cols < C)[None, :]
    r, c = rows[:, None], cols.to(tl.int64)[None, :]
    x = tl.load(X + r * stride_xn + c, mask=ok, other=0.0).to(ACC)
    t = tl.load(T + r * stride_tn + c * stride_tc, mask=ok, other=0.0).to(ACC)
    z = tl.exp(-tl.abs(x))
    soft = _log1p(z)
    sp_pos = tl.maximum(x, 0.0) + soft  # softplus(x) = -log sigmoid(-x)
    sp_neg = tl.maximum(-x, 0.0) + soft  # softplus(-x) = -log sigmoid(x)
    big = 1.0 / (1.0 + z)
    p = tl.where(x >= 0.0, big, z * big)  # sigmoid(x) and sigmoid(-x), neither formed as 1 - the other
    q = tl.where(x >= 0.0, z * big, big)
    if LOSS == _BCE:
        pos = t
        if HAS_POS_WEIGHT:
            pos = t * tl.load(PW + r * stride_pn + c * stride_pc, mask=ok, other=0.0).to(ACC)
        loss = pos * sp_neg + (1.0 - t) * sp_pos
        dloss = (1.0 - t) * p - pos * q
    else:
        ce = t * sp_neg + (1.0 - t) * sp_pos
        base = p * (1.0 - t) + q * t  # 1 - p_t
        gamma = _param(gamma_hi, gamma_lo, ACC)
        focus = _pow(base, gamma)
        # d(1-p_t)/dx = (1-2t) p q; base^(gamma-1) = focus / base, and the term vanishes where base == 0
        tail = tl.where(base > 0.0, focus / tl.where(base > 0.0, base, 1.0), 0.0)
        loss = ce * focus
        dloss = ((1.0 - t) * p - t * q) * focus + gamma * ce * tail * (1.0 - 2.0 * t) * p * q
        if HAS_ALPHA:
            alpha = _param(alpha_hi, alpha_lo, ACC)
            alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
            loss, dloss = loss * alpha_t, dloss * alpha_t
    if HAS_WEIGHT:
        w = tl.load(W + r * stride_wn + c * stride_wc, mask=ok, other=0.0).to(ACC)
        loss, dloss = loss * w, dloss * w
    inv = 1.0 / tl.cast(den_count, ACC)
    if WRITE_GRAD:
        if UPSTREAM == _UP_ELEM:
            dloss = dloss * tl.load(U + r * stride_un + c * stride_uc, mask=ok, other=0.0).to(ACC)
        else:
            dloss = dloss * inv
        tl.store(G + r * stride_xn + c, dloss.to(G.dtype.element_ty), mask=ok)
    if LOSS_OUT == _OUT_ELEM:
        tl.store(L + r * C + c, loss.to(L.dtype.element_ty), mask=ok)
    elif LOSS_OUT == _OUT_PARTIAL:
        total = tl.sum(tl.sum(tl.where(ok, loss, 0.0), 1), 0) * inv
        tl.store(L + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), total)


# ------------------------------------------------------------------------------------------- host helpers


@dataclass(frozen=True)
class _Spec:
    """The non-tensor arguments of one loss call."""

    loss: int
    reduction: str
    ignore_index: int = -100
    eps: float = 0.0
    gamma: float = 0.0
    alpha: float = -1.0
    inplace: bool = False


class _SoftmaxConfig(NamedTuple):
    rows: int
    block_c: int
    one_block: bool
    num_warps: int


def _launch(kernel, grid, num_warps, *args, **meta):
    # The one place kernels are launched from (tests swap it to record launches for ahead-of-time compiles).
    kernel[grid](*args, num_warps=num_warps, **meta)


def _split(value: float) -> tuple[float, float]:
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def _acc(x: Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _warps(tile: int) -> int:
    # about 16 elements per thread: more costs registers (spills at small C), fewer costs bytes in flight
    return min(16, max(4, tile // 512))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _softmax_config(n_cols: int, elem_size: int) -> _SoftmaxConfig:
    """Whole rows in a register tile when they fit (several per program when short), else blocks of a row."""
    width = triton.next_power_of_2(n_cols)
    if width <= _ONE_BLOCK_LIMIT[elem_size]:
        rows = max(1, _TILE // width)
        config = _SoftmaxConfig(rows, width, True, _warps(rows * width))
    else:
        config = _SoftmaxConfig(1, _LONG_BLOCK[elem_size], False, _warps(_LONG_BLOCK[elem_size]))
    return config._replace(**{k: v for k, v in _TUNING.items() if k in _SoftmaxConfig._fields})


def _softmax_launch(x: Tensor) -> tuple[_SoftmaxConfig, int]:
    """The configuration and the grid size; long rows cap the grid at a few programs per SM."""
    n, c = x.shape
    config = _softmax_config(c, x.element_size())
    n_blocks = triton.cdiv(n, config.rows)
    cap = _TUNING.get("max_programs")
    if cap is None and x.is_cuda and not config.one_block:
        cap = _sm_count(x.device.index) * _LONG_PROGRAMS_PER_SM  # a CUDA tensor's device has an index
    return config, min(n_blocks, cap) if cap else n_blocks


def _check_input(x: Tensor, inplace: bool) -> None:
    if not x.is_cuda and not _INTERPRETED:
        raise ValueError(
            f"the triton backend needs CUDA tensors, got a tensor on {x.device}; use backend='fused' on the "
            "CPU, or set TRITON_INTERPRET=1 before triton and xentlab.kernels.triton_xent are first imported "
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


def _denominator(x: Tensor, target: Tensor, weight: Tensor | None,
                 ignore_index: int) -> tuple[Tensor, int, int]:
    """Per-block partial sums of w[y] (or of the non-ignored count), for the main kernel to add up."""
    n = target.shape[0]
    block = max(1024, triton.next_power_of_2(triton.cdiv(n, 1024)))
    parts = triton.cdiv(n, block)
    out = torch.empty(parts, dtype=compute_dtype(x.dtype), device=x.device)
    _launch(_denominator_kernel, (parts,), 4, target, target.stride(0), target if weight is None else weight,
            out, n, ignore_index, HAS_WEIGHT=weight is not None, BLOCK=block, ACC=_acc(x))
    return out, parts, triton.next_power_of_2(parts)


def _launch_softmax(x: Tensor, target: Tensor, weight: Tensor | None, spec: _Spec, *,
                    grad: Tensor | None = None, loss: Tensor | None = None, loss_out=_OUT_NONE,
                    upstream: Tensor | None = None) -> None:
    """One launch of the softmax-family kernel (plus the denominator pre-kernel for an index-target mean)."""
    n, c = x.shape
    if n == 0:
        return
    acc, prob = _acc(x), target.is_floating_point()
    config, grid = _softmax_launch(x)
    den, n_den, den_block, den_count = x, 0, 0, 1
    if spec.reduction == "mean" and upstream is None:
        if prob:
            den_count = n * c if spec.loss in (_MSE_PROBS, _MSE_LOGITS) else n
        else:
            den_weight = weight if spec.loss in (_CE, _FOCAL) else None
            den, n_den, den_block = _denominator(x, target, den_weight, spec.ignore_index)
            den_count = c if spec.loss in (_MSE_PROBS, _MSE_LOGITS) else 1
    up_mode = _UP_NONE if upstream is None else _UP_ROW if upstream.dim() == 1 else _UP_ELEM
    up_strides = (0, 0) if upstream is None else (tuple(upstream.stride()) + (0,))[:2]
    t_strides = (tuple(target.stride()) + (0,))[:2]
    _launch(_softmax_family_kernel, (grid,), config.num_warps,
            x, x.stride(0), target, *t_strides, x if weight is None else weight,
            x if upstream is None else upstream, *up_strides, x if grad is None else grad,
            x if loss is None else loss, den, n_den, den_count, n, c, spec.ignore_index,
            *_split(spec.eps), *_split(spec.gamma),
            LOSS=spec.loss, PROB_TARGET=prob, HAS_WEIGHT=weight is not None, SMOOTH=spec.eps > 0,
            UPSTREAM=up_mode, WRITE_GRAD=grad is not None, LOSS_OUT=loss_out, ONE_BLOCK=config.one_block,
            ROWS=config.rows, BLOCK_C=config.block_c, DEN_BLOCK=den_block, ACC=acc)


def _sigmoid_grid(n: int, c: int) -> tuple[tuple[int, int], int, int]:
    block_c = min(triton.next_power_of_2(c), 1024)
    rows = max(1, _TILE // block_c)
    return (triton.cdiv(n, rows), triton.cdiv(c, block_c)), rows, block_c


def _launch_sigmoid(x: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None,
                    spec: _Spec, *, grad: Tensor | None = None, loss: Tensor | None = None,
                    loss_out=_OUT_NONE, upstream: Tensor | None = None) -> None:
    """One launch of the sigmoid-family kernel; weight and pos_weight are broadcast to (N, C) as stride-0
    views."""
    n, c = x.shape
    if n * c == 0:
        return
    grid, rows, block_c = _sigmoid_grid(n, c)
    w = x if weight is None else torch.broadcast_to(weight, (n, c))
    pw = x if pos_weight is None else torch.broadcast_to(pos_weight, (n, c))
    u = x if upstream is None else upstream
    den_count = n * c if spec.reduction == "mean" and upstream is None else 1
    _launch(_sigmoid_family_kernel, grid, _warps(rows * block_c),
            x, x.stride(0), target, *target.stride(), w, *w.stride(), pw, *pw.stride(), u, *u.stride(),
            x if grad is None else grad, x if loss is None else loss, n, c, den_count,
            *_split(spec.alpha), *_split(spec.gamma),
            LOSS=spec.loss, HAS_WEIGHT=weight is not None, HAS_POS_WEIGHT=pos_weight is not None,
            HAS_ALPHA=spec.alpha >= 0, UPSTREAM=_UP_NONE if upstream is None else _UP_ELEM,
            WRITE_GRAD=grad is not None, LOSS_OUT=loss_out, ROWS=rows, BLOCK_C=block_c, ACC=_acc(x))


def _rescale(grad: Tensor, grad_output: Tensor, applied: Tensor) -> None:
    """grad *= grad_output / applied on the device (no memory pass when that is 1); applied = grad_output."""
    n = grad.numel()
    if n:
        blocks = triton.cdiv(n, _RESCALE_BLOCK)
        if grad.is_cuda:
            blocks = min(blocks, 4 * _sm_count(grad.device.index))
        _launch(_rescale_kernel, (blocks,), 8, grad, n, grad_output, applied, BLOCK=_RESCALE_BLOCK,
                ACC=_acc(grad))
    applied.copy_(grad_output)


def _saved_gradient(ctx, x: Tensor, grad: Tensor, spec: _Spec) -> None:
    """Save the gradient so autograd frees it after the backward (letting AccumulateGrad take it without a
    copy); the device scalar of the scale already applied is a plain attribute, as the backward updates it."""
    if spec.inplace:
        torch.autograd.graph.increment_version(x)
    ctx.save_for_backward(grad)
    ctx.applied = torch.ones((), dtype=compute_dtype(x.dtype), device=x.device)


# ----------------------------------------------------------------------------------------- autograd glue


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


# -------------------------------------------------------------------------------------------- public API


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, *, inplace_backward=None):
    """Cross-entropy in one launch: l_i = (1-eps) w[y_i] (lse_i - x_iy) + (eps/C) sum_c w_c (lse_i - x_ic) for
    class indices (ignored rows 0, `mean` over D = sum of w[y_i] on kept rows), or l_i = -sum_c w_c t'_ic
    log p_ic with t' = (1-eps) t + eps/C for probability targets (`mean` over N); the gradient
    (1-eps) w_y (p - onehot_y) + (eps/C)(W p - w) (divided by D for `mean`) is written during the forward."""
    spec = _Spec(int(_CE), reduction, ignore_index=int(ignore_index), eps=float(label_smoothing))
    return _apply_softmax(input, target, weight, spec, inplace_backward)


def focal_loss(input, target, gamma, alpha, ignore_index, reduction, *, inplace_backward=None):
    """Softmax focal loss l_i = -a[y_i] (1 - p_iy)^gamma log p_iy in one launch, `mean` over the sum of
    a[y_i] on kept rows; gradient s_i (p_i - onehot_y) with s_i = a[y_i] [(1-pt)^gamma - gamma pt
    (1-pt)^(gamma-1) log pt], where 1 - pt is summed over the other classes and the (1-pt)^(gamma-1) log pt
    factor stays finite as pt -> 1."""
    spec = _Spec(int(_FOCAL), reduction, ignore_index=int(ignore_index), gamma=float(gamma))
    return _apply_softmax(input, target, alpha, spec, inplace_backward)


def mse_loss(input, target, ignore_index, reduction, on, *, inplace_backward=None):
    """Squared error (softmax(x) - t)^2 (on="probs") or (x - t)^2 (on="logits") against the one-hot or
    probability target t, element-wise for `none`, ignored rows 0, `mean` over (kept rows) * C; the gradient
    through the softmax is 2 p_c ((p_c - t_c) - sum_k p_k (p_k - t_k)) per unit of upstream gradient."""
    spec = _Spec(int(_MSE_PROBS if on == "probs" else _MSE_LOGITS), reduction, ignore_index=int(ignore_index))
    return _apply_softmax(input, target, None, spec, inplace_backward)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction, *, inplace_backward=None):
    """l = weight [pos_weight t softplus(-x) + (1-t) softplus(x)] element-wise (PyTorch's BCE with logits),
    `mean` over all N*C elements; gradient weight [(1-t) sigmoid(x) - pos_weight t sigmoid(-x)]."""
    spec = _Spec(int(_BCE), reduction)
    return _apply_sigmoid(input, target, weight, pos_weight, spec, inplace_backward)


def sigmoid_focal_loss(input, target, alpha, gamma, reduction, *, inplace_backward=None):
    """torchvision's sigmoid focal loss alpha_t ce (1 - p_t)^gamma with ce the BCE with logits, p_t = p t +
    (1-p)(1-t), alpha_t = alpha t + (1-alpha)(1-t) (alpha < 0: 1); gradient alpha_t [(p - t)(1-p_t)^gamma +
    gamma ce (1-p_t)^(gamma-1) (1-2t) p (1-p)], the second term taken as 0 where 1 - p_t == 0."""
    spec = _Spec(int(_SIGMOID_FOCAL), reduction, alpha=float(alpha), gamma=float(gamma))
    return _apply_sigmoid(input, target, None, None, spec, inplace_backward)
