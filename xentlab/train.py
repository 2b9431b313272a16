"""The Hydra entry point: parse the command line, check the config, dispatch the job, print its end.

Run `xentlab-train --help` for the config groups, or `xentlab-train -m loss=ce,focal seed=0,1,2` for a sweep.
Training itself is `xentlab.lab.run.train`, imported only when a job trains: the process that launches a
parallel sweep never trains, and importing torch and Lightning there would cost ~5 s of every joblib sweep.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

import xentlab.lab.sweep as console
from xentlab import config_dir
from xentlab.lab.runs import (
    FolderHoldsAnotherRun,
    RunInterrupted,
    RunNotRecorded,
    try_to_record,
    write_record,
)
from xentlab.lab.slurm import requeued
from xentlab.lab.summary import SUMMARY_DIR, write_summaries
from xentlab.lab.sweep import (
    available_cpus,
    discard_unstarted_run,
    job_line,
    name_the_loss,
    print_records,
    refuse,
    shown,
    sweep_keys,
    sweep_value,
    threads_per_job,
)
from xentlab.lab.validation import ConfigError, check_config, describe_composition_error, install_open_groups

CONFIG_DIR = str(config_dir())

install_open_groups()


def run_job(cfg: DictConfig) -> float:
    """One Hydra job: check the config, train its seeds, print how each ended; in a multirun a failed job
    is recorded in its folder and the sweep goes on. Returns the sweeper's value: the objective, averaged
    over the job's seeds."""
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
        threads = threads_per_job(hydra_cfg.launcher, available_cpus(), cfg.threads)
        from xentlab.lab.run import train  # torch and Lightning: only in a process that trains

        records = train(cfg, output_dir, overrides=overrides, threads=threads,
                        shared_dir=Path(hydra_cfg.sweep.dir) if multirun else None,
                        varied=sweep_keys() if multirun else None,
                        fresh_if_nothing_to_resume=multirun or requeued(),
                        announce=None if multirun else announce)
    except RunInterrupted as stop:
        print(f"[xentlab] {stop}", flush=True)
        if multirun:
            raise
        raise SystemExit(stop.exit_code) from None
    except Exception as error:
        if not multirun:
            if isinstance(error, ConfigError):
                discard_unstarted_run(output_dir)
                if console.BRIEF_ERRORS:
                    refuse(str(error))  # here, not in main(): Hydra would first print "Error executing job"
            raise
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
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing and exiting with 1
    try:
        hydra_main()
    except (ConfigError, HydraException, OmegaConfBaseException) as error:
        if not console.BRIEF_ERRORS:
            raise
        refuse(str(error) if isinstance(error, ConfigError) else describe_composition_error(error))
    from xentlab.lab.callbacks import INCOMPLETE_SWEEPS

    if INCOMPLETE_SWEEPS:
        sys.exit(1)  # a job failed or never finished: said by the report's last line


if __name__ == "__main__":
    main()
