"""The Hydra entry point: config → data, loss, model → Lightning fit + test → metrics.json.

Run `xentlab-train --help` for the config groups, or `xentlab-train -m loss=ce,focal seed=0,1,2` for a sweep.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch import nn

    from xentlab.data import TensorDataModule
    from xentlab.module import ClassifierModule

METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"  # ModelCheckpoint(save_last=True) refreshes it every epoch
SUMMARY = ("balanced_accuracy", "macro_f1", "minority_recall", "ece")  # printed when a run ends
# conf/ sits beside the package in the repository (installed editable by the scripts).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def build_parts(cfg: DictConfig) -> tuple[TensorDataModule, nn.Module, nn.Module]:
    """The run's data module, loss and model: the loss gets the training split's class counts, the model
    the data's feature and class counts. Seeding is the caller's."""
    from xentlab.data import build_datamodule
    from xentlab.losses import build_loss
    from xentlab.models import build_model

    datamodule = build_datamodule(seed=cfg.seed, **cfg.data)
    loss = build_loss(**cfg.loss, task=datamodule.task, class_counts=datamodule.class_counts,
                      num_examples=len(datamodule.splits["train"][1]))
    model = build_model(**cfg.model, in_features=datamodule.num_features, num_outputs=datamodule.num_classes)
    return datamodule, loss, model


def build_run(cfg: DictConfig, output_dir: Path) \
        -> tuple[pl.Trainer, ClassifierModule, pl.LightningDataModule]:
    """Everything a run needs, built (and so validated) before the first training step."""
    # Imported here, not at the top: the process that launches a parallel sweep never trains, and
    # importing Lightning there would cost ~5 s of every joblib sweep (docs/benchmarks.md).
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from xentlab.checkpoint import SafeCheckpointIO
    from xentlab.module import ClassifierModule
    from xentlab.runs import RunRecorder

    quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, loss, model = build_parts(cfg)
    module = ClassifierModule(model, loss, task=datamodule.task, num_classes=datamodule.num_classes,
                              optimizer=instantiate(cfg.optimizer), run_params=flat_params(cfg),
                              figure_every_n_epochs=cfg.figure_every_n_epochs)
    logger = TensorBoardLogger(save_dir=str(output_dir), name="", version="", **cfg.logger)
    callbacks = [RunRecorder(OmegaConf.to_container(cfg, resolve=True))]
    if cfg.trainer.get("enable_checkpointing", True):
        # last.ckpt, refreshed every epoch, is what `ckpt_path=last` resumes from.
        callbacks.append(ModelCheckpoint(dirpath=output_dir / CHECKPOINT_DIR, save_last=True))
    trainer = pl.Trainer(**cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(output_dir),
                         plugins=[SafeCheckpointIO()])
    return trainer, module, datamodule


def quiet_lightning() -> None:
    """Silences Lightning's start-up chatter, which every job of a sweep would repeat: accelerator
    availability, a product tip, "Seed set to", and a deprecation warning its own code triggers in
    recent torch (`LeafSpec`). Lightning's warnings about the run itself still show."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def flat_params(cfg: DictConfig) -> dict:
    """The run's choices as flat `group.key -> scalar` pairs (lists become strings), e.g. `loss.gamma`."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{name}.")
            else:
                plain = isinstance(value, (int, float, str, bool)) or value is None
                flat[name] = value if plain else str(value)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM, after its `interrupted` record was written (or not: the message
    says). `exit_code` is the shell's convention, 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RunNotRecorded(RuntimeError):
    """A run failed and its `failed` record could not be written either (e.g. the disk is full)."""


def train(cfg: DictConfig, output_dir: str | Path, *, overrides: list[str] | tuple[str, ...] = (),
          threads: int | None = None, fresh_if_nothing_to_resume: bool = False) -> dict:
    """Fit on the training split, test on the held-out split, write `metrics.json`; return its content.

    Every run that starts ends with a `metrics.json` whose `status` is `completed` (with `warnings`, e.g.
    `diverged: ...` by `xentlab.runs.divergence_warnings`), `failed` (with the error and traceback; the
    error is re-raised) or `interrupted` (Ctrl-C or SIGTERM; `RunInterrupted` is raised). If that record
    cannot be written either (a full disk), the error raised says so (`RunNotRecorded`).

    With `ckpt_path=last` the run continues from `<output_dir>/checkpoints/last.ckpt` (global step, epoch,
    optimizer state and the TensorBoard curves carry on) if the folder holds this run's configuration
    (`resume_point`); a run already completed for `trainer.max_epochs` epochs is not trained again, so a
    resumed sweep redoes only its unfinished jobs. Without a checkpoint this is an error, or a fresh start
    if `fresh_if_nothing_to_resume` (a resumed sweep's jobs that never reached one). `overrides` (the
    job's command-line overrides) are stored for the report; `threads`, if given, sets torch's intra-op
    threads first.
    """
    import torch

    from xentlab.runs import FolderHoldsAnotherRun, Interruption, RunRecorder, divergence_warnings

    if threads is not None:
        torch.set_num_threads(threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started, trainer, interruption = time.time(), None, Interruption()

    def record(status: str, **fields) -> dict:
        return write_record(output_dir, cfg, {
            "status": status, "duration_s": round(time.time() - started, 3),
            "epochs": trainer.current_epoch if trainer is not None else 0,
            "torch_threads": torch.get_num_threads(), "metrics": {}, **fields}, overrides)

    try:
        ckpt_path = cfg.ckpt_path
        if ckpt_path == "last":
            done, ckpt_path = resume_point(cfg, output_dir, fresh_ok=fresh_if_nothing_to_resume)
            if done is not None:
                return done
        with interruption.watching():
            trainer, module, datamodule = build_run(cfg, output_dir)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            final = {k: float(v) for k, v in trainer.callback_metrics.items()}
            tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        final.update({k: float(v) for k, v in tested.items()})
        recorder = next(c for c in trainer.callbacks if isinstance(c, RunRecorder))
        return record("completed", metrics=final,
                      warnings=divergence_warnings(recorder.initial_loss, recorder.epoch_losses))
    except FolderHoldsAnotherRun:
        raise  # the folder's record belongs to that other run: leave it
    except Exception as error:
        unrecorded = try_to_record(record, "failed", error=f"{type(error).__name__}: {error}",
                                   traceback=traceback.format_exc())
        if unrecorded:
            raise RunNotRecorded(f"{type(error).__name__}: {error}; {unrecorded}") from error
        raise
    except (KeyboardInterrupt, SystemExit) as stop:  # Lightning turns Ctrl-C and SIGTERM into SystemExit
        cause = interruption.describe(stop)
        partial = {k: float(v) for k, v in trainer.callback_metrics.items()} if trainer is not None else {}
        unrecorded = try_to_record(record, "interrupted", error=f"stopped by {cause}", metrics=partial)
        epoch = f" in epoch {trainer.current_epoch + 1}" if trainer is not None else ""
        raise RunInterrupted(
            f"interrupted by {cause}{epoch}; " + (unrecorded or f"recorded in {output_dir / METRICS_FILE}"),
            interruption.exit_code()) from stop


def try_to_record(record, status: str, **fields) -> str | None:
    """`record(status, **fields)` for a run that ended early; None, or why the record could not be written."""
    try:
        record(status, **fields)
    except OSError as error:
        return f"its {status!r} record could not be written either: {type(error).__name__}: {error}"
    return None


def resume_point(cfg: DictConfig, output_dir: Path, *, fresh_ok: bool) -> tuple[dict | None, str | None]:
    """For `ckpt_path=last`: (the record, None) if this run already completed its `trainer.max_epochs`
    epochs in `output_dir`; else (None, the checkpoint to resume), or (None, None) for a fresh start
    when there is none and `fresh_ok`.

    A folder holds one configuration. Its `metrics.json`, or else the config stamped in its last.ckpt, is
    compared with `cfg` (ignoring `xentlab.runs.RESUME_MAY_CHANGE`, e.g. threads); any other difference
    raises `FolderHoldsAnotherRun` rather than hand this job another run's results or weights.
    """
    from xentlab.atomic import remove_staging_files
    from xentlab.checkpoint import load_checkpoint
    from xentlab.runs import FolderHoldsAnotherRun, RunRecorder, config_differences

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
    raise ValueError(
        f"ckpt_path=last: nothing to resume in {output_dir} (no {CHECKPOINT_DIR}/{LAST_CHECKPOINT}). "
        "Point at the run's folder: `xentlab-train <its overrides> hydra.run.dir=<its folder> "
        "ckpt_path=last` (a sweep: `xentlab-train -m <its overrides> hydra.sweep.dir=<its folder> "
        "ckpt_path=last`), or at a checkpoint file: ckpt_path=<path/to/file.ckpt>.")


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

    Written atomically (`xentlab.atomic`), so a report reading a sweep in progress, a crash or a full disk
    never leaves half a file. Returns the record as written.
    """
    from xentlab.atomic import atomic_write

    record = {**record, "overrides": list(overrides), "config": OmegaConf.to_container(cfg, resolve=True)}
    atomic_write(output_dir / METRICS_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


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
            return path
        except FileExistsError:
            continue


OmegaConf.register_new_resolver("xentlab.unique_dir", unique_dir, use_cache=True, replace=True)


def threads_per_job(launcher: DictConfig, cpu_count: int, requested: int | None = None) -> int:
    """torch intra-op threads for one job: `requested` (the `threads` key) if set, else automatic.

    joblib: cpu_count // jobs, with jobs = n_jobs, or cpu_count + 1 + n_jobs for negative n_jobs (joblib's
    rule, so the default -1 gives one thread per job); submitit: `cpus_per_task`, or 1 when unset (the
    local executor starts every job at once). One job at a time (a single run, the basic launcher): 1.
    The models here are small enough that a second thread gains nothing, and on two busy cores it
    costs 15-20x per step (OpenMP threads wait for each other; see docs/benchmarks.md).
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads must be a positive integer or null (automatic), got {requested!r}")
        return requested
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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    logdir = Path(hydra_cfg.sweep.dir) if multirun else output_dir
    threads = threads_per_job(hydra_cfg.launcher, available_cpus(), cfg.threads)
    if cfg.ckpt_path == "last" and multirun and not any(
            o.startswith("hydra.sweep.dir=") for o in hydra_cfg.overrides.hydra):
        raise ValueError("ckpt_path=last resumes a sweep in its own folder, and none was given (this sweep "
                         f"got a new one, {logdir}): run `xentlab-train -m <the sweep's overrides> "
                         "hydra.sweep.dir=<its folder> ckpt_path=last`")
    print(f"[xentlab] logs: {output_dir}\n[xentlab] view: tensorboard --logdir {logdir}")
    overrides = list(hydra_cfg.overrides.task)
    raises_failures = "optuna" in str(hydra_cfg.sweeper.get("_target_", ""))
    from xentlab.runs import FolderHoldsAnotherRun  # here, not at the top: it imports Lightning

    try:
        record = train(cfg, output_dir, overrides=overrides, threads=threads,
                       fresh_if_nothing_to_resume=multirun)
    except RunInterrupted as stop:
        print(f"[xentlab] {stop}")
        if multirun:
            raise
        raise SystemExit(stop.exit_code) from None
    except Exception as error:
        # In a sweep one failing job must not stop the others (train recorded it for the report), but a
        # folder holding another configuration means the sweep was resumed with other settings: stop.
        if not multirun or isinstance(error, FolderHoldsAnotherRun):
            raise
        print(f"[xentlab] job failed: {type(error).__name__}: {error}")
        if raises_failures:
            raise
        return math.nan
    summary = ", ".join(f"{name} {record['metrics'][f'test/{name}']:.3f}" for name in SUMMARY
                        if f"test/{name}" in record["metrics"])
    print(f"[xentlab] {record['status']}: test {summary or 'not run'} ({output_dir / METRICS_FILE})")
    for warning in record.get("warnings", []):
        print(f"[xentlab] warning: {warning}")
    return sweep_value(record, cfg.objective, must_be_finite=multirun and raises_failures)


if __name__ == "__main__":
    main()
