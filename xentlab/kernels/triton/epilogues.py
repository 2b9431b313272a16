"""Epilogues and the kernels built from them: gradients (and element-wise losses) written from a row's terms.

`_softmax_grad_kernel` is the index-target family's whole backward: with lse' and the per-row coefficients
known, the gradient is element-wise, dL/dx_c = scale_c (c_p p'_c - c_y [c == y] - c_w w_c). The
probability-target CE and MSE kernel walks rows with the statistics of `rows.py`, then its epilogue writes
dl/dx from p = exp(x - lse). The sigmoid family (BCE, sigmoid focal, ASL) is element-wise, all epilogue.
Every kernel that writes a gradient can also write d loss / d target (TG), for targets that require grad.
"""

from __future__ import annotations

import triton
import triton.language as tl

from xentlab.kernels.triton.rows import (
    _BCE,
    _CE_PROBS,
    _MSE_LOGITS,
    _MSE_PROBS,
    _NEG_INF,
    _OUT_ELEM,
    _OUT_PARTIAL,
    _OUT_ROW,
    _SIGMOID_FOCAL,
    _UP_ELEM,
    _UP_SCALAR,
    _accumulate,
    _load_block,
    _log1p,
    _param,
    _pow,
    _row_setup,
    _row_terms,
    _transform,
    _true_class,
)

# ------------------------------------------------------------------------- index targets: the gradient


@triton.jit
def _softmax_grad_kernel(
    X, stride_xn, Y, stride_yn, W, SCALE, BIAS, MARGIN, LSE, CP, CY, CW, G, N, C, ignore_index,
    HAS_WEIGHT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MARGIN: tl.constexpr,
    SMOOTH: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """dL/dx_c = scale_c (c_p p'_c - c_y [c == y] - c_w w_c) on a [ROWS, BLOCK_C] tile, p' = exp(z' - lse')
    with z' formed exactly as in the row statistics; c_p p'_y - c_y (p - 1 for cross-entropy) is formed in
    ACC before the store. G may alias X (each element is read before it is overwritten, by one program)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows64, row_ok, valid, y, margin_y = _true_class(Y, stride_yn, MARGIN, rows, N, C, ignore_index,
                                                     HAS_MARGIN, ACC)
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    is_y = cols[None, :] == y[:, None]
    offs = rows64[:, None] * stride_xn + cols[None, :]
    x = tl.load(X + offs, mask=ok, other=0.0).to(ACC)
    z = _transform(x, is_y, margin_y, SCALE, BIAS, cols, col_ok, HAS_SCALE, HAS_BIAS, HAS_MARGIN, ACC)
    lse = tl.load(LSE + rows64, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    c_p = tl.load(CP + rows64, mask=row_ok, other=0.0)
    c_y = tl.load(CY + rows64, mask=row_ok, other=0.0)
    grad = c_p[:, None] * p - tl.where(is_y, c_y[:, None], 0.0)
    if SMOOTH:
        c_w = tl.load(CW + rows64, mask=row_ok, other=0.0)
        if HAS_WEIGHT:
            grad -= c_w[:, None] * tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        else:
            grad -= c_w[:, None]
    if HAS_SCALE:
        grad *= tl.load(SCALE + cols, mask=col_ok, other=1.0).to(ACC)[None, :]
    grad = tl.where(valid[:, None], grad, 0.0)  # ignored rows: 0 even where p' is not finite
    tl.store(G + offs, grad.to(G.dtype.element_ty), mask=ok)


# ----------------------------------------------------- probability-target CE and MSE: one fused row walk


@triton.jit
def _epilogue(x, t, w, u, col_ok, lse, k, c_p, g, eps, LOSS: tl.constexpr, WRITE_TGRAD: tl.constexpr):
    """The gradient block, d loss / d target, and the element-wise squared error (MSE only)."""
    if LOSS == _MSE_LOGITS:
        d = x - t
        grad = 2.0 * k[:, None] * u * d
        tgrad = -grad
        err = d * d
    else:
        p = tl.exp(x - lse[:, None])
        if LOSS == _MSE_PROBS:
            d = p - t
            grad = 2.0 * k[:, None] * p * (u * d - g[:, None])
            tgrad = -2.0 * k[:, None] * u * d
            err = d * d
        else:  # -sum w t' log p: grad = k (sum(w t') p - w t'), d/dt = -(1 - eps) k w log p
            grad = k[:, None] * (c_p[:, None] * p - w * t)
            tgrad = tl.zeros_like(grad)
            if WRITE_TGRAD:  # past the row end x is -inf and w is 0
                log_p = tl.where(col_ok[None, :], x - lse[:, None], 0.0)
                tgrad = -(1.0 - eps) * k[:, None] * w * log_p
            err = tl.zeros_like(grad)
    return grad, tgrad, err


@triton.jit
def _store_block(G, TG, L, rows64, stride_xn, cols, C, row_ok, col_ok, valid, grad, tgrad, err,
                 WRITE_GRAD: tl.constexpr, WRITE_TGRAD: tl.constexpr, LOSS_OUT: tl.constexpr):
    """Store the gradients and the element-wise loss of a block; return the block's per-row error sum."""
    ok = row_ok[:, None] & col_ok[None, :]
    err = tl.where(valid[:, None] & col_ok[None, :], err, 0.0)
    if WRITE_GRAD:
        tl.store(G + rows64[:, None] * stride_xn + cols[None, :], grad.to(G.dtype.element_ty), mask=ok)
    if WRITE_TGRAD:  # a fresh contiguous buffer
        tgrad = tl.where(valid[:, None], tgrad, 0.0)
        tl.store(TG + rows64[:, None] * C + cols[None, :], tgrad.to(TG.dtype.element_ty), mask=ok)
    if LOSS_OUT == _OUT_ELEM:
        tl.store(L + rows64[:, None] * C + cols[None, :], err.to(L.dtype.element_ty), mask=ok)
    return tl.sum(err, 1)


@triton.jit
def _softmax_family_kernel(
    X, stride_xn, Y, stride_yn, stride_yc, W, U, stride_un, stride_uc, G, TG, L, DEN, den_count,
    N, C, ignore_index, eps_hi, eps_lo,
    LOSS: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_DEN: tl.constexpr, UPSTREAM: tl.constexpr, WRITE_GRAD: tl.constexpr, WRITE_TGRAD: tl.constexpr,
    LOSS_OUT: tl.constexpr, ONE_BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """Loss or gradient of CE with probability targets and of MSE, for blocks of ROWS rows; programs loop over
    row blocks. The mean denominator is den_count (times DEN[0], the kept-row count, when HAS_DEN). Scalar
    reductions store one partial sum per program (in a fixed order, so the total is deterministic)."""
    eps = _param(eps_hi, eps_lo, ACC)
    inv = 1.0 / tl.cast(den_count, ACC)
    if HAS_DEN:
        inv = inv / tl.load(DEN).to(ACC)
    total = inv * 0.0
    for block in range(tl.program_id(0), tl.cdiv(N, ROWS), tl.num_programs(0)):
        rows = block * ROWS + tl.arange(0, ROWS)
        rows64, row_ok, y, valid, x_y, u_y, k = _row_setup(
            X, stride_xn, Y, stride_yn, U, stride_un, stride_uc, rows, N, C, ignore_index, inv, LOSS,
            PROB_TARGET, UPSTREAM, ACC)
        m, s = tl.full([ROWS], _NEG_INF, ACC), tl.zeros([ROWS], ACC)
        e1, e2, a1, a2 = s, s, s, s
        if ONE_BLOCK:  # the whole row stays in registers: the logits are read once
            cols = tl.arange(0, BLOCK_C)
            x, t, w, u, col_ok = _load_block(X, stride_xn, Y, stride_yn, stride_yc, W, U, stride_un,
                                             stride_uc, rows64, row_ok, y, cols, C, eps, LOSS, PROB_TARGET,
                                             HAS_WEIGHT, SMOOTH, UPSTREAM, ACC)
            if LOSS != _MSE_LOGITS:
                m, s, e1, e2, a1, a2 = _accumulate(m, s, e1, e2, a1, a2, x, t, w, u, col_ok, LOSS,
                                                   PROB_TARGET)
        elif LOSS != _MSE_LOGITS:
            for start in range(0, C, BLOCK_C):
                cols = start + tl.arange(0, BLOCK_C)
                x, t, w, u, col_ok = _load_block(X, stride_xn, Y, stride_yn, stride_yc, W, U, stride_un,
                                                 stride_uc, rows64, row_ok, y, cols, C, eps, LOSS,
                                                 PROB_TARGET, HAS_WEIGHT, SMOOTH, UPSTREAM, ACC)
                m, s, e1, e2, a1, a2 = _accumulate(m, s, e1, e2, a1, a2, x, t, w, u, col_ok, LOSS,
                                                   PROB_TARGET)
        lse, loss, c_p, g = _row_terms(m, s, e1, e2, a1, a2, x_y, u_y, LOSS, PROB_TARGET)

        err_sum = tl.zeros([ROWS], ACC)
        if ONE_BLOCK:
            grad, tgrad, err = _epilogue(x, t, w, u, col_ok, lse, k, c_p, g, eps, LOSS, WRITE_TGRAD)
            err_sum = _store_block(G, TG, L, rows64, stride_xn, cols, C, row_ok, col_ok, valid, grad, tgrad,
                                   err, WRITE_GRAD, WRITE_TGRAD, LOSS_OUT)
        elif WRITE_GRAD or WRITE_TGRAD or LOSS != _CE_PROBS:  # CE's loss needs no second walk
            n_blocks = tl.cdiv(C, BLOCK_C)
            for i in range(n_blocks):  # backwards: the blocks read last are the likeliest still in L2
                cols = (n_blocks - 1 - i) * BLOCK_C + tl.arange(0, BLOCK_C)
                x, t, w, u, col_ok = _load_block(X, stride_xn, Y, stride_yn, stride_yc, W, U, stride_un,
                                                 stride_uc, rows64, row_ok, y, cols, C, eps, LOSS,
                                                 PROB_TARGET, HAS_WEIGHT, SMOOTH, UPSTREAM, ACC)
                grad, tgrad, err = _epilogue(x, t, w, u, col_ok, lse, k, c_p, g, eps, LOSS, WRITE_TGRAD)
                err_sum += _store_block(G, TG, L, rows64, stride_xn, cols, C, row_ok, col_ok, valid, grad,
                                        tgrad, err, WRITE_GRAD, WRITE_TGRAD, LOSS_OUT)
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


# ------------------------------------------------------------------- element-wise: the sigmoid family


@triton.jit
def _sigmoid_family_kernel(
    X, stride_xn, T, stride_tn, stride_tc, W, stride_wn, stride_wc, PW, stride_pn, stride_pc,
    U, stride_un, stride_uc, G, TG, L, N, C, den_count, alpha_hi, alpha_lo, gamma_hi, gamma_lo,
    gamma_neg_hi, gamma_neg_lo, clip_hi, clip_lo,
    LOSS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, HAS_ALPHA: tl.constexpr,
    UPSTREAM: tl.constexpr, WRITE_GRAD: tl.constexpr, WRITE_TGRAD: tl.constexpr, LOSS_OUT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Element-wise BCE-with-logits, sigmoid focal loss or ASL, with its derivatives with respect to the
    logit (G) and the target (TG), on a [ROWS, BLOCK_C] tile."""
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
    gamma = _param(gamma_hi, gamma_lo, ACC)
    if LOSS == _BCE:
        pos = t
        pw = tl.full([1, 1], 1.0, ACC)
        if HAS_POS_WEIGHT:
            pw = tl.load(PW + r * stride_pn + c * stride_pc, mask=ok, other=0.0).to(ACC)
            pos = t * pw
        loss = pos * sp_neg + (1.0 - t) * sp_pos
        dloss = (1.0 - t) * p - pos * q
        dtarget = pw * sp_neg - sp_pos
    elif LOSS == _SIGMOID_FOCAL:
        # ce in PyTorch's own form (1-t) x + softplus(-x), so that +-inf logits give torchvision's values
        # (inf, and NaN where its BCE is NaN)
        ce = (1.0 - t) * x + sp_neg
        base = p * (1.0 - t) + q * t  # 1 - p_t
        focus = _pow(base, gamma)
        # d(1-p_t)/dx = (1-2t) p q; base^(gamma-1) = focus / base, and the term vanishes where base == 0; at
        # gamma = 0 it is absent (never 0 * an infinite ce), so the gradient there is torchvision's (p - t)
        tail = tl.where(base > 0.0, focus / tl.where(base > 0.0, base, 1.0), 0.0)
        loss = ce * focus
        focusing = tl.where(gamma > 0.0, gamma * ce * tail * (1.0 - 2.0 * t) * p * q, 0.0)
        dloss = ((1.0 - t) * p - t * q) * focus + focusing
        # d ce/dt = softplus(-x) - softplus(x) = -x; d(1-p_t)/dt = q - p
        dtarget = -x * focus + gamma * ce * tail * (q - p)
        if HAS_ALPHA:
            alpha = _param(alpha_hi, alpha_lo, ACC)
            alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
            dtarget = dtarget * alpha_t + (2.0 * alpha - 1.0) * loss
            loss, dloss = loss * alpha_t, dloss * alpha_t
    else:  # ASL: t q^g+ softplus(-x) - (1-t) p_m^g- log(1 - p_m), p_m = max(p - clip, 0)
        gamma_neg = _param(gamma_neg_hi, gamma_neg_lo, ACC)
        clip = _param(clip_hi, clip_lo, ACC)
        shifted = p > clip
        p_m = tl.where(shifted, p - clip, 0.0)
        one_m_pm = tl.where(shifted, tl.minimum(q + clip, 1.0), 1.0)  # 1 - p_m without cancellation
        log_one_m_pm = tl.where(clip > 0.0, tl.log(one_m_pm), -sp_pos)
        pos_focus = _pow(q, gamma)
        neg_focus = _pow(p_m, gamma_neg)
        pos_loss = pos_focus * sp_neg
        neg_loss = -neg_focus * log_one_m_pm
        loss = t * pos_loss + (1.0 - t) * neg_loss
        # d/dx of the positive part: q^g+ (g+ p log p - q); of the negative part, where p > clip:
        # -p q p_m^g- (g- log(1 - p_m) / p_m - 1 / (1 - p_m)), the ratio log(1 - p_m)/p_m -> -1 as p_m -> 0
        ratio = tl.where(p_m > 0.0, log_one_m_pm / tl.where(p_m > 0.0, p_m, 1.0), -1.0)
        q_over = tl.where(one_m_pm > 0.0, q / tl.where(one_m_pm > 0.0, one_m_pm, 1.0), 1.0)
        # the focusing terms are absent at gamma = 0 (never 0 * inf at +-inf logits: the gradients are -q, p)
        d_pos = pos_focus * (tl.where(gamma > 0.0, -gamma * p * sp_neg, 0.0) - q)
        d_neg = tl.where(shifted, -p * neg_focus * (tl.where(gamma_neg > 0.0, gamma_neg * ratio * q, 0.0)
                                                    - q_over), 0.0)
        dloss = t * d_pos + (1.0 - t) * d_neg
        dtarget = pos_loss - neg_loss
    if HAS_WEIGHT:
        w = tl.load(W + r * stride_wn + c * stride_wc, mask=ok, other=0.0).to(ACC)
        loss, dloss, dtarget = loss * w, dloss * w, dtarget * w
    inv = 1.0 / tl.cast(den_count, ACC)
    if UPSTREAM == _UP_ELEM:
        k = tl.load(U + r * stride_un + c * stride_uc, mask=ok, other=0.0).to(ACC)
    elif UPSTREAM == _UP_SCALAR:
        k = tl.full([1, 1], 1.0, ACC) * (inv * tl.load(U).to(ACC))
    else:
        k = tl.full([1, 1], 1.0, ACC) * inv
    if WRITE_GRAD:
        tl.store(G + r * stride_xn + c, (dloss * k).to(G.dtype.element_ty), mask=ok)
    if WRITE_TGRAD:  # a fresh contiguous buffer
        tl.store(TG + r * C + c, (dtarget * k).to(TG.dtype.element_ty), mask=ok)
    if LOSS_OUT == _OUT_ELEM:
        tl.store(L + r * C + c, loss.to(L.dtype.element_ty), mask=ok)
    elif LOSS_OUT == _OUT_PARTIAL:
        total = tl.sum(tl.sum(tl.where(ok, loss, 0.0), 1), 0) * inv
        tl.store(L + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), total)
