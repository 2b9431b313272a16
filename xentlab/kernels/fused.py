"""The CPU fast path: one autograd.Function whose forward sweeps the logits once, in row chunks.

Each chunk's row statistic (the softmax, i.e. exp(x - lse)) is computed once, in float32 (float64 for float64
inputs), and the loss and the closed-form gradient (docs/losses.md) come out of that same chunk while it is
still in cache. For `mean`/`sum` the gradient is written during the forward pass into one logits-sized buffer,
the only thing saved; backward hands it over untouched when grad_output is 1 (autograd then adopts it as .grad
without a copy). For `none` the forward saves only the logits and backward re-sweeps them, because the
gradient depends on the per-row/per-element grad_output. No softmax is ever kept beyond that buffer.

Chunk temporaries live in a per-thread workspace reused across calls (at most a few x `_CHUNK_ELEMS`
elements): fresh chunk-sized allocations cost page faults on every call, which on CPU can take longer than the
math. Peak extra memory is therefore the one logits-sized buffer plus that bounded workspace.

Inputs of at most _SMALL_ELEMS elements (the shapes the lab trains on) take one-shot paths instead: the whole
batch in a few dispatched ops, where dispatch, not arithmetic, is the cost. There plain cross-entropy and BCE
are PyTorch's own ops (nothing written in Python can undercut one native op and its C++ autograd node), and
the other losses compute loss and gradient in one pass as above.

Double backward is not supported: differentiating the gradient again raises a RuntimeError saying so
(backend="reference" is plain autograd and supports it), except where the small path is PyTorch's own op.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from xentlab.kernels import compute_dtype, spec

Tensor = torch.Tensor

# Elements per row chunk: large enough that per-op overhead (dispatch, waking the intra-op threads) is small
# next to the math, small enough for a chunk's buffers to stay in cache. Inputs larger than 4 x
# _MIN_CHUNK_ELEMS are cut into at least 4 chunks, so chunk temporaries stay well below the logits' size.
_CHUNK_ELEMS = 1 << 20
_MIN_CHUNK_ELEMS = 1 << 16
# Below this many classes PyTorch's row-softmax kernel is dominated by per-row overhead; compose it instead.
_SMALL_C = 64
# Inputs up to this many elements take the one-shot path: the whole batch in one pass of a few dispatched ops,
# loss and gradient in the forward. At training shapes (128 x 5) each op costs microseconds of dispatch while
# the math costs nanoseconds, so op count is the whole cost; chunking pays off only once rows leave cache.
_SMALL_ELEMS = 1 << 16
# Up to this many elements (128 x 32) even the one-shot path's ~25 dispatched ops cost more than PyTorch's own
# row kernels plus autograd's C++ nodes do, measured inside a whole training step of the default model; from
# _SMALL_C classes on, PyTorch's row kernels win at every small size.
_TINY_ELEMS = 1 << 12
_ROWS_ELEMS = 1 << 19
_NLL = spec.NLL()
_local = threading.local()


def _workspace(slots: int, elems: int, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    """`slots` flat scratch buffers of `elems` elements, cached per thread, dtype and device."""
    cache = _local.__dict__.setdefault("workspace", {})
    buf = cache.get((dtype, device))
    if buf is None or buf.numel() < slots * elems:
        # Never an inference tensor: one grown under inference_mode (a test epoch) could not be written
        # outside it, and a joblib worker runs the next job's training in the same thread.
        with torch.inference_mode(False):
            buf = cache[(dtype, device)] = torch.empty(max(slots, 1) * elems, dtype=dtype, device=device)
    return [buf[i * elems:(i + 1) * elems] for i in range(slots)]


def workspace_bytes() -> int:
    """Bytes held by this thread's cached chunk workspace (reported by the CPU benchmark)."""
    cache = getattr(_local, "workspace", {})
    return sum(b.numel() * b.element_size() for b in cache.values())


class _FusedLoss(torch.autograd.Function):
    """Drives a chunk kernel: forward sweeps once (loss, and the gradient for mean/sum); backward either
    returns that gradient (times grad_output) or, for `none`, re-sweeps the saved logits with grad_output."""

    @staticmethod
    def forward(ctx, input: Tensor, kernel, reduction: str) -> Tensor:
        ctx.kernel, ctx.reduction = kernel, reduction
        want_grad = ctx.needs_input_grad[0]
        if reduction == "none" or not want_grad:
            ctx.save_for_backward(input if reduction == "none" else None)
            loss = _sweep(kernel, input, None, None)
            if reduction != "none":
                loss = loss.sum() / kernel.denominator() if reduction == "mean" else loss.sum()
            return loss.to(input.dtype)
        cdt = compute_dtype(input.dtype)
        denominator = kernel.denominator().to(cdt) if reduction == "mean" else None
        if denominator is None:
            scale = torch.ones((), dtype=cdt, device=input.device)
        else:  # an empty or all-ignored batch has a NaN mean loss but a zero gradient, as in PyTorch
            scale = torch.where(denominator > 0, 1 / denominator, 0.0)
        grad = torch.empty_like(input)
        total = _sweep(kernel, input, scale, grad)
        ctx.save_for_backward(grad)
        return (total if denominator is None else total / denominator).to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        with torch.no_grad():
            grad = _input_gradient(ctx, grad_output)
        if torch.is_grad_enabled():  # create_graph=True: make a later differentiation of `grad` fail loudly
            grad = _NoDoubleBackward.apply(grad.detach().requires_grad_())
        return grad, None, None


def _input_gradient(ctx, grad_output: Tensor) -> Tensor:
    (saved,) = ctx.saved_tensors
    if ctx.reduction == "none":
        grad = torch.empty_like(saved)
        _sweep(ctx.kernel, saved, grad_output.to(compute_dtype(saved.dtype)), grad)
        return grad
    if bool(grad_output == 1):
        return saved
    return saved * grad_output.to(saved.dtype)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on a first-order gradient whose backward raises: the fused losses are once-differentiable."""

    @staticmethod
    def forward(ctx, grad: Tensor) -> Tensor:
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("xentlab's fused losses are once-differentiable: double backward (differentiating "
                           "a gradient taken with create_graph=True) is not supported; "
                           "use backend='reference'")


def _sweep(kernel, x: Tensor, scale: Tensor | None, grad: Tensor | None) -> Tensor:
    """Runs `kernel.chunk` over row chunks. Without `scale` it returns the full loss ((N,) per row or (N, C)
    per element); with `scale` it writes scale * gradient into `grad` and returns the summed loss."""
    n, c = x.shape
    cdt = compute_dtype(x.dtype)
    step = max(1, min(_CHUNK_ELEMS, max(_MIN_CHUNK_ELEMS, n * c // 4)) // c)
    convert = x.dtype != cdt
    in_place = grad is not None and grad.dtype == cdt  # the gradient is computed right in its final place
    slots = _workspace(kernel.slots + (not in_place) + convert, min(step, max(n, 1)) * c, cdt, x.device)
    losses = None if scale is not None else torch.empty((n, c) if kernel.elementwise else (n,), dtype=cdt,
                                                       device=x.device)
    total = torch.zeros((), dtype=cdt, device=x.device)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        ws = [s[:(rows.stop - start) * c].view(-1, c) for s in slots]
        xc = ws.pop().copy_(x[rows]) if convert else x[rows]
        out = grad[rows] if in_place else ws.pop()
        part = kernel.chunk(xc, rows, out, ws, scale if scale is None or scale.dim() == 0 else scale[rows])
        if scale is None:
            losses[rows] = part
        else:
            total += part.sum()
            if not in_place:
                grad[rows] = out
    return total if losses is None else losses


def _softmax(x: Tensor, out: Tensor) -> Tensor:
    if x.shape[1] >= _SMALL_C:
        return torch.softmax(x, 1, out=out)
    torch.sub(x, x.amax(1, keepdim=True), out=out).exp_()
    return out.div_(out.sum(1, keepdim=True))


def _log_softmax(x: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    if x.shape[1] >= _SMALL_C:
        return torch.log_softmax(x, 1, out=out)
    torch.sub(x, x.amax(1, keepdim=True), out=out)
    return out.sub_(torch.exp(out, out=scratch).sum(1, keepdim=True).log_())


def _log_true_class(p: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """log p[y] without a host sync: lse = x_k - log p_k at the row's argmax k, where p_k >= 1/C is never too
    small for an accurate log, so log p[y] = x[y] - x_k + log p_k even when p[y] underflows."""
    top, k = x.max(1, keepdim=True)
    return (x.gather(1, y) - top + p.gather(1, k).log_()).squeeze(1)


@dataclass(eq=False)
class _SoftmaxIndex:
    """The index-target softmax family of `xentlab.kernels.spec`: a row loss phi of log p'_y after a logit
    transform z -> z', with class weights and PyTorch's label smoothing.

    target has ignored rows sent to class 0; w_y is the true class's weight (alpha for focal), 0 on ignored
    rows. Per row the gradient with respect to z' is coef p' - [c == y] coef_y - smooth w (the last only
    with label smoothing), with coef_y = -(1-eps) w_y slope(log p'_y) and coef = coef_y + smooth W; the
    transform's scale multiplies it on the way back to z."""

    target: Tensor
    valid: Tensor
    w_y: Tensor
    weight: Tensor | None
    eps: float
    row_loss: spec.RowLoss
    transform: spec.LogitTransform | None
    elementwise = False

    @property
    def slots(self) -> int:
        return self.transform is not None

    def denominator(self) -> Tensor:
        return self.w_y.sum()

    def chunk(self, x, rows, out, ws, s):
        y, w_y = self.target[rows, None], self.w_y[rows]
        if self.transform is not None:
            x = self._transformed(x, y, ws.pop() if ws else None)
        p = _softmax(x, out)
        logpt = _log_true_class(p, x, y)
        nll = isinstance(self.row_loss, spec.NLL)
        if nll:
            value = -logpt
        elif s is None:
            value = self.row_loss.value(logpt)
        else:  # both, from one computation where the row loss shares them (focal)
            value, slope = spec.value_and_slope(self.row_loss, logpt)
        keep = 1 - self.eps
        loss = w_y * value if keep == 1 else (keep * w_y) * value
        smooth = None
        if self.eps:
            smooth, total_w, row_sum = self._smoothing(x, y, logpt, rows)
            loss = loss - smooth * row_sum
        if s is None:
            return torch.where(self.valid[rows], loss, 0.0)
        coef_y = w_y if nll else w_y * -slope
        if keep != 1:
            coef_y = keep * coef_y
        coef_y = coef_y * s  # s: a number, 0-d, or (rows,) in the backward of reduction="none"
        coef = coef_y if smooth is None else coef_y + (smooth * s) * total_w
        p.mul_(coef[:, None])
        if smooth is not None and self.weight is None:
            p.sub_((smooth * s)[:, None])
        elif smooth is not None:
            p.addr_(smooth * s, self.weight, alpha=-1)
        p.scatter_add_(1, y, coef_y.neg()[:, None])
        scale = self.transform.scale if self.transform is not None else 1.0
        if isinstance(scale, Tensor) or scale != 1.0:
            p.mul_(scale)
        return torch.where(self.valid[rows], loss, 0.0)

    def _transformed(self, x, y, buffer):
        """z' = scale (z - [c == y] margin) + bias, in `buffer` when given (a chunk workspace slot)."""
        t = self.transform
        z = x if buffer is None else buffer.copy_(x)
        if t.margin is not None:
            z = z.scatter_add(1, y, -t.margin[y]) if buffer is None else z.scatter_add_(1, y, -t.margin[y])
        if isinstance(t.scale, Tensor) or t.scale != 1.0:
            z = z * t.scale if z is x else z.mul_(t.scale)
        if t.bias is not None:
            z = z + t.bias if z is x else z.add_(t.bias)
        return z

    def _smoothing(self, x, y, logpt, rows):
        """smooth_i = valid_i eps/C, W = sum_c w_c and sum_c w_c log p'_ic (the smoothing term's row sum)."""
        n_classes = x.shape[1]
        smooth = self.valid[rows].to(x.dtype) * (self.eps / n_classes)
        total_w = n_classes if self.weight is None else self.weight.sum()
        # sum_c w_c log p_c = sum_c w_c x_c - W lse, with lse = x_y - log p_y
        lse = x.gather(1, y).squeeze(1) - logpt
        row_sum = (x.sum(1) if self.weight is None else x @ self.weight) - total_w * lse
        return smooth, total_w, row_sum


def softmax_loss(input, target, row_loss, weight, transform, ignore_index, reduction, label_smoothing):
    """The index-target softmax family (`xentlab.kernels.spec`): per non-ignored row l_i = (1-eps) w[y_i]
    phi(log p'_iy) + (eps/C) sum_c w_c (lse'_i - z'_ic) on the transformed logits z'; `mean` divides by the
    sum of w[y_i] over non-ignored rows. Gradient in closed form from the row loss's slope. Small inputs
    (`checks_targets`) get their class indices range-checked inside PyTorch's nll kernel, as F.cross_entropy
    does; an out-of-range index raises IndexError there."""
    cdt = compute_dtype(input.dtype)
    weight = None if weight is None else weight.to(cdt)
    if transform is not None and transform.is_identity:
        transform = None
    if _pytorch_rows_win(input):
        if transform is None and _is_nll(row_loss):
            return _small_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
        if not label_smoothing:
            return _row_loss_by_autograd(input, target, row_loss, weight, transform, ignore_index, reduction)
    if checks_targets(input):
        problem = (target, row_loss, weight, transform, ignore_index, label_smoothing)
        return _SmallSoftmax.apply(input, problem, reduction)
    valid = target != ignore_index
    y = torch.where(valid, target, 0)
    w_y = valid.to(cdt) if weight is None else weight[y] * valid
    kernel = _SoftmaxIndex(y, valid, w_y, weight, label_smoothing, row_loss, transform)
    return _FusedLoss.apply(input, kernel, reduction)


def _pytorch_rows_win(input: Tensor) -> bool:
    """Where PyTorch's own row kernels plus autograd beat the closed-form paths (as docs/benchmarks.md
    measures): the smallest batches, and training batches of _SMALL_C classes or more (up to 4096 x 128)."""
    elems = input.numel()
    return elems <= _TINY_ELEMS or (input.shape[1] >= _SMALL_C and elems <= _ROWS_ELEMS)


def checks_targets(input: Tensor) -> bool:
    """Whether softmax_loss and mse_loss on this (validated, (N, C)) input range-check the class indices
    themselves (inside PyTorch's kernels, raising IndexError or RuntimeError), so xentlab.functional need
    not spend a host sync on it."""
    return input.numel() <= _SMALL_ELEMS


_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}


def _small_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing):
    """(Weighted, label-smoothed) cross-entropy at training shapes is PyTorch's own op, log_softmax + nll_loss
    with native autograd nodes: at 128 x 5 a whole forward and backward costs about thirty microseconds,
    most of it fixed per-op and autograd cost that a Python autograd.Function adds to, never removes. It is
    the same row logsumexp computed once; half inputs are computed in float32 as everywhere else."""
    cdt = compute_dtype(input.dtype)
    z = input if input.dtype == cdt else input.to(cdt)
    loss = torch._C._nn.cross_entropy_loss(z, target, weight, _REDUCTION_ENUM[reduction], ignore_index,
                                           label_smoothing)
    return loss if loss.dtype == input.dtype else loss.to(input.dtype)


def _row_loss_by_autograd(input, target, row_loss, weight, transform, ignore_index, reduction):
    """The smallest batches (at most _TINY_ELEMS elements, e.g. 128 x 5) and small batches of many classes:
    -log p'_y per row from PyTorch's cross-entropy op (0 on ignored rows, where phi is then evaluated at
    p = 1 and weighted by 0; and the range check), phi through autograd. Inside a whole training step of the
    default model this costs what PyTorch's eager composition costs, where the one-shot closed form's two
    dozen extra dispatched ops cost ~20% more (docs/benchmarks.md). The logit transform, too, is
    differentiated by autograd."""
    cdt = compute_dtype(input.dtype)
    z = input if input.dtype == cdt else input.to(cdt)
    y = target.clamp(0, z.shape[1] - 1)  # ignored rows may hold any index; their weight is 0
    if transform is not None:
        z = transform.apply(z, y)
    neg_logpt = torch._C._nn.cross_entropy_loss(z, target, None, 0, ignore_index, 0.0)
    loss = neg_logpt if isinstance(row_loss, spec.NLL) else row_loss.value(neg_logpt.neg())
    if weight is None and not _has_ignored(target, ignore_index):  # the training loop: every row counts
        return _reduced(loss.sum() if reduction == "sum" else loss.mean() if reduction == "mean" else loss,
                        input.dtype)
    valid = target != ignore_index
    w_y = valid.to(cdt) if weight is None else weight.gather(0, y).mul_(valid)
    loss = loss * w_y
    if reduction != "none":
        loss = loss.sum() if reduction == "sum" else loss.sum() / w_y.sum()
    return _reduced(loss, input.dtype)


def _has_ignored(target: Tensor, ignore_index: int) -> bool:
    """Whether any row may be ignored: the one host read a small CPU loss call makes (the smallest batches
    have no cheaper way to skip the masking ops that ignored rows need). On a GPU the answer is "maybe",
    without a read, so that the call stays free of host synchronisation."""
    return target.is_cuda or bool((target == ignore_index).any())


def _reduced(loss: Tensor, dtype: torch.dtype) -> Tensor:
    return loss if loss.dtype == dtype else loss.to(dtype)


def _is_nll(row_loss) -> bool:
    """Row losses that are -log p_y exactly (focal with gamma 0 is weighted CE bit for bit)."""
    return isinstance(row_loss, spec.NLL) or (isinstance(row_loss, (spec.Focal, spec.Poly1))
                                               and getattr(row_loss, "gamma", getattr(row_loss, "epsilon", 1))
                                               == 0)


def _softmax_parts(z: Tensor):
    """(a, b, e, s) with log softmax(z) = a - b and softmax(z) = e / s, b = log s ((N, 1)). Below _SMALL_C
    classes from whole-tensor elementwise ops and two row reductions (PyTorch's row-softmax kernels spend
    ~60 ns of fixed cost per row there); above it from log_softmax, with b = None and s = 1."""
    if z.shape[1] >= _SMALL_C:
        a = torch.log_softmax(z, 1)
        return a, None, a.exp(), None
    a = z - z.amax(1, keepdim=True)
    e = a.exp()
    s = e.sum(1, keepdim=True)
    return a, s.log(), e, s


class _SmallSoftmax(torch.autograd.Function):
    """Small inputs: the whole batch in a few dispatched ops (at 128 x 5 each op's dispatch costs more than
    its math, so the op count is the cost). nll_loss gives -log p'_y per row (0 on ignored rows, where the
    row loss is then evaluated at p_y = 1 and weighted by 0) and does the target range check. Per row the
    gradient is coef_y (p' - onehot(y)) + s (W p' - w) with coef_y = (1-eps) w_y (-slope(log p'_y)) and the
    smoothing share s = eps/C, built in the forward as p' * (coef_y + s W) plus one scatter at y.
    Backward only scales the saved gradient."""

    @staticmethod
    def forward(ctx, input: Tensor, problem, reduction: str) -> Tensor:
        target, row_loss, weight, transform, ignore_index, eps = problem
        cdt = compute_dtype(input.dtype)
        z = input if input.dtype == cdt else input.to(cdt)
        n_classes = z.shape[1]
        # Ignored rows may hold any index; their weight is 0, so any column will do for them.
        y = target.clamp(0, n_classes - 1)[:, None]
        if transform is not None:
            z = transform.apply(z, y[:, 0])
        a, b, e, s = _softmax_parts(z)
        logp = a if b is None else a - b
        neg_logpt = torch._C._nn.nll_loss_nd(logp, target, None, 0, ignore_index)
        valid = target != ignore_index
        w_y = valid.to(cdt) if weight is None else weight.gather(0, y[:, 0]).mul_(valid)
        w_kept = w_y if not eps else w_y * (1 - eps)
        nll = isinstance(row_loss, spec.NLL)
        if nll:
            loss = neg_logpt.mul_(w_kept)
        else:
            value, slope = spec.value_and_slope(row_loss, neg_logpt.neg_())
            loss = value * w_kept  # value and slope may be a plugin's tensors: never written in place
        if eps:  # the smoothing share s_i = eps/C of sum_c w_c (-log p'_c)
            smooth = valid.to(cdt).mul_(eps / n_classes)
            loss = loss.sub_(smooth * (logp.sum(1) if weight is None else logp @ weight))
        denominator = w_y.sum() if reduction == "mean" else None
        if reduction != "none":
            loss = loss.sum() if denominator is None else loss.sum().div_(denominator)
        if ctx.needs_input_grad[0]:
            # coef_y = -slope w_y (1-eps) / D; an empty or all-ignored batch: NaN mean loss, zero gradient
            if nll:
                coef_y = w_kept
            else:
                coef_y = (slope * w_kept).neg_()
            if denominator is not None:
                inverse = denominator.clamp(min=torch.finfo(cdt).tiny).reciprocal_()
                coef_y = coef_y * inverse
                smooth = smooth.mul_(inverse) if eps else None
            coef = coef_y if not eps else coef_y + smooth * (n_classes if weight is None else weight.sum())
            grad = e.mul_(coef[:, None] if s is None else coef[:, None] / s)
            grad.scatter_add_(1, y, coef_y.neg()[:, None])
            if eps:
                grad = grad.sub_(smooth[:, None]) if weight is None else grad.addr_(smooth, weight, alpha=-1)
            scale = transform.scale if transform is not None else 1.0
            if isinstance(scale, Tensor) or scale != 1.0:
                grad = grad.mul_(scale)
            ctx.save_for_backward(grad)
        ctx.reduction, ctx.dtype = reduction, input.dtype
        return loss if loss.dtype == input.dtype else loss.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        # scaled in the compute dtype, rounded once to the input's dtype
        go = grad_output if grad_output.dtype == grad.dtype else grad_output.to(grad.dtype)
        grad = grad * (go[:, None] if ctx.reduction == "none" else go)
        grad = grad if grad.dtype == ctx.dtype else grad.to(ctx.dtype)
        if torch.is_grad_enabled():
            grad = _NoDoubleBackward.apply(grad.detach().requires_grad_())
        return grad, None, None


@dataclass(eq=False)
class _SoftmaxProbs:
    """Cross-entropy against probability targets t' = (1-eps) t + eps/C: l = -sum_c w_c t'_c log p_c, whose
    gradient is p * sum_c(w_c t'_c) - w * t'."""

    target: Tensor
    weight: Tensor | None
    eps: float
    elementwise = False
    slots = 1

    def denominator(self) -> Tensor:
        return torch.tensor(float(self.target.shape[0]), device=self.target.device)

    def chunk(self, x, rows, out, ws, s):
        (wt,) = ws
        logp = _log_softmax(x, out, wt)
        torch.mul(self.target[rows], 1 - self.eps, out=wt).add_(self.eps / x.shape[1])
        if self.weight is not None:
            wt.mul_(self.weight)
        loss = -torch.linalg.vecdot(wt, logp)
        if s is not None:
            s = s[:, None] if s.dim() == 1 else s
            p = logp.exp_()
            p.mul_(wt.sum(1, keepdim=True) * s).addcmul_(wt, s, value=-1)
        return loss


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing):
    """Index targets: softmax_loss with phi = -log p_y (PyTorch's cross-entropy). Probability targets:
    l_i = -sum_c w_c t'_ic log p_ic with t' = (1-eps) t + eps/C, `mean` over rows."""
    if not target.dtype.is_floating_point:
        return softmax_loss(input, target, _NLL, weight, None, ignore_index, reduction, label_smoothing)
    weight = None if weight is None else weight.to(compute_dtype(input.dtype))
    return _FusedLoss.apply(input, _SoftmaxProbs(target, weight, label_smoothing), reduction)


def focal_loss(input, target, gamma, alpha, ignore_index, reduction):
    """Softmax focal loss: softmax_loss with phi = -(1 - p_y)^gamma log p_y and alpha as the class weight."""
    return softmax_loss(input, target, spec.Focal(gamma), alpha, None, ignore_index, reduction, 0.0)


@dataclass(eq=False)
class _Mse:
    """Squared error e = pred - goal, pred = softmax(x) (probs) or x (logits). Through the softmax,
    dL/dx = p * (g - sum_k g_k p_k) with g = 2 e * scale. Ignored rows have e = 0 and leave the count."""

    target: Tensor
    valid: Tensor | None
    all_valid: bool
    on: str
    n_classes: int
    elementwise = True
    slots = 1

    def denominator(self) -> Tensor:
        rows = self.target.shape[0] if self.valid is None else self.valid.sum()
        return torch.as_tensor(rows * self.n_classes, device=self.target.device)

    def chunk(self, x, rows, out, ws, s):
        (err,) = ws
        pred = _softmax(x, out) if self.on == "probs" else x
        if self.valid is None:
            torch.sub(pred, self.target[rows], out=err)
        else:
            valid = self.valid[rows, None].to(x.dtype)
            err.copy_(pred).scatter_add_(1, self.target[rows, None], -valid)
            if not self.all_valid:
                err.mul_(valid)
        if s is None:
            return err.square_()
        loss = torch.linalg.vecdot(err, err)
        g = err.mul_(2 * s)  # s: 0-d, or (rows, C) in the backward of reduction="none"
        if self.on == "probs":
            out.mul_(g.sub_(torch.linalg.vecdot(g, out)[:, None]))
        else:
            out.copy_(g)
        return loss


def mse_loss(input, target, ignore_index, reduction, on):
    """Elementwise (pred - onehot(y))^2 with pred = softmax(x) (on="probs") or x (on="logits"), or against a
    probability target; `mean` divides by (non-ignored rows) * C."""
    if input.numel() <= _TINY_ELEMS:
        return _tiny_mse(input, target, ignore_index, reduction, on)
    if input.numel() <= _SMALL_ELEMS:
        return _SmallMse.apply(input, (target, ignore_index, on), reduction)
    if target.dtype.is_floating_point:
        kernel = _Mse(target, None, True, on, input.shape[1])
    else:
        valid = target != ignore_index
        kernel = _Mse(torch.where(valid, target, 0), valid, bool(valid.all()), on, input.shape[1])
    return _FusedLoss.apply(input, kernel, reduction)


def _tiny_mse(input, target, ignore_index, reduction, on):
    """The smallest batches (see _row_loss_by_autograd): PyTorch's softmax and mse_loss ops with autograd,
    ignored rows zeroed on both sides; one_hot range-checks the class indices. An all-ignored batch has a NaN
    mean and a zero gradient."""
    cdt = compute_dtype(input.dtype)
    z = input if input.dtype == cdt else input.to(cdt)
    pred = torch.softmax(z, 1) if on == "probs" else z
    if target.dtype.is_floating_point:
        loss = torch.nn.functional.mse_loss(pred, target.to(cdt), reduction=reduction)
        return loss if loss.dtype == input.dtype else loss.to(input.dtype)
    if not _has_ignored(target, ignore_index):  # the training loop's case: the plain composition
        goal = torch.nn.functional.one_hot(target, z.shape[1]).to(cdt)
        return _reduced(torch.nn.functional.mse_loss(pred, goal, reduction=reduction), input.dtype)
    valid = target != ignore_index
    kept = valid[:, None]
    goal = torch.nn.functional.one_hot(torch.where(valid, target, 0), z.shape[1]).mul_(kept)
    summed = "sum" if reduction == "mean" else reduction
    loss = torch.nn.functional.mse_loss(pred * kept, goal, reduction=summed)
    if reduction == "mean":
        count = valid.sum() * z.shape[1]
        loss = torch.where(count > 0, loss / count.clamp(min=1), torch.nan)
    return loss if loss.dtype == input.dtype else loss.to(input.dtype)


class _SmallMse(torch.autograd.Function):
    """Small inputs: err = pred - goal in a few whole-batch ops (the one-hot goal by one scatter, whose index
    check is the target range check), and for `mean`/`sum` the gradient in the forward: 2 err through the
    softmax, p (g - sum_k g_k p_k). Backward only scales it (`none` forms it there, per element)."""

    @staticmethod
    def forward(ctx, input: Tensor, problem, reduction: str) -> Tensor:
        target, ignore_index, on = problem
        cdt = compute_dtype(input.dtype)
        z = input if input.dtype == cdt else input.to(cdt)
        if on == "probs":
            _, _, e, s = _softmax_parts(z)
            pred = e if s is None else e.div_(s)
        else:
            pred = z
        if target.dtype.is_floating_point:
            err = pred - target.to(cdt)
            count = float(err.numel())
        else:  # ignored rows scatter nowhere (index 0, value 0) and are zeroed; others are range-checked
            valid = target != ignore_index
            kept = valid.to(cdt)
            err = pred.clone().scatter_add_(1, torch.where(valid, target, 0)[:, None], kept.neg()[:, None])
            err = err.mul_(kept[:, None])
            count = kept.sum().mul_(pred.shape[1])
        if reduction == "none":
            loss = err.square()
        else:
            flat = err.view(-1)
            loss = torch.dot(flat, flat)
            loss = loss / count if reduction == "mean" else loss
        ctx.reduction, ctx.dtype = reduction, input.dtype
        probs = pred if on == "probs" else None
        if reduction == "none" or not ctx.needs_input_grad[0]:
            ctx.save_for_backward(err, probs)
            return loss.to(input.dtype)
        # an empty or all-ignored batch: zero gradient, as PyTorch's
        scale = 2.0 if reduction == "sum" else 2 / (count.clamp(min=1) if isinstance(count, Tensor) else
                                                        max(count, 1.0))
        ctx.save_for_backward(_through_softmax(err.mul_(scale), probs), None)
        return loss.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        saved, probs = ctx.saved_tensors
        go = grad_output.to(saved.dtype)
        if ctx.reduction == "none":
            grad = _through_softmax(saved * (2 * go), probs)
        else:
            grad = saved * go
        grad = grad.to(ctx.dtype)
        if torch.is_grad_enabled():
            grad = _NoDoubleBackward.apply(grad.detach().requires_grad_())
        return grad, None, None


def _through_softmax(g: Tensor, probs: Tensor | None) -> Tensor:
    """dL/dx from g = dL/dpred: p (g - sum_k g_k p_k) when pred = softmax(x) (`probs` given), g itself when
    pred = x."""
    if probs is None:
        return g
    return g.sub_(torch.linalg.vecdot(g, probs)[:, None]).mul_(probs)


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
    if input.numel() <= _SMALL_ELEMS:
        return _small_bce(input, target, weight, pos_weight, reduction)
    return _FusedLoss.apply(input, _Bce(target, weight, pos_weight), reduction)


def _small_bce(input, target, weight, pos_weight, reduction):
    """At training shapes BCE is PyTorch's own element-wise op with its native autograd node, for the reason
    given in _small_cross_entropy; half inputs are computed in float32."""
    cdt = compute_dtype(input.dtype)
    x = input if input.dtype == cdt else input.to(cdt)
    t = target if target.dtype == cdt else target.to(cdt)
    loss = torch.binary_cross_entropy_with_logits(x, t, weight, pos_weight, _REDUCTION_ENUM[reduction])
    return loss if loss.dtype == input.dtype else loss.to(input.dtype)


@dataclass(eq=False)
class _SigmoidFocal(_PerElement):
    """torchvision's sigmoid focal loss ce * m^g * alpha_t, with m = 1 - p_t = s(x)(1-t) + s(-x) t formed
    without cancellation; dL/dx = alpha_t [(s - t) m^g + g m^g (ce/m) s(x) s(-x) (1 - 2t)], where ce/m -> 1
    as m -> 0."""

    target: Tensor
    alpha: float
    gamma: float
    slots = 5

    def chunk(self, x, rows, out, ws, s):
        ce, sig_neg, m, modulator, loss = ws
        t = self.target[rows]
        _softplus(x, ce).addcmul_(t, x, value=-1)
        sig = torch.sigmoid(x, out=out)
        torch.sigmoid(torch.neg(x, out=sig_neg), out=sig_neg)
        torch.addcmul(sig, sig, t, value=-1, out=m).addcmul_(sig_neg, t)
        torch.pow(m, self.gamma, out=modulator)
        torch.mul(ce, modulator, out=loss)
        if s is not None:
            # gamma m^(gamma-1) ce is formed as gamma m^gamma (ce/m), with ce/m -> 1 where m -> 0
            ratio = ce.div_(m).masked_fill_(m == 0, 1.0)
            ratio.mul_(modulator).mul_(sig).mul_(sig_neg)
            ratio.addcmul_(ratio, t, value=-2)  # times (1 - 2t)
            sig.sub_(t).mul_(modulator).add_(ratio, alpha=self.gamma).mul_(s)
        if self.alpha >= 0:  # alpha_t = alpha t + (1-alpha)(1-t) reuses sig_neg's buffer, no longer needed
            alpha_t = torch.mul(t, 2 * self.alpha - 1, out=sig_neg).add_(1 - self.alpha)
            loss.mul_(alpha_t)
            if s is not None:
                out.mul_(alpha_t)
        return loss if s is None else loss.sum(1)


def sigmoid_focal_loss(input, target, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss: alpha_t (1 - p_t)^gamma BCE(x, t), mean over all elements."""
    return _FusedLoss.apply(input, _SigmoidFocal(target, float(alpha), float(gamma)), reduction)


@dataclass(eq=False)
class _Asl(_PerElement):
    """Asymmetric loss, with p = s(x), q = 1 - p = s(-x) and p_m = max(p - clip, 0):
    l = t q^g+ softplus(-x) - (1-t) p_m^g- log(1 - p_m). dl/dx = t q^g+ (-g+ p softplus(-x) - q) +
    (1-t) [p_m > 0] p_m^g- p q (1 / (1 - p_m) - g- r) with r = log(1 - p_m) / p_m (-> -1 as p_m -> 0, so
    p_m^(g-1) is never formed) and 1 - p_m = q + clip there."""

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
        loss = _mix(t, q_pow * neg_logp, negative)
        if s is None:
            return loss
        d_positive = q_pow * (-self.gamma_pos * p * neg_logp - q)
        ratio = torch.where(p_m > 0, log_rest / p_m, -1.0)
        pq = p * q  # p q / (1 - p_m) is p when clip = 0, where 1 - p_m = q can underflow
        slope = p if self.clip == 0 else pq / rest
        d_negative = torch.where(p_m > 0, p_m_pow * (slope - self.gamma_neg * ratio * pq), 0.0)
        out.copy_(_mix(t, d_positive, d_negative)).mul_(s)
        return loss.sum(1)


def _mix(t: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    """t positive + (1 - t) negative, where a zero weight drops its term even when it is infinite."""
    return torch.where(t != 0, t * positive, 0.0) + torch.where(t != 1, (1 - t) * negative, 0.0)


def asl_loss(input, target, gamma_pos, gamma_neg, clip, reduction):
    """Asymmetric loss (Ridnik et al. 2021) per element, `mean` over all elements; see `_Asl`."""
    return _FusedLoss.apply(input, _Asl(target, float(gamma_pos), float(gamma_neg), float(clip)), reduction)
