"""The Hydra entry point: config → data, loss, model → Lightning fit + test → metrics.json.

Run `xentlab-train --help` for the config groups, or `xentlab-train -m loss=ce,focal seed=0,1,2` for a sweep.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

from xentlab import config_dir
from xentlab.lab.lock import hold, release
from xentlab.lab.loss_configs import store_loss_configs
from xentlab.lab.slurm import requeued
from xentlab.lab.validation import (
    ConfigError,
    check_config,
    check_sweep,
    check_threads,
    describe_composition_error,
    describe_startup_error,
    flatten,
    install_open_groups,
    name_the_loss,
)

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch import nn

    from xentlab.lab.data import TensorDataModule
    from xentlab.lab.module import ClassifierModule

METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"  # ModelCheckpoint(save_last=True) refreshes it every epoch
SUMMARY = ("balanced_accuracy", "macro_f1", "minority_recall", "ece")  # printed when a run ends
CONFIG_DIR = str(config_dir())
# Set by SweepProgress in the process that launches a multirun, read by each job (joblib and submitit
# workers inherit the environment): the number of jobs and the keys the sweep varies.
SWEEP_ENV = "XENTLAB_SWEEP"

install_open_groups()
_IMPORT_ERROR: Exception | None = None
try:
    store_loss_configs(CONFIG_DIR)  # a plugin loss without a YAML is a loss= choice too
except Exception as error:  # noqa: BLE001 - e.g. a broken Hydra plugin module: main() says so in one line
    _IMPORT_ERROR = error


def build_parts(cfg: DictConfig) -> tuple[TensorDataModule, nn.Module, nn.Module]:
    """The run's data module, loss and model: the loss gets the training split's class counts, the model
    the data's feature and class counts; then the class-count table is logged. Seeding is the caller's."""
    from xentlab.lab.data import build_datamodule, log_counts
    from xentlab.lab.models import build_model
    from xentlab.losses import build_loss

    datamodule = build_datamodule(seed=cfg.seed, **cfg.data)
    loss = build_loss(**cfg.loss, task=datamodule.task, class_counts=datamodule.class_counts,
                      num_examples=len(datamodule.splits["train"][1]))
    model = build_model(**cfg.model, input_shape=datamodule.input_shape, num_outputs=datamodule.num_classes)
    log_counts(datamodule)
    return datamodule, loss, model


def build_run(cfg: DictConfig, output_dir: Path, overrides=(), shared_dir: Path | None = None,
              varied: list[str] | None = None) \
        -> tuple[pl.Trainer, ClassifierModule, pl.LightningDataModule]:
    """Everything a run needs, built (and so validated) before the first training step. `overrides` (those
    of the keys in `varied`, the keys its sweep varies, when known) pick the TensorBoard HParams columns;
    `shared_dir` is the sweep folder of a multirun job."""
    # Imported here, not at the top: the process that launches a parallel sweep never trains, and
    # importing Lightning there would cost ~5 s of every joblib sweep (docs/benchmarks.md).
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from xentlab.lab.checkpoint import SafeCheckpointIO
    from xentlab.lab.loggers import build_logger
    from xentlab.lab.module import ClassifierModule
    from xentlab.lab.runs import RunRecorder
    from xentlab.lab.schedules import build_scheduler
    from xentlab.lab.selection import best_epoch_callback
    from xentlab.lab.slurm import lightning_plugins

    quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True)
    scheduler = build_scheduler(**OmegaConf.to_container(cfg.scheduler), total_epochs=cfg.trainer.max_epochs)
    datamodule, loss, model = build_parts(cfg)
    module = ClassifierModule(model, loss, task=datamodule.task, num_classes=datamodule.num_classes,
                              optimizer=instantiate(cfg.optimizer), run_params=flat_params(cfg),
                              figure_every_n_epochs=cfg.figure_every_n_epochs, scheduler=scheduler,
                              overrides=overrides, shared_dir=shared_dir, varied=varied)
    logger = build_logger(OmegaConf.to_container(cfg.logger), output_dir, flat_params(cfg))
    callbacks = [RunRecorder(OmegaConf.to_container(cfg, resolve=True)), best_epoch_callback(cfg)]
    arguments = trainer_arguments(cfg, train_batches=len(datamodule.train_dataloader()))
    if cfg.trainer.get("enable_checkpointing", True):
        # last.ckpt, refreshed every epoch, is what `ckpt_path=last` resumes from.
        callbacks.append(ModelCheckpoint(dirpath=output_dir / CHECKPOINT_DIR, save_last=True))
    trainer = pl.Trainer(**arguments, logger=logger, callbacks=[c for c in callbacks if c is not None],
                         default_root_dir=str(output_dir), plugins=[SafeCheckpointIO(), *lightning_plugins()])
    return trainer, module, datamodule


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


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM, after its `interrupted` record was written (or not: the message
    says). `exit_code` is the shell's convention, 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RunNotRecorded(RuntimeError):
    """A run failed and its `failed` record could not be written either (e.g. the disk is full)."""


def train(cfg: DictConfig, output_dir: str | Path, *, overrides: list[str] | tuple[str, ...] = (),
          threads: int | None = None, shared_dir: str | Path | None = None,
          varied: list[str] | None = None, fresh_if_nothing_to_resume: bool = False,
          announce: Callable[[], None] | None = None) -> dict:
    """Fit on the training split, test on the held-out split, write `metrics.json`; return its content.

    Every run that starts ends with a `metrics.json` whose `status` is `completed` (with `warnings`, e.g.
    `diverged: ...` by `xentlab.lab.runs.divergence_warnings`), `failed` (with the error and traceback; the
    error is re-raised) or `interrupted` (Ctrl-C or SIGTERM; `RunInterrupted` is raised). If that record
    cannot be written either (a full disk), the error raised says so (`RunNotRecorded`).

    With `ckpt_path=last` the run continues from `<output_dir>/checkpoints/last.ckpt` (global step, epoch,
    optimizer state and the TensorBoard curves carry on) if the folder holds this run's configuration
    (`resume_point`); a run already completed for `trainer.max_epochs` epochs is not trained again, so a
    resumed sweep redoes only its unfinished jobs. Without a checkpoint this is an error, or a fresh start
    if `fresh_if_nothing_to_resume` (a resumed sweep's jobs that never reached one). `overrides` (the
    job's command-line overrides) are stored for the report; `threads`, if given, sets torch's intra-op
    threads first; `shared_dir` and `varied` are a multirun's sweep folder and the keys it varies (for
    TensorBoard's HParams columns). `announce()`, if given, is called once the run is built (and so its
    settings accepted), before training starts.
    """
    import torch

    from xentlab.lab.loggers import send_record
    from xentlab.lab.runs import FolderHoldsAnotherRun, Interruption, RunRecord, RunRecorder
    from xentlab.lab.selection import SELECTED_EPOCH, restore_best

    if cfg.get("seeds", 1) != 1:
        raise ValueError(f"train() runs one seed; seeds={cfg.seeds} is train_seeds()'s")
    if threads is not None:
        torch.set_num_threads(threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer, interruption, record = None, Interruption(), RunRecord(output_dir, cfg, overrides)

    def epochs() -> int:
        return trainer.current_epoch if trainer is not None else 0

    def tell_loggers() -> None:
        """The record just written, to the loggers beside TensorBoard (`logger=csv|wandb|mlflow`). Their
        failure is only logged: the run's own record is written and stands."""
        if trainer is not None:
            try:
                send_record(trainer.logger, read_record(output_dir / METRICS_FILE), output_dir / METRICS_FILE)
            except Exception as error:  # whatever a third-party logger raises
                logging.getLogger(__name__).warning("the run's record did not reach logger=%s: %s: %s",
                                                    cfg.logger.get("name"), type(error).__name__, error)

    try:
        ckpt_path = cfg.ckpt_path
        if ckpt_path == "last":
            done, ckpt_path = resume_point(cfg, output_dir, fresh_ok=fresh_if_nothing_to_resume)
            if done is not None:
                return done
        with interruption.watching():
            try:
                trainer, module, datamodule = build_run(cfg, output_dir, overrides, shared_dir, varied)
            except (ValueError, TypeError) as error:
                # Building validates what the config checks could not (the data's settings, the loss for
                # this data, Lightning's view of the Trainer arguments): a refusal is a setting to change.
                raise ConfigError(str(error)) from error
            if announce is not None:
                announce()
            trainer.callbacks.append(interruption.stop_point())
            with interruption.deferring():
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
                selected = restore_best(trainer, module, datamodule)  # checkpoint=best: the chosen epoch's
                final = {k: float(v) for k, v in trainer.callback_metrics.items()}
                tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        final.update({k: float(v) for k, v in tested.items()})
        if selected is not None:
            final[SELECTED_EPOCH] = float(selected[0])
        recorder = next(c for c in trainer.callbacks if isinstance(c, RunRecorder))
        done = record.completed(final, epochs=epochs(), warnings=recorder.warnings())
        tell_loggers()
        return done
    except FolderHoldsAnotherRun:
        raise  # the folder's record belongs to that other run: leave it
    except Exception as error:
        trace = traceback.format_exc()
        unrecorded = try_to_record(functools.partial(record.failed, error, epochs=epochs(), trace=trace),
                                   "failed")
        if unrecorded:
            raise RunNotRecorded(f"{type(error).__name__}: {error}; {unrecorded}") from error
        tell_loggers()
        error.xentlab_recorded = True  # run_job need not record it again
        raise
    except (KeyboardInterrupt, SystemExit) as stop:  # Lightning turns Ctrl-C and SIGTERM into SystemExit
        cause = interruption.describe(stop)
        partial = {k: float(v) for k, v in trainer.callback_metrics.items()} if trainer is not None else {}
        unrecorded = try_to_record(
            functools.partial(record.interrupted, cause, epochs=epochs(), metrics=partial), "interrupted")
        if not unrecorded:
            tell_loggers()
        epoch = f" in epoch {trainer.current_epoch + 1}" if trainer is not None else ""
        raise RunInterrupted(
            f"interrupted by {cause}{epoch}; " + (unrecorded or f"recorded in {output_dir / METRICS_FILE}"),
            interruption.exit_code(cause)) from stop


def train_seeds(cfg: DictConfig, output_dir: str | Path, *, overrides: list[str] | tuple[str, ...] = (),
                threads: int | None = None, shared_dir: str | Path | None = None,
                varied: list[str] | None = None, fresh_if_nothing_to_resume: bool = False,
                announce: Callable[[], None] | None = None) -> list[dict]:
    """The run's records: `[train(...)]` for `seeds: 1`; for `seeds: K > 1` the K runs of seeds
    seed ... seed+K-1, trained as one batch (`xentlab.lab.seedbatch`), each in `<output_dir>/seed=<s>/`.
    `announce()` is called once the run (the batch) is built, before training."""
    from xentlab.lab.seedbatch import check_seeds, train_batch

    if check_seeds(cfg.get("seeds", 1)) == 1:
        return [train(cfg, output_dir, overrides=overrides, threads=threads, shared_dir=shared_dir,
                      varied=varied, fresh_if_nothing_to_resume=fresh_if_nothing_to_resume,
                      announce=announce)]
    return train_batch(cfg, output_dir, overrides=overrides, threads=threads,
                       fresh_if_nothing_to_resume=fresh_if_nothing_to_resume, announce=announce)


def try_to_record(write: Callable[[], object], status: str) -> str | None:
    """`write()` the record of a run that ended early; None, or why that record could not be written."""
    try:
        write()
    except OSError as error:
        return f"its {status!r} record could not be written either: {type(error).__name__}: {error}"
    return None


def resume_point(cfg: DictConfig, output_dir: Path, *, fresh_ok: bool) -> tuple[dict | None, str | None]:
    """For `ckpt_path=last`: (the record, None) if this run already completed its `trainer.max_epochs`
    epochs in `output_dir`; else (None, the checkpoint to resume), or (None, None) for a fresh start
    when there is none and `fresh_ok`.

    A folder holds one configuration. Its `metrics.json`, or else the config stamped in its last.ckpt, is
    compared with `cfg` (ignoring `xentlab.lab.runs.RESUME_MAY_CHANGE`, e.g. threads); any other difference
    raises `FolderHoldsAnotherRun` rather than hand this job another run's results or weights.
    """
    from xentlab.lab.atomic import remove_staging_files
    from xentlab.lab.checkpoint import load_checkpoint
    from xentlab.lab.runs import FolderHoldsAnotherRun, RunRecorder, config_differences

    record_file, checkpoint = output_dir / METRICS_FILE, output_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    for folder in (output_dir, checkpoint.parent):
        if folder.is_dir():
            remove_staging_files(folder)  # left by a process killed mid-write; this job owns the folder
    record = read_record(record_file) if record_file.exists() else None
    source, recorded = (record_file, record.get("config")) if record is not None else (None, None)
    if record is None and checkpoint.exists():
        source, recorded = checkpoint, RunRecorder.config_in(load_checkpoint(checkpoint))
    if recorded is not None:
        differences = config_differences(recorded, OmegaConf.to_container(cfg, resolve=True))
        if differences:
            raise FolderHoldsAnotherRun(
                f"ckpt_path=last: {output_dir} holds another configuration's run ({source} was written for "
                f"it); differences (recorded -> this job): {'; '.join(differences[:8])}"
                f"{' ...' if len(differences) > 8 else ''}. Resume a job with the overrides it was started "
                "with, or start it in a new folder (ckpt_path=null).")
    if record is not None and record.get("status") == "completed" \
            and record.get("epochs") == cfg.trainer.max_epochs:
        return record, None
    if checkpoint.exists():
        return None, str(checkpoint)
    if fresh_ok:
        return None, None
    raise nothing_to_resume(output_dir)


def nothing_to_resume(output_dir: Path) -> ConfigError:
    """The error of `ckpt_path=last` in a folder without a checkpoint: how to point at the run instead."""
    return ConfigError(
        f"ckpt_path=last: nothing to resume in {output_dir} (no {CHECKPOINT_DIR}/{LAST_CHECKPOINT}). "
        "Point at the run's folder: `xentlab-train <its overrides> hydra.run.dir=<its folder> "
        "ckpt_path=last` (a sweep: `xentlab-train -m <its overrides> hydra.sweep.dir=<its folder> "
        "ckpt_path=last`), or at a checkpoint file: ckpt_path=<path/to/file.ckpt>.")


def holds_a_run(output_dir: Path) -> bool:
    """Whether `output_dir` holds anything `ckpt_path=last` resumes from: a record (a single run's, or a
    seed batch's `seed=<s>/metrics.json`) or a last checkpoint."""
    checkpoint = output_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    return (output_dir / METRICS_FILE).is_file() or checkpoint.is_file() \
        or any(output_dir.glob(f"seed=*/{METRICS_FILE}"))


def read_record(path: Path) -> dict:
    """A run's `metrics.json`; a ValueError naming the file if it is unreadable or not a record."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the run record {path}: {type(error).__name__}: {error}; move it away "
                         "to start that run over") from None
    if not isinstance(record, dict) or not isinstance(record.get("config", {}), dict):
        raise ValueError(f"{path} is not a run record (a JSON object with a 'config' object); move it away "
                         "to start that run over")
    return record


def write_record(output_dir: Path, cfg: DictConfig, record: dict, overrides=()) -> dict:
    """metrics.json: the run's status and final metrics, its overrides and the plain values of its config.

    Written atomically (`xentlab.lab.atomic`), so a report reading a sweep in progress, a crash or a full disk
    never leaves half a file. Returns the record as written.
    """
    from xentlab.lab.atomic import atomic_write

    record = {**record, "overrides": list(overrides), "config": OmegaConf.to_container(cfg, resolve=True)}
    atomic_write(output_dir / METRICS_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


_CREATED_DIRS: set[Path] = set()  # the folders unique_dir created in this process


def unique_dir(base: str) -> str:
    """`base`, or else `base_1`, `base_2`, ...: the first of these that did not exist, created here.

    Backs the `${xentlab.unique_dir:...}` resolver of the run and sweep folders: two sweeps started in
    the same second resolve `${now:...}` to the same path, and `mkdir` without `exist_ok` is atomic, so
    each process claims its own folder. The resolver is cached per config and Hydra copies that cache
    into every job's config (joblib and submitit jobs included), so a sweep resolves it once.
    """
    for attempt in itertools.count():
        path = base if attempt == 0 else f"{base}_{attempt}"
        try:
            Path(path).mkdir(parents=True)
            _CREATED_DIRS.add(Path(path).resolve())
            return path
        except FileExistsError:
            continue


OmegaConf.register_new_resolver("xentlab.unique_dir", unique_dir, use_cache=True, replace=True)


def discard_unstarted_run(output_dir: Path) -> None:
    """Removes the folder of a single run refused before training (a ConfigError) if this process created
    it for the run (`unique_dir`): it holds only Hydra's copy of the refused config and log. A folder the
    user named (`hydra.run.dir=`, a resumed run) is left as it is."""
    import shutil

    if Path(output_dir).resolve() in _CREATED_DIRS:
        shutil.rmtree(output_dir, ignore_errors=True)


def threads_per_job(launcher: DictConfig, cpu_count: int, requested: int | None = None) -> int:
    """torch intra-op threads for one job: `requested` (the `threads` key) if set, else automatic.

    joblib: cpu_count // jobs, with jobs = n_jobs, or cpu_count + 1 + n_jobs for negative n_jobs (joblib's
    rule, so the default -1 gives one thread per job); submitit: `cpus_per_task`, or 1 when unset (the
    local executor starts every job at once). One job at a time (a single run, the basic launcher): 1.
    The models here are small enough that a second thread gains nothing, and on two busy cores it
    costs 15-20x per step (OpenMP threads wait for each other; see docs/benchmarks.md).
    """
    if requested is not None:
        return check_threads(requested)
    if "n_jobs" in launcher:
        jobs = launcher.n_jobs if launcher.n_jobs > 0 else cpu_count + 1 + launcher.n_jobs
        return max(1, cpu_count // max(1, jobs))
    if "cpus_per_task" in launcher:
        return launcher.cpus_per_task or 1
    return 1


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which cgroups and `taskset` shrink)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def sweep_value(record: dict, objective: str, *, must_be_finite: bool) -> float:
    """The value returned to the sweeper: the run's final `objective` metric, NaN when it is missing.

    `hp/<m>` names the final `test/<m>` (the module's TensorBoard HParams metrics), so either name works.
    Sweepers that count failures themselves (Optuna) need an exception instead: hydra-optuna-sweeper 1.3
    on optuna 2.x crashes the whole study on a NaN return, but records a raised job as a failed trial.
    """
    metrics = record["metrics"]
    if objective.startswith("hp/") and objective not in metrics:
        objective = "test/" + objective[len("hp/"):]
    value = float(metrics.get(objective, math.nan))
    if must_be_finite and not math.isfinite(value):
        raise ValueError(f"objective {objective!r} is {value} for this run; "
                         f"metrics it reported: {', '.join(sorted(metrics)) or 'none'}")
    return value


def shown(path: str | Path) -> str:
    """A path as printed: relative to the working directory when inside it, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


class SweepProgress(Callback):
    """Hydra callback (`hydra.callbacks.progress`): checks every job's config before the first job starts,
    announces the multirun once and tells its jobs the sweep's size and varying keys, so each prints one
    `[k/N] loss=focal,seed=1 <metric> (<s> s)` line at its end."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        jobs, keys = sweep_plan(config)
        name_jobs_by_swept_keys(config, keys)
        if jobs is not None:
            try:
                check_sweep(config, jobs)
            except ConfigError as error:
                # Hydra turns a callback's exception into a warning and goes on: stop here instead.
                if not _BRIEF_ERRORS:
                    traceback.print_exc()
                refuse(str(error))
        size = len(jobs) if jobs is not None else config.hydra.sweeper.get("n_trials")
        os.environ[SWEEP_ENV] = json.dumps({"size": size, "keys": keys, "dir": str(config.hydra.sweep.dir)})
        # Hydra's launchers log one line per job at its start; the job's own line at its end says more.
        for name in ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.hydra_joblib_launcher"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if "SlurmLauncher" in str(config.hydra.launcher.get("_target_", "")):
            from xentlab.lab.slurm import quiet_submitit_polling

            quiet_submitit_polling()
        sweep_dir = shown(config.hydra.sweep.dir)
        announced = f"{size} jobs" if size is not None else "a sweep"
        print(f"[xentlab] {announced} -> {sweep_dir}\n[xentlab] view: tensorboard --logdir {sweep_dir}",
              flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        # submitit's jobs print their line into their own log, not this console: shown here, in job order.
        if "submitit" in str(config.hydra.launcher.get("_target_", "")):
            from xentlab.lab.slurm import job_lines

            for line in job_lines(config.hydra.sweep.dir):
                print(line, flush=True)


def sweep_plan(config: DictConfig) -> tuple[list[list[str]] | None, list[str]]:
    """The basic sweeper's jobs (each a list of overrides, as its own splitting of its `params` and the
    command line's sweeps makes them; None for another sweeper) and the keys the sweep varies."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    sweeper = config.hydra.sweeper
    overrides = sweep_overrides(config)
    if "BasicSweeper" not in str(sweeper.get("_target_", "")):
        return None, sorted(sweeper.get("params") or {})
    keys = sorted({o.key_or_group for o in overrides if o.is_sweep_override()})
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch], keys


def sweep_overrides(config: DictConfig) -> list:
    """The sweep's overrides, parsed: its sweeper's `params`, then the command line's."""
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    return OverridesParser.create().parse_overrides(arguments)


def name_jobs_by_swept_keys(config: DictConfig, keys: list[str]) -> None:
    """Leaves the sweep's constant keys out of its jobs' folder names (Hydra's `override_dirname`), so a
    job of `-m experiment=compare_losses loss=ce,focal` is `loss=focal`, not
    `experiment=compare_losses,loss=focal`: an override of `exclude_keys` added to the sweep's Hydra
    overrides, which Hydra applies to every job's config. Nothing changes when no key varies."""
    constants = sorted({o.key_or_group for o in sweep_overrides(config)} - set(keys))
    if not keys or not constants:
        return
    excluded = [*config.hydra.job.config.override_dirname.exclude_keys, *constants]
    listed = ",".join(f"'{key}'" for key in dict.fromkeys(excluded))
    with read_write(config.hydra.overrides.hydra):  # Hydra makes its own config read-only
        config.hydra.overrides.hydra.append(f"hydra.job.config.override_dirname.exclude_keys=[{listed}]")


def job_line(hydra_cfg: DictConfig, text: str, seconds: float) -> str:
    """`[k/N] <the job's values of the swept keys> <text> (<seconds> s)`: one finished job of a multirun."""
    plan = json.loads(os.environ.get(SWEEP_ENV, "{}"))
    number = f"{hydra_cfg.job.num + 1}/{plan['size']}" if plan.get("size") else f"{hydra_cfg.job.num + 1}"
    parser = OverridesParser.create()
    varying = [o.input_line for o in parser.parse_overrides(list(hydra_cfg.overrides.task))
               if o.key_or_group in plan.get("keys", ())]
    name = ",".join(varying) or hydra_cfg.job.override_dirname or "(defaults)"
    return f"[{number}] {name} {text} ({seconds:.1f} s)"


def run_job(cfg: DictConfig) -> float:
    """One Hydra job (`run_held_job`) holding its folder's lock, in whichever process the launcher runs it:
    one writer per folder. A folder in use is raised, not recorded: the folder's record is the other
    writer's. The lock is given back when the job ends, so a long sweep holds one job's at a time."""
    hydra_cfg = HydraConfig.get()
    output_dir = hydra_cfg.runtime.output_dir
    hold(output_dir, None if hydra_cfg.mode == RunMode.MULTIRUN else f"hydra.run.dir={output_dir}")
    try:
        return run_held_job(cfg)
    finally:
        release(output_dir)


def run_held_job(cfg: DictConfig) -> float:
    """Check the config, train, print a summary; in a multirun a failed job is recorded in its folder and
    the sweep goes on."""
    started = time.time()
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    raises_failures = "optuna" in str(hydra_cfg.sweeper.get("_target_", ""))
    name_the_loss(cfg, hydra_cfg.runtime.choices)
    if cfg.trainer.get("enable_progress_bar") is None:  # null: a bar for a single run watched in a terminal
        cfg.trainer.enable_progress_bar = not multirun and sys.stdout.isatty()
    if multirun and hydra_cfg.job.num > 0:  # the class-count table once per sweep, by its first job
        logging.getLogger("xentlab.lab.data").setLevel(logging.WARNING)

    def announce() -> None:  # a single run's folder, once the run is built: a refused one prints nothing
        where = shown(output_dir)
        print(f"[xentlab] logs: {where}\n[xentlab] view: tensorboard --logdir {where}", flush=True)

    if cfg.ckpt_path == "last" and multirun and not any(
            o.startswith("hydra.sweep.dir=") for o in hydra_cfg.overrides.hydra):
        # Raised, not recorded: every job of this sweep would fail alike.
        raise ConfigError("ckpt_path=last resumes a sweep in its own folder, and none was given (this sweep "
                          f"got a new one, {shown(hydra_cfg.sweep.dir)}): run `xentlab-train -m <the sweep's "
                          "overrides> hydra.sweep.dir=<its folder> ckpt_path=last`")
    try:
        check_config(cfg)
        if requeued() and cfg.ckpt_path is None:
            cfg.ckpt_path = "last"  # SLURM requeued this job (xentlab.lab.slurm): it resumes its own run
        if cfg.ckpt_path == "last" and not multirun and not requeued() and not holds_a_run(output_dir):
            raise nothing_to_resume(output_dir)  # said now, not after Lightning has loaded
        threads = threads_per_job(hydra_cfg.launcher, available_cpus(), cfg.threads)
        varied = json.loads(os.environ.get(SWEEP_ENV, "{}")).get("keys") if multirun else None
        from xentlab.lab.tuning import tune  # here, not at the top: it trains through this module

        cfg = tune(cfg, output_dir, threads=threads)  # tune=grid: the candidates train first; else cfg
        records = train_seeds(cfg, output_dir, overrides=overrides, threads=threads,
                              shared_dir=Path(hydra_cfg.sweep.dir) if multirun else None,
                              varied=varied, fresh_if_nothing_to_resume=multirun or requeued(),
                              announce=None if multirun else announce)
    except RunInterrupted as stop:
        if multirun:
            raise  # main() says it once for the sweep, with the command that resumes it
        print(f"[xentlab] {stop}; resume: {resume_command('hydra.run.dir', output_dir)}", flush=True)
        raise SystemExit(stop.exit_code) from None
    except Exception as error:
        if not multirun:
            if isinstance(error, ConfigError):
                discard_unstarted_run(output_dir)
                if _BRIEF_ERRORS:
                    refuse(str(error))  # here, not in main(): Hydra would first print "Error executing job"
            raise
        from xentlab.lab.runs import FolderHoldsAnotherRun  # here, not at the top: it imports Lightning

        if isinstance(error, FolderHoldsAnotherRun):
            raise  # the sweep was resumed with other settings: stop it, leaving that folder's record alone
        # In a sweep one failing job must not stop the others: record it for the report and move on.
        message = f"{type(error).__name__}: {error}"
        if not getattr(error, "xentlab_recorded", False) and not isinstance(error, RunNotRecorded):
            failure = {"status": "failed", "error": message, "traceback": traceback.format_exc(),
                       "metrics": {}}
            unrecorded = try_to_record(lambda: write_record(output_dir, cfg, failure, overrides), "failed")
            message += f"; {unrecorded}" if unrecorded else ""
        print(job_line(hydra_cfg, f"FAILED: {message}", time.time() - started), flush=True)
        if raises_failures:
            raise
        return math.nan
    for record in records:
        metrics = record["metrics"]
        batched = "" if len(records) == 1 else f"seed={record['config']['seed']}"
        # A run that did not complete shows its error, never metrics beside its status.
        failed = record["status"] != "completed"
        if multirun:
            objective = cfg.objective if cfg.objective in metrics else "test/balanced_accuracy"
            text = f"FAILED: {record.get('error')}" if failed \
                else f"{objective} {metrics.get(objective, math.nan):.3f}"
            print(job_line(hydra_cfg, f"{batched} {text}".lstrip(), time.time() - started), flush=True)
        else:
            summary = ", ".join(f"{name} {metrics[f'test/{name}']:.3f}" for name in SUMMARY
                                if f"test/{name}" in metrics)
            written = shown(output_dir / batched / METRICS_FILE)
            text = record.get("error") if failed else f"test {summary or 'not run'}"
            print(f"[xentlab] {record['status']}: {text} ({written})")
        for warning in record.get("warnings", []):
            print(" ".join(filter(None, ("[xentlab] warning:", batched, warning))), flush=True)
    if not multirun and len(records) > 1:  # a seed batch: mean and interval per curve (a sweep: at its end)
        from xentlab.lab.summary import SUMMARY_DIR, write_summaries

        if write_summaries(output_dir):
            print(f"[xentlab] TensorBoard: mean and 95% interval over the seeds in "
                  f"{shown(output_dir / SUMMARY_DIR)}")
    if not multirun and any(record["status"] != "completed" for record in records):
        raise SystemExit(1)  # the runs are recorded and their errors printed above
    # A batch of seeds gives the sweeper its mean over the seeds.
    values = [sweep_value(record, cfg.objective, must_be_finite=multirun and raises_failures)
              for record in records]
    return sum(values) / len(values)


def resume_command(folder_key: str, folder: str | Path) -> str:
    """The command line that resumes this run or sweep in `folder`: its own arguments, pointed at that
    folder (`folder_key`, hydra.run.dir or hydra.sweep.dir) with `ckpt_path=last`."""
    kept = [a for a in sys.argv[1:] if not a.startswith((f"{folder_key}=", "ckpt_path="))]
    return shlex.join(["xentlab-train", *kept, f"{folder_key}={shown(folder)}", "ckpt_path=last"])


def refuse(message: str) -> None:
    """An invalid setting's message on stderr, exit status 2."""
    print(f"xentlab-train: {message}", file=sys.stderr)
    sys.exit(2)


_BRIEF_ERRORS = False  # set by main() unless HYDRA_FULL_ERROR=1 asks for tracebacks
hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(run_job)


def main() -> None:
    """`xentlab-train`: Hydra's command line over `run_job`. An invalid setting (a ConfigError or Hydra's
    own composition error) is printed as one message with exit status 2, no traceback; HYDRA_FULL_ERROR=1
    re-raises it with its traceback, as Hydra does. A multirun whose report finds failed, unfinished or
    never-started jobs exits with status 1 (the sweep still ran every job and wrote its report)."""
    global _BRIEF_ERRORS
    _BRIEF_ERRORS = os.environ.get("HYDRA_FULL_ERROR") != "1"
    # A broken loss plugin is logged once, in one line (and named again if a run asks for its loss); the
    # same message as a Python warning would add two more lines to every run's console.
    warnings.filterwarnings("ignore", message="skipping xentlab loss plugin", category=RuntimeWarning)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing and exiting with 1
    try:
        if _IMPORT_ERROR is not None:
            raise _IMPORT_ERROR
        hydra_main()
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM during a sweep (a single run exits in run_job)
        if not _BRIEF_ERRORS:
            raise
        sweep_dir = json.loads(os.environ.get(SWEEP_ENV, "{}")).get("dir")
        said = str(stop) if isinstance(stop, RunInterrupted) else "interrupted by SIGINT"
        resume = f"; resume: {resume_command('hydra.sweep.dir', sweep_dir)}" if sweep_dir else ""
        print(f"xentlab-train: {said}{resume}", file=sys.stderr, flush=True)
        sys.exit(getattr(stop, "exit_code", 130))
    except (ConfigError, HydraException, OmegaConfBaseException) as error:
        if not _BRIEF_ERRORS:
            raise
        refuse(str(error) if isinstance(error, ConfigError) else describe_composition_error(error))
    except Exception as error:
        message = describe_startup_error(error) if _BRIEF_ERRORS else None
        if message is None:
            raise
        refuse(message)
    from xentlab.lab.callbacks import INCOMPLETE_SWEEPS

    if INCOMPLETE_SWEEPS:
        sys.exit(1)  # a job failed or never finished: said by the report's last line


if __name__ == "__main__":
    main()
