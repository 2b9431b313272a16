"""Learning-rate schedules, stepped once per epoch: none, cosine or step decay, each after an optional
linear warm-up (LDAM-DRW's recipe, Cao et al. 2019, is 5 warm-up epochs then step decay)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

SCHEDULES = ("none", "cosine", "step")
# The keys each schedule takes besides `name` (conf/scheduler/<name>.yaml holds their defaults).
PARAMS = {"none": ("warmup_epochs",), "cosine": ("warmup_epochs", "min_factor"),
          "step": ("warmup_epochs", "milestones", "gamma")}


def lr_factor(epoch: int, name: str, total_epochs: int, warmup_epochs: int = 0, min_factor: float = 0.0,
              milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """The multiplier f(e) of the optimizer's base learning rate during epoch e (0-based).

    Warm-up, e < W: f = (e + 1) / W. After it: `none` f = 1; `step` f = gamma^k, k the number of
    milestones <= e (torch's MultiStepLR); `cosine` f = m + (1 - m)(1 + cos(pi (e - W) / (T - W))) / 2,
    m = `min_factor`, T = `total_epochs` (torch's CosineAnnealingLR over the epochs after the warm-up).
    """
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    if name == "step":
        return gamma ** sum(epoch >= m for m in milestones)
    if name == "cosine":
        progress = (epoch - warmup_epochs) / (total_epochs - warmup_epochs)
        return min_factor + (1 - min_factor) * (1 + math.cos(math.pi * progress)) / 2
    return 1.0


def build_scheduler(name: str, total_epochs: int, **params) \
        -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None:
    """Checks the `scheduler` config against a run of `total_epochs` epochs and returns a factory that
    wraps an optimizer in a LambdaLR following `lr_factor`, or None for `none` without warm-up."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULES)}")
    unknown = sorted(set(params) - set(PARAMS[name]))
    if unknown:
        raise TypeError(f"scheduler {name!r} has no parameter(s) {', '.join(unknown)}; it takes: "
                        f"{', '.join(PARAMS[name])}")
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(f"scheduler={name} needs a finite trainer.max_epochs >= 1, got {total_epochs!r}")
    warmup = params.get("warmup_epochs", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"scheduler.warmup_epochs must be an integer >= 0, got {warmup!r}")
    if name == "step":
        # Milestones (or a warm-up) beyond trainer.max_epochs are never reached, as in torch's MultiStepLR:
        # a short trial run of a long schedule is allowed.
        milestones = list(params.get("milestones", ()))
        if milestones != sorted(set(milestones)) or not all(isinstance(m, int) and m > warmup
                                                             for m in milestones):
            raise ValueError(f"scheduler.milestones must be increasing epochs after the warm-up (> "
                             f"scheduler.warmup_epochs={warmup}), got {milestones}")
        if not 0 < params.get("gamma", 0.1) <= 1:
            raise ValueError(f"scheduler.gamma must be in (0, 1], got {params['gamma']}")
    if name == "cosine" and not 0 <= params.get("min_factor", 0.0) < 1:
        raise ValueError(f"scheduler.min_factor must be in [0, 1), got {params['min_factor']}")
    if name == "none" and warmup == 0:
        return None

    def factory(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: lr_factor(epoch, name, total_epochs, **params))

    return factory
