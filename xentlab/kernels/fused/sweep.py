"""The sweep engine: one autograd.Function whose forward walks the logits once, in row chunks.

A kernel (a small dataclass of the loss's own arguments) gives `chunk(x, rows, out, ws, s)`: the loss of a
chunk of rows and, when a gradient scale `s` is given, that chunk's closed-form gradient written into `out`.
Each chunk's row statistic is computed once, in float32 (float64 for float64 inputs), and loss and gradient
come out of it while it is still in cache. For `mean`/`sum` the gradient is written during the forward pass
into one logits-sized buffer, the only thing saved; backward hands it over untouched when grad_output is 1
(autograd then adopts it as .grad without a copy). For `none` the forward saves only the logits and backward
re-sweeps them, because the gradient depends on the per-row/per-element grad_output.

Chunk temporaries live in a per-thread workspace reused across calls (at most a few x CHUNK_ELEMS elements):
fresh chunk-sized allocations cost page faults on every call, which on CPU can take longer than the math.
Peak extra memory is therefore the one logits-sized buffer plus that bounded workspace.
"""

from __future__ import annotations

import threading

import torch

from xentlab.kernels import compute_dtype, mean_over, reference
from xentlab.kernels.fused import sizes

Tensor = torch.Tensor

REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}  # PyTorch's own loss ops take the reduction as this enum
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


class FusedLoss(torch.autograd.Function):
    """Drives a chunk kernel: forward sweeps once (loss, and the gradient for mean/sum); backward either
    returns that gradient (times grad_output) or, for `none`, re-sweeps the saved logits with grad_output.
    `composable` is the same loss as the reference backend composes it, for `differentiable_gradient`."""

    @staticmethod
    def forward(ctx, input: Tensor, kernel, reduction: str, composable) -> Tensor:
        ctx.kernel, ctx.reduction, ctx.composable = kernel, reduction, composable
        want_grad = ctx.needs_input_grad[0]
        if reduction == "none" or not want_grad:
            ctx.save_for_backward(input)
            loss = sweep(kernel, input, None, None)
            if reduction != "none":
                loss = mean_over(loss.sum(), kernel.denominator()) if reduction == "mean" else loss.sum()
            return loss.to(input.dtype)
        cdt = compute_dtype(input.dtype)
        denominator = kernel.denominator().to(cdt) if reduction == "mean" else None
        scale = torch.ones((), dtype=cdt, device=input.device) if denominator is None else 1 / denominator
        grad = torch.empty_like(input)
        total = sweep(kernel, input, scale, grad)
        ctx.save_for_backward(input, grad)  # the logits for a create_graph backward: a reference, no copy
        return (total if denominator is None else mean_over(total, denominator)).to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if torch.is_grad_enabled():
            return differentiable_gradient(ctx, grad_output), None, None, None
        with torch.no_grad():
            return _input_gradient(ctx, grad_output), None, None, None


def _input_gradient(ctx, grad_output: Tensor) -> Tensor:
    saved = ctx.saved_tensors[-1]
    if ctx.reduction == "none":
        grad = torch.empty_like(saved)
        sweep(ctx.kernel, saved, grad_output.to(compute_dtype(saved.dtype)), grad)
        return grad
    if bool(grad_output == 1):
        return saved
    return saved * grad_output.to(saved.dtype)


def differentiable_gradient(ctx, grad_output: Tensor) -> Tensor:
    """The gradient when backward runs with grad mode on (create_graph=True, a Hessian-vector product): by
    autograd through `ctx.composable`, the reference composition, from the saved logits (the first saved
    tensor), so that it can be differentiated again exactly. The closed forms are first-order only."""
    return reference.gradient_of(ctx.composable, ctx.saved_tensors[:1], (True,), grad_output)[0]


def sweep(kernel, x: Tensor, scale: Tensor | None, grad: Tensor | None) -> Tensor:
    """Runs `kernel.chunk` over row chunks. Without `scale` it returns the full loss ((N,) per row or (N, C)
    per element); with `scale` it writes scale * gradient into `grad` and returns the summed loss."""
    n, c = x.shape
    cdt = compute_dtype(x.dtype)
    if x.numel() == 0:  # no rows or no classes: nothing to sweep (a `mean` is then 0/0, NaN, as PyTorch's)
        shape = () if scale is not None else (n, c) if kernel.elementwise else (n,)
        return torch.zeros(shape, dtype=cdt, device=x.device)
    step = sizes.chunk_rows(n, c)
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


def has_ignored(target: Tensor, ignore_index: int) -> bool:
    """Whether any row may be ignored: the one host read a small CPU loss call makes (the smallest batches
    have no cheaper way to skip the masking ops that ignored rows need). On a GPU the answer is "maybe",
    without a read, so that the call stays free of host synchronisation."""
    return target.is_cuda or bool((target == ignore_index).any())


def reduced(loss: Tensor, dtype: torch.dtype) -> Tensor:
    """`loss` in the input's dtype (a no-op when the arithmetic ran in it)."""
    return loss if loss.dtype == dtype else loss.to(dtype)
