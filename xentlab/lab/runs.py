"""A run's record, `<run dir>/metrics.json`, and what it says beyond the metrics: which configuration a
folder holds (and whether it finished, or holds results a fresh start must not overwrite), whether
training diverged, and whether a signal stopped it.
`RunRecord` is the one writer of a record, for every seed of every run (`xentlab.lab.run`); nothing here
imports torch or Lightning, so the Hydra entry point can record a job that failed before training."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from xentlab.lab.atomic import atomic_write, remove_staging_files
from xentlab.lab.validation import ConfigError, flatten

if TYPE_CHECKING:
    import pytorch_lightning as pl

METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"  # ModelCheckpoint(save_last=True) refreshes it every epoch
# The key of the run's callback state in a checkpoint, where the config it was trained with is stamped.
RECORDER_STATE = "RunRecorder"

# Keys a resumed run may change without becoming another run: where it resumes from, how many threads
# compute it, what the sweeper reads, how often figures are drawn, and how long it trains (resuming a
# finished run with a larger trainer.max_epochs trains it on).
RESUME_MAY_CHANGE = frozenset({"ckpt_path", "threads", "objective", "figure_every_n_epochs",
                               "trainer.max_epochs"})
# The last epoch's training loss above this multiple of the loss before the first update is divergence.
DIVERGED_FACTOR = 2.0


class FolderHoldsAnotherRun(ConfigError):
    """`ckpt_path=last` found a record or checkpoint of a different configuration in the job's folder."""


class FolderHoldsARun(FolderHoldsAnotherRun):
    """A fresh start (no `ckpt_path`) found a run's results in its folder, which it would overwrite."""


def config_differences(recorded: dict, current: dict) -> list[str]:
    """`key: recorded -> current` for every setting that differs, ignoring RESUME_MAY_CHANGE."""
    old, new = flatten(recorded), flatten(current)

    def shown(flat: dict, key: str) -> str:
        return repr(flat[key]) if key in flat else "(unset)"

    return [f"{key}: {shown(old, key)} -> {shown(new, key)}" for key in sorted(old.keys() | new.keys())
            if key not in RESUME_MAY_CHANGE and (key not in old or key not in new or old[key] != new[key])]


def divergence_warnings(initial_loss: float | None, epoch_losses: list[float]) -> list[str]:
    """`diverged: ...` warnings for a finished run's training losses (epoch means, in order).

    Two rules, either suffices: (1) with two or more epochs, no later epoch's training loss is below the
    first epoch's (training never made progress); (2) the last epoch's training loss is more than
    DIVERGED_FACTOR times the loss of the first batch before any update (the model ends worse than it
    started: e.g. Adam at lr=1e6 settles at a finite loss ~1e5 times the initial one, at chance accuracy).
    """
    warnings = []
    first, later = epoch_losses[:1], epoch_losses[1:]
    if later and min(later) >= first[0]:
        warnings.append(f"diverged: the training loss never fell below its first epoch's {first[0]:.4g} "
                        f"(lowest of the {len(later)} later epochs: {min(later):.4g})")
    if initial_loss is not None and epoch_losses and math.isfinite(initial_loss) \
            and epoch_losses[-1] > DIVERGED_FACTOR * initial_loss:
        warnings.append(f"diverged: the last epoch's training loss {epoch_losses[-1]:.4g} is "
                        f"{epoch_losses[-1] / initial_loss:.3g}x the loss before the first update "
                        f"({initial_loss:.4g})")
    return warnings


def nonfinite_loss(loss: float, epoch: int, step: int) -> FloatingPointError | None:
    """The error a run fails with when its epoch's mean training loss is NaN or infinite, else None.

    A diverged run would otherwise train on and report a broken model's metrics. The epoch mean is NaN
    if any batch was, so checking it once per epoch costs no per-step device sync. A single run raises
    it (`ClassifierModule`); a seed of a batch is marked failed with it while the other seeds train on.
    """
    if math.isfinite(loss):
        return None
    return FloatingPointError(f"train/loss is {loss} at epoch {epoch} (step {step}); try a lower "
                              "optimizer.lr or check the loss parameters")


class Interruption:
    """Records which signal stopped a run, and stops it where stopping is safe.

    While a run trains (`deferring`), Ctrl-C (SIGINT) and SIGTERM only note the signal; `stop_point()`,
    a callback the run's Trainer carries, raises KeyboardInterrupt when the next batch starts,
    and Lightning then shuts down as on Ctrl-C (it exits through SystemExit, which loses the cause: hence
    the note). A KeyboardInterrupt raised wherever the signal lands could land inside TensorBoard's
    writer queue, whose thread then never wakes and Lightning's shutdown waits on it forever. A second
    signal, or one before the Trainer runs or after it is done, raises at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._deferring = False

    def describe(self, stop: BaseException) -> str:
        if self.signal:
            return self.signal
        if isinstance(stop, KeyboardInterrupt) or type(stop) is SystemExit:
            return "SIGINT (Ctrl-C)"  # Lightning answers Ctrl-C with sys.exit(1)
        return "SIGTERM" if type(stop).__name__ == "SIGTERMException" else type(stop).__name__

    @staticmethod
    def exit_code(cause: str) -> int:
        """The shell's convention for a process a signal stopped: 128 + the signal number."""
        return 128 + (signal.SIGTERM if cause.startswith("SIGTERM") else signal.SIGINT)

    def stop_point(self) -> pl.Callback:
        """A callback that delivers a noted signal when the next batch of any stage starts."""
        import pytorch_lightning as pl  # only a process that trains asks for it

        interruption = self

        class StopPoint(pl.Callback):
            def _stop_if_signalled(self, *_args) -> None:
                interruption.raise_if_signalled()

            on_train_batch_start = on_validation_batch_start = on_test_batch_start = _stop_if_signalled

        return StopPoint()

    def raise_if_signalled(self) -> None:
        if self.signal is not None:
            self._deferring = False  # Lightning's shutdown may take a while; a second Ctrl-C still works
            raise KeyboardInterrupt(self.signal)

    @contextlib.contextmanager
    def watching(self) -> Iterator[Interruption]:
        """Notes SIGINT and SIGTERM while the block runs; within `deferring()`, they wait for a stop point."""
        if threading.current_thread() is not threading.main_thread():
            yield self  # only the main thread may set handlers; Lightning's own SIGTERM handling remains
            return

        def on_signal(signum, frame):
            first = self.signal is None
            self.signal = self.signal or ("SIGTERM" if signum == signal.SIGTERM else "SIGINT (Ctrl-C)")
            if not (first and self._deferring):
                raise KeyboardInterrupt(self.signal)

        # Lightning sets SIGINT to "ignore" after a Ctrl-C and leaves it so; restored here for the caller.
        previous = signal.signal(signal.SIGINT, on_signal), signal.signal(signal.SIGTERM, on_signal)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """The block (a Trainer's fit or test, which carries `stop_point()`) is stopped at a stop point; a
        signal that arrived too late for one is raised when the block ends."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        self.raise_if_signalled()


class RunRecord:
    """Writes one run's `metrics.json`: the only writer of that record, for a single run and every seed of
    a batch alike. Each method writes the record (atomically) and returns it.

    Every record holds `status`, `duration_s` (since this object was made), `epochs`, `torch_threads`,
    `versions` (xentlab, torch, Lightning, Python: the report's set-up section reads them from here, never
    from its own process), `metrics`, plus what the status adds: `warnings` (completed), `error` and
    `traceback` (failed), `error` ("stopped by <cause>", interrupted); `write_record` adds the overrides
    and the config. `extra` fields go into every record (a seed's `seed_batch`).
    """

    def __init__(self, output_dir: str | Path, cfg, overrides=(), **extra):
        self.output_dir, self.cfg, self.overrides, self.extra = Path(output_dir), cfg, list(overrides), extra
        self.started = time.time()

    def completed(self, metrics: dict, *, epochs: int, warnings: list[str]) -> dict:
        return self._write("completed", epochs, metrics, warnings=list(warnings))

    def failed(self, error: BaseException, *, epochs: int, trace: str | None = None) -> dict:
        """`trace`: the traceback as formatted where the error was caught; by default the error's own."""
        trace = trace if trace is not None else "".join(traceback.format_exception(error))
        return self._write("failed", epochs, {}, error=f"{type(error).__name__}: {error}", traceback=trace)

    def interrupted(self, cause: str, *, epochs: int, metrics: dict) -> dict:
        return self._write("interrupted", epochs, metrics, error=f"stopped by {cause}")

    def _write(self, status: str, epochs: int, metrics: dict, **fields) -> dict:
        import torch

        self.output_dir.mkdir(parents=True, exist_ok=True)
        return write_record(self.output_dir, self.cfg, {
            "status": status, "duration_s": round(time.time() - self.started, 3), "epochs": epochs,
            "torch_threads": torch.get_num_threads(), "versions": versions(), "metrics": dict(metrics),
            **self.extra, **fields}, self.overrides)


def versions() -> dict[str, str]:
    """The versions a run was made with, as its record keeps them."""
    import pytorch_lightning as pl
    import torch

    import xentlab

    return {"xentlab": xentlab.__version__, "torch": torch.__version__, "lightning": pl.__version__,
            "python": platform.python_version()}


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM, after its `interrupted` record was written (or not: the message
    says). `exit_code` is the shell's convention, 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RunNotRecorded(RuntimeError):
    """A run failed and its `failed` record could not be written either (e.g. the disk is full)."""


def try_to_record(write: Callable[[], object], status: str) -> str | None:
    """`write()` the record of a run that ended early; None, or why that record could not be written."""
    try:
        write()
    except OSError as error:
        return f"its {status!r} record could not be written either: {type(error).__name__}: {error}"
    return None


def write_record(output_dir: Path, cfg: DictConfig, record: dict, overrides=()) -> dict:
    """metrics.json: the run's status and final metrics, its overrides and the plain values of its config.

    Written atomically (`xentlab.lab.atomic`), so a report reading a sweep in progress, a crash or a full disk
    never leaves half a file. Returns the record as written.
    """
    record = {**record, "overrides": list(overrides), "config": OmegaConf.to_container(cfg, resolve=True)}
    atomic_write(Path(output_dir) / METRICS_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


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


def folder_state(cfg: DictConfig, output_dir: Path) -> tuple[dict | None, str | None]:
    """What `output_dir` holds of the run `cfg`: (its record if it completed its `trainer.max_epochs`
    epochs, else None; its last checkpoint if there is one, else None).

    A folder holds one configuration. Its `metrics.json`, or else the config stamped in its last.ckpt, is
    compared with `cfg` (ignoring RESUME_MAY_CHANGE, e.g. threads); any other difference raises
    `FolderHoldsAnotherRun` rather than hand this job another run's results or weights. So does a
    `trainer.max_epochs` below the epochs the folder's run has trained (its completed record's, or else its
    checkpoint's): a resume never shrinks a record.
    """
    record_file, checkpoint = output_dir / METRICS_FILE, output_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    for folder in (output_dir, checkpoint.parent):
        if folder.is_dir():
            remove_staging_files(folder)  # left by a process killed mid-write; this job owns the folder
    record = read_record(record_file) if record_file.exists() else None
    source, recorded = (record_file, record.get("config")) if record is not None else (None, None)
    completed = record is not None and record.get("status") == "completed"
    held = record.get("epochs") if completed else None  # the epochs the folder's run has trained
    if not completed and checkpoint.exists():
        from xentlab.lab.checkpoint import load_checkpoint  # torch: only when there is one to read

        loaded = load_checkpoint(checkpoint)
        held = loaded.get("epoch", -1) + 1 if isinstance(loaded.get("epoch"), int) else None
        if record is None:
            source, recorded = checkpoint, stamped_config(loaded)
    if recorded is not None:
        differences = config_differences(recorded, OmegaConf.to_container(cfg, resolve=True))
        if differences:
            raise FolderHoldsAnotherRun(
                f"ckpt_path=last: {output_dir} holds another configuration's run ({source} was written for "
                f"it); differences (recorded -> this job): {'; '.join(differences[:8])}"
                f"{' ...' if len(differences) > 8 else ''}. Resume a job with the overrides it was started "
                "with, or start it in a new folder (ckpt_path=null).")
    if isinstance(held, int) and held > cfg.trainer.max_epochs:
        raise FolderHoldsAnotherRun(
            f"ckpt_path=last: {output_dir} holds a run trained for {held} epochs; trainer.max_epochs="
            f"{cfg.trainer.max_epochs} would end it earlier and replace its record with a shorter one. "
            f"Resume with trainer.max_epochs >= {held}, or start the shorter run in a new folder "
            "(ckpt_path=null).")
    finished = completed and record.get("epochs") == cfg.trainer.max_epochs
    return (record if finished else None), (str(checkpoint) if checkpoint.exists() else None)


def check_fresh_start(cfg: DictConfig, output_dir: Path) -> None:
    """Refuses (`FolderHoldsARun`) a fresh start (no `ckpt_path`) in a folder that holds a run's results,
    before anything is built or written: its record and checkpoints would be overwritten (Lightning would
    write `last-v1.ckpt` beside the old `last.ckpt`) and its TensorBoard curves mixed with the new run's.

    Results are a checkpoint under `checkpoints/` or a record of a run that trained (a completed record, or
    one of a run that failed or was interrupted after an epoch or more), in the folder or in any of its
    seed folders (`seed=<s>/`, a batch's). A record of a run that never finished an epoch (e.g. a setting
    refused while the run was built) is no result: rerunning it with the setting fixed is normal. Hydra's
    default folders are new ones, so only a folder named on the command line can be refused."""
    if cfg.get("ckpt_path") is not None:
        return
    folders = [output_dir, *sorted(output_dir.glob("seed=*"))]
    records = [said for said in map(trained_record, folders) if said is not None]
    checkpoints = [path for folder in folders for path in sorted((folder / CHECKPOINT_DIR).glob("*.ckpt"))]
    if records or checkpoints:
        held = records[0] if records else f"{checkpoints[0]} is a run's checkpoint"
        raise FolderHoldsARun(
            f"{output_dir} already holds a run ({held}), which a fresh start would overwrite: resume it "
            "with ckpt_path=last (and the overrides it was started with), or start this run in another "
            "folder (hydra.run.dir=, or hydra.sweep.dir= for a sweep), or delete that folder first.")


def trained_record(folder: Path) -> str | None:
    """What the record in `folder` says of a run that trained (see `check_fresh_start`), else None."""
    path = folder / METRICS_FILE
    if not path.is_file():
        return None
    try:
        record = read_record(path)
    except ValueError:
        return f"{path} is a record that cannot be read"
    status, epochs = record.get("status"), record.get("epochs")
    epochs = epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else 0
    if status != "completed" and epochs < 1:
        return None
    counted = f"{epochs} epoch{'s' if epochs != 1 else ''}"
    what = {"completed": f"a completed run of {counted}", "failed": f"a run that failed after {counted}",
            "interrupted": f"a run interrupted after {counted}"}.get(status, f"a {status} run of {counted}")
    return f"{path} records {what}"


def stamped_config(checkpoint: dict) -> dict | None:
    """The config a checkpoint was written for (None for checkpoints written without RunRecorder)."""
    state = (checkpoint.get("callbacks") or {}).get(RECORDER_STATE)
    return state.get("config") if isinstance(state, dict) else None


def nothing_to_resume(output_dir: Path) -> ConfigError:
    """The error of `ckpt_path=last` in a folder without a checkpoint: how to point at the run instead."""
    return ConfigError(
        f"ckpt_path=last: nothing to resume in {output_dir} (no {CHECKPOINT_DIR}/{LAST_CHECKPOINT}). "
        "Point at the run's folder: `xentlab-train <its overrides> hydra.run.dir=<its folder> "
        "ckpt_path=last` (a sweep: `xentlab-train -m <its overrides> hydra.sweep.dir=<its folder> "
        "ckpt_path=last`), or at a checkpoint file: ckpt_path=<path/to/file.ckpt>.")
