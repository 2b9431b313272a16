"""What the Hydra entry point does around a job, kept light (no torch, no Lightning): the run and sweep
folders (`unique_dir`), the sweep's plan and pre-flight check (`SweepProgress`, the `hydra.callbacks.progress`
callback), threads per job, the value returned to a sweeper, and what the console shows (job lines,
summaries, refusals). The process that launches a joblib sweep imports this and never trains.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from xentlab.lab.lock import claim, restore_refused
from xentlab.lab.runs import METRICS_FILE
from xentlab.lab.validation import ConfigError, check_sweep, check_threads

SUMMARY = ("balanced_accuracy", "macro_f1", "minority_recall", "ece")  # printed when a run ends
# Set by SweepProgress in the process that launches a multirun, read by each job (joblib and submitit
# workers inherit the environment): the number of jobs and the keys the sweep varies.
SWEEP_ENV = "XENTLAB_SWEEP"
# True while `xentlab-train` (`xentlab.train.main`) prints refusals as one line (HYDRA_FULL_ERROR=1:
# tracebacks).
BRIEF_ERRORS = False


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
                if not BRIEF_ERRORS:
                    traceback.print_exc()
                refuse(str(error))
        claim(config.hydra.sweep.dir, "hydra.sweep.dir")  # one writer per folder: before it is announced
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


def sweep_keys() -> list[str] | None:
    """The keys the running multirun varies (set by SweepProgress), None outside one."""
    return json.loads(os.environ.get(SWEEP_ENV, "{}")).get("keys")


def print_records(records: list[dict], hydra_cfg: DictConfig, objective: str, *, multirun: bool,
                  output_dir: Path, started: float) -> None:
    """Each seed's end: a job line in a multirun, else its status, summary and record file; then its
    warnings. A run that did not complete shows its error, never metrics beside its status."""
    for record in records:
        metrics = record["metrics"]
        batched = "" if len(records) == 1 else f"seed={record['config']['seed']}"
        failed = record["status"] != "completed"
        if multirun:
            shown_metric = objective if objective in metrics else "test/balanced_accuracy"
            text = f"FAILED: {record.get('error')}" if failed \
                else f"{shown_metric} {metrics.get(shown_metric, math.nan):.3f}"
            print(job_line(hydra_cfg, f"{batched} {text}".lstrip(), time.time() - started), flush=True)
        else:
            summary = ", ".join(f"{name} {metrics[f'test/{name}']:.3f}" for name in SUMMARY
                                if f"test/{name}" in metrics)
            written = shown(output_dir / batched / METRICS_FILE)
            text = record.get("error") if failed else f"test {summary or 'not run'}"
            print(f"[xentlab] {record['status']}: {text} ({written})")
        for warning in record.get("warnings", []):
            print(" ".join(filter(None, ("[xentlab] warning:", batched, warning))), flush=True)


def resume_command(folder_key: str, folder: str | Path) -> str:
    """The command line that resumes this run or sweep in `folder`: its own arguments, pointed at that
    folder (`folder_key`, hydra.run.dir or hydra.sweep.dir) with `ckpt_path=last`."""
    kept = [a for a in sys.argv[1:] if not a.startswith((f"{folder_key}=", "ckpt_path="))]
    return shlex.join(["xentlab-train", *kept, f"{folder_key}={shown(folder)}", "ckpt_path=last"])


def refuse(message: str) -> None:
    """An invalid setting's message on stderr, exit status 2; a refused resume's folder as it was."""
    restore_refused()
    print(f"xentlab-train: {message}", file=sys.stderr)
    sys.exit(2)
