"""The built-in losses: nn.Module wrappers over `xentlab.functional`, registered by name.

The wrappers hold parameters only (per-class weights, alpha and pos_weight as buffers, so `.to(device)`
and checkpoints carry them); the math is in `xentlab.functional`. Each loss's defaults live in
`conf/loss/<name>.yaml`, the file Hydra composes for `loss=<name>` and `build_loss(name)` reads; the Python
signatures default only the PyTorch conventions (`ignore_index`, `reduction`) and the backend choice.
"""

from __future__ import annotations

import torch
from torch import nn

from xentlab import config_dir, weights
from xentlab import functional as F
from xentlab.kernels import BACKENDS, spec
from xentlab.kernels.spec import check_parameter
from xentlab.losses.registry import register_loss

Tensor = torch.Tensor

CONF_DIR = config_dir() / "loss"
SOFTMAX_TASKS = ("multiclass", "binary")
POS_WEIGHT_RULES = ("balanced",)


def builtin(name: str, tasks: tuple[str, ...]):
    """register_loss with the defaults file conf/loss/<name>.yaml."""
    return register_loss(name, tasks=tasks, config=CONF_DIR / f"{name}.yaml")


class _Loss(nn.Module):
    """The knobs every built-in shares; `reduction` is public so reductions can be checked and switched."""

    _shown: tuple[str, ...] = ()  # scalar parameters for the repr (buffers print themselves)
    # How the logits map to probabilities for the metrics: "softmax" rows or independent "sigmoid"s.
    probability_map = "softmax"

    def __init__(self, *, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        _choice("reduction", reduction, F.REDUCTIONS)
        _choice("backend", backend, BACKENDS)
        self.reduction, self.backend = reduction, backend

    @property
    def averages_rows(self) -> bool:
        """Whether `mean` is the plain mean of the `none` values over the non-ignored rows (over elements for
        the element-wise losses): no per-class weight divides it (pos_weight does not). Seed batches rely on
        it to compute K seeds' means from one call (`xentlab.lab.stacking.row_means`)."""
        return all(getattr(self, name, None) is None for name in ("weight", "alpha", "drw_weight"))

    def extra_repr(self) -> str:
        shown = [*self._shown, "reduction", "backend"]
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)


class _SoftmaxLoss(_Loss):
    def __init__(self, *, ignore_index: int = -100, **common):
        super().__init__(**common)
        F._check_int("ignore_index", ignore_index)
        self.ignore_index = ignore_index


@builtin("ce", SOFTMAX_TASKS)
class CrossEntropy(_SoftmaxLoss):
    """Cross-entropy, l_i = lse(x_i) - x_{i,y_i}, averaged over the non-ignored rows (F.cross_entropy)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, ignore_index=self.ignore_index, reduction=self.reduction,
                               backend=self.backend)


@builtin("weighted_ce", SOFTMAX_TASKS)
class WeightedCrossEntropy(_SoftmaxLoss):
    """Class-weighted cross-entropy, l_i = w[y_i] (lse(x_i) - x_{i,y_i}), `mean` dividing by sum_i w[y_i].

    `weights` is a list of C values or a rule applied to the training split's class counts:
    inverse_frequency (w_c ~ 1/n_c), sqrt_inverse (1/sqrt n_c) or effective_number ((1-beta)/(1-beta^n_c)),
    normalised to sum_c w_c = C (xentlab.weights.class_weights).
    """

    def __init__(self, *, weights, beta: float, class_counts: Tensor | None = None, **common):
        super().__init__(**common)
        if weights is None:
            raise ValueError(f"weighted_ce needs weights: a list of per-class values or one of "
                             f"{_weights_rules()}")
        self.register_buffer("weight", class_vector("weights", weights, beta, class_counts))

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, backend=self.backend)


@builtin("label_smoothing", SOFTMAX_TASKS)
class LabelSmoothingCrossEntropy(_SoftmaxLoss):
    """Label-smoothed cross-entropy (PyTorch's convention): l_i = (1-eps)(lse_i - x_{i,y_i}) +
    (eps/C) sum_c (lse_i - x_{i,c}) with eps = `smoothing`, the true class included in the eps/C share."""

    _shown = ("smoothing",)

    def __init__(self, *, smoothing: float, **common):
        super().__init__(**common)
        self.smoothing = check_parameter("label_smoothing", smoothing, shown_as="smoothing")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, ignore_index=self.ignore_index, reduction=self.reduction,
                               label_smoothing=self.smoothing, backend=self.backend)


@builtin("focal", SOFTMAX_TASKS)
class FocalLoss(_SoftmaxLoss):
    """Softmax focal loss (Lin et al. 2017), l_i = -a[y_i] (1 - p_{i,y_i})^gamma log p_{i,y_i}.

    `alpha` is None (a = 1), a list of C values, or a class-weight rule over the training counts as for
    weighted_ce; `mean` divides by sum_i a[y_i], so gamma=0 is weighted cross-entropy exactly.
    """

    _shown = ("gamma",)

    def __init__(self, *, gamma: float, alpha, beta: float, class_counts: Tensor | None = None, **common):
        super().__init__(**common)
        self.gamma = spec.Focal(gamma).gamma
        self.register_buffer("alpha", class_vector("alpha", alpha, beta, class_counts))

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.focal_loss(input, target, gamma=self.gamma, alpha=self.alpha, ignore_index=self.ignore_index,
                            reduction=self.reduction, backend=self.backend)


@builtin("bce", ("multilabel", "binary", "multiclass"))
class BinaryCrossEntropy(_Loss):
    """Binary cross-entropy on logits, element-wise: l = -[pw_c t log sigmoid(x) + (1-t) log sigmoid(-x)].

    Multi-hot (or soft) targets train every label independently; class-index targets (multiclass or
    binary data) become one-hot rows, i.e. one-vs-rest. `pos_weight` is None, a list with one value per
    label, or `balanced`: negatives/positives per label of the training split (pw_c = (N - n_c) / n_c).
    """

    probability_map = "sigmoid"

    def __init__(self, *, pos_weight, class_counts: Tensor | None = None, num_examples: int | None = None,
                 **common):
        super().__init__(**common)
        self.register_buffer("pos_weight", _pos_weight(pos_weight, class_counts, num_examples))

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(input, binary_targets(input, target),
                                                  pos_weight=self.pos_weight, reduction=self.reduction,
                                                  backend=self.backend)


@builtin("mse", SOFTMAX_TASKS)
class MSELoss(_SoftmaxLoss):
    """Squared error to the one-hot target, on softmax probabilities (`on: probs`) or on the raw logits
    (`on: logits`, Hui & Belkin 2021); `mean` over the N*C elements of the non-ignored rows."""

    _shown = ("on",)

    def __init__(self, *, on: str, **common):
        super().__init__(**common)
        _choice("on", on, F.MSE_TARGETS)
        self.on = on

    @property
    def probability_map(self) -> str:
        # On logits each output is regressed onto 0/1 on its own, a one-vs-rest model like bce.
        return "sigmoid" if self.on == "logits" else "softmax"

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, ignore_index=self.ignore_index, reduction=self.reduction, on=self.on,
                          backend=self.backend)


@builtin("logit_adjusted", SOFTMAX_TASKS)
class LogitAdjustedCrossEntropy(_SoftmaxLoss):
    """Logit-adjusted cross-entropy (Menon et al. 2021): cross-entropy of z + tau log pi, pi the training
    split's class priors; tau = 1 is Balanced Softmax (Ren et al. 2020, the `balanced_softmax` config)."""

    _shown = ("tau",)

    def __init__(self, *, tau: float, class_counts: Tensor | None = None, **common):
        super().__init__(**common)
        self.tau = check_parameter("tau", tau)
        self.register_buffer("log_prior", weights.log_priors(_counts_for("logit_adjusted", class_counts)))

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.logit_adjusted_loss(input, target, self.log_prior, self.tau, ignore_index=self.ignore_index,
                                     reduction=self.reduction, backend=self.backend)


@builtin("ldam", SOFTMAX_TASKS)
class LDAMLoss(_SoftmaxLoss):
    """LDAM (Cao et al. 2019): cross-entropy of s (z - Delta_y e_y) with margins Delta_c ~ n_c^(-1/4), the
    largest `max_margin`; s = `scale` suits a normalised (cosine) head. With `drw_epoch` set, deferred
    re-weighting: from that epoch on (the `on_train_epoch_start` hook) rows are weighted by the class-balanced
    effective-number weights (1-beta)/(1-beta^n_c), normalised to sum C, as in weighted_ce."""

    _shown = ("scale", "drw_epoch")

    def __init__(self, *, max_margin: float, scale: float, drw_epoch: int | None, beta: float,
                 class_counts: Tensor | None = None, **common):
        super().__init__(**common)
        counts = _counts_for("ldam", class_counts)
        self.register_buffer("margins", weights.ldam_margins(counts, max_margin))
        self.scale = check_parameter("scale", scale)
        if drw_epoch is not None and (isinstance(drw_epoch, bool) or not isinstance(drw_epoch, int)
                                      or drw_epoch < 0):
            raise ValueError(f"drw_epoch must be null or an epoch number >= 0, got {drw_epoch!r}")
        self.drw_epoch = drw_epoch
        drw = None if drw_epoch is None else weights.class_weights(counts, "effective_number", beta=beta)
        self.register_buffer("drw_weight", drw)
        self.reweighting = False

    def on_train_epoch_start(self, epoch: int) -> None:
        """Deferred re-weighting: the class-balanced weights apply from epoch `drw_epoch` on."""
        self.reweighting = self.drw_epoch is not None and epoch >= self.drw_epoch

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        weight = self.drw_weight if self.reweighting else None
        return F.ldam_loss(input, target, self.margins, self.scale, weight=weight,
                           ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend)


@builtin("poly1", SOFTMAX_TASKS)
class Poly1CrossEntropy(_SoftmaxLoss):
    """Poly-1 (Leng et al. 2022): l_i = -log p_iy + epsilon (1 - p_iy); epsilon = 0 is cross-entropy."""

    _shown = ("epsilon",)

    def __init__(self, *, epsilon: float, **common):
        super().__init__(**common)
        self.epsilon = spec.Poly1(epsilon).epsilon

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.poly1_loss(input, target, self.epsilon, ignore_index=self.ignore_index,
                            reduction=self.reduction, backend=self.backend)


@builtin("gce", SOFTMAX_TASKS)
class GeneralizedCrossEntropy(_SoftmaxLoss):
    """Generalised cross-entropy (Zhang & Sabuncu 2018) for noisy labels: l_i = (1 - p_iy^q) / q with q in
    (0, 1]."""

    _shown = ("q",)

    def __init__(self, *, q: float, **common):
        super().__init__(**common)
        self.q = spec.GCE(q).q

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.gce_loss(input, target, self.q, ignore_index=self.ignore_index, reduction=self.reduction,
                          backend=self.backend)


@builtin("sigmoid_focal", ("multilabel", "binary", "multiclass"))
class SigmoidFocalLoss(_Loss):
    """Sigmoid focal loss (torchvision's): alpha_t (1 - p_t)^gamma BCE(x, t) per label, mean over all
    elements; class-index targets become one-hot rows (one-vs-rest), as for bce."""

    _shown = ("alpha", "gamma")
    probability_map = "sigmoid"

    def __init__(self, *, alpha: float, gamma: float, **common):
        super().__init__(**common)
        self.alpha = check_parameter("alpha", alpha)
        self.gamma = check_parameter("gamma", gamma)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.sigmoid_focal_loss(input, binary_targets(input, target), self.alpha, self.gamma,
                                    reduction=self.reduction, backend=self.backend)


@builtin("asl", ("multilabel", "binary", "multiclass"))
class AsymmetricLoss(_Loss):
    """Asymmetric loss (Ridnik et al. 2021) for multi-label data: -[t (1-p)^gamma_pos log p + (1-t)
    p_m^gamma_neg log(1-p_m)], p_m = max(p - clip, 0), mean over all elements; class-index targets become
    one-hot rows (one-vs-rest), as for bce."""

    _shown = ("gamma_pos", "gamma_neg", "clip")
    probability_map = "sigmoid"

    def __init__(self, *, gamma_pos: float, gamma_neg: float, clip: float, **common):
        super().__init__(**common)
        self.gamma_pos = check_parameter("gamma_pos", gamma_pos)
        self.gamma_neg = check_parameter("gamma_neg", gamma_neg)
        self.clip = check_parameter("clip", clip)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.asymmetric_loss(input, binary_targets(input, target), self.gamma_pos, self.gamma_neg,
                                 self.clip, reduction=self.reduction, backend=self.backend)


# ---------------------------------------------------------------- parameters from configs and counts


def _weights_rules() -> str:
    return " | ".join(weights.METHODS)


def class_vector(name: str, value, beta: float, class_counts: Tensor | None) -> Tensor | None:
    """A per-class weight vector from a config value: None, an explicit sequence of C numbers, or the name
    of a weights.class_weights rule applied to the training split's class counts."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in weights.METHODS:
            raise ValueError(f"{name} must be a list of per-class values or one of {_weights_rules()}, "
                             f"got {value!r}")
        counts = _counts_for(f"{name}={value!r}", class_counts, " or give explicit values")
        return weights.class_weights(counts, value, beta=beta)
    return _float_vector(name, value)


def _pos_weight(value, class_counts: Tensor | None, num_examples: int | None) -> Tensor | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in POS_WEIGHT_RULES:
            raise ValueError(f"pos_weight must be a list of per-label values or one of {POS_WEIGHT_RULES}, "
                             f"got {value!r}")
        counts = _counts_for(f"pos_weight={value!r}", class_counts, " or give explicit values")
        if num_examples is None:
            raise ValueError(f"pos_weight={value!r} needs num_examples, the training split's size, next to "
                             f"its class counts (build the loss with build_loss or xentlab-train)")
        return weights.pos_weight_from_counts(counts, int(num_examples))
    return _float_vector("pos_weight", value)


def _counts_for(what: str, class_counts: Tensor | None, alternative: str = "") -> Tensor:
    """The class counts `what` (a loss, or a setting such as `alpha='inverse_frequency'`) is derived from."""
    if class_counts is None:
        raise ValueError(f"{what} is derived from the training split's class counts, which were not given; "
                         f"pass them as class_counts (build_loss and xentlab-train do){alternative}")
    return torch.as_tensor(class_counts)


def _float_vector(name: str, value) -> Tensor:
    try:
        vector = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a sequence of numbers, got {value!r}") from error
    if vector.dim() != 1 or vector.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence (one value per class), got {value!r}")
    return vector


def binary_targets(input: Tensor, target: Tensor) -> Tensor:
    """Targets for element-wise BCE: multi-hot/soft targets as given; class indices (N,) as one-hot rows over
    the input's C columns (one-vs-rest), or as a column when the input is a single logit per row."""
    if target.dtype.is_floating_point or target.dim() == input.dim():
        return target
    if input.dim() == 2 and input.shape[1] == 1:
        return target.reshape(-1, 1).to(input.dtype)
    n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    if F._checking_values():
        values = F._values(target)
        bad = (values < 0) | (values >= n_classes)
        if bool(bad.any()):
            raise ValueError(f"target contains class index {values[bad][0].item()}, outside [0, {n_classes}) "
                             f"for C={n_classes} classes")
    # a comparison, not one_hot, whose own range check reads values (which neither vmap nor compile allow)
    classes = torch.arange(n_classes, device=target.device)
    return (target[..., None] == classes).movedim(-1, 1).to(input.dtype)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
