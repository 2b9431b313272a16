"""The conformance kit for losses: `check_loss` runs the checks the built-ins' own tests run.

    from xentlab.testing import check_loss
    print(check_loss("focal", task="multiclass"))   # a registered name, built with its YAML defaults
    check_loss(MyLoss(eps=2.0), task="multiclass")   # or an instance; raises LossCheckError on failure

A loss is called as `loss(logits, target)` with the shapes xentlab's data modules produce: multiclass and
binary data give (N, C) logits (C = 2 for binary) and (N,) int64 class indices; multilabel data gives (N, C)
logits and (N, C) float multi-hot targets. The reduction checks switch the loss's public `reduction`
attribute ("none" | "mean" | "sum"), as torch.nn losses expose it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.gradcheck import GradcheckError

from xentlab.losses.registry import build_loss
from xentlab.tasks import check_task

Tensor = torch.Tensor

# Training-split counts handed to losses built by name (a 8:1 long tail, so derived weights are not uniform).
TOY_COUNTS = (64, 32, 16, 8)
EXTREME = 1e4
MIN_ACCURACY = 0.9
LEARNING_RATES = (0.5, 0.05, 5.0)


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: what it measured when it passed, what went wrong when it failed."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class LossReport:
    """What check_loss found: one line per check; `str()` is the readable report."""

    loss: str
    task: str
    num_classes: int
    results: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.results if not r.passed]

    def __str__(self) -> str:
        passed = sum(r.passed for r in self.results)
        width = max(len(r.name) for r in self.results)
        lines = [f"check_loss({self.loss}, task={self.task}, C={self.num_classes}): "
                 f"{passed}/{len(self.results)} checks passed"]
        lines += [f"  {'PASS' if r.passed else 'FAIL'}  {r.name:<{width}}  {r.detail}" for r in self.results]
        return "\n".join(lines)


class LossCheckError(AssertionError):
    """A loss failed conformance; `.report` holds every check's outcome."""

    def __init__(self, report: LossReport):
        super().__init__(str(report))
        self.report = report


class _Failed(Exception):
    pass


def check_loss(loss_or_name: nn.Module | str, *, task: str = "multiclass", num_classes: int | None = None,
               device: str | torch.device = "cpu", seed: int = 0, **params) -> LossReport:
    """Run the conformance checks on a loss module (or a registered name, built with `params` over its YAML
    defaults and toy class counts) and return the report; raise LossCheckError, carrying it, on failure.

    Checks: finite loss and gradient on random logits and on logits of +-1e4; torch.autograd.gradcheck in
    float64 for every reduction; reduction consistency (`none` sums to `sum`, and `sum = mean * D` with the
    same D for any logits, i.e. `mean` divides by a constant of the targets); invariance to the batch order;
    and, over 30 SGD steps of a linear model on a linearly separable toy set, a loss that falls by at least 1%
    and a model that ends up fitting at least 90% of it. A loss with the epoch hook
    `on_train_epoch_start(epoch)` (called by the training loop before each epoch, e.g. LDAM's deferred
    re-weighting) runs every check twice: after the hook for epoch 0 and after it for a late epoch.
    """
    check_task(task)
    num_classes = _num_classes(loss_or_name, task, num_classes)
    loss, label = _loss_module(loss_or_name, task, num_classes, params)
    loss = copy.deepcopy(loss).to(device)  # the caller's module stays where it was
    generator = torch.Generator().manual_seed(seed)
    toy = _ToyData(task, num_classes, torch.device(device), generator)
    # The toy tensors are tiny: intra-op threads only add hand-off latency, which on a busy 2-core machine
    # grows to tens of milliseconds per backward pass.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = tuple(result for epoch in _epochs(loss) for result in _run_phase(loss, toy, epoch))
    finally:
        torch.set_num_threads(threads)
    report = LossReport(label, task, num_classes, results)
    if not report.ok:
        raise LossCheckError(report)
    return report


LATE_EPOCH = 10_000


def _epochs(loss: nn.Module) -> tuple[int | None, ...]:
    return (0, LATE_EPOCH) if callable(getattr(loss, "on_train_epoch_start", None)) else (None,)


def _run_phase(loss: nn.Module, toy: _ToyData, epoch: int | None) -> list[CheckResult]:
    """Every check on the loss as built (epoch None) or on a copy after `on_train_epoch_start(epoch)`."""
    if epoch is None:
        return [_run(name, check, loss, toy) for name, check in CHECKS]
    loss = copy.deepcopy(loss)
    hook = f"on_train_epoch_start({epoch})"
    try:
        returned = loss.on_train_epoch_start(epoch)
    except Exception as error:
        return [CheckResult(hook, False, f"raised {type(error).__name__}: {error}")]
    if returned is not None:
        return [CheckResult(hook, False, f"the hook must return None, got {returned!r}")]
    return [_run(f"{name} @ epoch {epoch}", check, loss, toy) for name, check in CHECKS]


# ---------------------------------------------------------------- the checks


def _finite_random(loss: nn.Module, toy: _ToyData) -> str:
    x, t = toy.logits(16, scale=3.0), toy.targets(16)
    value, grad = _value_and_grad(loss, x, t)
    return f"loss {value.item():.4g}, max |grad| {grad.abs().max().item():.3g}"


def _finite_extreme(loss: nn.Module, toy: _ToyData) -> str:
    x = toy.logits(16).sign() * EXTREME
    x[0] = EXTREME  # a row of ties at the top
    t = toy.targets(16)
    value, grad = _value_and_grad(loss, x, t)
    return f"logits of +-{EXTREME:g}: loss {value.item():.4g}, max |grad| {grad.abs().max().item():.3g}"


def _gradcheck(loss: nn.Module, toy: _ToyData) -> str:
    x, t = toy.logits(3, dtype=torch.float64), toy.targets(3, dtype=torch.float64)
    # Without a `reduction` attribute only the loss as given can be checked; the reduction check says why.
    reductions = ("mean", "sum", "none") if _has_reduction(loss) else (None,)
    for reduction in reductions:
        module = copy.deepcopy(loss) if reduction is None else _with_reduction(loss, reduction)
        module = module.double()
        try:
            torch.autograd.gradcheck(lambda z, m=module: m(z, t), (x.requires_grad_(),), eps=1e-6, atol=1e-5,
                                     rtol=1e-3)
        except GradcheckError as error:
            raise _Failed(f"reduction={reduction or 'as given'}: analytical and numerical gradients differ: "
                          f"{str(error).splitlines()[0]}") from error
    return f"float64 gradients match finite differences ({', '.join(map(str, reductions))})"


def _reductions(loss: nn.Module, toy: _ToyData) -> str:
    n, t = 12, toy.targets(12)
    none_loss, sum_loss = _with_reduction(loss, "none"), _with_reduction(loss, "sum")
    mean_loss = _with_reduction(loss, "mean")
    denominators = []
    for _ in range(2):
        x = toy.logits(n, scale=2.0)
        with torch.no_grad():
            per, total, mean = none_loss(x, t), sum_loss(x, t), mean_loss(x, t)
        if per.dim() == 0 or per.shape[0] != n:
            raise _Failed(f"reduction='none' must keep the batch dimension N={n}, got shape "
                          f"{tuple(per.shape)}")
        if total.dim() != 0 or mean.dim() != 0:
            raise _Failed(f"reduction='sum'/'mean' must return 0-d tensors, got {tuple(total.shape)} and "
                          f"{tuple(mean.shape)}")
        if not torch.allclose(per.sum(), total, rtol=1e-5, atol=1e-6):
            raise _Failed(f"'none' sums to {per.sum().item():.6g} but 'sum' is {total.item():.6g}")
        if mean.item() == 0 or total.item() / mean.item() <= 0:
            raise _Failed(f"'sum' {total.item():.6g} and 'mean' {mean.item():.6g} on random logits do not "
                          f"differ by a positive denominator")
        denominators.append(total.item() / mean.item())
    first, second = denominators
    if abs(first - second) > 1e-4 * abs(first):
        raise _Failed(f"sum / mean is {first:.6g} for one batch of logits and {second:.6g} for another with "
                      f"the same targets: 'mean' must divide 'sum' by a denominator that does not depend on "
                      f"the logits")
    named = {n: "N", n * toy.num_classes: "N*C"}.get(round(first), "a target-dependent weight sum")
    return f"'none' sums to 'sum'; sum = mean * {first:.6g} ({named})"


def _batch_order(loss: nn.Module, toy: _ToyData) -> str:
    x, t = toy.logits(12, scale=2.0), toy.targets(12)
    order = torch.randperm(12, generator=toy.generator).to(toy.device)
    value, grad = _value_and_grad(loss, x, t)
    value_p, grad_p = _value_and_grad(loss, x[order], t[order])
    if not torch.allclose(value, value_p, rtol=1e-5, atol=1e-6):
        raise _Failed(f"loss {value.item():.6g} becomes {value_p.item():.6g} when the batch is permuted")
    if not torch.allclose(grad[order], grad_p, rtol=1e-4, atol=1e-6):
        raise _Failed("the gradient does not follow its rows when the batch is permuted")
    return "loss and per-row gradients unchanged by a permutation of the batch"


def _learns(loss: nn.Module, toy: _ToyData, steps: int = 30) -> str:
    features, t = toy.separable(96)
    initial = 0.1 * torch.randn(toy.num_classes, features.shape[1], generator=toy.generator).to(toy.device)
    outcomes = []
    # Losses differ in scale (MSE on logits has a larger curvature than CE; ASL's down-weighted negatives give
    # small gradients), so a smaller and then a larger step get a chance before the loss is judged not to
    # learn.
    for lr in LEARNING_RATES:
        first, last, accuracy = _sgd(loss, features, t, initial, lr, steps, toy)
        if last < first - 0.01 * abs(first) and accuracy >= MIN_ACCURACY:
            return f"{first:.4g} -> {last:.4g} in {steps} SGD steps (lr={lr}); fits {accuracy:.0%} of the set"
        outcomes.append(f"lr={lr}: loss {first:.4g} -> {last:.4g}, fits {accuracy:.0%}")
    raise _Failed(f"on a linearly separable problem the loss should fall by >= 1% in {steps} SGD steps and "
                  f"the model fit >= {MIN_ACCURACY:.0%} of it; got {'; '.join(outcomes)}")


def _sgd(loss, features, t, initial, lr, steps, toy) -> tuple[float, float, float]:
    """SGD on a linear model from a fixed, seeded start: first and last loss, final training accuracy."""
    model = nn.Linear(features.shape[1], toy.num_classes).to(toy.device)
    with torch.no_grad():
        model.weight.copy_(initial)
        model.bias.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        value = loss(model(features), t)
        value.backward()
        optimizer.step()
        history.append(value.item())
    with torch.no_grad():
        return history[0], history[-1], toy.accuracy(model(features), t)


CHECKS: tuple[tuple[str, Callable[[nn.Module, _ToyData], str]], ...] = (
    ("finite on random logits", _finite_random),
    ("finite on extreme logits", _finite_extreme),
    ("gradcheck (float64)", _gradcheck),
    ("reduction consistency", _reductions),
    ("batch-order invariance", _batch_order),
    ("learns a separable problem", _learns),
)


# ---------------------------------------------------------------- helpers


class _ToyData:
    """Logits and targets in the shapes xentlab's data modules give the loss for `task`."""

    def __init__(self, task: str, num_classes: int, device: torch.device, generator: torch.Generator):
        self.task, self.num_classes, self.device, self.generator = task, num_classes, device, generator

    def logits(self, n: int, *, scale: float = 1.0, dtype=torch.float32) -> Tensor:
        x = scale * torch.randn(n, self.num_classes, generator=self.generator, dtype=dtype)
        return x.to(self.device)

    def targets(self, n: int, *, dtype=torch.float32) -> Tensor:
        if self.task == "multilabel":
            hot = torch.rand(n, self.num_classes, generator=self.generator) < 0.4
            hot[0], hot[1] = True, False  # every label seen positive and negative
            return hot.to(dtype=dtype, device=self.device)
        # Every class present once the batch has C rows, the rest drawn at random.
        drawn = torch.randint(0, self.num_classes, (n,), generator=self.generator)
        drawn[: min(n, self.num_classes)] = torch.arange(min(n, self.num_classes))
        return drawn.to(self.device)

    def accuracy(self, logits: Tensor, t: Tensor) -> float:
        """Exact-label accuracy: argmax for single-label data, per-label sign of the logit for multilabel."""
        if self.task == "multilabel":
            return ((logits > 0) == (t > 0.5)).float().mean().item()
        return (logits.argmax(1) == t).float().mean().item()

    def separable(self, n: int) -> tuple[Tensor, Tensor]:
        """Features a linear model separates with margin: class (label) c sets coordinate c to about +1, the
        others to about -1."""
        t = self.targets(n)
        hot = t if self.task == "multilabel" else nn.functional.one_hot(t, self.num_classes).float()
        noise = 0.1 * torch.randn(n, self.num_classes, generator=self.generator).to(self.device)
        return (2 * hot - 1) + noise, t


def _value_and_grad(loss: nn.Module, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach().clone().requires_grad_()
    value = loss(x, t)
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise _Failed(f"the loss (reduction='mean') must return a 0-d tensor, got {shape}")
    if value.dtype != x.dtype:
        raise _Failed(f"the loss has dtype {value.dtype} for {x.dtype} logits; it must keep the input dtype")
    value.backward()
    if not torch.isfinite(value):
        raise _Failed(f"non-finite loss {value.item()}")
    if x.grad is None or not torch.isfinite(x.grad).all():
        bad = "none" if x.grad is None else f"{int((~torch.isfinite(x.grad)).sum())} non-finite entries"
        raise _Failed(f"loss {value.item():.4g} but the gradient has {bad}")
    return value.detach(), x.grad


def _has_reduction(loss: nn.Module) -> bool:
    return isinstance(getattr(loss, "reduction", None), str)


def _with_reduction(loss: nn.Module, reduction: str) -> nn.Module:
    if not _has_reduction(loss):
        raise _Failed("the loss has no `reduction` attribute; store it as torch.nn losses do "
                      "(self.reduction = 'mean' | 'sum' | 'none') and honour it in forward")
    module = copy.deepcopy(loss)
    module.reduction = reduction
    return module


def _run(name: str, check, loss: nn.Module, toy: _ToyData) -> CheckResult:
    try:
        return CheckResult(name, True, check(loss, toy))
    except _Failed as failure:
        return CheckResult(name, False, str(failure))
    except Exception as error:  # a crash inside the loss is a finding, reported next to the other checks
        return CheckResult(name, False, f"raised {type(error).__name__}: {error}")


def _num_classes(loss_or_name, task: str, num_classes: int | None) -> int:
    if task == "binary":
        if num_classes not in (None, 2):
            raise ValueError(f"binary data has C = 2 logits per row, got num_classes={num_classes}")
        return 2
    if num_classes is not None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        return num_classes
    # A module with per-class buffers (weights, alpha, pos_weight) fixes C.
    if isinstance(loss_or_name, nn.Module):
        sizes = {b.numel() for b in loss_or_name.buffers() if b.dim() == 1 and b.numel() > 1}
        if len(sizes) == 1:
            return sizes.pop()
    return len(TOY_COUNTS)


def _loss_module(loss_or_name, task: str, num_classes: int, params: dict) -> tuple[nn.Module, str]:
    if isinstance(loss_or_name, str):
        counts = torch.tensor([TOY_COUNTS[c % len(TOY_COUNTS)] for c in range(num_classes)])
        # Multilabel positives do not partition the examples: the split is larger than any label's count.
        num_examples = int(counts.sum()) if task != "multilabel" else 2 * int(counts.max())
        loss = build_loss(loss_or_name, task=task, class_counts=counts, num_examples=num_examples, **params)
        return loss, repr(loss_or_name)
    if params:
        raise TypeError(f"parameters {sorted(params)} apply to a loss given by name; pass them to the module "
                        f"instead")
    if not isinstance(loss_or_name, nn.Module):
        raise TypeError(f"check_loss takes an nn.Module or a registered loss name, got {type(loss_or_name)}")
    return loss_or_name, type(loss_or_name).__name__
