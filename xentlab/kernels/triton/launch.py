"""Launch heuristics and tuning state: tile shapes, warps, grid sizes, and the one place kernels are launched.

Row kernels (the row statistics, the probability-target CE/MSE kernel): short rows (next_power_of_2(C)
within a register budget) share a [ROWS, BLOCK_C] tile, several rows per program; long rows take one program
each and are walked in BLOCK_C blocks, the grid of the two-walk kernel capped at a few programs per SM on
CUDA so the rows in flight stay within L2. Element-wise kernels (the index-target gradient, the sigmoid
family) run on a 2-D grid of [ROWS, BLOCK_C] tiles. `_TUNING` overrides the row-kernel choices (tests force
the long-row path at tiny C; scripts/bench_gpu.py --tune sweeps configurations).
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
from xentlab.kernels.triton.epilogues import (
    _sigmoid_family_kernel,
    _softmax_family_kernel,
    _softmax_grad_kernel,
)
from xentlab.kernels.triton.rows import (
    _MSE_LOGITS,
    _MSE_PROBS,
    _OUT_NONE,
    _UP_ELEM,
    _UP_NONE,
    _UP_ROW,
    _UP_SCALAR,
    _row_stats_kernel,
)

Tensor = torch.Tensor

_INTERPRETED = bool(triton.knobs.runtime.interpret)

# Largest next_power_of_2(C) kept whole in registers, by element size; longer rows are walked in blocks.
# Set so ptxas (sm_90) reports no spills for plain cross-entropy: 32768 columns at 16 warps already spill.
_ONE_BLOCK_LIMIT = {2: 16384, 4: 16384, 8: 4096}
_LONG_BLOCK = {2: 8192, 4: 4096, 8: 2048}
_TILE = 4096  # elements per program for short rows and element-wise tiles
_LONG_PROGRAMS_PER_SM = 2
# Launch-configuration overrides: keys of `_SoftmaxConfig` plus "max_programs" (grid cap). Empty in normal
# use; tests set it to force the long-row path at tiny C, scripts/bench_gpu.py --tune to try configurations.
_TUNING: dict = {}


@dataclass(frozen=True)
class _Spec:
    """The non-tensor arguments of one probability-target CE, MSE or element-wise loss call."""

    loss: int
    reduction: str
    ignore_index: int = -100
    eps: float = 0.0
    gamma: float = 0.0
    alpha: float = -1.0
    gamma_neg: float = 0.0
    clip: float = 0.0
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


def _softmax_config(n_cols: int, elem_size: int, two_walks: bool = True) -> _SoftmaxConfig:
    """Whole rows in a register tile when they fit (several per program when short), else blocks of a row. A
    kernel that reads a row once gains nothing from holding more than one block of it in registers."""
    width = triton.next_power_of_2(n_cols)
    if width <= (_ONE_BLOCK_LIMIT if two_walks else _LONG_BLOCK)[elem_size]:
        rows = max(1, _TILE // width)
        config = _SoftmaxConfig(rows, width, True, _warps(rows * width))
    else:
        config = _SoftmaxConfig(1, _LONG_BLOCK[elem_size], False, _warps(_LONG_BLOCK[elem_size]))
    return config._replace(**{k: v for k, v in _TUNING.items() if k in _SoftmaxConfig._fields})


def _softmax_launch(x: Tensor, two_walks: bool = True) -> tuple[_SoftmaxConfig, int]:
    """The configuration and the grid size; a kernel that walks long rows twice caps the grid at a few
    programs per SM, so the second walk finds the row in L2."""
    n, c = x.shape
    config = _softmax_config(c, x.element_size(), two_walks)
    n_blocks = triton.cdiv(n, config.rows)
    cap = _TUNING.get("max_programs")
    if cap is None and two_walks and x.is_cuda and not config.one_block:
        cap = _sm_count(x.device.index) * _LONG_PROGRAMS_PER_SM  # a CUDA tensor's device has an index
    return config, min(n_blocks, cap) if cap else n_blocks


def _tile_grid(n: int, c: int) -> tuple[tuple[int, int], int, int]:
    """A 2-D grid of [rows, block_c] tiles for the element-wise kernels."""
    block_c = min(triton.next_power_of_2(c), 1024)
    rows = max(1, _TILE // block_c)
    return (triton.cdiv(n, rows), triton.cdiv(c, block_c)), rows, block_c


def _up_mode(upstream: Tensor | None):
    if upstream is None:
        return _UP_NONE
    return {0: _UP_SCALAR, 1: _UP_ROW, 2: _UP_ELEM}[upstream.dim()]


# ------------------------------------------------------------------ index targets: row statistics, gradient


def _transform_args(transform, x: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(scale, bias, margin) as contiguous (C,) vectors in the compute dtype, None where absent; a scale of
    1.0 is absent, another number becomes a (C,) vector by a device fill (no host-to-device copy, which a
    CUDA graph could not capture)."""
    if transform is None:
        return None, None, None
    c, dtype = x.shape[1], compute_dtype(x.dtype)

    def vector(v):
        if v is None or isinstance(v, Tensor):
            return None if v is None else v.to(device=x.device, dtype=dtype).expand(c).contiguous()
        return torch.full((c,), float(v), dtype=dtype, device=x.device)

    scale = transform.scale
    scale = None if not isinstance(scale, Tensor) and float(scale) == 1.0 else vector(scale)
    return scale, vector(transform.bias), vector(transform.margin)


def _launch_row_stats(x: Tensor, target: Tensor, weight: Tensor | None, vectors, ignore_index: int,
                      smooth: bool) -> tuple[Tensor, ...]:
    """Per row, in the compute dtype: lse', log p'_y, w[y] and (with `smooth`, else None) the smoothing sum
    sum_c w_c (lse' - z'_c) and the 0/1 kept-row indicator; ignored rows give log p'_y = 0 and zeros."""
    n, c = x.shape
    dtype = compute_dtype(x.dtype)
    lse, logpt, w_y = (torch.empty(n, dtype=dtype, device=x.device) for _ in range(3))
    smoothing, kept = (torch.empty(n, dtype=dtype, device=x.device) if smooth else None for _ in range(2))
    if n:
        scale, bias, margin = vectors
        config, grid = _softmax_launch(x, two_walks=False)
        tensors = (x if v is None else v for v in (weight, *vectors))
        _launch(_row_stats_kernel, (grid,), config.num_warps,
                x, x.stride(0), target, target.stride(0), *tensors, lse, logpt, w_y,
                lse if smoothing is None else smoothing, lse if kept is None else kept, n, c, ignore_index,
                HAS_WEIGHT=weight is not None, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
                HAS_MARGIN=margin is not None, SMOOTH=smooth, ONE_BLOCK=config.one_block, ROWS=config.rows,
                BLOCK_C=config.block_c, ACC=_acc(x))
    return lse, logpt, w_y, smoothing, kept


def _launch_softmax_grad(x: Tensor, target: Tensor, weight: Tensor | None, vectors, ignore_index: int,
                         lse: Tensor, c_p: Tensor, c_y: Tensor, c_w: Tensor | None, grad: Tensor) -> None:
    """grad = scale_c (c_p p' - c_y onehot(y) - c_w w), element-wise over the logits (grad may be x)."""
    n, c = x.shape
    if n * c == 0:
        return
    scale, bias, margin = vectors
    grid, rows, block_c = _tile_grid(n, c)
    _launch(_softmax_grad_kernel, grid, _warps(rows * block_c),
            x, x.stride(0), target, target.stride(0), *(x if v is None else v for v in (weight, *vectors)),
            lse, c_p, c_y, lse if c_w is None else c_w, grad, n, c, ignore_index,
            HAS_WEIGHT=weight is not None, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
            HAS_MARGIN=margin is not None, SMOOTH=c_w is not None, ROWS=rows, BLOCK_C=block_c, ACC=_acc(x))


# ------------------------------------------------------------ probability-target CE, MSE; element-wise


def _launch_softmax(x: Tensor, target: Tensor, weight: Tensor | None, spec: _Spec, *,
                    grad: Tensor | None = None, tgrad: Tensor | None = None, loss: Tensor | None = None,
                    loss_out=_OUT_NONE, upstream: Tensor | None = None) -> None:
    """One launch of the probability-target CE / MSE kernel: the loss (no upstream) or the gradients (with
    grad_output as `upstream`: a scalar for mean/sum, per row or per element for `none`)."""
    n, c = x.shape
    if n == 0:
        return
    prob = target.is_floating_point()
    config, grid = _softmax_launch(x)
    den, den_count = None, 1
    if spec.reduction == "mean" and (upstream is None or upstream.dim() == 0):
        den_count = c if spec.loss in (_MSE_PROBS, _MSE_LOGITS) else 1
        if prob:
            den_count *= n
        else:  # the kept rows, counted on the device (out-of-range indices count as ignored, as in rows.py)
            kept = (target != spec.ignore_index) & (target >= 0) & (target < c)
            den = kept.sum().to(compute_dtype(x.dtype))
    up_strides = (0, 0) if upstream is None else (tuple(upstream.stride()) + (0, 0))[:2]
    t_strides = (tuple(target.stride()) + (0,))[:2]
    _launch(_softmax_family_kernel, (grid,), config.num_warps,
            x, x.stride(0), target, *t_strides, x if weight is None else weight,
            x if upstream is None else upstream, *up_strides, x if grad is None else grad,
            x if tgrad is None else tgrad, x if loss is None else loss, x if den is None else den, den_count,
            n, c, spec.ignore_index, *_split(spec.eps),
            LOSS=spec.loss, PROB_TARGET=prob, HAS_WEIGHT=weight is not None, SMOOTH=spec.eps > 0,
            HAS_DEN=den is not None, UPSTREAM=_up_mode(upstream), WRITE_GRAD=grad is not None,
            WRITE_TGRAD=tgrad is not None, LOSS_OUT=loss_out, ONE_BLOCK=config.one_block, ROWS=config.rows,
            BLOCK_C=config.block_c, ACC=_acc(x))


def _launch_sigmoid(x: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None,
                    spec: _Spec, *, grad: Tensor | None = None, tgrad: Tensor | None = None,
                    loss: Tensor | None = None, loss_out=_OUT_NONE, upstream: Tensor | None = None) -> None:
    """One launch of the element-wise kernel; weight and pos_weight are broadcast to (N, C) as stride-0
    views."""
    n, c = x.shape
    if n * c == 0:
        return
    grid, rows, block_c = _tile_grid(n, c)
    w = x if weight is None else torch.broadcast_to(weight, (n, c))
    pw = x if pos_weight is None else torch.broadcast_to(pos_weight, (n, c))
    u = x if upstream is None else upstream
    u_strides = (tuple(u.stride()) + (0, 0))[:2]
    den_count = n * c if spec.reduction == "mean" and (upstream is None or upstream.dim() == 0) else 1
    _launch(_sigmoid_family_kernel, grid, _warps(rows * block_c),
            x, x.stride(0), target, *target.stride(), w, *w.stride(), pw, *pw.stride(), u, *u_strides,
            x if grad is None else grad, x if tgrad is None else tgrad, x if loss is None else loss, n, c,
            den_count, *_split(spec.alpha), *_split(spec.gamma), *_split(spec.gamma_neg), *_split(spec.clip),
            LOSS=spec.loss, HAS_WEIGHT=weight is not None, HAS_POS_WEIGHT=pos_weight is not None,
            HAS_ALPHA=spec.alpha >= 0, UPSTREAM=_up_mode(upstream), WRITE_GRAD=grad is not None,
            WRITE_TGRAD=tgrad is not None, LOSS_OUT=loss_out, ROWS=rows, BLOCK_C=block_c, ACC=_acc(x))
