"""What a softmax-family loss is, written once for every backend: a row loss of log p_y and a logit transform.

Cross-entropy, focal, Poly-1 and GCE are functions phi(log p_y) of the true-class log-probability alone, so
the gradient of a row's loss with respect to its logits is always -phi'(log p_y) (p - onehot(y)). A
`RowLoss` holds phi's parameters and gives phi (`value`) and its derivative (`slope`), both elementwise on a
float tensor of log p_y. Logit adjustment and LDAM change the logits before the row's logsumexp; a
`LogitTransform` holds that change: z'_c = scale_c (z_c - [c == y] margin_c) + bias_c. Every backend's
`softmax_loss` takes one of each, so a new loss of p_y is one small class here (or in a plugin), and the
reference, fused and Triton backends all run it: the reference through autograd on `value`, the others with
`slope` in closed form. Torch only: no registry, Hydra or Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Protocol, runtime_checkable

import torch

Tensor = torch.Tensor


@runtime_checkable
class RowLoss(Protocol):
    """A loss phi(l) of the true-class log-probability l = log p_y, elementwise on a float tensor."""

    def value(self, logpt: Tensor) -> Tensor:
        """phi(l)."""
        ...

    def slope(self, logpt: Tensor) -> Tensor:
        """d phi / d l, finite for every l <= 0 (p_y = 1 included)."""
        ...


def value_and_slope(row_loss: RowLoss, logpt: Tensor) -> tuple[Tensor, Tensor]:
    """(phi(l), phi'(l)) for the closed-form backends. A row loss may define `value_and_slope` to share work
    between the two (at training shapes every elementwise op is a dispatch that costs more than its math);
    otherwise `value` and `slope` are called. Both must be elementwise (`row_value`)."""
    both = getattr(row_loss, "value_and_slope", None)
    value, slope = both(logpt) if both is not None else (row_loss.value(logpt), row_loss.slope(logpt))
    return _elementwise(row_loss, "value", value, logpt), _elementwise(row_loss, "slope", slope, logpt)


def row_value(row_loss: RowLoss, logpt: Tensor) -> Tensor:
    """phi(l), checked to be elementwise: one value per row, not a reduced or broadcast tensor."""
    return _elementwise(row_loss, "value", row_loss.value(logpt), logpt)


def _elementwise(row_loss, method: str, out, logpt: Tensor) -> Tensor:
    if not isinstance(out, Tensor) or out.shape != logpt.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{type(row_loss).__name__}.{method}(logpt) must return one value per row, a tensor "
                         f"of logpt's shape {tuple(logpt.shape)}, got {shape}")
    return out


@dataclass(frozen=True)
class Range:
    """The values a scalar loss parameter may take: finite, from `low` to `high`, with `low` itself excluded
    when `open_low`; `hint` says what the excluded end would mean."""

    low: float
    high: float
    open_low: bool = False
    hint: str = ""

    def __str__(self) -> str:
        return f"{'(' if self.open_low else '['}{self.low}, {self.high}]"


INF = math.inf
PARAMETERS = {
    "gamma": Range(0.0, INF),                     # focal and sigmoid focal: 0 is cross-entropy / BCE
    "gamma_pos": Range(0.0, INF),                 # ASL's focusing on positives
    "gamma_neg": Range(0.0, INF),                 # ASL's focusing on negatives
    "clip": Range(0.0, 1.0),                      # ASL's probability margin on negatives
    "alpha": Range(-INF, 1.0),                    # sigmoid focal's positive weight; < 0 disables it
    "epsilon": Range(-1.0, INF),                  # Poly-1: >= -1 keeps the loss decreasing in p_y
    "q": Range(0.0, 1.0, open_low=True, hint="q -> 0 is cross-entropy (loss=ce, or cross_entropy)"),
    "label_smoothing": Range(0.0, 1.0),
    "tau": Range(-INF, INF),                      # logit adjustment's prior strength
    "scale": Range(0.0, INF, open_low=True),      # LDAM's s: 0 would flatten every row
}
"""Every scalar loss parameter's valid range, written once: `xentlab.functional`, the spec's row losses and
the built-in modules all check through `check_parameter`."""


def check_parameter(name: str, value, *, shown_as: str | None = None) -> float:
    """`value` as a float after checking it against PARAMETERS[name]: TypeError for a non-number (bools
    included), ValueError naming the range for NaN, infinities or a value outside it. `shown_as` names the
    parameter in the message where its config key differs (a built-in's `smoothing`)."""
    return check_real(shown_as or name, value, PARAMETERS[name])


def check_real(name: str, value, valid: Range) -> float:
    """A finite real number within `valid`, returned as a float."""
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, Real)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    low_ok = valid.low < value if valid.open_low else valid.low <= value
    if not (math.isfinite(value) and low_ok and value <= valid.high):
        hint = f"; {valid.hint}" if valid.hint else ""
        raise ValueError(f"{name} must be a finite number in {valid}, got {value!r}{hint}")
    return float(value)


@dataclass(frozen=True)
class NLL:
    """Cross-entropy: phi(l) = -l, slope -1."""

    def value(self, logpt: Tensor) -> Tensor:
        return -logpt

    def slope(self, logpt: Tensor) -> Tensor:
        return torch.full_like(logpt, -1.0)


@dataclass(frozen=True)
class Focal:
    """Focal loss (Lin et al. 2017): phi(l) = -(1 - e^l)^gamma l, with p = e^l the slope is
    gamma (1-p)^(gamma-1) p l - (1-p)^gamma.

    The slope is formed as -(1-p)^gamma [1 - gamma p l / (1-p)]: (1-p)^(gamma-1) never appears, so gamma < 1
    stays finite as p -> 1, where l / (1-p) -> -1. 1 - p is -expm1(l), exact for p near 1."""

    gamma: float = 2.0

    def __post_init__(self):
        object.__setattr__(self, "gamma", check_parameter("gamma", self.gamma))

    def value(self, logpt: Tensor) -> Tensor:
        # The clamp keeps autograd's (1-p)^(gamma-1) finite at p = 1 (the reference backend differentiates
        # this); it moves the value by less than tiny^gamma * |l|, and l = 0 there.
        one_minus_pt = (-torch.expm1(logpt)).clamp(min=torch.finfo(logpt.dtype).tiny)
        return -one_minus_pt.pow(self.gamma) * logpt

    def slope(self, logpt: Tensor) -> Tensor:
        return self.value_and_slope(logpt)[1]

    def value_and_slope(self, logpt: Tensor) -> tuple[Tensor, Tensor]:
        # Ten tensor ops and no tensor-scalar arithmetic but one: at training shapes each op's dispatch is the
        # cost. l / (1-p) is 0/0 only at l = 0 (p = 1), where its limit is -1.
        one_minus_pt = torch.expm1(logpt).neg_().clamp_min_(0)
        modulator = one_minus_pt.pow(self.gamma)
        ratio = torch.div(logpt, one_minus_pt).nan_to_num_(nan=-1.0)
        slope = torch.addcmul(modulator.neg(), modulator, ratio.mul_(logpt.exp()), value=self.gamma)
        return modulator.mul_(logpt).neg_(), slope


@dataclass(frozen=True)
class Poly1:
    """Poly-1 (Leng et al. 2022): phi(l) = -l + epsilon (1 - e^l), slope -1 - epsilon e^l.

    epsilon >= -1 keeps phi decreasing in p_y (the slope is -(1 + epsilon p) <= 0)."""

    epsilon: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "epsilon", check_parameter("epsilon", self.epsilon))

    def value(self, logpt: Tensor) -> Tensor:
        return -logpt - self.epsilon * torch.expm1(logpt)

    def slope(self, logpt: Tensor) -> Tensor:
        return -1 - self.epsilon * logpt.exp()


@dataclass(frozen=True)
class GCE:
    """Generalised cross-entropy (Zhang & Sabuncu 2018): phi(l) = (1 - e^{q l}) / q = (1 - p^q) / q, slope
    -e^{q l}; q in (0, 1] (q -> 0 is cross-entropy, q = 1 is MAE on the true class)."""

    q: float = 0.7

    def __post_init__(self):
        object.__setattr__(self, "q", check_parameter("q", self.q))

    def value(self, logpt: Tensor) -> Tensor:
        return -torch.expm1(self.q * logpt) / self.q

    def slope(self, logpt: Tensor) -> Tensor:
        return -torch.exp(self.q * logpt)


@dataclass(frozen=True, eq=False)
class LogitTransform:
    """z'_c = scale_c (z_c - [c == y] margin_c) + bias_c, applied to each row before its logsumexp.

    `scale` is a number or a (C,) tensor (LDAM's s), `bias` a (C,) tensor added after scaling (logit
    adjustment's tau log prior), `margin` a (C,) tensor subtracted from the true class's logit before
    scaling (LDAM's Delta). The chain rule gives dL/dz_c = scale_c dL/dz'_c. Tensors are expected in the
    backend's compute dtype on the input's device (xentlab.functional arranges that)."""

    scale: float | Tensor = 1.0
    bias: Tensor | None = None
    margin: Tensor | None = None

    @property
    def is_identity(self) -> bool:
        return self.bias is None and self.margin is None and not isinstance(self.scale, Tensor) \
            and self.scale == 1.0

    def apply(self, z: Tensor, target: Tensor) -> Tensor:
        """z' for (N, C) logits z and (N,) class indices (valid ones: ignored rows sent to any class)."""
        if self.margin is not None:
            z = z.scatter_add(1, target[:, None], -self.margin[target][:, None].to(z.dtype))
        if isinstance(self.scale, Tensor) or self.scale != 1.0:
            z = z * self.scale
        if self.bias is not None:
            z = z + self.bias
        return z


def is_nll(row_loss: RowLoss) -> bool:
    """Whether the row loss is -log p_y exactly (focal with gamma 0 and Poly-1 with epsilon 0 are, bit for
    bit), so a backend may run plain cross-entropy for it."""
    return isinstance(row_loss, NLL) or (isinstance(row_loss, Focal) and row_loss.gamma == 0) or (
        isinstance(row_loss, Poly1) and row_loss.epsilon == 0)
