"""Row statistics of the softmax family: the online logsumexp, log p_y of the true class, the per-row sums.

A row's lse = logsumexp(x) is formed online (running max m and rescaled sum s = sum exp(x - m)) over one
register tile or over blocks of a long row, with the few extra sums a loss needs folded in on the way.
`_row_stats_kernel` does this for the index-target family on the transformed logits z' (see
`xentlab.kernels.spec`): lse', log p'_y (from the other classes' mass when p'_y is near 1, so 1 - p_y keeps
its precision) and the label-smoothing sum. The rest serves the probability-target CE and MSE kernel. Also
here: the constexpr selectors shared by every kernel and small device helpers.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Loss kinds: constexpr selectors of the softmax-family and element-wise kernels.
_CE_PROBS = tl.constexpr(0)
_MSE_PROBS = tl.constexpr(2)
_MSE_LOGITS = tl.constexpr(3)
_BCE = tl.constexpr(10)
_SIGMOID_FOCAL = tl.constexpr(11)
_ASL = tl.constexpr(12)
# What a kernel stores as the loss: nothing, one value per row, one per element, one partial sum per program.
_OUT_NONE = tl.constexpr(0)
_OUT_ROW = tl.constexpr(1)
_OUT_ELEM = tl.constexpr(2)
_OUT_PARTIAL = tl.constexpr(3)
# How grad_output enters the gradient: not at all (forward only), per row, per element, one scalar.
_UP_NONE = tl.constexpr(0)
_UP_ROW = tl.constexpr(1)
_UP_ELEM = tl.constexpr(2)
_UP_SCALAR = tl.constexpr(3)
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


# ------------------------------------------------------------- index targets: transformed logits, row stats


@triton.jit
def _true_class(Y, stride_yn, MARGIN, rows, N, C, ignore_index, HAS_MARGIN: tl.constexpr, ACC: tl.constexpr):
    """Per row: int64 row offsets, which rows exist, which count, y (0 where ignored) and the margin m[y].
    A class index outside [0, C) counts as ignored, so unvalidated targets never address memory out of
    bounds."""
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(Y + rows64 * stride_yn, mask=row_ok, other=ignore_index)
    valid = row_ok & (y != ignore_index) & (y >= 0) & (y < C)
    y = tl.where(valid, y, 0)
    margin_y = tl.zeros(rows.shape, ACC)
    if HAS_MARGIN:
        margin_y = tl.load(MARGIN + y, mask=row_ok, other=0.0).to(ACC)
    return rows64, row_ok, valid, y, margin_y


@triton.jit
def _transform(x, is_y, margin_y, SCALE, BIAS, cols, col_ok, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_MARGIN: tl.constexpr, ACC: tl.constexpr):
    """z' = scale_c (x - [c == y] margin_y) + bias_c on a [ROWS, BLOCK_C] block (the same operations, in the
    same order, wherever z' is formed, so the row statistics and the gradient agree bit for bit)."""
    if HAS_MARGIN:
        x = x - tl.where(is_y, margin_y[:, None], 0.0)
    if HAS_SCALE:
        x = x * tl.load(SCALE + cols, mask=col_ok, other=1.0).to(ACC)[None, :]
    if HAS_BIAS:
        x = x + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return x


@triton.jit
def _weighted_centred_sums(a1, a2, beta, z, m, ref, col_ok):
    """The online pair a1 = sum beta, a2 = sum beta (z - m): a2 is first shifted by a1 (m - m_old) as the
    row maximum m grows to `ref`, then the block's terms are added (columns past C count 0)."""
    shift = tl.where(m == _NEG_INF, 0.0, m - ref)
    centred = tl.where(col_ok[None, :], z - ref[:, None], 0.0)
    return a1 + tl.sum(beta, 1), a2 + a1 * shift + tl.sum(beta * centred, 1)


@triton.jit
def _stats_block(X, stride_xn, W, SCALE, BIAS, rows64, row_ok, y, margin_y, cols, C, m, s, other, z_y, a1, a2,
                 HAS_WEIGHT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_MARGIN: tl.constexpr, SMOOTH: tl.constexpr, ACC: tl.constexpr):
    """Fold one block of z' into the online row sums: m = max z', s = sum e, other = sum of e over c != y
    (e = exp(z' - m), both rescaled as m grows), z_y = z'_y, and with SMOOTH a1 = sum w and
    a2 = sum w (z' - m) (shifted as m grows)."""
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    is_y = cols[None, :] == y[:, None]
    x = tl.load(X + rows64[:, None] * stride_xn + cols[None, :], mask=ok, other=0.0).to(ACC)
    z = _transform(x, is_y, margin_y, SCALE, BIAS, cols, col_ok, HAS_SCALE, HAS_BIAS, HAS_MARGIN, ACC)
    z = tl.where(col_ok[None, :], z, _NEG_INF)
    z_y += tl.sum(tl.where(is_y, z, 0.0), 1)
    m_new = tl.maximum(m, tl.max(z, 1))
    ref = tl.where(m_new == _NEG_INF, 0.0, m_new)  # a row that is all -inf so far must not give exp(nan)
    rescale = tl.exp(m - ref)
    e = tl.exp(z - ref[:, None])
    s = s * rescale + tl.sum(e, 1)
    other = other * rescale + tl.sum(tl.where(is_y, 0.0, e), 1)
    if SMOOTH:
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :] + tl.zeros_like(z)
        else:
            w = tl.where(col_ok[None, :], 1.0, 0.0) + tl.zeros_like(z)
        a1, a2 = _weighted_centred_sums(a1, a2, w, z, m, ref, col_ok)
    return m_new, s, other, z_y, a1, a2


@triton.jit
def _row_stats_kernel(
    X, stride_xn, Y, stride_yn, W, SCALE, BIAS, MARGIN, LSE, LOGPT, W_Y, SMOOTHING, KEPT, N, C, ignore_index,
    HAS_WEIGHT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MARGIN: tl.constexpr,
    SMOOTH: tl.constexpr, ONE_BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per row of z' (one read of the logits): lse', log p'_y, w[y], and with SMOOTH sum_c w_c (lse' - z'_c)
    and whether the row counts. log p'_y is log1p(-(mass of the other classes)) when that mass is below 1/4,
    else z'_y - lse'. Ignored rows store log p'_y = 0 (p_y = 1, where every row loss is finite), w[y] = 0
    and a zero smoothing sum, so the caller needs no mask; programs loop over blocks of ROWS rows."""
    for block in range(tl.program_id(0), tl.cdiv(N, ROWS), tl.num_programs(0)):
        rows = block * ROWS + tl.arange(0, ROWS)
        rows64, row_ok, valid, y, margin_y = _true_class(Y, stride_yn, MARGIN, rows, N, C, ignore_index,
                                                         HAS_MARGIN, ACC)
        m = tl.full([ROWS], _NEG_INF, ACC)
        s = tl.zeros([ROWS], ACC)
        other, z_y, a1, a2 = s, s, s, s
        if ONE_BLOCK:  # the whole row in one register tile
            m, s, other, z_y, a1, a2 = _stats_block(
                X, stride_xn, W, SCALE, BIAS, rows64, row_ok, y, margin_y, tl.arange(0, BLOCK_C), C, m, s,
                other, z_y, a1, a2, HAS_WEIGHT, HAS_SCALE, HAS_BIAS, HAS_MARGIN, SMOOTH, ACC)
        else:
            for start in range(0, C, BLOCK_C):
                m, s, other, z_y, a1, a2 = _stats_block(
                    X, stride_xn, W, SCALE, BIAS, rows64, row_ok, y, margin_y, start + tl.arange(0, BLOCK_C),
                    C, m, s, other, z_y, a1, a2, HAS_WEIGHT, HAS_SCALE, HAS_BIAS, HAS_MARGIN, SMOOTH, ACC)
        ref = tl.where(m == _NEG_INF, 0.0, m)
        log_s = tl.log(s)
        one_m_pt = other / s
        logpt = tl.where(one_m_pt < 0.25, _log1p(-tl.minimum(one_m_pt, 0.25)), (z_y - ref) - log_s)
        w_y = tl.where(valid, 1.0, 0.0).to(ACC)
        if HAS_WEIGHT:
            w_y = tl.load(W + y, mask=valid, other=0.0).to(ACC)
        tl.store(LSE + rows64, ref + log_s, mask=row_ok)
        tl.store(LOGPT + rows64, tl.where(valid, logpt, 0.0), mask=row_ok)
        tl.store(W_Y + rows64, w_y, mask=row_ok)
        if SMOOTH:  # sum_c w_c (lse' - z'_c) = W log s - sum_c w_c (z'_c - m)
            tl.store(SMOOTHING + rows64, tl.where(valid, a1 * log_s - a2, 0.0), mask=row_ok)
            tl.store(KEPT + rows64, tl.where(valid, 1.0, 0.0).to(ACC), mask=row_ok)


# ------------------------------------------------------- probability targets and MSE: the fused-row kernel


@triton.jit
def _row_setup(X, stride_xn, Y, stride_yn, U, stride_un, stride_uc, rows, N, C, ignore_index, inv,
               LOSS: tl.constexpr, PROB_TARGET: tl.constexpr, UPSTREAM: tl.constexpr, ACC: tl.constexpr):
    """Per row: the class index y (0 where ignored; index-target MSE only), which rows count, x[y],
    grad_output[y] and the gradient scale k (grad_output / denominator, or the per-row grad_output, and 0 for
    ignored rows)."""
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    one = tl.full(rows.shape, 1.0, ACC)
    y = tl.zeros(rows.shape, tl.int64)
    valid = row_ok
    x_y, u_y = one * 0.0, one
    if not PROB_TARGET:
        y = tl.load(Y + rows64 * stride_yn, mask=row_ok, other=ignore_index)
        valid = row_ok & (y != ignore_index) & (y >= 0) & (y < C)  # out of range: as ignored, never read
        y = tl.where(valid, y, 0)
        if LOSS != _MSE_LOGITS:  # gathered before any store: G may alias X
            x_y = tl.load(X + rows64 * stride_xn + y, mask=valid, other=0.0).to(ACC)
        if UPSTREAM == _UP_ELEM:
            u_y = tl.load(U + rows64 * stride_un + y * stride_uc, mask=valid, other=0.0).to(ACC)
    k = tl.where(valid, inv, 0.0)  # ignored rows: zero gradient even when the denominator is 0
    if UPSTREAM == _UP_SCALAR:
        k = tl.where(valid, inv * tl.load(U).to(ACC), 0.0)
    elif UPSTREAM == _UP_ROW:
        k = tl.where(valid, tl.load(U + rows64 * stride_un, mask=valid, other=0.0).to(ACC), 0.0)
    elif UPSTREAM == _UP_ELEM:
        k = tl.where(valid, 1.0, 0.0)
    return rows64, row_ok, y, valid, x_y, u_y, k


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
def _accumulate(m, s, e1, e2, a1, a2, x, t, w, u, col_ok, LOSS: tl.constexpr, PROB_TARGET: tl.constexpr):
    """Fold one block into the online row sums: m = max x, s = sum e with e = exp(x - m); e1/e2 are sums of e
    and e^2 (rescaled with s) and a1/a2 sums of beta and beta (x - m) (shifted with m), as each loss needs."""
    m_new = tl.maximum(m, tl.max(x, 1))
    ref = tl.where(m_new == _NEG_INF, 0.0, m_new)  # a row that is all -inf so far must not give exp(nan)
    scale = tl.exp(m - ref)
    e = tl.exp(x - ref[:, None])
    s = s * scale + tl.sum(e, 1)
    if LOSS == _MSE_PROBS:
        if PROB_TARGET:
            e1 = e1 * scale + tl.sum(e * u * t, 1)
            e2 = e2 * scale * scale + tl.sum(e * e * u, 1)
        else:
            e1 = e1 * scale + tl.sum(e * (1.0 - t), 1)
            e2 = e2 * scale * scale + tl.sum(e * e * u * (1.0 - t), 1)
    if LOSS == _CE_PROBS:
        a1, a2 = _weighted_centred_sums(a1, a2, w * t, x, m, ref, col_ok)
    return m_new, s, e1, e2, a1, a2


@triton.jit
def _row_terms(m, s, e1, e2, a1, a2, x_y, u_y, LOSS: tl.constexpr, PROB_TARGET: tl.constexpr):
    """From the row sums: lse, the row loss of CE with probabilities (-sum w t' log p = a1 lse - sum w t' x),
    and g = sum_c u_c p_c (p_c - t_c) for MSE on probabilities (grad = 2 k p (u (p - t) - g))."""
    zero = tl.zeros_like(s)
    lse, loss, g = zero, zero, zero
    if LOSS != _MSE_LOGITS:
        ref = tl.where(m == _NEG_INF, 0.0, m)
        log_s = tl.log(s)
        lse = ref + log_s
        if LOSS == _CE_PROBS:
            loss = a1 * log_s - a2
        elif LOSS == _MSE_PROBS:
            if PROB_TARGET:
                g = e2 / (s * s) - e1 / s
            else:
                g = e2 / (s * s) - u_y * tl.exp(x_y - lse) * (e1 / s)
    return lse, loss, a1, g
