"""One writer per run or sweep folder: an OS-level lock (`flock`) on the folder itself, held by the process
that writes there until it exits. Two processes writing one folder would interleave TensorBoard points,
overwrite each other's `metrics.json` and leave a report that counts one run where two were started; the
second is refused instead. The kernel drops the lock when its holder exits, however it exits (a crash, a
SIGKILL), so a dead run never leaves a folder locked, and no lock file is written into the folder.

`FolderLock`, a Hydra callback, takes the lock before Hydra writes anything there: a single run's folder
at `on_run_start` (before Hydra writes `.hydra/` and the log) and a sweep's at `on_multirun_start`
(before the sweeper writes `multirun.yaml`; `xentlab.lab.sweep.SweepProgress` takes it already, once the
sweep's settings are accepted and before it announces the sweep). Each job takes its own folder's lock
too (`hold`, called by `xentlab.train.run_job`), in whichever process a launcher runs it.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from xentlab.lab.validation import ConfigError

_HELD: dict[Path, int] = {}  # folder -> the descriptor holding its lock, for as long as this process lives


class FolderInUse(ConfigError):
    """Another live process holds the lock of the folder this run or sweep would write."""


def hold(folder: str | Path, name: str | None = None) -> None:
    """Lock `folder` (created if missing) for this process, or raise FolderInUse naming it (as `name`,
    e.g. `hydra.sweep.dir=<folder>`). Holding it already is fine. Where the file system has no `flock`
    (some network file systems), the run goes on unlocked: the lock guards against a mistake, it is not
    needed to write."""
    if helper_rank():
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    resolved = folder.resolve()
    if resolved in _HELD:
        return
    descriptor = os.open(resolved, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise FolderInUse(f"{name or folder} is in use: another xentlab-train is writing there; wait for it "
                          f"to end, or choose another folder") from None
    except OSError:
        os.close(descriptor)
        return
    _HELD[resolved] = descriptor


# Set in every process of a distributed (DDP) run: by srun (SLURM_PROCID), torchrun (RANK, LOCAL_RANK) and
# Lightning's own launchers (LOCAL_RANK, NODE_RANK).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def helper_rank() -> bool:
    """Whether this process is a DDP rank other than 0: it works in rank 0's folder, under rank 0's lock."""
    return any(os.environ.get(name, "0").strip() not in ("", "0") for name in RANK_VARIABLES)


def release(folder: str | Path) -> None:
    """Give `folder`'s lock back (a process that exits gives back all of its locks anyway)."""
    descriptor = _HELD.pop(Path(folder).resolve(), None)
    if descriptor is not None:
        os.close(descriptor)


# What Hydra has written in a run or sweep folder before a run or sweep starts there again (a resume with
# `ckpt_path=last`, or a fresh start that `xentlab.lab.runs.check_fresh_start` may refuse): file -> its
# bytes (`.hydra/` files, `multirun.yaml`) or its size (logs, which only grow). Hydra rewrites these before
# any job can check the folder; a refused run or sweep puts them back (`restore_refused`).
_BEFORE: dict[Path, bytes | int | None] = {}


def remember(folder: str | Path) -> None:
    """Keep what Hydra will rewrite in `folder` (a run's, or a sweep's and its jobs'), for
    `restore_refused`."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in [*folder.glob("multirun.yaml"), *folder.glob(".hydra/*"), *folder.glob("*/.hydra/*")]:
        _BEFORE[path] = path.read_bytes() if path.is_file() else None
    for path in [*folder.glob("*.log"), *folder.glob("*/*.log")]:
        _BEFORE[path] = path.stat().st_size


def restore_refused() -> None:
    """Put back what `remember` kept: a refused resume leaves its folder's files as they were. Files Hydra
    added in a folder it had written before (a `.hydra/` file, a log) are removed."""
    for path, before in _BEFORE.items():
        if isinstance(before, bytes):
            path.write_bytes(before)
        elif isinstance(before, int) and path.is_file():
            os.truncate(path, before)
    folders = {path.parent for path in _BEFORE}
    for folder in folders:
        for path in [*folder.glob("*.yaml"), *folder.glob("*.log")] if folder.is_dir() else []:
            if path not in _BEFORE and (folder.name == ".hydra" or path.suffix == ".log"):
                path.unlink()
    _BEFORE.clear()


class FolderLock(Callback):
    """Hydra callback (`hydra.callbacks.lock`): locks the run or sweep folder before Hydra writes into it.
    A refusal is one line and exit status 2: Hydra would turn an exception raised here into a warning."""

    def on_run_start(self, config, **kwargs) -> None:
        claim(config.hydra.run.dir, "hydra.run.dir")
        remember(config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        claim(config.hydra.sweep.dir, "hydra.sweep.dir")
        remember(config.hydra.sweep.dir)

    def on_run_end(self, config, **kwargs) -> None:
        release(config.hydra.run.dir)

    def on_multirun_end(self, config, **kwargs) -> None:
        release(config.hydra.sweep.dir)


def claim(folder: str, key: str) -> None:
    """`hold` for a Hydra callback, where an exception would become a warning: a folder in use is one line
    on stderr and exit status 2."""
    try:
        hold(folder, f"{key}={folder}")
    except FolderInUse as error:
        print(f"xentlab-train: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
