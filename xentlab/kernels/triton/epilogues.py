"""Epilogues and the kernels built from them: the gradient (and element-wise loss) written from a row's terms.

`_softmax_family_kernel` walks rows with the statistics of `rows.py`, then an epilogue writes dl/dx from
p = exp(x - lse); the sigmoid family is element-wise, all epilogue; `_rescale_kernel` applies grad_output.
"""

from __future__ import annotations

import triton
import triton.language as tl

from xentlab.kernels.triton.rows import (
    _BCE,
    _CE,
    _MSE_LOGITS,
    _MSE_PROBS,
    _NEG_INF,
    _OUT_ELEM,
    _OUT_PARTIAL,
    _OUT_ROW,
    _UP_ELEM,
    _accumulate,
    _load_block,
    _log1p,
    _param,
    _pow,
    _row_setup,
    _row_terms,
)


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

