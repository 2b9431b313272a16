"""Seed batches: K runs of one config (seeds s, s+1, ..., s+K-1) trained together as one stacked model.

Small models leave a Lightning step mostly loop overhead, and a sweep pays each job's start-up again;
K seeds in one process share both. Each seed stays an independent run: its own data (generation, split,
scaling, shuffling order), initialisation, loss (parameters from its own class counts), optimizer state
and metrics. Its parameters are slice k of tensors stacked along a leading seed dimension, and the model
runs once per step on all K through `torch.func.vmap` over `functional_call`. The step minimises the
sum of the K losses; seed k's loss depends only on slice k, so slice k's gradient is exactly what seed k
alone would get, and element-wise optimizers (Adam, SGD, ...) then update every slice as its own run
would. Gradient-norm clipping is done per seed. Each seed writes what a single run writes into
`<run dir>/seed=<s>/`: TensorBoard events, `metrics.json` and `checkpoints/last.ckpt` (its own, in the
single run's form, written when training ends). The batch's checkpoint (`<run dir>/checkpoints/last.ckpt`,
refreshed every epoch) holds every seed, and `ckpt_path=last` resumes the batch from it, after the checks a
single run's resume makes (`resume_batch`).

A seed's record is written by the single run's writer (`xentlab.lab.runs.RunRecord`) and ends as a single run
ends: `completed` (with the same divergence `warnings`), `failed` (its loss went NaN or infinite, detected
as a single run's is: the other seeds train on; or the batch raised) or `interrupted` (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import traceback
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from xentlab.lab import plots
from xentlab.lab.checkpoint import SafeCheckpointIO, load_checkpoint
from xentlab.lab.loggers import build_logger, send_record
from xentlab.lab.metrics import StageMetrics
from xentlab.lab.module import (
    LeanModule,
    log_figures,
    loss_curves_figure,
    posthoc_metrics,
    write_data_description,
    write_hparams,
)
from xentlab.lab.runs import FolderHoldsAnotherRun, Interruption, RunRecord, RunRecorder, nonfinite_loss
from xentlab.lab.schedules import build_scheduler
from xentlab.lab.selection import SELECTED_EPOCH, BestEpoch, best_epoch_callback, restore_best, seed_part
from xentlab.lab.slurm import lightning_plugins
from xentlab.lab.validation import ConfigError
from xentlab.train import (
    CHECKPOINT_DIR,
    RunInterrupted,
    RunNotRecorded,
    build_parts,
    flat_params,
    nothing_to_resume,
    quiet_lightning,
    resume_point,
    trainer_arguments,
    try_to_record,
)

# Optimizers whose update of each parameter element depends only on that element's own gradient and
# state, so an update of stacked parameters is K independent updates. (L-BFGS's line search, or
# layer-wise trust ratios as in LAMB/LARS, would couple the seeds.)
ELEMENTWISE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax,
                          torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad,
                          torch.optim.Adadelta)


def check_seeds(seeds) -> int:
    """`seeds` as a positive int, else a ConfigError (a ValueError) naming the value."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds (how many seeds to train together: seed, seed+1, ...) must be an integer "
                         f">= 1, got {seeds!r}")
    return seeds


def seed_dir(output_dir: Path, seed: int) -> Path:
    """Where seed `seed` of a batch writes its run: `<output_dir>/seed=<seed>`."""
    return Path(output_dir) / f"seed={seed}"


def seed_config(cfg: DictConfig, seed: int) -> DictConfig:
    """The config of one seed of the batch: `cfg` with `seed` set and `seeds: 1` (a single run's config)."""
    one = copy.deepcopy(cfg)
    with open_dict(one):
        one.seed, one.seeds = seed, 1
    return one


def seed_overrides(overrides, seed: int) -> list[str]:
    """A seed's command-line overrides: the batch's, without `seed=`/`seeds=`, plus `seed=<seed>`."""
    kept = [o for o in overrides if o.lstrip("+~").partition("=")[0] not in ("seed", "seeds")]
    return [*kept, f"seed={seed}"]


def check_optimizer(factory) -> None:
    """Refuse an optimizer whose update could couple the seeds of a batch."""
    cls = factory.func if isinstance(factory, functools.partial) else factory
    if not (isinstance(cls, type) and issubclass(cls, ELEMENTWISE_OPTIMIZERS)):
        names = ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
        raise ValueError(f"seeds > 1 trains the seeds as one stacked model, which needs an optimizer that "
                         f"updates each parameter element on its own; {getattr(cls, '__name__', cls)!r} is "
                         f"not one known to. Use one of {names}, or seeds=1")


# --- the stacked model ---------------------------------------------------------------------------------

class StackedModel(nn.Module):
    """K models of one architecture as one module: every parameter and buffer stacked along dim 0.

    forward maps inputs (K, B, ...) to outputs (K, B, ...), model k applied to x[k]: vmap over
    functional_call, so any architecture built by `xentlab.lab.models` works without a batched rewrite. A
    plain stack of Linear and ReLU layers (the default MLP, the linear model) takes batched matmuls instead,
    h <- baddbmm(b, h, W^T): the same arithmetic without vmap's per-op dispatch, ~40% of its time here.
    Dropout draws a different mask per seed (vmap's randomness="different"), from the global generator:
    each seed is still an independent run, but not bit-identical to the same seed trained alone.
    """

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        shapes = [[(n, t.shape) for n, t in m.state_dict().items()] for m in models]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("the models of a seed batch must share one architecture")
        params, buffers = stack_module_state(models)
        # models[0] serves as the skeleton; its own tensors are replaced by the stacked ones.
        self.model = copy.deepcopy(models[0])
        for name, value in params.items():
            owner, leaf = self._owner(name)
            setattr(owner, leaf, nn.Parameter(value.detach().clone()))
        for name, value in buffers.items():
            owner, leaf = self._owner(name)
            owner.register_buffer(leaf, value.clone())
        self.num_models = len(models)
        self._forward = vmap(self._one, in_dims=(0, 0, 0), randomness="different")
        layers = list(self.model) if isinstance(self.model, nn.Sequential) else [self.model]
        self._plain = all(type(layer) in (nn.Linear, nn.ReLU) for layer in layers)
        self._layers = layers

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        prefix, _, leaf = name.rpartition(".")
        return (self.model.get_submodule(prefix) if prefix else self.model), leaf

    def _one(self, params, buffers, x):
        return functional_call(self.model, (params, buffers), (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._plain and x.dim() == 3:
            for layer in self._layers:
                if type(layer) is nn.ReLU:
                    x = torch.relu(x)
                elif layer.bias is None:
                    x = torch.bmm(x, layer.weight.transpose(1, 2))
                else:
                    x = torch.baddbmm(layer.bias.unsqueeze(1), x, layer.weight.transpose(1, 2))
            return x
        return self._forward(dict(self.model.named_parameters()), dict(self.model.named_buffers()), x)

    def unstacked(self, k: int) -> dict[str, torch.Tensor]:
        """Model k's state dict, as the single model's `state_dict()` would hold it."""
        return {name: value[k] for name, value in self.model.state_dict().items()}


# --- data: K data modules, one batch of K slices per step ------------------------------------------------

class StackedBatches:
    """Zips K loaders of equal length: each step yields x (K, B, ...) and y (K, B, ...), slice k from
    loader k, so every seed sees exactly the batches its own run would."""

    def __init__(self, loaders: list):
        self.loaders = loaders

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self):
        for batches in zip(*self.loaders, strict=True):
            xs, ys = zip(*batches, strict=True)
            yield torch.stack(xs), torch.stack(ys)


class SeedBatchData(pl.LightningDataModule):
    """The seeds' own data modules behind one LightningDataModule that serves stacked batches."""

    def __init__(self, datamodules: list):
        super().__init__()
        first = datamodules[0]
        for k, dm in enumerate(datamodules):
            for attribute in ("task", "num_classes", "num_features"):
                if getattr(dm, attribute) != getattr(first, attribute):
                    raise ValueError(f"seed batch: seed {k}'s data has {attribute}={getattr(dm, attribute)}, "
                                     f"the first seed's {getattr(first, attribute)}")
            for name, (_, y) in dm.splits.items():
                if len(y) != len(first.splits[name][1]):
                    raise ValueError(
                        f"seed batch: the {name} split has {len(y)} samples for seed index {k} but "
                        f"{len(first.splits[name][1])} for the first seed; a batch trains its seeds in lock "
                        "step, so every seed's splits must have the same sizes (use seeds=1 for this data)")
        self.datamodules = datamodules
        self.task, self.num_classes, self.num_features = first.task, first.num_classes, first.num_features

    def train_dataloader(self):
        return StackedBatches([dm.train_dataloader() for dm in self.datamodules])

    def val_dataloader(self):
        return StackedBatches([dm.val_dataloader() for dm in self.datamodules])

    def test_dataloader(self):
        return StackedBatches([dm.test_dataloader() for dm in self.datamodules])


# --- the LightningModule ---------------------------------------------------------------------------------

class SeedRun:
    """What belongs to one seed of the batch besides its parameters: where it logs, what it logged."""

    def __init__(self, seed: int, logger: TensorBoardLogger | None, run_params: dict, datamodule):
        self.seed, self.logger, self.run_params, self.datamodule = seed, logger, run_params, datamodule
        self.final: dict[str, float] = {}  # the last value of each logged `<stage>/<metric>`
        self.error: FloatingPointError | None = None  # set when the seed's loss went NaN or infinite
        self.failed_epoch = 0  # the epoch it did

    @property
    def writer(self):
        return None if self.logger is None else self.logger.experiment

    @property
    def minority(self) -> int:
        return int(torch.as_tensor(self.datamodule.class_counts).argmin())


def interchangeable(losses: list[nn.Module]) -> bool:
    """Whether the seeds' losses are one function whose mean is a mean of rows: one class that says so
    (`averages_rows`, which the built-ins declare; a plugin loss without it keeps per-seed calls) with
    `reduction="mean"` to switch, equal plain settings and buffers, and no parameters, submodules or epoch
    hook (which could make them differ later)."""
    first = losses[0]
    if getattr(first, "averages_rows", False) is not True or getattr(first, "reduction", None) != "mean" \
            or callable(getattr(first, "on_train_epoch_start", None)):
        return False

    def settings(loss: nn.Module) -> dict | None:
        plain = {k: v for k, v in vars(loss).items() if not k.startswith("_") and k != "training"}
        if any(not isinstance(v, (bool, int, float, str, type(None))) for v in plain.values()):
            return None
        if loss._parameters or loss._modules:
            return None
        return plain

    reference = settings(first)
    if reference is None:
        return False
    for loss in losses[1:]:
        if type(loss) is not type(first) or settings(loss) != reference \
                or loss._buffers.keys() != first._buffers.keys():
            return False
        for name, value in loss._buffers.items():
            other = first._buffers[name]
            if (value is None) != (other is None) or (value is not None and not torch.equal(value, other)):
                return False
    return True


def row_means(loss: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(K,) the mean over each seed's rows of `loss`'s reduction="none" values on all K*B rows of `logits`
    (K, B, C) at once, rows whose target is the loss's `ignore_index` left out as PyTorch's mean does."""
    k, b = y.shape[:2]
    loss.reduction = "none"
    try:
        values = loss(logits.flatten(0, 1), y.flatten(0, 1))
    finally:
        loss.reduction = "mean"
    values = values.reshape(k, b, -1)
    ignore = getattr(loss, "ignore_index", None)
    if isinstance(ignore, int) and y.dim() == 2 and not y.is_floating_point():
        kept = (y != ignore).sum(1).to(values.dtype)
        return values.sum((1, 2)) / (kept * values.shape[2])
    return values.mean((1, 2))


class SeedBatchModule(LeanModule):
    """Trains a StackedModel with one loss per seed (each on its seed's slice of the logits) and logs
    every seed's metrics, figures and HParams session to that seed's own TensorBoard logger."""

    def __init__(self, model: StackedModel, losses: list[nn.Module], runs: list[SeedRun], *, task: str,
                 num_classes: int, optimizer, figure_every_n_epochs: int = 0, scheduler=None):
        super().__init__()
        if len(losses) != model.num_models or len(runs) != model.num_models:
            raise ValueError(f"a batch of {model.num_models} models needs as many losses and runs, got "
                             f"{len(losses)} and {len(runs)}")
        if isinstance(figure_every_n_epochs, bool) or not isinstance(figure_every_n_epochs, int) \
                or figure_every_n_epochs < 0:
            raise ValueError(f"figure_every_n_epochs must be an integer >= 0, got {figure_every_n_epochs!r}")
        check_optimizer(optimizer)
        self.model, self.losses, self.runs = model, nn.ModuleList(losses), runs
        self.task, self.num_classes = task, num_classes
        self.optimizer_factory, self.figure_every_n_epochs = optimizer, figure_every_n_epochs
        # A schedule is a function of the epoch alone (xentlab.lab.schedules), the same for every seed.
        self.scheduler_factory = scheduler
        # Each seed's metrics on its loss's probabilities (ClassifierModule does the same).
        maps = [getattr(loss, "probability_map", "softmax") for loss in losses]
        self.metrics = nn.ModuleList(nn.ModuleDict({
            "train_": StageMetrics(task, num_classes, full=False, probability_map=m),
            "val_": StageMetrics(task, num_classes, keep_predictions=True, probability_map=m),
            "test_": StageMetrics(task, num_classes, keep_predictions=True, probability_map=m),
        }) for m in maps)
        self._logit_grad_norms: torch.Tensor | None = None
        # None: one call may serve all seeds, checked at the first step (`_seed_losses`); False: it may not.
        self._shared_loss: bool | None = None if interchangeable(losses) else False
        self._val_logits: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(runs)
        self._redrawn = plots.Redrawn()  # one figure per layout, redrawn for every seed and stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # --- steps -------------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        values = self._step(batch, "train")
        # Seed k's parameters reach only values[k], so the sum's gradient is each seed's own. The losses
        # per seed are for xentlab.lab.runs.RunRecorder (each seed's divergence warnings).
        return {"loss": values.sum(), "run_losses": values.detach()}

    def _step(self, batch, stage: str) -> torch.Tensor:
        """The K seeds' losses on their slices of the stacked batch."""
        x, y = batch
        logits = self(x)
        values = self._seed_losses(logits, y)
        every = self.trainer.log_every_n_steps
        if logits.requires_grad and every and (self.global_step + 1) % every == 0:
            logits.register_hook(self._record_logit_grads)
        detached, losses = logits.detach(), values.detach()
        for k, metrics in enumerate(self.metrics):
            metrics[f"{stage}_"].update(detached[k], y[k], losses[k])
        return values

    def _seed_losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(K,) each seed's loss on its own slice. When every seed's loss is the same function
        (`interchangeable`) the K means come from one call on all K*B rows with reduction="none": ten small
        loss calls a step cost more than the stacked model's whole forward. The first call checks that form
        against the seeds' own calls (a weighted mean, say, is not a mean of rows) and keeps to the seeds'
        own calls for good if it differs."""
        if self._shared_loss is False:
            return torch.stack([loss(logits[k], y[k]) for k, loss in enumerate(self.losses)])
        if self._shared_loss:
            return row_means(self.losses[0], logits, y)
        own = torch.stack([loss(logits[k], y[k]) for k, loss in enumerate(self.losses)])
        try:
            shared = row_means(self.losses[0], logits, y).detach()
        except (RuntimeError, ValueError, TypeError):  # a "none" output that is not one value per row
            shared = None
        self._shared_loss = shared is not None and shared.shape == own.shape and bool(
            torch.allclose(shared, own.detach(), rtol=1e-5, atol=1e-7))
        return own

    def _record_logit_grads(self, grad: torch.Tensor) -> None:
        # Per seed, as ClassifierModule: N * mean_i ||dL_k/dx_i||.
        self._logit_grad_norms = grad.detach().float().norm(dim=2).mean(dim=1) * grad.shape[1]

    def on_after_backward(self) -> None:
        if self._logit_grad_norms is not None:
            for run, value in zip(self.runs, self._logit_grad_norms.tolist(), strict=True):
                if run.logger is not None:
                    run.logger.log_metrics({"train/logit_grad_norm": value}, step=self.global_step)
            self._logit_grad_norms = None

    def on_train_epoch_start(self) -> None:
        for loss in self.losses:
            hook = getattr(loss, "on_train_epoch_start", None)
            if callable(hook):
                hook(self.current_epoch)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        for run in self.runs:
            if run.logger is not None:
                run.logger.log_metrics({"train/lr": lr}, step=self.global_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clipping by value is element-wise; clipping by norm uses each seed's own gradient norm (over its
        slice of every stacked parameter and its own loss's parameters), never one norm over the batch."""
        if gradient_clip_val is None or gradient_clip_algorithm == "value":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        stacked = [p.grad for p in self.model.parameters() if p.grad is not None]
        squares = sum((g.float().flatten(1).pow(2).sum(1) for g in stacked),
                      torch.zeros(self.model.num_models, device=self.device))
        own = [[p.grad for p in loss.parameters() if p.grad is not None] for loss in self.losses]
        squares = squares + torch.stack([sum((g.float().pow(2).sum() for g in grads),
                                             torch.zeros((), device=self.device)) for grads in own])
        # torch.nn.utils.clip_grad_norm_'s rule, per seed: scale by min(1, max_norm / (norm + 1e-6)).
        scale = (gradient_clip_val / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for g in stacked:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
        for k, grads in enumerate(own):
            for g in grads:
                g.mul_(scale[k].to(g.dtype))

    # --- epoch ends ----------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        images: dict[bytes, object] = {}  # seeds with equal losses and class counts share one figure
        for run, loss in zip(self.runs, self.losses, strict=True):
            if run.writer is None:
                continue
            write_data_description(run.writer, run.datamodule)
            key = repr((run.minority, {k: v.tolist() for k, v in loss.state_dict().items()},
                        run.run_params.get("loss.name"))).encode()
            if key not in images:
                name = run.run_params.get("loss.name", type(loss).__name__)
                images[key] = plots.to_image(loss_curves_figure(
                    loss, name, task=self.task, num_classes=self.num_classes, minority=run.minority,
                    device=self.device))
            run.writer.add_image("loss_curves", images[key], 0, dataformats="HWC")

    def on_train_epoch_end(self) -> None:
        for k, run in enumerate(self.runs):
            values = self._log_stage(k, "train")
            error = nonfinite_loss(values.get("loss", float("nan")), self.current_epoch, self.global_step)
            if run.error is None and error is not None:
                # As a single run would fail; the other seeds are unaffected and train on.
                run.error, run.failed_epoch = error, self.current_epoch
        if all(run.error is not None for run in self.runs):
            self.trainer.should_stop = True

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for metrics in self.metrics:
                metrics["val_"].reset()
            return
        epoch, every = self.current_epoch + 1, self.figure_every_n_epochs
        figures = epoch == self.trainer.max_epochs or (every > 0 and epoch % every == 0)
        for k in range(len(self.runs)):
            # For the post-hoc fits at test time, as ClassifierModule keeps them.
            self._val_logits[k] = self.metrics[k]["val_"].kept_logits()
            self._log_stage(k, "val", figures=figures)

    def objective_values(self, key: str) -> list[float]:
        """Each seed's latest value of a logged metric; NaN for a seed that failed or never logged it."""
        return [float(run.final.get(key, math.nan)) if run.error is None else math.nan for run in self.runs]

    def on_test_epoch_end(self) -> None:
        for k, run in enumerate(self.runs):
            metrics = self.metrics[k]["test_"]
            posthoc = posthoc_metrics(self._val_logits[k], *metrics.kept_logits(), task=self.task,
                                      probability_map=metrics.probability_map,
                                      class_counts=run.datamodule.class_counts, loss=self.losses[k],
                                      sampler=getattr(run.datamodule, "sampler", "instance"))
            self._log_stage(k, "test", figures=True)
            logged = {f"test/{name}": value for name, value in posthoc.items()}
            run.final.update(logged)
            if run.logger is not None:
                run.logger.log_metrics(logged, step=self.global_step)

    def on_test_end(self) -> None:
        for run in self.runs:
            final = {f"hp/{name.removeprefix('test/')}": value for name, value in run.final.items()
                     if name.startswith("test/") and name != "test/loss"}
            if run.logger is not None:  # the hp/ scalars go into the session's own sub-run
                write_hparams(run.writer, run.run_params, final, self.global_step)

    def _log_stage(self, k: int, stage: str, figures: bool = False) -> dict[str, float]:
        """Seed k's epoch metrics of `stage` to its logger (and figures); resets them, returns the values."""
        run, metrics = self.runs[k], self.metrics[k][f"{stage}_"]
        values = metrics.compute()
        if f"recall_class_{run.minority}" in values:
            values["minority_recall"] = values[f"recall_class_{run.minority}"]
        logged = {f"{stage}/{name}": value for name, value in values.items()}
        run.final.update(logged)
        if run.logger is not None:
            run.logger.log_metrics({**logged, "epoch": self.current_epoch}, step=self.global_step)
            if figures:
                log_figures(run.writer, self.global_step, stage, metrics, task=self.task,
                            num_classes=self.num_classes, redrawn=self._redrawn)
        metrics.reset()
        return values


# --- building and running a batch --------------------------------------------------------------------

def check_batch(cfg: DictConfig):
    """Refuse the settings a batch cannot train (several devices or nodes, an optimizer that couples the
    seeds) with a ValueError; return the optimizer factory."""
    devices, strategy = cfg.trainer.get("devices", 1), cfg.trainer.get("strategy")
    if cfg.trainer.get("num_nodes", 1) != 1 or devices not in (1, "1") or "ddp" in str(strategy):
        raise ValueError(f"seeds > 1 trains its seeds in one process on one device; got trainer.devices="
                         f"{devices}, trainer.strategy={strategy}: use seeds=1 with DDP")
    optimizer = instantiate(cfg.optimizer)
    check_optimizer(optimizer)
    return optimizer


def build_batch(cfg: DictConfig, output_dir: Path, seeds: list[int]) \
        -> tuple[pl.Trainer, SeedBatchModule, SeedBatchData]:
    """Trainer, module and data of a batch: each seed's parts built exactly as its single run builds them
    (same global seeding before `build_parts`, so the same initialisation), then stacked."""
    quiet_lightning()
    optimizer = check_batch(cfg)
    scheduler = build_scheduler(**OmegaConf.to_container(cfg.scheduler), total_epochs=cfg.trainer.max_epochs)
    datamodules, losses, models, runs = [], [], [], []
    data_log = logging.getLogger("xentlab.lab.data")
    shown_level = data_log.level
    for k, seed in enumerate(seeds):
        one = seed_config(cfg, seed)
        pl.seed_everything(seed, workers=True)
        # The class-count table once, with the first seed's: the other seeds' repeat it (or differ only
        # by their label noise), ten tables deep in a sweep's console.
        data_log.setLevel(logging.WARNING if k > 0 else shown_level)
        try:
            datamodule, loss, model = build_parts(one)
        finally:
            data_log.setLevel(shown_level)
        datamodules.append(datamodule)
        losses.append(loss)
        models.append(model)
        logger = build_logger(OmegaConf.to_container(cfg.logger), seed_dir(output_dir, seed),
                              flat_params(one))
        runs.append(SeedRun(seed, logger, flat_params(one), datamodule))
    # The seeds' runs drew their own initialisations above; what follows (dropout masks) draws from the
    # first seed's stream, as a single run of it would.
    pl.seed_everything(seeds[0], workers=True)
    data = SeedBatchData(datamodules)
    module = SeedBatchModule(StackedModel(models), losses, runs, task=data.task, num_classes=data.num_classes,
                             optimizer=optimizer, figure_every_n_epochs=cfg.figure_every_n_epochs,
                             scheduler=scheduler)
    # Each seed's losses for its divergence warnings; the batch's config stamped in its checkpoint.
    callbacks = [RunRecorder(OmegaConf.to_container(cfg, resolve=True), runs=len(seeds))]
    best = best_epoch_callback(cfg)
    if best is not None:
        callbacks.append(best)
    if cfg.trainer.get("enable_checkpointing", True):
        callbacks.append(ModelCheckpoint(dirpath=Path(output_dir) / CHECKPOINT_DIR, save_last=True))
    trainer = pl.Trainer(**trainer_arguments(cfg), logger=False, callbacks=callbacks,
                         default_root_dir=str(output_dir),
                         plugins=[SafeCheckpointIO(), *lightning_plugins()])
    return trainer, module, data


def train_batch(cfg: DictConfig, output_dir: str | Path, *, overrides=(), threads: int | None = None,
                fresh_if_nothing_to_resume: bool = False, announce=None) -> list[dict]:
    """Train seeds cfg.seed ... cfg.seed + cfg.seeds - 1 as one batch; each writes `seed=<s>/metrics.json`
    as its single run would (overrides with `seed=<s>`, config with `seed: <s>`). Returns the K records.

    Each seed ends as `xentlab.train.train` ends a single run, its record written by the same
    `RunRecord`: `completed` with its divergence `warnings`; `failed` if its loss went NaN (the others
    train on) or if the batch raised (every seed not already failed is recorded with that error, which is
    re-raised); `interrupted` for every seed not failed on Ctrl-C or SIGTERM (`RunInterrupted` is raised).
    With `ckpt_path=last` the batch resumes every seed from `<output_dir>/checkpoints/last.ckpt` after the
    checks of `resume_batch`; without a checkpoint that is an error, or a fresh start if
    `fresh_if_nothing_to_resume`.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    output_dir = Path(output_dir)
    seeds = [cfg.seed + k for k in range(check_seeds(cfg.seeds))]
    try:
        check_batch(cfg)  # refused before anything is written, as an invalid setting is
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from error
    records = [RunRecord(seed_dir(output_dir, s), seed_config(cfg, s), seed_overrides(overrides, s),
                         seed_batch=seeds) for s in seeds]
    trainer, module, interruption = None, None, Interruption()

    def epochs() -> int:
        return trainer.current_epoch if trainer is not None else 0

    def stopped(k: int, error: BaseException | None = None, trace: str | None = None,
                cause: str | None = None) -> dict:
        """Seed k's record when the batch ends early: `failed` with its own error if its loss went NaN,
        else `interrupted` by `cause`, or `failed` with the batch's `error`."""
        run = module.runs[k] if module is not None else None
        if run is not None and run.error is not None:
            return records[k].failed(run.error, epochs=run.failed_epoch)
        if cause is not None:
            return records[k].interrupted(cause, epochs=epochs(), metrics=run.final if run else {})
        return records[k].failed(error, epochs=epochs(), trace=trace)

    try:
        ckpt_path = cfg.ckpt_path
        if ckpt_path == "last":
            done, ckpt_path = resume_batch(cfg, output_dir, seeds, fresh_ok=fresh_if_nothing_to_resume)
            if done is not None:
                return done
        with interruption.watching():
            try:
                trainer, module, data = build_batch(cfg, output_dir, seeds)
            except (ValueError, TypeError) as error:  # as train(): a refusal while building is a setting
                raise ConfigError(str(error)) from error
            if announce is not None:  # train_seeds' announce(): the batch is built, its settings accepted
                announce()
            trainer.callbacks.append(interruption.stop_point())
            with interruption.deferring():
                trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
                batch_checkpoint = output_dir / CHECKPOINT_DIR / "last.ckpt"
                if batch_checkpoint.is_file():
                    split_checkpoint(batch_checkpoint, module,
                                     [seed_dir(output_dir, s) / CHECKPOINT_DIR for s in seeds],
                                     [OmegaConf.to_container(record.cfg, resolve=True) for record in records])
                if any(run.error is None for run in module.runs):
                    selected = restore_best(trainer, module, data)  # checkpoint=best: each seed's epoch
                    for run, epoch in zip(module.runs, selected or [], strict=False):
                        run.final[SELECTED_EPOCH] = float(epoch)
                    trainer.test(module, datamodule=data, verbose=False)
        recorder = next(c for c in trainer.callbacks if isinstance(c, RunRecorder))
        done = [stopped(k) if run.error is not None else
                records[k].completed(run.final, epochs=epochs(), warnings=recorder.warnings(k))
                for k, run in enumerate(module.runs)]
        for run, record in zip(module.runs, done, strict=True):
            send_record(run.logger, record, seed_dir(output_dir, run.seed) / "metrics.json")
        return done
    except FolderHoldsAnotherRun:
        raise  # the folder's records belong to that other run: leave them
    except Exception as error:
        trace = traceback.format_exc()
        lost = [try_to_record(functools.partial(stopped, k, error, trace), "failed")
                for k in range(len(seeds))]
        if any(lost):
            raise RunNotRecorded(f"{type(error).__name__}: {error}; {next(filter(None, lost))}") from error
        error.xentlab_recorded = True  # run_job need not record it again
        raise
    except (KeyboardInterrupt, SystemExit) as stop:  # Lightning turns Ctrl-C and SIGTERM into SystemExit
        cause = interruption.describe(stop)
        lost = [try_to_record(functools.partial(stopped, k, cause=cause), "interrupted")
                for k in range(len(seeds))]
        epoch = f" in epoch {trainer.current_epoch + 1}" if trainer is not None else ""
        where = f"recorded in {seed_dir(output_dir, '*') / 'metrics.json'}"
        raise RunInterrupted(f"interrupted by {cause}{epoch}; {next(filter(None, lost), where)}",
                             interruption.exit_code(cause)) from stop


def resume_batch(cfg: DictConfig, output_dir: Path, seeds: list[int], *, fresh_ok: bool) \
        -> tuple[list[dict] | None, str | None]:
    """For `ckpt_path=last` on a batch: (the seeds' records, None) if every seed already completed its
    `trainer.max_epochs` epochs; else (None, the batch checkpoint to resume every seed from), or
    (None, None) for a fresh start when there is none and `fresh_ok` (else the single run's error).

    Each seed's folder and the batch's are checked as `xentlab.train.resume_point` checks a single run's:
    each `seed=<s>/metrics.json` (or else its checkpoint) carries its seed's config, the batch checkpoint
    the batch's (and a single run's record in the batch's folder is another configuration); any
    difference other than those a resume may make raises `FolderHoldsAnotherRun` naming the folder and
    the keys, before anything is trained or written.
    """
    done = [resume_point(seed_config(cfg, s), seed_dir(output_dir, s), fresh_ok=True)[0] for s in seeds]
    _, checkpoint = resume_point(cfg, output_dir, fresh_ok=True)
    if all(record is not None for record in done):
        return done, None
    if checkpoint is None and not fresh_ok:
        raise nothing_to_resume(output_dir)
    return None, checkpoint


def split_checkpoint(path: Path, module: SeedBatchModule, out_dirs: list[Path], configs: list[dict]) -> None:
    """Writes `<out_dirs[k]>/last.ckpt`: the batch checkpoint at `path` cut into seed k's own, in the form a
    single run of that seed writes (model, loss and optimizer state under the single run's names and
    parameter order; its RunRecorder state, stamped with its config `configs[k]`; epoch, step, loop and
    schedule state as they are), so one seed can be loaded or continued alone (`seeds=1 seed=<s>
    ckpt_path=<that file>`), and its folder is matched to its config on a resume."""
    batch = load_checkpoint(path)
    callbacks = batch.get("callbacks") or {}
    recorded = callbacks.get(RunRecorder.__qualname__)
    recorder = RunRecorder(configs[0], runs=len(out_dirs))
    if recorded is not None:
        recorder.load_state_dict(recorded)
    stacked = [name for name, _ in module.model.model.named_parameters()]
    own = [len(list(loss.parameters())) for loss in module.losses]
    for k, out_dir in enumerate(out_dirs):
        one = {key: value for key, value in batch.items() if key not in ("state_dict", "optimizer_states")}
        state = {}
        for key, value in batch["state_dict"].items():
            head, _, rest = key.partition(".")
            if key.startswith("model.model."):
                state["model." + key.removeprefix("model.model.")] = value[k].clone()
            elif head in ("losses", "metrics") and rest.partition(".")[0] == str(k):
                state[("loss" if head == "losses" else head) + "." + rest.partition(".")[2]] = value
        one["state_dict"] = state
        if recorded is not None:
            one["callbacks"] = {**callbacks, RunRecorder.__qualname__: recorder.state_of(k, configs[k])}
        if BestEpoch.__qualname__ in callbacks:  # checkpoint=best: seed k's kept weights only
            one["callbacks"] = {**one.get("callbacks", callbacks),
                                BestEpoch.__qualname__: seed_part(callbacks[BestEpoch.__qualname__], k)}
        # Parameter order: the stacked model's, then loss 0's, loss 1's, ...; a single run: model, loss.
        first = len(stacked) + sum(own[:k])
        indices = list(range(len(stacked))) + list(range(first, first + own[k]))
        one["optimizer_states"] = []
        for optimizer in batch.get("optimizer_states", []):
            sliced = {}
            for new, old in enumerate(indices):
                if old in optimizer["state"]:
                    sliced[new] = {name: value[k].clone() if new < len(stacked) and torch.is_tensor(value)
                                   and value.dim() > 0 else value
                                   for name, value in optimizer["state"][old].items()}
            groups = [{**group, "params": list(range(len(indices)))} for group in optimizer["param_groups"]]
            one["optimizer_states"].append({"state": sliced, "param_groups": groups})
        SafeCheckpointIO().save_checkpoint(one, out_dir / "last.ckpt")
