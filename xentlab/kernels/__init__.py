"""Backend choice for the loss kernels: "auto" | "fused" | "triton" | "reference".

Every backend module exposes
`softmax_loss(input, target, row_loss, weight, transform, ignore_index, reduction, label_smoothing)`, the
whole index-target softmax family over a row loss of log p_y and a logit transform (see
`xentlab.kernels.spec`), plus the losses with their own kernels (cross_entropy for probability targets,
mse_loss, binary_cross_entropy_with_logits, sigmoid_focal_loss, asl_loss), all over already-validated,
flattened (N, C) arguments.
Triton is imported only when the Triton backend is actually chosen, so importing xentlab never needs it.

Under torch.compile, torch.func transforms (vmap, grad, jvp, ...) and forward-mode AD every backend runs the
reference composition (`composable_only`): the compiler fuses it by itself, and the transforms need ops they
can see through, which a hand-written autograd.Function's closed-form gradient is not.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

import torch
import torch._C._functorch as _functorch
from torch.autograd import forward_ad

from xentlab.kernels.numerics import compute_dtype, mean_over  # noqa: F401 (every backend imports them here)

BACKENDS = ("auto", "fused", "triton", "reference")


@functools.cache  # find_spec searches sys.path on disk; the answer does not change within a process
def triton_available() -> bool:
    """True when the `triton` package can be imported; it is located, not imported, to keep imports lazy."""
    return importlib.util.find_spec("triton") is not None


def composable_only() -> bool:
    """Whether the call is being traced by torch.compile, runs inside a torch.func transform, or under
    forward-mode AD (a `torch.autograd.forward_ad.dual_level`): then only plain PyTorch ops compose."""
    return (torch.compiler.is_compiling() or _functorch.peek_interpreter_stack() is not None
            or forward_ad._current_level >= 0)


def get_backend(name: str, input: torch.Tensor) -> ModuleType:
    """The backend module for `name`: "auto" picks Triton for CUDA inputs when Triton is importable and the
    fused CPU path otherwise; "fused", "triton" and "reference" pick that module outright, except that every
    name is the reference composition where `composable_only()`."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if composable_only():
        name = "reference"
    elif name == "auto":
        name = "triton" if input.is_cuda and triton_available() else "fused"
    module = _loaded.get(name)
    if module is None:  # first use of this backend (this sits on every loss call's path: keep it a lookup)
        module = _loaded[name] = importlib.import_module(f"{__name__}.{name}")
    return module


_loaded: dict[str, ModuleType] = {}

# The reference composition is plain torch and cheap to import; loaded up front so that the path a compiled
# or transformed call takes never imports anything while being traced.
from xentlab.kernels import reference  # noqa: E402

_loaded["reference"] = reference
