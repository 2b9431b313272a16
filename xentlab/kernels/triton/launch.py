"""Launch heuristics and tuning state: tile shapes, warps, grid sizes, and the one place kernels are launched.

Short rows (next_power_of_2(C) within a register budget) share a [ROWS, BLOCK_C] tile, several rows per
program; long rows take one program each and are walked in BLOCK_C blocks, the grid capped at a few programs
per SM on CUDA so the rows in flight stay within L2. `_TUNING` overrides any of it (tests force the long-row
path at tiny C; scripts/bench_gpu.py --tune sweeps configurations).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from xentlab.kernels import compute_dtype
from xentlab.kernels.triton.epilogues import _rescale_kernel, _sigmoid_family_kernel, _softmax_family_kernel
from xentlab.kernels.triton.rows import (
    _CE,
    _FOCAL,
    _MSE_LOGITS,
    _MSE_PROBS,
    _OUT_NONE,
    _UP_ELEM,
    _UP_NONE,
    _UP_ROW,
    _denominator_kernel,
)

Tensor = torch.Tensor

_INTERPRETED = bool(triton.knobs.runtime.interpret)

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
# Launch-configuration overrides: keys of `_SoftmaxConfig` plus "max_programs" (grid cap). Empty in normal
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
