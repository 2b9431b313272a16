"""The LightningModule, for one seed or K seeds trained as one: forward the model, apply each seed's
loss, log each seed's metrics and figures to its own logger.

No loss math here, and no loss registry: the losses come from the run's builder (`xentlab.lab.run`).
Logged names are `<stage>/<metric>` (train/, val/, test/); in TensorBoard the stages are numbered
(`BoardLogger`) so its Time Series opens on validation and test. `hp/<metric>` are the final test
metrics of the HParams session, written into the run's `hparams` sub-run when testing ends.
Conventions: docs/metrics.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from xentlab import functional as xF
from xentlab.lab import plots
from xentlab.lab.board import HPARAMS_RUN, board_tag, purge_from
from xentlab.lab.metrics import (
    Reliability,
    StageMetrics,
    logit_adjusted,
    loss_curve,
    model_prior,
    per_label,
    shift_calibration,
    temperature_scaled,
)
from xentlab.lab.runs import nonfinite_loss
from xentlab.lab.stacking import (
    clip_grad_norm_per_seed,
    interchangeable,
    row_means,
    seed_axis,
    stacked_forward,
)

CURVE_POINTS = 49
# Overrides that are no HParams column: threads and ckpt_path change nothing computed, and an experiment's
# settings show as their own keys. (Job folder names do include experiment and threads: conf/hydra.)
NOT_HPARAMS = ("experiment", "ckpt_path", "threads")


class BoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger with xentlab's layout: stage groups numbered by `board_tag`, and
    without the `epoch` counter Lightning adds to every epoch-level write (the step axis says it)."""

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics({board_tag(k): v for k, v in metrics.items() if k != "epoch"}, step)


class SeedRun:
    """What belongs to one seed besides its parameters: its data, where it logs and what it logged.

    `run_params` (its flattened config), `overrides` (its command-line overrides) and `varied` (the keys
    its sweep varies, None when unknown) pick its TensorBoard HParams columns (`session_hparams`)."""

    def __init__(self, seed: int, datamodule, logger: TensorBoardLogger | None, run_params: dict,
                 overrides: Sequence[str] = (), varied: Sequence[str] | None = None):
        self.seed, self.datamodule, self.logger = seed, datamodule, logger
        self.run_params, self.overrides = dict(run_params), list(overrides)
        self.varied = None if varied is None else list(varied)
        self.final: dict[str, float] = {}  # the last value of each logged `<stage>/<metric>`
        self.error: FloatingPointError | None = None  # set when the seed's loss went NaN or infinite
        self.failed_epoch = 0  # the epoch it did
        self.val_logits: tuple[torch.Tensor, torch.Tensor] | None = None  # the last validation epoch's

    @property
    def minority(self) -> int | None:
        """The training split's rarest class (label with the fewest positives)."""
        counts = getattr(self.datamodule, "class_counts", None)
        return None if counts is None else int(torch.as_tensor(counts).argmin())

    def setting(self) -> str:
        """The run's settings but the seed: equal for the seeds of one setting of a sweep."""
        return json.dumps({k: str(v) for k, v in sorted(self.run_params.items()) if k != "seed"})


class ClassifierModule(pl.LightningModule):
    """Trains K >= 1 seeds of one configuration: `model` (K models stacked by `xentlab.lab.stacking`, the
    plain model at K = 1) with seed k's `losses[k](logits_k, target_k)`, and logs each seed's metrics of
    `xentlab.lab.metrics`, figures and HParams session to that seed's own logger (`runs[k]`), so every
    seed of a batch writes what a single run writes. Batches carry a leading seed axis (`seed_axis`).

    Figures (confusion matrix, reliability diagram) and per-class PR curves go to TensorBoard every
    `figure_every_n_epochs` validation epochs (0: only the last), at the last epoch and at test; the
    loss-vs-probability figure once per setting (once per sweep when given its folder, `shared_dir`).
    A seed whose epoch's training loss is NaN or infinite is failed (`SeedRun.error`) while the others
    train on; a single run raises that error.
    """

    def __init__(self, model: nn.Module, losses: Sequence[nn.Module], runs: Sequence[SeedRun], *, task: str,
                 num_classes: int, optimizer: Callable[..., torch.optim.Optimizer],
                 figure_every_n_epochs: int = 0,
                 scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
                 | None = None, shared_dir: str | Path | None = None):
        super().__init__()
        if len(losses) != len(runs) or getattr(model, "num_models", 1) != len(runs):
            raise ValueError(f"{len(runs)} seeds need as many models and losses, got "
                             f"{getattr(model, 'num_models', 1)} and {len(losses)}")
        if isinstance(figure_every_n_epochs, bool) or not isinstance(figure_every_n_epochs, int) \
                or figure_every_n_epochs < 0:
            raise ValueError(f"figure_every_n_epochs must be an integer >= 0, got {figure_every_n_epochs!r}")
        self.model, self.losses, self.runs = model, nn.ModuleList(losses), list(runs)
        self.num_seeds, self.task, self.num_classes = len(runs), task, num_classes
        # A schedule is a function of the epoch alone (xentlab.lab.schedules), the same for every seed.
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.figure_every_n_epochs = figure_every_n_epochs
        self.shared_dir = None if shared_dir is None else Path(shared_dir)
        # Metrics on the loss's probabilities (calibration, NLL and Brier are measured on those), every seed's
        # in one pass. ModuleDict keys may not shadow nn.Module.train, hence the trailing underscore.
        maps = {getattr(loss, "probability_map", "softmax") for loss in losses}
        if len(maps) > 1:
            raise ValueError(f"the seeds' losses map logits to probabilities differently ({sorted(maps)}); "
                             "a seed batch trains one loss")
        stage = functools.partial(StageMetrics, task, num_classes, self.num_seeds, probability_map=maps.pop())
        self.metrics = nn.ModuleDict({"train_": stage(full=False), "val_": stage(keep_predictions=True),
                                      "test_": stage(keep_predictions=True)})
        self._logit_grad_norms: torch.Tensor | None = None
        # None: one call may serve all seeds, checked at the first step (`_seed_losses`); False: it may not.
        self._shared_loss: bool | None = None if interchangeable(list(losses)) else False
        self._redrawn = plots.Redrawn()  # one figure per layout, redrawn for every seed and stage

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets bookkeeping attributes (the current hook's name) around every hook call, some 40
        # times a training step, and nn.Module.__setattr__'s checks for parameters, buffers and submodules
        # then cost ~0.1 ms a step. An existing plain attribute given a plain value needs none of them.
        if name in self.__dict__ and not isinstance(value, (torch.Tensor, nn.Module)):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (K, B, ...) of inputs (K, B, ...), seed k's model on x[k]."""
        return stacked_forward(self.model, x)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        # Lightning's default interval: stepped once per epoch, after it.
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    # --- steps -------------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        values = self._step(batch, "train")
        # Seed k's parameters reach only values[k], so the sum's gradient is each seed's own. The losses
        # per seed are for RunRecorder (each seed's divergence warnings).
        return {"loss": values.sum(), "run_losses": values.detach()}

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def _step(self, batch, stage: str) -> torch.Tensor:
        """(K,) the seeds' losses on their slices of the batch."""
        x, y = seed_axis(batch, self.num_seeds)
        logits = self(x)
        values = self._seed_losses(logits, y)
        # Only on the steps Lightning writes to the logger: the norm on every step would cost more than
        # the rest of a small model's step.
        every = self.trainer.log_every_n_steps
        if logits.requires_grad and self.logger is not None and every and (self.global_step + 1) % every == 0:
            logits.register_hook(self._record_logit_grads)
        self.metrics[f"{stage}_"].update(logits.detach(), y, values.detach())
        return values

    def _seed_losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(K,) each seed's loss on its own slice. When every seed's loss is the same function
        (`interchangeable`) the K means come from one call on all K*B rows with reduction="none": ten small
        loss calls a step cost more than the stacked model's whole forward. The first call checks that form
        against the seeds' own calls (a weighted mean, say, is not a mean of rows) and keeps to the seeds'
        own calls for good if it differs."""
        if self._shared_loss:
            return row_means(self.losses[0], logits, y)
        own = torch.stack([loss(logits[k], y[k]) for k, loss in enumerate(self.losses)])
        if self._shared_loss is None:
            try:
                shared = row_means(self.losses[0], logits, y).detach()
            except (RuntimeError, ValueError, TypeError):  # a "none" output that is not one value per row
                shared = None
            self._shared_loss = shared is not None and shared.shape == own.shape and bool(
                torch.allclose(shared, own.detach(), rtol=1e-5, atol=1e-7))
        return own

    def _record_logit_grads(self, grad: torch.Tensor) -> None:
        # Per seed, N * mean_i ||dL/dx_i||: the per-sample push under a batch-mean loss, free of batch size.
        self._logit_grad_norms = grad.detach().float().norm(dim=2).mean(dim=1) * grad.shape[1]

    def on_after_backward(self) -> None:
        if self._logit_grad_norms is not None:
            # Straight to the loggers, at the step Lightning would use: self.log costs ~0.5 ms a call.
            for run, value in zip(self.runs, self._logit_grad_norms.tolist(), strict=True):
                self._log(run, {"train/logit_grad_norm": value}, final=False)
            self._logit_grad_norms = None

    def on_train_epoch_start(self) -> None:
        # A loss may change with the epoch (LDAM's deferred re-weighting): the documented hook, optional.
        for loss in self.losses:
            hook = getattr(loss, "on_train_epoch_start", None)
            if callable(hook):
                hook(self.current_epoch)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        for run in self.runs:
            self._log(run, {"train/lr": lr}, final=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clipping by value is element-wise; clipping by norm of a batch uses each seed's own gradient
        norm (over its slice of every stacked parameter and its own loss's parameters)."""
        if self.num_seeds == 1 or gradient_clip_val is None or gradient_clip_algorithm == "value":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        own = [[p.grad for p in loss.parameters() if p.grad is not None] for loss in self.losses]
        stacked = [p.grad for p in self.model.parameters() if p.grad is not None]
        clip_grad_norm_per_seed(stacked, own, gradient_clip_val)

    # --- epoch ends: scalars, figures, the HParams session -----------------------------------------

    def on_fit_start(self) -> None:
        if self.trainer.ckpt_path is not None:
            return  # a resumed run: its first process wrote these
        images: dict[str, object] = {}  # seeds of one setting share one drawing
        for run, loss in zip(self.runs, self.losses, strict=True):
            writer = self._writer(run)
            if writer is None:
                continue
            write_data_description(writer, run.datamodule)
            if not self._claim_loss_curves(run):
                continue
            key = run.setting() + repr((run.minority, {k: v.tolist() for k, v in loss.state_dict().items()}))
            if key not in images:
                name = run.run_params.get("loss.name", type(loss).__name__)
                images[key] = plots.to_image(loss_curves_figure(
                    loss, name, task=self.task, num_classes=self.num_classes, minority=run.minority or 0,
                    device=self.device))
            writer.add_image("loss_curves", images[key], 0, dataformats="HWC")

    def on_train_epoch_end(self) -> None:
        losses = [values["loss"] for values in self._log_stage("train", step=self.global_step - 1)]
        for run, loss in zip(self.runs, losses, strict=True):
            error = nonfinite_loss(loss, self.current_epoch, self.global_step)
            if run.error is None and error is not None:
                # A single run fails with it; a batch's other seeds are unaffected and train on.
                run.error, run.failed_epoch = error, self.current_epoch
        if all(run.error is not None for run in self.runs):
            if self.num_seeds == 1:
                raise self.runs[0].error  # in a sweep the error marks the job failed and the others go on
            self.trainer.should_stop = True  # every seed of the batch failed; their records will say so

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.metrics["val_"].reset()
            return
        epoch, every = self.current_epoch + 1, self.figure_every_n_epochs
        figures = epoch == self.trainer.max_epochs or (every > 0 and epoch % every == 0)
        # Kept for the post-hoc fits at test time; the last epoch's logits are the tested model's.
        logits, target = self.metrics["val_"].kept_logits()
        for k, run in enumerate(self.runs):
            run.val_logits = logits[k], target[k]
        self._log_stage("val", figures=figures, step=self.global_step - 1)

    def objective_values(self, key: str) -> list[float]:
        """Each seed's latest value of a logged metric (`xentlab.lab.selection`); NaN for a seed that failed
        or never logged it."""
        return [float(run.final.get(key, math.nan)) if run.error is None else math.nan for run in self.runs]

    def on_test_epoch_end(self) -> None:
        metrics = self.metrics["test_"]
        logits, target = metrics.kept_logits()
        self._log_stage("test", figures=True)
        for k, run in enumerate(self.runs):
            posthoc = posthoc_metrics(run.val_logits, logits[k], target[k], task=self.task,
                                      probability_map=metrics.probability_map,
                                      class_counts=getattr(run.datamodule, "class_counts", None),
                                      loss=self.losses[k],
                                      sampler=getattr(run.datamodule, "sampler", "instance"))
            self._log(run, {f"test/{name}": value for name, value in posthoc.items()})

    def on_test_end(self) -> None:
        # Per-class recalls included: they are what a loss for imbalanced data is judged by. The loss
        # value is left out, since values of different losses are not comparable.
        for run in self.runs:
            final = {f"hp/{name.removeprefix('test/')}": value for name, value in run.final.items()
                     if name.startswith("test/") and name != "test/loss"}
            writer = self._writer(run)
            if writer is not None:
                write_hparams(writer, run.run_params, final, self.global_step, run.overrides, run.varied)

    def _log_stage(self, stage: str, figures: bool = False,
                   step: int | None = None) -> list[dict[str, float]]:
        """Every seed's epoch metrics of `stage` to its logger at `step` (default: the global step) and its
        figures; resets them, returns each seed's values. The values are already global (torchmetrics syncs
        in compute), so under DDP every process holds the same numbers. Training and validation metrics go
        at the last step trained, global step - 1 (where Lightning logs epoch-end training metrics): all
        an epoch logs lies below the global step its checkpoint holds, which a resume purges from
        (`purge_from`)."""
        metrics = self.metrics[f"{stage}_"]
        seeds = metrics.compute()
        if figures:
            confusion, reliability = metrics.confusion_matrix().cpu().numpy(), metrics.reliability()
            probs, target = (t.cpu() for t in metrics.kept_predictions())
        for k, (run, values) in enumerate(zip(self.runs, seeds, strict=True)):
            if f"recall_class_{run.minority}" in values:
                values["minority_recall"] = values[f"recall_class_{run.minority}"]
            self._log(run, {f"{stage}/{name}": value for name, value in values.items()}, step=step)
            writer = self._writer(run)
            if figures and writer is not None:
                log_figures(writer, self.global_step if step is None else step, stage, confusion[k],
                            reliability.seed(k), probs[k], target[k], task=self.task,
                            num_classes=self.num_classes, redrawn=self._redrawn)
        metrics.reset()
        return seeds

    def _log(self, run: SeedRun, values: dict[str, float], final: bool = True,
             step: int | None = None) -> None:
        """`values` to the seed's logger at `step` (default: the global step); if `final`, also its latest
        (its record's metrics)."""
        if final:
            run.final.update(values)
        if run.logger is not None:
            run.logger.log_metrics(values, step=self.global_step if step is None else step)

    # --- TensorBoard figures -----------------------------------------------------------------------

    def _writer(self, run: SeedRun):
        """The seed's SummaryWriter on the process that writes (rank 0), else None."""
        if isinstance(run.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            return run.logger.experiment
        return None

    def _claim_loss_curves(self, run: SeedRun) -> bool:
        """Whether this seed draws the loss-curve figure: always, unless another seed or run of the sweep
        with the same settings but the seed already claimed it (an atomic mkdir in the sweep folder)."""
        if self.shared_dir is None:
            return True
        claims = self.shared_dir / ".loss_curves"
        claims.mkdir(parents=True, exist_ok=True)
        try:
            (claims / hashlib.sha256(run.setting().encode()).hexdigest()[:20]).mkdir()
        except FileExistsError:
            return False
        return True

    # --- checkpoints: a single run's are in the single-model layout ----------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.num_seeds == 1:
            checkpoint["state_dict"] = single_run_layout(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.num_seeds == 1:
            checkpoint["state_dict"] = seed_axis_layout(checkpoint["state_dict"])
        # What the interrupted process logged after this checkpoint is logged again from here on.
        for run in self.runs:
            writer = self._writer(run)
            if writer is not None:
                purge_from(writer, checkpoint["global_step"])


def _with_prefix_renamed(state: dict, old: str, new: str) -> dict:
    return {new + key.removeprefix(old) if key.startswith(old) else key: value
            for key, value in state.items()}


def single_run_layout(state: dict) -> dict:
    """A one-seed module's state dict under a single run's names: `losses.0.x` as `loss.x` (the model's
    `model.x` is the same; metrics keep no state in checkpoints)."""
    return _with_prefix_renamed(state, "losses.0.", "loss.")


def seed_axis_layout(state: dict) -> dict:
    """The inverse of `single_run_layout`: a single run's checkpoint loaded into a one-seed module."""
    return _with_prefix_renamed(state, "loss.", "losses.0.")


def posthoc_metrics(val: tuple[torch.Tensor, torch.Tensor] | None, logits: torch.Tensor, target: torch.Tensor,
                    *, task: str, probability_map: str, class_counts=None, loss=None,
                    sampler: str = "instance") -> dict[str, float]:
    """Temperature scaling fitted on `val` (the last validation epoch's logits and targets; skipped when
    None) and, for single-label data, logit adjustment by the training priors `class_counts`, both
    scored on the test logits and targets; beside them classwise ECE and the ECE after moving the
    probabilities from the prior the model (`loss`, `sampler`) carries to the test split's prior
    (docs/metrics.md)."""
    single = class_counts is not None and task != "multilabel"
    prior = model_prior(class_counts, loss, sampler) if single else None
    values = shift_calibration(logits, target, task, probability_map, class_counts, prior)
    if val is not None:
        values.update(temperature_scaled(*val, logits, target, task, probability_map))
    if task != "multilabel" and class_counts is not None:
        values.update(logit_adjusted(logits, target, class_counts))
    return values


# --- what a run writes to TensorBoard besides scalars ----------------------------------------------------

def write_data_description(writer, datamodule) -> None:
    """The datamodule's per-split class counts as a text panel (if it can describe itself)."""
    if hasattr(datamodule, "describe"):
        # Indented: TensorBoard's text plugin renders markdown, and this keeps the table's columns.
        writer.add_text("data/class_counts", "    " + datamodule.describe().replace("\n", "\n    "), 0)


def log_figures(writer, step: int, stage: str, confusion: np.ndarray, bins: Reliability, probs: torch.Tensor,
                target: torch.Tensor, *, task: str, num_classes: int,
                redrawn: plots.Redrawn | None = None) -> None:
    """One seed's confusion matrix (`StageMetrics.confusion_matrix`), reliability diagram and per-class PR
    curves of a stage; `redrawn` keeps the figures to draw the next stage's (or seed's) into."""
    redrawn, title = redrawn or plots.Redrawn(), f"{stage} confusion"
    if task == "multilabel":
        confusion_image = plots.to_image(plots.multilabel_confusion_figure(confusion, title=title))
    else:
        confusion_image = redrawn.confusion_matrix(confusion, title=title)
    reliability = redrawn.reliability(*(b.cpu().numpy() for b in bins), float(bins.ece),
                                      title=f"{stage} reliability")
    for tag, image in (("confusion_matrix", confusion_image), ("reliability", reliability)):
        writer.add_image(board_tag(f"{stage}/{tag}"), image, step, dataformats="HWC")
    for c in range(num_classes):
        labels = target[:, c] > 0.5 if task == "multilabel" else target == c
        writer.add_pr_curve(board_tag(f"{stage}/pr_class_{c}"), labels, probs[:, c], step)


def loss_curves_figure(loss: Callable, loss_name: str, *, task: str, num_classes: int, minority: int,
                       device: torch.device | str = "cpu"):
    """The run's loss next to CE and MSE (xentlab.functional) as functions of p(true class)."""
    p = torch.linspace(0.01, 0.99, CURVE_POINTS)
    kwargs = {"task": task, "num_classes": num_classes, "true_class": minority, "device": device}
    # Multilabel: per label, where CE and MSE of the 2-way softmax are BCE and the binary Brier score.
    wrap = per_label if task == "multilabel" else (lambda loss: loss)
    curves = {"cross-entropy": loss_curve(wrap(xF.cross_entropy), p, **kwargs),
              "MSE on probabilities": loss_curve(wrap(xF.mse_loss), p, **kwargs),
              f"this run: {loss_name}": loss_curve(loss, p, **kwargs)}
    title = "loss vs p(true), " + ("per label" if task == "multilabel" else f"class {minority}")
    arrays = {name: (values.numpy(), grads.numpy()) for name, (values, grads) in curves.items()}
    return plots.loss_curves_figure(p.numpy(), arrays, title=title)


def write_hparams(writer, run_params: dict, final: dict[str, float], step: int,
                  overrides: Sequence[str] = (), varied: Sequence[str] | None = None) -> None:
    """The run's HParams session (`session_hparams` of its config and overrides) and its final `hp/`
    metrics, in the sub-run `<run>/hparams`."""
    # A sub-run of its own: TensorBoard's HParams view takes its metric columns from the scalars of a
    # session's run and the runs below it, so this keeps them to hp/*. Session summaries only, no
    # experiment summary (Lightning's log_hyperparams writes one): TensorBoard shows the first it finds,
    # so in a sweep mixing losses the other losses' parameters would vanish; without one it unites the
    # hyperparameters of all runs.
    _, start, end = hparams(session_hparams(run_params, overrides, varied), final)
    # Purging from `step`: a test stage run again after an interruption replaces the session, not adds one.
    with SummaryWriter(str(Path(writer.log_dir) / HPARAMS_RUN), purge_step=step) as session:
        session.file_writer.add_summary(start, step)
        for name, value in final.items():
            session.add_scalar(name, value, step)
        session.file_writer.add_summary(end, step)


def hparam_values(params: dict) -> dict:
    """Config values as the HParams plugin takes them: numbers, strings and booleans as they are,
    None as "None" (so the column shows it), anything else as its string."""
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value)
            for key, value in params.items()}


def session_hparams(params: dict, overrides: Sequence[str] = (), varied: Sequence[str] | None = None) -> dict:
    """A run's HParams columns: the loss's name and parameters (`loss.*`), the seed, and each key its
    overrides set that its sweep varies (`varied`, the sweep's varying keys or parameters; None: every
    override, all a single run has to go by); the config's constants stay out. A group choice
    (`data=digits`, `optimizer=sgd`) shows as the group's `name` (else its `_target_`). The seed is a
    string so TensorBoard shows `3`, not `3.0000`."""
    keys, choices = [key for key in params if key.startswith("loss.")], {}
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        constant = varied is not None and key not in varied
        if key.startswith("hydra") or key in (*NOT_HPARAMS, "seed") or constant:
            continue
        group = key.replace("/", ".")
        found = [k for k in (key, f"{group}.name", f"{group}._target_") if k in params][:1]
        # A group that only sets other keys (a `@package _global_` choice such as `+method=ldam_drw`)
        # shows as the choice itself.
        choices[key] = None if found else override.split("=", 1)[1]
        keys += found
    shown = hparam_values({key: params[key] for key in dict.fromkeys(keys)})
    shown.update({key: choice for key, choice in choices.items() if choice is not None})
    if "seed" in params:
        shown["seed"] = str(params["seed"])
    return shown
