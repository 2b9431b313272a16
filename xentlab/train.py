"""The Hydra entry point: parse the command line, check the config, dispatch the job, print its end.

Run `xentlab-train --help` for the config groups, or `xentlab-train -m loss=ce,focal seed=0,1,2` for a sweep.
Training itself is `xentlab.lab.run.train`, imported only when a job trains: the process that launches a
parallel sweep never trains, and importing torch and Lightning there would cost ~5 s of every joblib sweep.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

import xentlab.lab.sweep as console
from xentlab import config_dir
from xentlab.lab.lock import hold, release
from xentlab.lab.loss_configs import store_loss_configs
from xentlab.lab.runs import (
    FolderHoldsAnotherRun,
    RunInterrupted,
    RunNotRecorded,
    holds_a_run,
    nothing_to_resume,
    try_to_record,
    write_record,
)
from xentlab.lab.slurm import requeued
from xentlab.lab.summary import SUMMARY_DIR, write_summaries
from xentlab.lab.sweep import (
    SWEEP_ENV,
    available_cpus,
    discard_unstarted_run,
    job_line,
    print_records,
    refuse,
    resume_command,
    shown,
    sweep_keys,
    sweep_value,
    threads_per_job,
)
from xentlab.lab.validation import (
    ConfigError,
    check_config,
    describe_composition_error,
    describe_startup_error,
    install_open_groups,
    name_the_loss,
)

CONFIG_DIR = str(config_dir())

install_open_groups()
_IMPORT_ERROR: Exception | None = None
try:
    store_loss_configs(CONFIG_DIR)  # a plugin loss without a YAML is a loss= choice too
except Exception as error:  # noqa: BLE001 - e.g. a broken Hydra plugin module: main() says so in one line
    _IMPORT_ERROR = error


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
    """Check the config, train its seeds, print how each ended; in a multirun a failed job is recorded in
    its folder and the sweep goes on. Returns the sweeper's value: the objective, averaged over the job's
    seeds."""
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
        from xentlab.lab.run import train  # torch and Lightning: only in a process that trains
        from xentlab.lab.tuning import tune

        cfg = tune(cfg, output_dir, threads=threads)  # tune=grid: the candidates train first; else cfg
        records = train(cfg, output_dir, overrides=overrides, threads=threads,
                        shared_dir=Path(hydra_cfg.sweep.dir) if multirun else None,
                        varied=sweep_keys() if multirun else None,
                        fresh_if_nothing_to_resume=multirun or requeued(),
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
                if console.BRIEF_ERRORS:
                    refuse(str(error))  # here, not in main(): Hydra would first print "Error executing job"
            raise
        if isinstance(error, FolderHoldsAnotherRun):
            # Resumed with other settings, or started afresh over a run (FolderHoldsARun): stop the sweep,
            # leaving that folder's record alone.
            raise
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
    print_records(records, hydra_cfg, cfg.objective, multirun=multirun, output_dir=output_dir,
                  started=started)
    if not multirun and len(records) > 1:  # a seed batch: mean and interval per curve (a sweep: at its end)
        if write_summaries(output_dir):
            print(f"[xentlab] TensorBoard: mean and 95% interval over the seeds in "
                  f"{shown(output_dir / SUMMARY_DIR)}")
    if not multirun and any(record["status"] != "completed" for record in records):
        raise SystemExit(1)  # the runs are recorded and their errors printed above
    values = [sweep_value(record, cfg.objective, must_be_finite=multirun and raises_failures)
              for record in records]
    return sum(values) / len(values)


hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(run_job)


def main() -> None:
    """`xentlab-train`: Hydra's command line over `run_job`. An invalid setting (a ConfigError or Hydra's
    own composition error) is printed as one message with exit status 2, no traceback; HYDRA_FULL_ERROR=1
    re-raises it with its traceback, as Hydra does. A multirun whose report finds failed, unfinished or
    never-started jobs exits with status 1 (the sweep still ran every job and wrote its report)."""
    console.BRIEF_ERRORS = os.environ.get("HYDRA_FULL_ERROR") != "1"
    # A broken loss plugin is logged once, in one line (and named again if a run asks for its loss); the
    # same message as a Python warning would add two more lines to every run's console.
    warnings.filterwarnings("ignore", message="skipping xentlab loss plugin", category=RuntimeWarning)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing and exiting with 1
    try:
        if _IMPORT_ERROR is not None:
            raise _IMPORT_ERROR
        hydra_main()
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM during a sweep (a single run exits in run_job)
        if not console.BRIEF_ERRORS:
            raise
        sweep_dir = json.loads(os.environ.get(SWEEP_ENV, "{}")).get("dir")
        said = str(stop) if isinstance(stop, RunInterrupted) else "interrupted by SIGINT"
        resume = f"; resume: {resume_command('hydra.sweep.dir', sweep_dir)}" if sweep_dir else ""
        print(f"xentlab-train: {said}{resume}", file=sys.stderr, flush=True)
        sys.exit(getattr(stop, "exit_code", 130))
    except (ConfigError, HydraException, OmegaConfBaseException) as error:
        if not console.BRIEF_ERRORS:
            raise
        refuse(str(error) if isinstance(error, ConfigError) else describe_composition_error(error))
    except Exception as error:
        message = describe_startup_error(error) if console.BRIEF_ERRORS else None
        if message is None:
            raise
        refuse(message)
    from xentlab.lab.callbacks import INCOMPLETE_SWEEPS

    if INCOMPLETE_SWEEPS:
        sys.exit(1)  # a job failed or never finished: said by the report's last line


if __name__ == "__main__":
    main()
