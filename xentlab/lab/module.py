"""The LightningModule: forward the model, apply the loss it was given, log metrics and figures.

No loss math here, and no loss registry: the loss object comes from `train.py`. Logged names are
`<stage>/<metric>` (train/, val/, test/); in TensorBoard the stages are numbered (`BoardLogger`) so
its Time Series opens on validation and test. `hp/<metric>` are the final test metrics of the HParams
session, written into the run's `hparams` sub-run when testing ends. Conventions: docs/metrics.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from xentlab import functional as xF
from xentlab.lab import plots
from xentlab.lab.board import HPARAMS_RUN, board_tag
from xentlab.lab.metrics import (
    StageMetrics,
    logit_adjusted,
    loss_curve,
    model_prior,
    per_label,
    shift_calibration,
    temperature_scaled,
)
from xentlab.lab.runs import nonfinite_loss

CURVE_POINTS = 49
# Overrides that are no HParams column: threads and ckpt_path change nothing computed, and an experiment's
# settings show as their own keys. (Job folder names do include experiment and threads: conf/hydra.)
NOT_HPARAMS = ("experiment", "ckpt_path", "threads")


class BoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger with xentlab's layout: stage groups numbered by `board_tag`, and
    without the `epoch` counter Lightning adds to every epoch-level write (the step axis says it)."""

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics({board_tag(k): v for k, v in metrics.items() if k != "epoch"}, step)


class LeanModule(pl.LightningModule):
    """The glue both training modules (one run, a seed batch) share: plain attributes set without
    nn.Module's checks; train/val/test steps through the subclass's `_step(batch, stage)`; the optimizer
    (and learning-rate schedule) from the factories it stores as `optimizer_factory` and
    `scheduler_factory` (None: a constant rate)."""

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets bookkeeping attributes (the current hook's name) around every hook call, some 40
        # times a training step, and nn.Module.__setattr__'s checks for parameters, buffers and submodules
        # then cost ~0.1 ms a step. An existing plain attribute given a plain value needs none of them.
        if name in self.__dict__ and not isinstance(value, (torch.Tensor, nn.Module)):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        # Lightning's default interval: stepped once per epoch, after it.
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}


class ClassifierModule(LeanModule):
    """Trains `model` with `loss(logits, target)` and logs the metrics of `xentlab.lab.metrics` per epoch.

    Figures (confusion matrix, reliability diagram) and per-class PR curves go to TensorBoard every
    `figure_every_n_epochs` validation epochs (0: only the last), at the last epoch and at test.
    """

    def __init__(self, model: nn.Module, loss: nn.Module, *, task: str, num_classes: int,
                 optimizer: Callable[..., torch.optim.Optimizer], run_params: dict | None = None,
                 figure_every_n_epochs: int = 0,
                 scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
                 | None = None, overrides: Sequence[str] = (), shared_dir: str | Path | None = None,
                 varied: Sequence[str] | None = None):
        super().__init__()
        if isinstance(figure_every_n_epochs, bool) or not isinstance(figure_every_n_epochs, int) \
                or figure_every_n_epochs < 0:
            raise ValueError(f"figure_every_n_epochs must be an integer >= 0, got {figure_every_n_epochs!r}")
        # The run's flattened config (loss and its parameters, dataset, imbalance ratio, seed, ...) and
        # its command-line overrides, for the TensorBoard HParams view (`session_hparams`).
        self.run_params, self.overrides = dict(run_params or {}), list(overrides)
        self.varied = None if varied is None else list(varied)
        # A sweep's folder: the loss-curve figure, the same for every seed, is drawn once per setting.
        self.shared_dir = None if shared_dir is None else Path(shared_dir)
        self.model, self.loss, self.task, self.num_classes = model, loss, task, num_classes
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.figure_every_n_epochs = figure_every_n_epochs
        # How the loss turns logits into probabilities: calibration, NLL and Brier are measured on those.
        probability_map = getattr(loss, "probability_map", "softmax")
        # ModuleDict keys may not shadow nn.Module.train, hence the trailing underscore.
        self.metrics = nn.ModuleDict({
            "train_": StageMetrics(task, num_classes, full=False, probability_map=probability_map),
            "val_": StageMetrics(task, num_classes, keep_predictions=True, probability_map=probability_map),
            "test_": StageMetrics(task, num_classes, keep_predictions=True, probability_map=probability_map),
        })
        self._logit_grad_norm: torch.Tensor | None = None
        self._val_logits: tuple[torch.Tensor, torch.Tensor] | None = None  # last validation epoch
        self._redrawn = plots.Redrawn()  # the validation figures' layouts, redrawn at test

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # --- steps -------------------------------------------------------------------------------------

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        # Only on the steps Lightning writes to the logger: the norm on every step would cost more than
        # the rest of a small model's step.
        every = self.trainer.log_every_n_steps
        if logits.requires_grad and self.logger is not None and every and (self.global_step + 1) % every == 0:
            logits.register_hook(self._record_logit_grad)
        self.metrics[f"{stage}_"].update(logits.detach(), y, loss.detach())
        return loss

    def _record_logit_grad(self, grad: torch.Tensor) -> None:
        # N * mean_i ||dL/dx_i||: the per-sample push under a batch-mean loss, free of the batch size.
        self._logit_grad_norm = grad.detach().float().norm(dim=1).mean() * grad.shape[0]

    def on_after_backward(self) -> None:
        if self._logit_grad_norm is not None:
            # Straight to the logger, at the step Lightning would use: self.log costs ~0.5 ms a call.
            self.logger.log_metrics({"train/logit_grad_norm": float(self._logit_grad_norm)},
                                    step=self.global_step)
            self._logit_grad_norm = None

    def on_train_epoch_start(self) -> None:
        # A loss may change with the epoch (LDAM's deferred re-weighting): the documented hook, optional.
        hook = getattr(self.loss, "on_train_epoch_start", None)
        if callable(hook):
            hook(self.current_epoch)
        if self.logger is not None:
            # Straight to the logger, once an epoch, like the logit-gradient norm.
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.logger.log_metrics({"train/lr": lr}, step=self.global_step)

    # --- epoch ends: scalars, figures, the HParams session -----------------------------------------

    def on_fit_start(self) -> None:
        writer = self._writer()
        if writer is not None:
            write_data_description(writer, self.trainer.datamodule)
        if writer is not None and self._claim_loss_curves():
            name = self.run_params.get("loss.name", type(self.loss).__name__)
            figure = loss_curves_figure(self.loss, name, task=self.task, num_classes=self.num_classes,
                                        minority=self._minority_class() or 0, device=self.device)
            writer.add_image("loss_curves", plots.to_image(figure), 0, dataformats="HWC")

    def on_train_epoch_end(self) -> None:
        loss = self._log_stage("train")["loss"]
        # In a sweep the error marks the job failed and the others go on.
        error = nonfinite_loss(loss, self.current_epoch, self.global_step)
        if error is not None:
            raise error

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.metrics["val_"].reset()
            return
        epoch, every = self.current_epoch + 1, self.figure_every_n_epochs
        last = epoch == self.trainer.max_epochs
        # Kept for the post-hoc fits at test time; the last epoch's logits are the tested model's.
        self._val_logits = self.metrics["val_"].kept_logits()
        self._log_stage("val", figures=last or (every > 0 and epoch % every == 0))

    def objective_values(self, key: str) -> list[float]:
        """The run's latest value of a logged metric, as a one-run list (`xentlab.lab.selection`)."""
        value = self.trainer.callback_metrics.get(key)
        return [math.nan if value is None else float(value)]

    def on_test_epoch_end(self) -> None:
        posthoc = self._posthoc(*self.metrics["test_"].kept_logits())
        self._log_stage("test", figures=True)
        self.log_dict({f"test/{name}": value for name, value in posthoc.items()}, sync_dist=True)

    def _posthoc(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        datamodule = self.trainer.datamodule
        return posthoc_metrics(self._val_logits, logits, target, task=self.task,
                               probability_map=self.metrics["test_"].probability_map,
                               class_counts=getattr(datamodule, "class_counts", None), loss=self.loss,
                               sampler=getattr(datamodule, "sampler", "instance"))

    def on_test_end(self) -> None:
        # Per-class recalls included: they are what a loss for imbalanced data is judged by. The loss
        # value is left out, since values of different losses are not comparable.
        final = {f"hp/{name.removeprefix('test/')}": float(value)
                 for name, value in self.trainer.callback_metrics.items()
                 if name.startswith("test/") and name != "test/loss"}
        writer = self._writer()
        if writer is not None:
            write_hparams(writer, self.run_params, final, self.global_step, self.overrides, self.varied)

    def _log_stage(self, stage: str, figures: bool = False) -> dict[str, float]:
        """Logs the stage's epoch metrics (and figures), resets them and returns the logged values."""
        metrics = self.metrics[f"{stage}_"]
        values = metrics.compute()
        minority = self._minority_class()
        if minority is not None and f"recall_class_{minority}" in values:
            values["minority_recall"] = values[f"recall_class_{minority}"]
        # The values are already global (torchmetrics syncs in compute), so under DDP every process holds
        # the same numbers; sync_dist only averages equal values, and tells Lightning they are synced.
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, sync_dist=True)
        if figures:
            self._log_figures(stage, metrics)
        metrics.reset()
        return values

    def _minority_class(self) -> int | None:
        """The training split's rarest class (label with the fewest positives), from the datamodule."""
        counts = getattr(self.trainer.datamodule, "class_counts", None)
        return None if counts is None else int(torch.as_tensor(counts).argmin())

    # --- TensorBoard figures -----------------------------------------------------------------------

    def _writer(self):
        """The SummaryWriter on the process that writes (rank 0), else None."""
        if isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            return self.logger.experiment
        return None

    def _log_figures(self, stage: str, metrics: StageMetrics) -> None:
        log_figures(self._writer(), self.global_step, stage, metrics, task=self.task,
                    num_classes=self.num_classes, redrawn=self._redrawn)

    def _claim_loss_curves(self) -> bool:
        """Whether this run draws the loss-curve figure: always, unless another run of the sweep with
        the same settings but the seed already claimed it (an atomic mkdir in the sweep folder)."""
        if self.shared_dir is None:
            return True
        setting = json.dumps({k: str(v) for k, v in sorted(self.run_params.items()) if k != "seed"})
        claims = self.shared_dir / ".loss_curves"
        claims.mkdir(parents=True, exist_ok=True)
        try:
            (claims / hashlib.sha256(setting.encode()).hexdigest()[:20]).mkdir()
        except FileExistsError:
            return False
        return True


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


# --- what a run writes to TensorBoard besides scalars (shared with xentlab.lab.seedbatch) -----------------

def write_data_description(writer, datamodule) -> None:
    """The datamodule's per-split class counts as a text panel (if it can describe itself)."""
    if hasattr(datamodule, "describe"):
        # Indented: TensorBoard's text plugin renders markdown, and this keeps the table's columns.
        writer.add_text("data/class_counts", "    " + datamodule.describe().replace("\n", "\n    "), 0)


def log_figures(writer, step: int, stage: str, metrics: StageMetrics, *, task: str, num_classes: int,
                redrawn: plots.Redrawn | None = None) -> None:
    """Confusion matrix, reliability diagram and per-class PR curves of the stage so far; `redrawn` keeps
    the figures to draw the next stage's (or seed's) into.

    Collective under DDP: every rank gathers the predictions; only a rank with a `writer` draws.
    """
    confusion = metrics.confusion_matrix().cpu().numpy()
    probs, target = (t.cpu() for t in metrics.kept_predictions())
    bins = metrics.calibration.bins()
    if writer is None:
        return
    redrawn, title = redrawn or plots.Redrawn(), f"{stage} confusion"
    if task == "multilabel":
        confusion_image = plots.to_image(plots.multilabel_confusion_figure(confusion, title=title))
    else:
        confusion_image = redrawn.confusion_matrix(confusion, title=title)
    reliability = redrawn.reliability(*(b.cpu().numpy() for b in bins), bins.ece,
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
    with SummaryWriter(str(Path(writer.log_dir) / HPARAMS_RUN)) as session:
        session.file_writer.add_summary(start, step)
        for name, value in final.items():
            session.add_scalar(name, value, step)
        session.file_writer.add_summary(end, step)


def hparam_values(params: dict) -> dict:
    """Config values as the HParams plugin takes them: numbers, strings and booleans as they are,
    None as "None" (so the column shows it), anything else as its string."""
    def plain(value):
        if value is None:
            return "None"
        return value if isinstance(value, (bool, int, float, str)) else str(value)

    return {key: plain(value) for key, value in params.items()}


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
