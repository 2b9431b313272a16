"""Learning-rate schedules against torch's own, their refusals, and the per-epoch hooks of a real run."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from xentlab.lab.board import board_tag
from xentlab.lab.run import build_run
from xentlab.lab.schedules import build_scheduler, lr_factor
from xentlab.train import CONFIG_DIR

TINY = ["data.n_samples=400", "model.hidden_sizes=[16]"]


def lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, epochs: int) -> list[float]:
    optimizer, seen = scheduler.optimizer, []
    for _ in range(epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def sgd(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_step_without_warm_up_is_torchs_multistep_lr():
    ours = build_scheduler("step", total_epochs=12, milestones=[3, 7], gamma=0.3)(sgd())
    theirs = torch.optim.lr_scheduler.MultiStepLR(sgd(), milestones=[3, 7], gamma=0.3)
    assert lrs(ours, 12) == pytest.approx(lrs(theirs, 12), rel=1e-12)


def test_cosine_without_warm_up_is_torchs_cosine_annealing():
    ours = build_scheduler("cosine", total_epochs=10, min_factor=0.1)(sgd())
    theirs = torch.optim.lr_scheduler.CosineAnnealingLR(sgd(), T_max=10, eta_min=0.01)
    assert lrs(ours, 10) == pytest.approx(lrs(theirs, 10), rel=1e-9)


def test_ldam_drw_recipe_warms_up_linearly_then_decays_in_steps():
    recipe = {"name": "step", "total_epochs": 200, "warmup_epochs": 5, "milestones": [160, 180],
              "gamma": 0.01}
    factors = [lr_factor(e, **recipe) for e in range(200)]
    assert factors[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert factors[159] == 1.0 and factors[160] == pytest.approx(0.01) and factors[199] == pytest.approx(1e-4)
    cosine = [lr_factor(e, "cosine", 10, warmup_epochs=2) for e in range(10)]
    assert cosine[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:], strict=False))  # decaying after the warm-up
    assert build_scheduler("none", total_epochs=5) is None  # no scheduler at all: the optimizer's lr
    warm = build_scheduler("none", total_epochs=5, warmup_epochs=4)(sgd(1.0))
    assert lrs(warm, 5) == [0.25, 0.5, 0.75, 1, 1]


@pytest.mark.parametrize(("name", "params", "fragments"), [
    ("linear", {}, ["'linear'", "none, cosine, step"]),
    ("cosine", {"milestones": [3]}, ["milestones", "warmup_epochs, min_factor"]),
    ("step", {"milestones": [5, 3]}, ["scheduler.milestones", "increasing", "[5, 3]"]),
    ("step", {"milestones": [2], "warmup_epochs": 4}, ["after the warm-up", "warmup_epochs=4", "[2]"]),
    ("step", {"milestones": [3], "gamma": 0.0}, ["scheduler.gamma", "0.0"]),
    ("none", {"warmup_epochs": -1}, ["scheduler.warmup_epochs", ">= 0", "-1"]),
    ("none", {"warmup_epochs": 1.5}, ["scheduler.warmup_epochs", "1.5"]),
    ("cosine", {"min_factor": 1.5}, ["scheduler.min_factor", "1.5"]),
])
def test_bad_schedules_are_refused_before_training(name, params, fragments):
    with pytest.raises((ValueError, TypeError)) as error:
        build_scheduler(name, total_epochs=10, **params)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_a_short_trial_of_a_long_schedule_runs_its_first_epochs():
    # Milestones and warm-up past trainer.max_epochs are never reached, as with torch's MultiStepLR.
    trial = build_scheduler("step", total_epochs=2, warmup_epochs=4, milestones=[20, 25], gamma=0.1)(sgd(1.0))
    assert lrs(trial, 2) == [0.25, 0.5]
    with pytest.raises(ValueError, match="finite trainer.max_epochs"):
        build_scheduler("cosine", total_epochs=-1)


class EpochRecorder(nn.Module):
    """A loss that is CE and records the epochs its `on_train_epoch_start` hook was called with."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.epochs = inner, []

    def forward(self, logits, target):
        return self.inner(logits, target)

    def on_train_epoch_start(self, epoch: int) -> None:
        self.epochs.append(epoch)


def test_a_run_steps_the_schedule_per_epoch_logs_the_lr_and_tells_the_loss_the_epoch(tmp_path):
    overrides = [*TINY, "trainer.max_epochs=4", "trainer.log_every_n_steps=1", "optimizer.lr=0.01",
                 "scheduler=step", "scheduler.warmup_epochs=2", "scheduler.milestones=[3]",
                 "scheduler.gamma=0.5"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    trainer, module, datamodule = build_run(cfg, tmp_path)
    module.losses[0] = EpochRecorder(module.losses[0])
    trainer.fit(module, datamodule=datamodule)
    assert module.losses[0].epochs == [0, 1, 2, 3]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    lrs = [e.value for e in events.Scalars(board_tag("train/lr"))]
    assert lrs == pytest.approx([0.005, 0.01, 0.01, 0.005])


def test_the_default_is_no_schedule():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config")
    assert cfg.scheduler.name == "none" and cfg.scheduler.warmup_epochs == 0
