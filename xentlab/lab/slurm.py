"""SLURM through Hydra's submitit launcher: quiet job polling without accounting, preemption and requeue.

Preemption and time limits use submitit's mechanism, and only it: SLURM sends the job `USR2` (90 s before
its time limit with the launcher's default `signal_delay_s`, or on `scancel --signal=USR2`); submitit
calls the launcher's `checkpoint()`, which resubmits the same job, requeues it with `scontrol requeue` and
exits. xentlab's run then records itself as `interrupted`, and the requeued job, seeing
`SLURM_RESTART_COUNT`, resumes from its folder's `checkpoints/last.ckpt` (`ckpt_path=last`). Lightning's
own SLURM auto-requeue (its `SIGUSR1` handler and its `hpc_ckpt_*.ckpt` files) is turned off so that a job
is never requeued twice or resumed from two places.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path


def requeued() -> bool:
    """True in a SLURM job that was requeued (preempted, timed out and resubmitted, `scontrol requeue`)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def lightning_plugins() -> list:
    """Trainer plugins for a run inside a SLURM job: its environment without Lightning's auto-requeue."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def accounting_disabled() -> bool:
    """Whether this cluster has no accounting storage, so `sacct` fails on every call."""
    try:
        result = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    match = re.search(r"^AccountingStorageType\s*=\s*(\S*)", result.stdout, re.MULTILINE)
    storage = match.group(1) if match else ""
    return result.returncode == 0 and storage in ("", "(null)", "accounting_storage/none")


class _BypassedSacct(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Bypassing sacct error" not in record.getMessage()


def quiet_submitit_polling() -> None:
    """For the process that launches a SLURM sweep. submitit polls job states with `sacct`; on a cluster
    without accounting every call fails, printing sacct's error and a warning each time. There it polls with
    `squeue --states=all` instead (same `JobID|State|NodeList` fields; a finished job stays listed for
    `MinJobAge`, 300 s by default, and submitit reads its result file within a second of it appearing),
    and submitit's warning about a failed poll is dropped."""
    from submitit.slurm import slurm

    class QueueWatcher(slurm.SlurmInfoWatcher):
        def _make_command(self) -> list[str] | None:
            command = super()._make_command()
            if command is None:
                return None
            jobs = ",".join(command[i + 1] for i, word in enumerate(command) if word == "-j")
            return ["squeue", "--noheader", "--states=all", "--format=%i|%T|%N", f"--jobs={jobs}"]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            return super().read_info("JobID|State|NodeList\n" + text)

    if type(slurm.SlurmJob.watcher).__name__ != "QueueWatcher" and accounting_disabled():
        slurm.SlurmJob.watcher = QueueWatcher(delay_s=600)
    logger = logging.getLogger("submitit")
    if not any(isinstance(f, _BypassedSacct) for f in logger.filters):
        logger.addFilter(_BypassedSacct())


def job_lines(sweep_dir: str | Path) -> list[str]:
    """The `[k/N] ...` lines that a sweep's submitit jobs printed into their logs, in job order: on a
    cluster a job's output goes to `<sweep dir>/.submitit/<job id>/*_log.out`, not to the console."""
    found = []
    for log in Path(sweep_dir).glob(".submitit/*/*_log.out"):
        for line in log.read_text(errors="replace").splitlines():
            match = re.match(r"\[(\d+)(/\d+)?\] ", line)
            if match:
                found.append((int(match.group(1)), line))
    return [line for _, line in sorted(found)]
