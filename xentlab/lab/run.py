"""A run's lifecycle, one path for K >= 1 seeds: build, fit, resume, record.

A run trains seeds seed, seed+1, ..., seed+K-1 of one configuration (`seeds: K`) in one process, as one
stacked model (`xentlab.lab.stacking`); K = 1 is a single run. Each seed is an independent run with its
own data, initialisation, loss, optimizer state, logger and record: a single run writes into the run
folder, seed s of a batch into `<run folder>/seed=<s>/` (`plan_seeds`). Each seed ends as a single run
ends, its `metrics.json` written by `xentlab.lab.runs.RunRecord`: `completed` (with divergence
`warnings`), `failed` (its loss went NaN or infinite, while the other seeds train on; or the run raised)
or `interrupted` (Ctrl-C, SIGTERM).

The one place that builds the model stack is `build_run` (each seed's logger by
`xentlab.lab.loggers.build_logger`), and the place that
restores a run from its folder `resume_point`. The run's checkpoint, `<run folder>/checkpoints/last.ckpt`,
refreshed every epoch, holds every seed; a batch also leaves each seed its own, in a single run's form
(`split_checkpoint`), so a seed can be continued alone.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.profilers import PassThroughProfiler
from torch import nn

from xentlab.lab.checkpoint import RandomStates, SafeCheckpointIO, load_checkpoint
from xentlab.lab.data import TensorDataModule, build_datamodule, log_counts
from xentlab.lab.loggers import build_logger, send_record
from xentlab.lab.models import build_model
from xentlab.lab.module import ClassifierModule, SeedRun, single_run_layout
from xentlab.lab.runs import (
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    METRICS_FILE,
    RECORDER_STATE,
    FolderHoldsAnotherRun,
    Interruption,
    RunInterrupted,
    RunNotRecorded,
    RunRecord,
    check_fresh_start,
    divergence_warnings,
    folder_state,
    nothing_to_resume,
    read_record,
    stamped_config,
    try_to_record,
)
from xentlab.lab.schedules import build_scheduler
from xentlab.lab.selection import SELECTED_EPOCH, BestEpoch, best_epoch_callback, restore_best, seed_part
from xentlab.lab.slurm import lightning_plugins
from xentlab.lab.stacking import StackedData, check_optimizer, stack_data, stack_models, stacking_problem
from xentlab.lab.validation import ConfigError, check_seeds, flatten
from xentlab.losses import build_loss

log = logging.getLogger(__name__)


@dataclass
class Seed:
    """One seed of a run: its seed, its folder, its config (`seed` set, `seeds: 1`) and its overrides."""
    seed: int
    dir: Path
    cfg: DictConfig
    overrides: list[str]


def plan_seeds(cfg: DictConfig, output_dir: str | Path, overrides=()) -> list[Seed]:
    """The run's seeds: a single run (`seeds: 1`) is itself, in `output_dir`; seed s of a batch has the
    folder `<output_dir>/seed=<s>`, the config with `seed: s, seeds: 1` and the batch's overrides without
    `seed=`/`seeds=`, plus `seed=<s>` (what its single run would have)."""
    count = check_seeds(cfg.get("seeds", 1))
    if count == 1:
        return [Seed(cfg.seed, Path(output_dir), cfg, list(overrides))]
    kept = [o for o in overrides if o.lstrip("+~").partition("=")[0] not in ("seed", "seeds")]
    return [Seed(s, Path(output_dir) / f"seed={s}", seed_config(cfg, s), [*kept, f"seed={s}"])
            for s in range(cfg.seed, cfg.seed + count)]


def seed_config(cfg: DictConfig, seed: int) -> DictConfig:
    """The config of one seed of a batch: `cfg` with `seed` set and `seeds: 1` (a single run's config)."""
    one = copy.deepcopy(cfg)
    with open_dict(one):
        one.seed, one.seeds = seed, 1
    return one


# --- building ------------------------------------------------------------------------------------------

def build_parts(cfg: DictConfig, show_counts: bool = True) -> tuple[TensorDataModule, nn.Module, nn.Module]:
    """One seed's data module, loss and model: the loss gets the training split's class counts, the model
    the data's feature and class counts; then the class-count table is logged (if `show_counts`).
    Seeding is the caller's."""
    datamodule = build_datamodule(seed=cfg.seed, **cfg.data)
    loss = build_loss(**cfg.loss, task=datamodule.task, class_counts=datamodule.class_counts,
                      num_examples=len(datamodule.splits["train"][1]))
    model = build_model(**cfg.model, input_shape=datamodule.input_shape, num_outputs=datamodule.num_classes)
    if show_counts:
        log_counts(datamodule)
    return datamodule, loss, model


def check_batch(cfg: DictConfig, optimizer) -> None:
    """Refuse the settings a batch of seeds cannot train (several devices or nodes, an optimizer that
    couples the seeds) with a ValueError."""
    devices, strategy = cfg.trainer.get("devices", 1), cfg.trainer.get("strategy")
    if cfg.trainer.get("num_nodes", 1) != 1 or devices not in (1, "1") or "ddp" in str(strategy):
        raise ValueError(f"seeds > 1 trains its seeds in one process on one device; got trainer.devices="
                         f"{devices}, trainer.strategy={strategy}: use seeds=1 with DDP")
    check_optimizer(optimizer)


def build_run(cfg: DictConfig, output_dir: str | Path, overrides=(), shared_dir: Path | None = None,
              varied: list[str] | None = None) -> tuple[pl.Trainer, ClassifierModule, pl.LightningDataModule]:
    """Trainer, module and data of the run, built (and so validated) before the first training step.

    Each seed's parts are built as its single run builds them (seeded by its seed, so the same data and
    initialisation), then stacked. Training draws (dropout) continue the first seed's stream, as its
    single run's do. `overrides` (those of the keys in `varied`, the keys its sweep varies, when known)
    pick the TensorBoard HParams columns; `shared_dir` is the sweep folder of a multirun job.
    """
    quiet_lightning()
    seeds = plan_seeds(cfg, output_dir, overrides)
    optimizer = instantiate(cfg.optimizer)
    if len(seeds) > 1:
        check_batch(cfg, optimizer)
    scheduler = build_scheduler(**OmegaConf.to_container(cfg.scheduler), total_epochs=cfg.trainer.max_epochs)
    datamodules, losses, models, runs = [], [], [], []
    for k, seed in enumerate(seeds):
        pl.seed_everything(seed.seed, workers=True)
        # The class-count table once, the first seed's: the others repeat it (or differ by label noise).
        datamodule, loss, model = build_parts(seed.cfg, show_counts=k == 0)
        if k == 0:
            stream = _collect_rng_states()
        datamodules.append(datamodule)
        losses.append(loss)
        models.append(model)
        params = flat_params(seed.cfg)
        logger = build_logger(OmegaConf.to_container(cfg.logger), seed.dir, params)
        runs.append(SeedRun(seed.seed, datamodule, logger, params, seed.overrides, varied))
    _set_rng_states(stream)
    data = stack_data(datamodules)
    module = ClassifierModule(stack_models(models), losses, runs, task=data.task,
                              num_classes=data.num_classes, optimizer=optimizer, scheduler=scheduler,
                              figure_every_n_epochs=cfg.figure_every_n_epochs, shared_dir=shared_dir)
    # Each seed's losses for its divergence warnings; the run's config stamped in its checkpoint.
    # ... and the random streams, so a resume trains the epochs the uninterrupted run trains (RandomStates).
    callbacks = [RunRecorder(OmegaConf.to_container(cfg, resolve=True), runs=len(seeds)), RandomStates()]
    best = best_epoch_callback(cfg)  # checkpoint=best: each seed's weights of its best validation epoch
    if best is not None:
        callbacks.append(best)
    if cfg.trainer.get("enable_checkpointing", True):
        # last.ckpt, refreshed at every epoch's end (never mid-epoch, whatever trainer.val_check_interval),
        # is what `ckpt_path=last` resumes from: the interrupted epoch is trained again from its start.
        callbacks.append(ModelCheckpoint(dirpath=Path(output_dir) / CHECKPOINT_DIR, save_last=True,
                                         save_on_train_epoch_end=True))
    arguments = trainer_arguments(cfg, train_batches=len(data.train_dataloader()))
    if arguments.get("profiler") is None:  # trainer.profiler=simple|advanced|... is the user's to choose
        arguments["profiler"] = Unprofiled()
    trainer = pl.Trainer(**arguments, logger=[run.logger for run in runs], callbacks=callbacks,
                         default_root_dir=str(output_dir), plugins=[SafeCheckpointIO(), *lightning_plugins()])
    return trainer, module, data


class Unprofiled(PassThroughProfiler):
    """Lightning's default of no profiler, without its cost: Lightning enters `profile(name)` around each
    hook of the module and of every callback, ~100 times a training step, and the default's generator-based
    context manager costs a few microseconds each time, as much as a small model's forward."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.nullcontext:
        return self._nothing


def trainer_arguments(cfg: DictConfig, train_batches: int | None = None) -> dict:
    """`cfg.trainer` as Trainer keyword arguments; `enable_progress_bar: null` becomes a bar only when a
    person watches a terminal. Given the training batches per epoch, `log_every_n_steps` is at most the
    batches an epoch runs (after `limit_train_batches`): a small dataset then logs once per epoch instead
    of Lightning warning that the interval exceeds the epoch."""
    arguments = dict(cfg.trainer)
    if arguments.get("enable_progress_bar") is None:
        arguments["enable_progress_bar"] = sys.stdout.isatty()
    if train_batches is not None:
        limit = arguments.get("limit_train_batches")
        if isinstance(limit, float):
            train_batches = int(train_batches * limit)
        elif isinstance(limit, int) and not isinstance(limit, bool):
            train_batches = min(train_batches, limit)
        interval = arguments.get("log_every_n_steps", 50)  # Lightning's default
        if isinstance(interval, int) and train_batches >= 1:
            arguments["log_every_n_steps"] = min(interval, train_batches)
    return arguments


def quiet_lightning() -> None:
    """Silences Lightning's start-up chatter, which every job of a sweep would repeat: accelerator
    availability, a product tip, "Seed set to", a deprecation warning its own code triggers in recent
    torch (`LeafSpec`), and its hint to prefix `srun` whenever SLURM is installed (a SLURM job of a sweep
    goes through submitit, which needs no srun). Lightning's warnings about the run itself still show."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")


def flat_params(cfg: DictConfig) -> dict:
    """The run's choices as flat `group.key -> scalar` pairs (lists become strings), e.g. `loss.gamma`."""
    return {key: value if value is None or isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items()}


# --- fitting and recording -------------------------------------------------------------------------------

def train(cfg: DictConfig, output_dir: str | Path, *, overrides: list[str] | tuple[str, ...] = (),
          threads: int | None = None, shared_dir: str | Path | None = None,
          varied: list[str] | None = None, fresh_if_nothing_to_resume: bool = False,
          announce: Callable[[], None] | None = None) -> list[dict]:
    """Fit each seed on its training split, test it on its held-out split, write its `metrics.json`;
    return the seeds' records, in seed order.

    Every seed that starts ends with a record whose `status` is `completed` (with `warnings`, e.g.
    `diverged: ...` by `xentlab.lab.runs.divergence_warnings`), `failed` (with the error and traceback) or
    `interrupted` (Ctrl-C or SIGTERM; `RunInterrupted` is raised). An error of the run (not one seed's
    NaN loss, unless it was the last seed training) is re-raised after the records are written; if they
    cannot be written either (a full disk), the error raised says so (`RunNotRecorded`).

    With `ckpt_path=last` the run continues from `<output_dir>/checkpoints/last.ckpt` (global step, epoch,
    optimizer state and the TensorBoard curves carry on) after the checks of `resume_point`; a run whose
    seeds all completed `trainer.max_epochs` epochs is not trained again, so a resumed sweep redoes only
    its unfinished jobs. Without a checkpoint this is an error, or a fresh start if
    `fresh_if_nothing_to_resume` (a resumed sweep's jobs that never reached one). Without `ckpt_path`, a
    folder (or seed folder) that holds a run's results is refused before anything is built or written
    (`xentlab.lab.runs.check_fresh_start`): resume it, or start in another folder. `overrides` (the job's
    command-line overrides) are stored for the report; `threads`, if given, sets torch's intra-op
    threads first; `shared_dir` and `varied` are a multirun's sweep folder and the keys it varies (for
    TensorBoard's HParams columns). `announce()`, if given, is called once the run is built (and so its
    settings accepted), before training starts.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    output_dir = Path(output_dir)
    seeds = plan_seeds(cfg, output_dir, overrides)
    check_fresh_start(cfg, output_dir)  # a fresh start never overwrites a run: refused before any building
    if len(seeds) > 1:
        try:
            check_batch(cfg, instantiate(cfg.optimizer))  # refused before anything is written
            problem = stacking_problem_of(seeds[0].cfg) if cfg.model.get("_target_") is not None else None
        except (ValueError, TypeError) as error:
            raise ConfigError(str(error)) from error
        if problem is not None:
            log.warning("seeds=%d: model %s cannot train stacked (%s); its seeds train one after another",
                        len(seeds), cfg.model._target_, problem)
            return train_one_by_one(seeds, threads=threads, shared_dir=shared_dir, varied=varied,
                                    fresh_if_nothing_to_resume=fresh_if_nothing_to_resume, announce=announce)
    output_dir.mkdir(parents=True, exist_ok=True)
    batch = {"seed_batch": [seed.seed for seed in seeds]} if len(seeds) > 1 else {}
    records = [RunRecord(seed.dir, seed.cfg, seed.overrides, **batch) for seed in seeds]
    trainer, module, interruption = None, None, Interruption()

    def epochs() -> int:
        return trainer.current_epoch if trainer is not None else 0

    def stopped(k: int, error: BaseException | None = None, trace: str | None = None,
                cause: str | None = None) -> dict:
        """Seed k's record when the run ends early: `failed` with its own error if its loss went NaN,
        else `interrupted` by `cause`, or `failed` with the run's `error`."""
        run = module.runs[k] if module is not None else None
        if run is not None and run.error is not None:
            own_trace = trace if run.error is error else None
            return records[k].failed(run.error, epochs=run.failed_epoch, trace=own_trace)
        if cause is not None:
            return records[k].interrupted(cause, epochs=epochs(), metrics=run.final if run else {})
        return records[k].failed(error, epochs=epochs(), trace=trace)

    def tell_loggers() -> None:
        """Each seed's record just written, to its loggers beside TensorBoard (`logger=csv|wandb|mlflow`).
        Their failure is only logged: the seed's own record is written and stands."""
        for seed, run in zip(seeds, module.runs if module is not None else (), strict=False):
            try:
                send_record(run.logger, read_record(seed.dir / METRICS_FILE), seed.dir / METRICS_FILE)
            except Exception as error:  # whatever a third-party logger raises
                log.warning("the record of %s did not reach logger=%s: %s: %s", seed.dir,
                            cfg.logger.get("name"), type(error).__name__, error)

    try:
        ckpt_path = cfg.ckpt_path
        if ckpt_path == "last":
            done, ckpt_path = resume_point(cfg, output_dir, seeds, fresh_ok=fresh_if_nothing_to_resume)
            if done is not None:
                return done
        with interruption.watching():
            try:
                trainer, module, data = build_run(cfg, output_dir, overrides, shared_dir, varied)
            except (ValueError, TypeError) as error:
                # Building validates what the config checks could not (the data's settings, the loss for
                # this data, Lightning's view of the Trainer arguments): a refusal is a setting to change.
                raise ConfigError(str(error)) from error
            if announce is not None:
                announce()
            trainer.callbacks.append(interruption.stop_point())
            with interruption.deferring():
                trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
                if len(seeds) > 1 and (output_dir / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file():
                    split_checkpoint(output_dir / CHECKPOINT_DIR / LAST_CHECKPOINT, module, seeds)
                if any(run.error is None for run in module.runs):
                    selected = restore_best(trainer, module, data)  # checkpoint=best: each seed's epoch
                    for run, epoch in zip(module.runs, selected or [], strict=False):
                        run.final[SELECTED_EPOCH] = float(epoch)
                    trainer.test(module, datamodule=data, verbose=False)
        recorder = next(c for c in trainer.callbacks if isinstance(c, RunRecorder))
        done = [stopped(k) if run.error is not None else
                records[k].completed(run.final, epochs=epochs(), warnings=recorder.warnings(k))
                for k, run in enumerate(module.runs)]
        tell_loggers()
        return done
    except FolderHoldsAnotherRun:
        raise  # the folder's records belong to that other run: leave them
    except Exception as error:
        trace = traceback.format_exc()
        lost = [try_to_record(functools.partial(stopped, k, error, trace), "failed")
                for k in range(len(seeds))]
        if any(lost):
            raise RunNotRecorded(f"{type(error).__name__}: {error}; {next(filter(None, lost))}") from error
        tell_loggers()
        error.xentlab_recorded = True  # run_job need not record it again
        raise
    except (KeyboardInterrupt, SystemExit) as stop:  # Lightning turns Ctrl-C and SIGTERM into SystemExit
        cause = interruption.describe(stop)
        lost = [try_to_record(functools.partial(stopped, k, cause=cause), "interrupted")
                for k in range(len(seeds))]
        if not any(lost):
            tell_loggers()
        epoch = f" in epoch {trainer.current_epoch + 1}" if trainer is not None else ""
        folder = seeds[0].dir.with_name("seed=*") if len(seeds) > 1 else seeds[0].dir
        where = f"recorded in {folder / METRICS_FILE}"
        raise RunInterrupted(f"interrupted by {cause}{epoch}; {next(filter(None, lost), where)}",
                             interruption.exit_code(cause)) from stop


def stacking_problem_of(cfg: DictConfig) -> str | None:
    """Why the model of the run `cfg` (one seed's config) cannot train stacked (`stacking_problem`), or
    None: the model is built as its run builds it and tried on two rows of a training batch."""
    data_log = logging.getLogger("xentlab.lab.data")
    shown = data_log.level
    data_log.setLevel(logging.WARNING)  # the label mapping is logged when the run itself is built
    try:
        pl.seed_everything(cfg.seed, workers=True)
        datamodule, _, model = build_parts(cfg, show_counts=False)
    finally:
        data_log.setLevel(shown)
    x = next(iter(datamodule.train_dataloader()))[0]
    return stacking_problem(model, x[:2])


def train_one_by_one(seeds: list[Seed], *, announce: Callable[[], None] | None = None, **settings) \
        -> list[dict]:
    """The seeds of a batch whose model cannot be stacked, each trained as its own single run into its
    seed folder (the folders, configs and records a stacked batch writes). An error that stops one seed
    (not a NaN loss, which only fails that seed) is recorded for the seeds not yet trained and re-raised;
    `announce()` is called once, when the first seed starts."""
    records = []
    for k, seed in enumerate(seeds):
        try:
            records += train(seed.cfg, seed.dir, overrides=seed.overrides,
                             announce=announce if k == 0 else None, **settings)
        except Exception as error:
            for later in seeds[k + 1:]:
                record = RunRecord(later.dir, later.cfg, later.overrides)
                try_to_record(functools.partial(record.failed, error, epochs=0), "failed")
            raise
    return records


# --- resuming --------------------------------------------------------------------------------------------

def resume_point(cfg: DictConfig, output_dir: Path, seeds: list[Seed], *, fresh_ok: bool) \
        -> tuple[list[dict] | None, str | None]:
    """For `ckpt_path=last`: (the seeds' records, None) if every seed already completed its
    `trainer.max_epochs` epochs; else (None, the run's checkpoint to resume every seed from), or
    (None, None) for a fresh start when there is none and `fresh_ok` (else an error saying how to point
    at a run).

    Each seed's folder, and the run's, must hold this configuration (`xentlab.lab.runs.folder_state`):
    a seed's record (or else its checkpoint) carries its seed's config, the run's checkpoint the run's
    (a single run's record in a batch's folder is another configuration); any difference other than
    those a resume may make raises `FolderHoldsAnotherRun` naming the folder and the keys, before
    anything is trained or written.
    """
    states = {seed.dir: folder_state(seed.cfg, seed.dir) for seed in seeds}
    _, checkpoint = states.get(output_dir) or folder_state(cfg, output_dir)
    done = [states[seed.dir][0] for seed in seeds]
    if all(record is not None for record in done):
        return done, None
    if checkpoint is None and not fresh_ok:
        raise nothing_to_resume(output_dir)
    return None, checkpoint


def split_checkpoint(path: Path, module: ClassifierModule, seeds: list[Seed]) -> None:
    """Writes `<seed folder>/checkpoints/last.ckpt` for every seed: the batch checkpoint at `path` cut into
    seed k's own, in the form a single run of that seed writes (model, loss and optimizer state under the
    single run's names and parameter order; its RunRecorder state, stamped with its own config; its data's
    training stream; epoch, step, loop, schedule and random state as they are), so one seed can be loaded
    or continued alone (`seeds=1 seed=<s> ckpt_path=<that file>`), and its folder is matched to its config
    on a resume."""
    batch = load_checkpoint(path)
    callbacks = batch.get("callbacks") or {}
    recorder = RunRecorder(stamped_config(batch), runs=len(seeds))
    if RECORDER_STATE in callbacks:
        recorder.load_state_dict(callbacks[RECORDER_STATE])
    stacked = [name for name, _ in module.model.model.named_parameters()]
    own = [len(list(loss.parameters())) for loss in module.losses]
    data = batch.get(StackedData.__qualname__, {}).get("seeds", [])
    for k, seed in enumerate(seeds):
        one = {key: value for key, value in batch.items()
               if key not in ("state_dict", "optimizer_states", StackedData.__qualname__)}
        if k < len(data):  # the seed's training stream, where its single run keeps it
            one[TensorDataModule.__qualname__] = data[k]
        state = {}
        for key, value in batch["state_dict"].items():
            head, _, rest = key.partition(".")
            index, _, leaf = rest.partition(".")
            if key.startswith("model.model."):
                state["model." + key.removeprefix("model.model.")] = value[k].clone()
            elif head in ("losses", "metrics") and index == str(k):
                state[f"{head}.0.{leaf}"] = value
        one["state_dict"] = single_run_layout(state)
        if RECORDER_STATE in callbacks:
            one["callbacks"] = {**callbacks, RECORDER_STATE: recorder.state_of(
                k, OmegaConf.to_container(seed.cfg, resolve=True))}
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
        SafeCheckpointIO().save_checkpoint(one, seed.dir / CHECKPOINT_DIR / LAST_CHECKPOINT)


class RunRecorder(pl.Callback):
    """Keeps what the records of the trainer's `runs` seeds need and a checkpoint must carry for a resume.

    Per seed, the training loss of the first batch (before any update) and each epoch's mean training
    loss feed `divergence_warnings` (`warnings(k)`); the config is stamped into every checkpoint, so a
    resumed job can tell whether a folder's checkpoint is its own. All of it is callback state, saved
    and restored with the checkpoint. The training step returns `{"loss": <the sum>, "run_losses": <one
    per seed>}`; a batch of several seeds is stacked as (runs, B, ...). Losses are summed on the device
    and read once per epoch (no per-step host sync).
    """

    def __init__(self, config: dict, runs: int = 1):
        self.config, self.runs = config, runs
        self.initial_losses: list[float] | None = None
        self.epoch_losses: list[list[float]] = []  # per epoch, one mean per seed
        self._sum = self._count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("run_losses", outputs.get("loss")) if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        size = 1 if target is None else target.shape[1 if self.runs > 1 else 0]
        losses = loss.detach().float().reshape(-1)  # float32: MPS has no float64
        if self.initial_losses is None and trainer.global_step <= 1:
            self.initial_losses = losses.tolist()
        self._sum = self._sum + losses * size
        self._count += size

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._count:
            self.epoch_losses.append((self._sum / self._count).tolist())
        self._sum = self._count = 0

    def warnings(self, k: int = 0) -> list[str]:
        """Seed k's `divergence_warnings`."""
        initial = self.initial_losses[k] if self.initial_losses is not None else None
        return divergence_warnings(initial, [epoch[k] for epoch in self.epoch_losses])

    def state_dict(self) -> dict:
        return {"config": self.config, "initial_losses": self.initial_losses,
                "epoch_losses": self.epoch_losses}

    def load_state_dict(self, state_dict: dict) -> None:
        if "initial_loss" in state_dict:  # a single run's checkpoint from before seed batches kept scalars
            initial = state_dict["initial_loss"]
            self.initial_losses = None if initial is None else [initial]
            self.epoch_losses = [[loss] for loss in state_dict.get("epoch_losses", [])]
        else:
            self.initial_losses = state_dict.get("initial_losses")
            self.epoch_losses = [list(epoch) for epoch in state_dict.get("epoch_losses", [])]

    def state_of(self, k: int, config: dict) -> dict:
        """Seed k's part of this state, as RunRecorder of seed k trained alone (with `config`) holds it."""
        return {"config": config,
                "initial_losses": None if self.initial_losses is None else [self.initial_losses[k]],
                "epoch_losses": [[epoch[k]] for epoch in self.epoch_losses]}

    config_in = staticmethod(stamped_config)
