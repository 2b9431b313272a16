"""Row statistics of the softmax family: the online logsumexp and the per-row sums each loss needs.

A row's lse = logsumexp(x) is formed online (running max m and rescaled sum s = sum exp(x - m)) over one
register tile or over blocks of a long row, with the few extra sums a loss needs folded in on the way; the
true-class logit and weight are gathered once per row. Also here: the constexpr selectors shared by every
kernel, small device helpers, and the pre-kernel that sums the `mean` denominator on the device.
"""

from __future__ import annotations

import triton
import triton.language as tl

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

