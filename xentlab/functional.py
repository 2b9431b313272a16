"""The loss API: PyTorch-style functions that check every argument, flatten, and dispatch to a backend.

All validation lives here and runs before any kernel, so a bad target is a ValueError naming the value, never
a device-side assert; the one exception is the class-index range check at the fused backend's training
shapes, which PyTorch's kernels do as the loss runs (`_with_index_check` turns their error into the same
ValueError). Inputs (N, C, d1, ...) follow PyTorch's class-dimension-1 convention for the softmax
family; they are flattened to (N*d1*..., C) rows and `reduction="none"` outputs are reshaped back. The
semantics are those of docs/losses.md; `backend` is "auto" | "fused" | "triton" | "reference".

Every loss takes `validate=True`. `validate=False` skips only the checks that read tensor values on the host
(class indices in range, weights finite and >= 0, binary targets in [0, 1]), each a device synchronisation,
so that a CUDA graph can capture the call; types, dtypes, shapes, devices and scalar parameters are still
checked. Out-of-range targets then give undefined values (the Triton kernels treat them as ignored rows and
never read out of bounds) instead of a ValueError.

Autograd, however entered: gradients of every order are exact on every backend (the fused and Triton
backends differentiate the reference composition when their backward runs under create_graph=True). Inside
torch.func transforms (vmap, grad, jvp, ...), under forward-mode AD and while torch.compile traces, every
backend runs the reference composition (`xentlab.kernels.composable_only`). Under vmap the value checks read
the whole batch's values behind the transform, so they still run; while torch.compile traces they are
skipped, as with `validate=False` (a host read would break the graph): check inputs eagerly before a compiled
call where that matters.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math

import torch
import torch._C._functorch as _functorch

from xentlab.kernels import compute_dtype, get_backend, spec

Tensor = torch.Tensor

REDUCTIONS = ("none", "mean", "sum")
MSE_TARGETS = ("probs", "logits")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NLL = spec.NLL()
_CHECK_VALUES = contextvars.ContextVar("xentlab_check_values", default=True)


def _validating(loss):
    """Adds the keyword-only `validate` (see the module docstring) to a public loss function."""
    @functools.wraps(loss)
    def wrapper(*args, validate: bool = True, **kwargs):
        # the common case, and torch.compile's (which skips the value checks and must not trace a ContextVar)
        if torch.compiler.is_compiling() or (validate is True and _CHECK_VALUES.get()):
            return loss(*args, **kwargs)
        if not isinstance(validate, bool):
            raise TypeError(f"validate must be True or False, got {validate!r}")
        token = _CHECK_VALUES.set(validate)
        try:
            return loss(*args, **kwargs)
        finally:
            _CHECK_VALUES.reset(token)

    signature = inspect.signature(loss)
    keyword = inspect.Parameter("validate", inspect.Parameter.KEYWORD_ONLY, default=True, annotation="bool")
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), keyword])
    return wrapper


@_validating
def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, backend: str = "auto") -> Tensor:
    """Cross-entropy with `torch.nn.functional.cross_entropy`'s semantics. Index targets: l_i = (1-eps) w[y_i]
    (lse_i - x_iy) + (eps/C) sum_c w_c (lse_i - x_ic), rows with y_i == ignore_index contribute nothing, and
    `mean` divides by sum of w[y_i] over the other rows. Probability targets (the input's shape and dtype):
    l_i = -sum_c w_c t'_ic log p_ic with t' = (1-eps) t + eps/C, and `mean` divides by the number of rows."""
    n_classes = _check_softmax_input(input)
    _check_reduction(reduction)
    _check_int("ignore_index", ignore_index)
    eps = spec.check_parameter("label_smoothing", label_smoothing)
    weight = _class_vector("weight", weight, n_classes, input)
    target = _softmax_target(target, input, n_classes, ignore_index, allow_probs=True)
    if target.dtype.is_floating_point:
        out = _backend_for(backend, input, target).cross_entropy(_rows(input), target, weight, ignore_index,
                                                                 reduction, eps)
        return _unflatten_rows(out, input, reduction)
    return _softmax_loss(backend, input, target, _NLL, weight, None, ignore_index, reduction, eps)


@_validating
def focal_loss(input: Tensor, target: Tensor, gamma: float = 2.0, alpha: Tensor | None = None,
               ignore_index: int = -100, reduction: str = "mean", *, backend: str = "auto") -> Tensor:
    """Softmax focal loss (Lin et al. 2017), l_i = -a[y_i] (1 - p_iy)^gamma log p_iy with p = softmax(x) and a
    per-class alpha (1 when absent). `mean` divides by the sum of a[y_i] over non-ignored rows, so gamma=0
    equals cross_entropy(weight=alpha) exactly."""
    n_classes = _check_softmax_input(input)
    _check_reduction(reduction)
    _check_int("ignore_index", ignore_index)
    row_loss = spec.Focal(gamma)
    alpha = _class_vector("alpha", alpha, n_classes, input)
    target = _softmax_target(target, input, n_classes, ignore_index, allow_probs=False)
    return _softmax_loss(backend, input, target, row_loss, alpha, None, ignore_index, reduction, 0.0)


@_validating
def mse_loss(input: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean", *,
             on: str = "probs", backend: str = "auto") -> Tensor:
    """Squared error against the one-hot (or probability) target: sum (pred - onehot(y))^2 with pred =
    softmax(x) (on="probs", the default) or the raw logits (on="logits", Hui & Belkin 2021). Ignored rows are
    zero and `mean` divides by (non-ignored rows) * C, i.e. F.mse_loss over the kept rows."""
    n_classes = _check_softmax_input(input)
    _check_reduction(reduction)
    _check_int("ignore_index", ignore_index)
    if on not in MSE_TARGETS:
        raise ValueError(f"on must be one of {MSE_TARGETS}, got {on!r}")
    target = _softmax_target(target, input, n_classes, ignore_index, allow_probs=True)
    module, rows = _backend_for(backend, input, target), _rows(input)
    out = _with_index_check(module, rows, target, ignore_index,
                            lambda: module.mse_loss(rows, target, ignore_index, reduction, on))
    if reduction != "none" or input.dim() == 2:
        return out
    if input.dim() == 1:
        return out.reshape(n_classes)
    return out.reshape(input.shape[0], *input.shape[2:], n_classes).movedim(-1, 1)


@_validating
def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Tensor | None = None,
                                     pos_weight: Tensor | None = None, reduction: str = "mean", *,
                                     backend: str = "auto") -> Tensor:
    """Element-wise BCE on logits with `F.binary_cross_entropy_with_logits`'s semantics:
    l = -weight [pos_weight t log sigmoid(x) + (1-t) log sigmoid(-x)], soft targets in [0, 1], `mean` over
    all elements. weight broadcasts to the input; pos_weight is a scalar or one value per entry of the input's
    last dimension (the label dimension)."""
    _check_float_input(input)
    _check_reduction(reduction)
    target = _binary_target(target, input)
    weight = _elementwise_weight(weight, input)
    pos_weight = _pos_weight(pos_weight, input)
    out = _backend_for(backend, input, target).binary_cross_entropy_with_logits(
        _elements(input), target, weight, pos_weight, reduction)
    return out.reshape(input.shape) if reduction == "none" else out


@_validating
def sigmoid_focal_loss(input: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "mean", *, backend: str = "auto") -> Tensor:
    """`torchvision.ops.sigmoid_focal_loss`: alpha_t (1 - p_t)^gamma BCE(x, t) with p = sigmoid(x),
    p_t = p t + (1-p)(1-t) and alpha_t = alpha t + (1-alpha)(1-t); alpha < 0 disables the alpha term."""
    _check_float_input(input)
    _check_reduction(reduction)
    alpha = spec.check_parameter("alpha", alpha)
    gamma = spec.check_parameter("gamma", gamma)
    target = _binary_target(target, input)
    out = _backend_for(backend, input, target).sigmoid_focal_loss(_elements(input), target, alpha, gamma,
                                                                  reduction)
    return out.reshape(input.shape) if reduction == "none" else out


@_validating
def logit_adjusted_loss(input: Tensor, target: Tensor, log_prior: Tensor, tau: float = 1.0,
                        weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean", *,
                        backend: str = "auto") -> Tensor:
    """Logit-adjusted cross-entropy (Menon et al. 2021): cross-entropy of z + tau log pi, with log pi the
    (C,) log class priors of the training split (`xentlab.weights.log_priors`), l_i = lse(z_i + tau log pi)
    - z_iy - tau log pi_y. tau = 1 is Balanced Softmax (Ren et al. 2020). `mean` as cross_entropy."""
    n_classes = _check_softmax_input(input)
    tau = spec.check_parameter("tau", tau)
    log_prior = _class_values("log_prior", log_prior, n_classes, input, nonnegative=False)
    transform = spec.LogitTransform(bias=tau * log_prior)
    return _softmax_family(input, target, _NLL, weight, transform, ignore_index, reduction, backend)


@_validating
def ldam_loss(input: Tensor, target: Tensor, margins: Tensor, scale: float = 30.0,
              weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean", *,
              backend: str = "auto") -> Tensor:
    """LDAM (Cao et al. 2019): cross-entropy of s (z - Delta_y e_y), the true class's logit lowered by its
    margin Delta_y before scaling by s, l_i = lse(s z'_i) - s (z_iy - Delta_y) with z'_ic = z_ic - [c = y_i]
    Delta_c. `margins` is (C,), >= 0 (`xentlab.weights.ldam_margins`); `weight` (the deferred re-weighting)
    and `mean` as cross_entropy."""
    n_classes = _check_softmax_input(input)
    scale = spec.check_parameter("scale", scale)
    margins = _class_values("margins", margins, n_classes, input)
    transform = spec.LogitTransform(scale=scale, margin=margins)
    return _softmax_family(input, target, _NLL, weight, transform, ignore_index, reduction, backend)


@_validating
def poly1_loss(input: Tensor, target: Tensor, epsilon: float = 1.0, weight: Tensor | None = None,
               ignore_index: int = -100, reduction: str = "mean", *, backend: str = "auto") -> Tensor:
    """Poly-1 (Leng et al. 2022): l_i = w[y_i] [-log p_iy + epsilon (1 - p_iy)], epsilon >= -1; `mean`
    divides by the sum of w[y_i] over non-ignored rows, so epsilon = 0 is cross_entropy."""
    _check_softmax_input(input)
    row_loss = spec.Poly1(epsilon)
    return _softmax_family(input, target, row_loss, weight, None, ignore_index, reduction, backend)


@_validating
def gce_loss(input: Tensor, target: Tensor, q: float = 0.7, weight: Tensor | None = None,
             ignore_index: int = -100, reduction: str = "mean", *, backend: str = "auto") -> Tensor:
    """Generalised cross-entropy (Zhang & Sabuncu 2018), robust to label noise: l_i = w[y_i] (1 - p_iy^q) / q
    with q in (0, 1] (q -> 0 is cross-entropy, q = 1 the mean absolute error of p_y); `mean` as
    cross_entropy."""
    _check_softmax_input(input)
    return _softmax_family(input, target, spec.GCE(q), weight, None, ignore_index, reduction, backend)


@_validating
def asymmetric_loss(input: Tensor, target: Tensor, gamma_pos: float = 0.0, gamma_neg: float = 4.0,
                    clip: float = 0.05, reduction: str = "mean", *, backend: str = "auto") -> Tensor:
    """Asymmetric loss for multi-label data (Ridnik et al. 2021), per element with p = sigmoid(x) and the
    shifted probability p_m = max(p - clip, 0): l = -[t (1-p)^gamma_pos log p + (1-t) p_m^gamma_neg
    log(1 - p_m)]; soft targets in [0, 1]; `mean` over all elements, like binary_cross_entropy_with_logits.
    gamma_pos = gamma_neg = clip = 0 is BCE."""
    _check_float_input(input)
    _check_reduction(reduction)
    gamma_pos = spec.check_parameter("gamma_pos", gamma_pos)
    gamma_neg = spec.check_parameter("gamma_neg", gamma_neg)
    clip = spec.check_parameter("clip", clip)
    target = _binary_target(target, input)
    out = _backend_for(backend, input, target).asl_loss(_elements(input), target, gamma_pos, gamma_neg, clip,
                                               reduction)
    return out.reshape(input.shape) if reduction == "none" else out


@_validating
def softmax_loss(input: Tensor, target: Tensor, row_loss: spec.RowLoss, weight: Tensor | None = None,
                 transform: spec.LogitTransform | None = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, backend: str = "auto") -> Tensor:
    """Any loss of the true-class probability after a logit transform, on every backend: per non-ignored row,
    with z' = transform(z) and p' = softmax(z'), l_i = (1-eps) w[y_i] phi(log p'_iy) + (eps/C) sum_c w_c
    (lse'_i - z'_ic), and `mean` divides by the sum of w[y_i] over non-ignored rows. `row_loss` gives phi
    and its slope (see `xentlab.kernels.spec`: NLL, Focal, Poly1, GCE, or your own); the gradient is
    -slope(log p'_y) w_y (p' - onehot(y)) times the transform's scale. Class-index targets only."""
    n_classes = _check_softmax_input(input)
    eps = spec.check_parameter("label_smoothing", label_smoothing)
    if not (callable(getattr(row_loss, "value", None)) and callable(getattr(row_loss, "slope", None))):
        raise TypeError(f"row_loss must have value(logpt) and slope(logpt) methods (a xentlab.kernels.spec "
                        f"RowLoss), got {type(row_loss).__name__}")
    if transform is not None and not isinstance(transform, spec.LogitTransform):
        raise TypeError(f"transform must be a LogitTransform or None, got {type(transform).__name__}")
    transform = _transform(transform, n_classes, input)
    if _learns(row_loss):  # only autograd through its value() gives its own tensors a gradient
        backend = "reference"
    return _softmax_family(input, target, row_loss, weight, transform, ignore_index, reduction, backend, eps)


def _learns(row_loss) -> bool:
    """Whether a (plugin's) row loss holds a tensor that requires grad, with grad mode on."""
    if not torch.is_grad_enabled():
        return False
    if isinstance(row_loss, torch.nn.Module):
        return any(p.requires_grad for p in row_loss.parameters())
    return any(isinstance(v, Tensor) and v.requires_grad for v in getattr(row_loss, "__dict__", {}).values())


def _softmax_family(input, target, row_loss, weight, transform, ignore_index, reduction, backend, eps=0.0):
    """The checks every index-target softmax loss shares (input already checked), then the backend."""
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    _check_reduction(reduction)
    _check_int("ignore_index", ignore_index)
    weight = _class_vector("weight", weight, n_classes, input)
    target = _softmax_target(target, input, n_classes, ignore_index, allow_probs=False)
    return _softmax_loss(backend, input, target, row_loss, weight, transform, ignore_index, reduction, eps)


def _softmax_loss(backend, input, target, row_loss, weight, transform, ignore_index, reduction, eps):
    module, rows = get_backend(backend, input), _rows(input)
    out = _with_index_check(module, rows, target, ignore_index, lambda: module.softmax_loss(
        rows, target, row_loss, weight, transform, ignore_index, reduction, eps))
    return _unflatten_rows(out, input, reduction)


def _with_index_check(module, rows: Tensor, target: Tensor, ignore_index: int, call):
    """Runs the backend call with class indices checked (integer targets only): by the backend's own kernels
    where it says so (`checks_targets`, PyTorch's nll and scatter kernels raising IndexError/RuntimeError,
    translated here into xentlab's ValueError), otherwise by one host-synchronising check before the call."""
    if target.dtype.is_floating_point or not _checking_values():
        return call()
    checks = getattr(module, "checks_targets", None)
    if checks is None or not checks(rows):
        _raise_if_bad_indices(target, rows.shape[1], ignore_index)
        return call()
    try:
        return call()
    except (IndexError, RuntimeError):
        problem = _bad_index_message(target, rows.shape[1], ignore_index)
        if problem is None:
            raise
    raise ValueError(problem)


def _bad_index_message(target: Tensor, n_classes: int, ignore_index: int) -> str | None:
    target = _values(target)
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if not bool(bad.any()):
        return None
    return (f"target contains class index {target[bad][0].item()}, outside [0, {n_classes}) for "
            f"C={n_classes} classes and not ignore_index={ignore_index}")


def _raise_if_bad_indices(target: Tensor, n_classes: int, ignore_index: int) -> None:
    problem = _bad_index_message(target, n_classes, ignore_index)
    if problem is not None:
        raise ValueError(problem)


# ---------------------------------------------------------------- argument checks


def _checking_values() -> bool:
    """Whether the checks that read tensor values run: not with validate=False, nor while torch.compile
    traces (a host read would break the graph; see the module docstring)."""
    return not torch.compiler.is_compiling() and _CHECK_VALUES.get()


def _values(t: Tensor) -> Tensor:
    """The plain tensor behind torch.func's wrappers (vmap's batched tensors hold every sample's values), so a
    value check reads the whole batch instead of failing on a data-dependent branch inside the transform."""
    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    return t


def _backend_for(backend: str, input: Tensor, target: Tensor):
    """The backend module, except that a floating-point target that requires grad (a soft label being learnt,
    distillation) is differentiated by the reference backend's autograd, as PyTorch differentiates it: the
    fused and Triton kernels return the gradient of the logits only."""
    module = get_backend(backend, input)
    if target.requires_grad and torch.is_grad_enabled():
        return get_backend("reference", input)
    return module


def _check_tensor(name: str, value) -> None:
    """A torch.Tensor, dense: sparse and meta tensors are refused up front, not deep inside a kernel."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}; convert it "
                        f"with .to_dense()")
    if value.is_meta:
        raise TypeError(f"{name} is a meta tensor (a shape and dtype without data); a loss needs real values")


def _check_constant(name: str, value) -> None:
    """A tensor (`_check_tensor`) that is a constant of the loss: weight, alpha, pos_weight and the
    transform's tensors, as PyTorch treats weight and pos_weight; one that requires grad is refused rather
    than silently given no gradient."""
    _check_tensor(name, value)
    if value.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but xentlab's losses take it as a constant (PyTorch refuses "
                         f"a weight or pos_weight that requires grad too); pass {name}.detach()")


def _check_float_input(input) -> None:
    _check_tensor("input", input)
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input dtype must be one of float16, bfloat16, float32, float64, got {input.dtype}")


def _check_softmax_input(input) -> int:
    """Checks a (C,) or (N, C, d1, ...) logits tensor and returns C."""
    _check_float_input(input)
    if input.dim() == 0:
        raise ValueError("input must have a class dimension: shape (C,) or (N, C, d1, ...), got a 0-d tensor")
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if n_classes < 1:
        raise ValueError(f"input must have at least one class (C >= 1), got shape {tuple(input.shape)}")
    return n_classes


def _check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")


def _check_weights(name: str, values: Tensor, nonnegative: bool = True) -> None:
    if values.dtype.is_complex or values.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {values.dtype}")
    if not _checking_values():
        return
    values = _values(values)
    bad = ~torch.isfinite(values)
    if nonnegative:
        bad = bad | (values < 0)
    if bool(bad.any()):
        rule = "finite and >= 0" if nonnegative else "finite"
        raise ValueError(f"{name} must be {rule}, got {values[bad].flatten()[0].item()}")


def _class_vector(name: str, value, n_classes: int, input: Tensor) -> Tensor | None:
    """A per-class weight/alpha: a length-C tensor or sequence of finite values >= 0, as the compute dtype."""
    if value is None:
        return None
    return _class_values(name, value, n_classes, input)


def _class_values(name: str, value, n_classes: int, input: Tensor, nonnegative: bool = True) -> Tensor:
    """A length-C tensor or sequence of finite values (>= 0 if `nonnegative`), as the compute dtype."""
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor or a sequence of numbers, got {value!r}") from err
    _check_constant(name, value)
    if tuple(value.shape) != (n_classes,):
        raise ValueError(f"{name} must have shape (C,) = ({n_classes},), got {tuple(value.shape)}")
    _check_weights(name, value, nonnegative)
    return value.to(device=input.device, dtype=compute_dtype(input.dtype)).contiguous()


def _transform(transform, n_classes: int, input: Tensor):
    """A LogitTransform with its tensors checked (finite, shape (C,)) and moved to the compute dtype."""
    if transform is None or transform.is_identity:
        return None
    moved = {}
    for name in ("scale", "bias", "margin"):
        value = getattr(transform, name)
        if isinstance(value, Tensor):
            _check_constant(f"transform.{name}", value)
            if tuple(value.shape) not in ((n_classes,), ()):
                raise ValueError(f"transform.{name} must have shape (C,) = ({n_classes},), got "
                                 f"{tuple(value.shape)}")
            _check_weights(f"transform.{name}", value, nonnegative=False)
            value = value.to(device=input.device, dtype=compute_dtype(input.dtype))
        elif value is not None:
            value = spec.check_real(f"transform.{name}", value, spec.Range(-math.inf, math.inf))
        moved[name] = value
    return spec.LogitTransform(**moved)


def _softmax_target(target, input: Tensor, n_classes: int, ignore_index: int, allow_probs: bool) -> Tensor:
    """Validates class indices (shape of input without the class dim) or probabilities (input's shape/dtype)
    and returns them flattened like the input rows."""
    _check_tensor("target", target)
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    dtype = target.dtype
    if dtype == torch.int64 and input.dim() == 2 and target.dim() == 1 and target.shape[0] == input.shape[0]:
        return target  # the training loop's case, (N, C) logits and (N,) indices, decided in a few lookups
    if dtype.is_floating_point and allow_probs:
        return _probability_target(target, input, ignore_index)
    index_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        kinds = "class indices (an integer tensor)" + (" or probabilities" if allow_probs else "")
        raise TypeError(f"target must hold {kinds}; got dtype {dtype}, shape {tuple(target.shape)}")
    if target.shape != index_shape:
        raise ValueError(f"class-index target must have shape {tuple(index_shape)} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    # in range: checked with the backend call (_with_index_check), where the kernels may do it for free
    return target.reshape(-1).to(torch.int64)


def _probability_target(target: Tensor, input: Tensor, ignore_index: int) -> Tensor:
    if target.shape != input.shape:
        raise ValueError(f"probability target must have the input's shape {tuple(input.shape)}, got "
                         f"{tuple(target.shape)} (class indices must be an integer tensor)")
    if target.dtype != input.dtype:
        raise TypeError(f"probability target dtype {target.dtype} must match the input dtype {input.dtype}")
    if ignore_index >= 0:
        raise ValueError(f"ignore_index applies to class-index targets only and must stay negative with "
                         f"probability targets, got {ignore_index}")
    return _rows(target)


def _binary_target(target, input: Tensor) -> Tensor:
    """Same shape as the input, values in [0, 1]; integer/bool multi-hot targets are converted to the input
    dtype."""
    _check_tensor("target", target)
    if target.shape != input.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal input shape {tuple(input.shape)}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if target.dtype.is_complex:
        raise TypeError(f"target must be real-valued, got dtype {target.dtype}")
    converted = target if target.dtype == input.dtype else target.to(input.dtype)
    if _checking_values() and target.numel():
        # one pass and one host sync (the comparisons fail for NaN); integer targets are exact as floats
        target = _values(target)
        checked = target if target.dtype.is_floating_point else _values(converted)
        low, high = torch.stack(torch.aminmax(checked)).tolist()
        if not (low >= 0 and high <= 1):
            bad = ~((target >= 0) & (target <= 1))
            raise ValueError(f"binary targets must be in [0, 1], got {target[bad][0].item()}")
    return _elements(converted)


def _elementwise_weight(weight, input: Tensor) -> Tensor | None:
    """A weight broadcastable to the input, finite and >= 0, returned broadcastable to the (rows, K) view."""
    if weight is None:
        return None
    _check_constant("weight", weight)
    try:
        shape = torch.broadcast_shapes(weight.shape, input.shape)
    except RuntimeError:
        shape = None
    if shape != input.shape:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not broadcast to input shape "
                         f"{tuple(input.shape)}")
    _check_weights("weight", weight)
    weight = weight.to(device=input.device, dtype=compute_dtype(input.dtype))
    return weight if input.dim() == 2 else _elements(weight.expand(input.shape))


def _pos_weight(pos_weight, input: Tensor) -> Tensor | None:
    """One positive-class weight per entry of the input's last dimension (a scalar is repeated)."""
    if pos_weight is None:
        return None
    _check_constant("pos_weight", pos_weight)
    n_labels = input.shape[-1] if input.dim() > 0 else 1
    if pos_weight.dim() > 1 or pos_weight.numel() not in (1, n_labels):
        raise ValueError(f"pos_weight must be a scalar or have shape ({n_labels},) (the input's last "
                         f"dimension), got {tuple(pos_weight.shape)}")
    _check_weights("pos_weight", pos_weight)
    pos_weight = pos_weight.to(device=input.device, dtype=compute_dtype(input.dtype))
    return pos_weight.reshape(-1).expand(n_labels).contiguous()


# ---------------------------------------------------------------- flattening


def _rows(t: Tensor) -> Tensor:
    """(C,) -> (1, C); (N, C) as is; (N, C, d1, ...) -> (N*d1*..., C), contiguous."""
    if t.dim() == 1:
        return t.reshape(1, -1).contiguous()
    if t.dim() > 2:
        t = t.movedim(1, -1).reshape(-1, t.shape[1])
    return t.contiguous()


def _unflatten_rows(out: Tensor, input: Tensor, reduction: str) -> Tensor:
    if reduction != "none":
        return out
    if input.dim() == 1:
        return out.reshape(())
    return out.reshape(input.shape[:1] + input.shape[2:])


def _elements(t: Tensor) -> Tensor:
    """Element-wise losses keep row-major order: view as (rows, last dim); a 0-d tensor is one element."""
    if t.dim() == 2:
        return t.contiguous()
    return t.reshape(-1, t.shape[-1] if t.dim() > 0 else 1).contiguous()
