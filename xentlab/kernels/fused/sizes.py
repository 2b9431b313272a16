"""The size thresholds that pick the CPU backend's route for each input, all in one place.

At the lab's training shapes (128 x 5) a dispatched op costs microseconds while its math costs nanoseconds, so
the op count is the whole cost; once rows leave cache the arithmetic and memory traffic are. Each loss
therefore has up to three routes (docs/benchmarks.md measures them):

- tiny: at most TINY_ELEMS elements, PyTorch's own row kernels with autograd's C++ nodes;
- one-shot: at most SMALL_ELEMS elements, the whole batch in a few dispatched ops, loss and closed-form
  gradient together in the forward;
- chunked: larger inputs, swept in row chunks of about CHUNK_ELEMS elements by `xentlab.kernels.fused.sweep`.

Tests monkeypatch these names to drive every route at small sizes, so the routes read them from this module
at call time.
"""

from __future__ import annotations

import torch

# Elements per row chunk: large enough that per-op overhead (dispatch, waking the intra-op threads) is small
# next to the math, small enough for a chunk's buffers to stay in cache. Inputs larger than 4 x
# MIN_CHUNK_ELEMS are cut into at least 4 chunks, so chunk temporaries stay well below the logits' size.
CHUNK_ELEMS = 1 << 20
MIN_CHUNK_ELEMS = 1 << 16
# Below this many classes PyTorch's row-softmax kernel is dominated by per-row overhead (~60 ns a row);
# compose it from whole-tensor ops instead.
SMALL_C = 64
# Inputs up to this many elements take the one-shot path: the whole batch in one pass of a few dispatched ops,
# loss and gradient in the forward. Chunking pays off only once rows leave cache.
SMALL_ELEMS = 1 << 16
# Up to this many elements (128 x 32) even the one-shot path's ~25 dispatched ops cost more than PyTorch's own
# row kernels plus autograd's C++ nodes do, measured inside a whole training step of the default model.
TINY_ELEMS = 1 << 12
# From SMALL_C classes on, PyTorch's row kernels win at every size up to this many elements (4096 x 128).
ROWS_ELEMS = 1 << 19


def is_tiny(input: torch.Tensor) -> bool:
    """At most TINY_ELEMS elements: PyTorch's own ops and autograd beat any closed form."""
    return input.numel() <= TINY_ELEMS


def is_one_shot(input: torch.Tensor) -> bool:
    """At most SMALL_ELEMS elements: one pass over the whole batch instead of row chunks."""
    return input.numel() <= SMALL_ELEMS


def few_classes(n_classes: int) -> bool:
    """Rows short enough that composing the softmax from whole-tensor ops beats PyTorch's row kernel."""
    return n_classes < SMALL_C


def pytorch_rows_win(input: torch.Tensor) -> bool:
    """Where PyTorch's own row kernels plus autograd beat the closed-form paths for the softmax family: the
    smallest batches, and training batches of SMALL_C classes or more (up to ROWS_ELEMS elements)."""
    elems = input.numel()
    return elems <= TINY_ELEMS or (input.shape[1] >= SMALL_C and elems <= ROWS_ELEMS)


def chunk_rows(n_rows: int, n_classes: int) -> int:
    """Rows per chunk of the sweep: about CHUNK_ELEMS elements, 4 or more above 4 x MIN_CHUNK_ELEMS."""
    return max(1, min(CHUNK_ELEMS, max(MIN_CHUNK_ELEMS, n_rows * n_classes // 4)) // n_classes)
