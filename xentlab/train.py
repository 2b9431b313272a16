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

from xentlab import config_dir

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch import nn

    from xentlab.data import TensorDataModule
    from xentlab.module import ClassifierModule

METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
SUMMARY = ("balanced_accuracy", "macro_f1", "minority_recall", "ece")  # printed when a run ends
CONFIG_DIR = str(config_dir())


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


def build_run(cfg: DictConfig, output_dir: Path, overrides=(), shared_dir: Path | None = None) \
        -> tuple[pl.Trainer, ClassifierModule, pl.LightningDataModule]:
    """Everything a run needs, built (and so validated) before the first training step. `overrides` pick
    the TensorBoard HParams columns; `shared_dir` is the sweep folder of a multirun job."""
    # Imported here, not at the top: the process that launches a parallel sweep never trains, and
    # importing Lightning there would cost ~5 s of every joblib sweep (docs/benchmarks.md).
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from xentlab.module import BoardLogger, ClassifierModule
    from xentlab.schedules import build_scheduler

    quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True)
    scheduler = build_scheduler(**OmegaConf.to_container(cfg.scheduler), total_epochs=cfg.trainer.max_epochs)
    datamodule, loss, model = build_parts(cfg)
    module = ClassifierModule(model, loss, task=datamodule.task, num_classes=datamodule.num_classes,
                              optimizer=instantiate(cfg.optimizer), run_params=flat_params(cfg),
                              figure_every_n_epochs=cfg.figure_every_n_epochs, scheduler=scheduler,
                              overrides=overrides, shared_dir=shared_dir)
    logger = BoardLogger(save_dir=str(output_dir), name="", version="", **cfg.logger)
    callbacks = []
    if cfg.trainer.get("enable_checkpointing", True):
        # last.ckpt, refreshed every epoch, is what `ckpt_path=last` resumes from.
        callbacks.append(ModelCheckpoint(dirpath=output_dir / CHECKPOINT_DIR, save_last=True))
    trainer = pl.Trainer(**cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(output_dir))
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


def train(cfg: DictConfig, output_dir: str | Path, *, overrides: list[str] | tuple[str, ...] = (),
          threads: int | None = None, shared_dir: str | Path | None = None) -> dict:
    """Fit on the training split, test on the held-out split, write `metrics.json`; return its content.

    With `ckpt_path=last` an interrupted run continues from `<output_dir>/checkpoints/last.ckpt` (global
    step, epoch, optimizer state and the TensorBoard curves carry on); a run whose `metrics.json` already
    says it completed `trainer.max_epochs` epochs is not trained again, so a resumed sweep redoes only
    its unfinished jobs. `overrides` (the job's command-line overrides) are stored for the report;
    `threads`, if given, sets torch's intra-op threads first; `shared_dir` is a multirun's sweep folder.
    """
    import torch

    if cfg.get("seeds", 1) != 1:
        raise ValueError(f"train() runs one seed; seeds={cfg.seeds} is train_seeds()'s")
    if threads is not None:
        torch.set_num_threads(threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.ckpt_path == "last" and (done := finished_record(output_dir, cfg.trainer.max_epochs)) is not None:
        return done
    started = time.time()
    trainer, module, datamodule = build_run(cfg, output_dir, overrides, shared_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    status = "interrupted" if trainer.interrupted else "completed"
    final = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not trainer.interrupted:
        tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        final.update({k: float(v) for k, v in tested.items()})
    record = {"status": status, "duration_s": round(time.time() - started, 3),
              "epochs": trainer.current_epoch, "torch_threads": torch.get_num_threads(), "metrics": final}
    return write_record(output_dir, cfg, record, overrides)


def train_seeds(cfg: DictConfig, output_dir: str | Path, *, overrides: list[str] | tuple[str, ...] = (),
                threads: int | None = None, shared_dir: str | Path | None = None) -> list[dict]:
    """The run's records: `[train(...)]` for `seeds: 1`; for `seeds: K > 1` the K runs of seeds
    seed ... seed+K-1, trained as one batch (`xentlab.seedbatch`), each in `<output_dir>/seed=<s>/`."""
    from xentlab.seedbatch import check_seeds, train_batch

    if check_seeds(cfg.get("seeds", 1)) == 1:
        return [train(cfg, output_dir, overrides=overrides, threads=threads, shared_dir=shared_dir)]
    return train_batch(cfg, output_dir, overrides=overrides, threads=threads)


def finished_record(output_dir: Path, max_epochs: int) -> dict | None:
    """The run's `metrics.json` content if it records a completed run of `max_epochs` epochs, else None."""
    try:
        record = json.loads((output_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("status") == "completed" and record.get("epochs") == max_epochs else None


def write_record(output_dir: Path, cfg: DictConfig, record: dict, overrides=()) -> dict:
    """metrics.json: the run's status and final metrics, its overrides and the plain values of its config.

    Written to a temporary file and renamed into place, so a report reading a sweep in progress never
    sees half a file. Returns the record as written.
    """
    record = {**record, "overrides": list(overrides), "config": OmegaConf.to_container(cfg, resolve=True)}
    staging = output_dir / f".{METRICS_FILE}.{os.getpid()}"
    staging.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(staging, output_dir / METRICS_FILE)
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
    print(f"[xentlab] logs: {output_dir}\n[xentlab] view: tensorboard --logdir {logdir}")
    overrides = list(hydra_cfg.overrides.task)
    raises_failures = "optuna" in str(hydra_cfg.sweeper.get("_target_", ""))
    try:
        records = train_seeds(cfg, output_dir, overrides=overrides, threads=threads,
                              shared_dir=logdir if multirun else None)
    except Exception as error:
        if not multirun:
            raise
        # In a sweep one failing job must not stop the others: record it for the report and move on.
        write_record(output_dir, cfg, {"status": "failed", "error": f"{type(error).__name__}: {error}",
                                       "traceback": traceback.format_exc(), "metrics": {}}, overrides)
        print(f"[xentlab] job failed: {type(error).__name__}: {error}")
        if raises_failures:
            raise
        return math.nan
    for record in records:
        summary = ", ".join(f"{name} {record['metrics'][f'test/{name}']:.3f}" for name in SUMMARY
                            if f"test/{name}" in record["metrics"])
        where = output_dir if len(records) == 1 else output_dir / f"seed={record['config']['seed']}"
        print(f"[xentlab] {record['status']}: test {summary or 'not run'} ({where / METRICS_FILE})")
    # A batch of seeds gives the sweeper its mean over the seeds.
    values = [sweep_value(record, cfg.objective, must_be_finite=multirun and raises_failures)
              for record in records]
    return sum(values) / len(values)


if __name__ == "__main__":
    main()
