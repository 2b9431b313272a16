"""What a run knows about itself beyond its metrics: which configuration a folder holds, whether training
diverged, and whether it was stopped by a signal; and `RunRecord`, the one writer of a run's
`metrics.json`, for single runs (`xentlab.train`) and for each seed of a batch (`xentlab.lab.seedbatch`)."""

from __future__ import annotations

import contextlib
import math
import platform
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl

from xentlab.lab.validation import ConfigError, flatten

# Keys a resumed run may change without becoming another run: where it resumes from, how many threads
# compute it, what the sweeper reads, how often figures are drawn, and how long it trains (resuming a
# finished run with a larger trainer.max_epochs trains it on).
RESUME_MAY_CHANGE = frozenset({"ckpt_path", "threads", "objective", "figure_every_n_epochs",
                               "trainer.max_epochs"})
# The last epoch's training loss above this multiple of the loss before the first update is divergence.
DIVERGED_FACTOR = 2.0


class FolderHoldsAnotherRun(ConfigError):
    """`ckpt_path=last` found a record or checkpoint of a different configuration in the job's folder."""


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


class RunRecorder(pl.Callback):
    """Keeps what the records of the trainer's `runs` runs need and a checkpoint must carry for a resume.

    Per run, the training loss of the first batch (before any update) and each epoch's mean training
    loss feed `divergence_warnings` (`warnings(k)`); the config is stamped into every checkpoint, so a
    resumed job can tell whether a folder's checkpoint is its own. All of it is callback state, saved
    and restored with the checkpoint. A single run's training step returns its loss; a seed batch's
    returns `{"loss": <the sum>, "run_losses": <one per seed>}` with batches stacked as (runs, B, ...).
    Losses are summed on the device and read once per epoch (no per-step host sync).
    """

    def __init__(self, config: dict, runs: int = 1):
        self.config, self.runs = config, runs
        self.initial_losses: list[float] | None = None
        self.epoch_losses: list[list[float]] = []  # per epoch, one mean per run
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
        """Run k's `divergence_warnings`."""
        initial = self.initial_losses[k] if self.initial_losses is not None else None
        return divergence_warnings(initial, [epoch[k] for epoch in self.epoch_losses])

    def state_dict(self) -> dict:
        return {"config": self.config, "initial_losses": self.initial_losses,
                "epoch_losses": self.epoch_losses}

    def load_state_dict(self, state_dict: dict) -> None:
        self.initial_losses = state_dict.get("initial_losses")
        self.epoch_losses = [list(epoch) for epoch in state_dict.get("epoch_losses", [])]
        if "initial_loss" in state_dict:  # a single run's checkpoint from before seed batches kept scalars
            initial = state_dict["initial_loss"]
            self.initial_losses = None if initial is None else [initial]
            self.epoch_losses = [[loss] for loss in state_dict.get("epoch_losses", [])]

    def state_of(self, k: int, config: dict) -> dict:
        """Run k's part of this state, as the RunRecorder of run k trained alone (with `config`) holds it."""
        return {"config": config,
                "initial_losses": None if self.initial_losses is None else [self.initial_losses[k]],
                "epoch_losses": [[epoch[k]] for epoch in self.epoch_losses]}

    @staticmethod
    def config_in(checkpoint: dict) -> dict | None:
        """The config a checkpoint was written for (None for checkpoints written without this callback)."""
        state = (checkpoint.get("callbacks") or {}).get(RunRecorder.__qualname__)
        return state.get("config") if isinstance(state, dict) else None


class Interruption:
    """Records which signal stopped a run: SIGTERM is turned into KeyboardInterrupt while the run trains,
    so Lightning shuts down as on Ctrl-C (it then exits through SystemExit, which loses the cause)."""

    def __init__(self) -> None:
        self.signal: str | None = None

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

    @contextlib.contextmanager
    def watching(self) -> Iterator[Interruption]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # only the main thread may set handlers; Lightning's own SIGTERM handling remains
            return

        def on_sigterm(signum, frame):
            self.signal = "SIGTERM"
            raise KeyboardInterrupt("SIGTERM")

        # Lightning sets SIGINT to "ignore" after a Ctrl-C and leaves it so; restored here for the caller.
        previous = signal.getsignal(signal.SIGINT), signal.signal(signal.SIGTERM, on_sigterm)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])


class RunRecord:
    """Writes one run's `metrics.json`: the only writer of that record, used by a single run
    (`xentlab.train.train`) and by every seed of a batch (`xentlab.lab.seedbatch.train_batch`), so the two
    cannot drift apart. Each method writes the record (atomically) and returns it.

    Every record holds `status`, `duration_s` (since this object was made), `epochs`, `torch_threads`,
    `versions` (xentlab, torch, Lightning, Python: the report's set-up section reads them from here, never
    from its own process), `metrics`, plus what the status adds: `warnings` (completed), `error` and
    `traceback` (failed), `error` ("stopped by <cause>", interrupted); `xentlab.train.write_record` adds
    the overrides and the config. `extra` fields go into every record (a seed's `seed_batch`).
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

        from xentlab.train import write_record

        self.output_dir.mkdir(parents=True, exist_ok=True)
        return write_record(self.output_dir, self.cfg, {
            "status": status, "duration_s": round(time.time() - self.started, 3), "epochs": epochs,
            "torch_threads": torch.get_num_threads(), "versions": versions(), "metrics": dict(metrics),
            **self.extra, **fields}, self.overrides)


def versions() -> dict[str, str]:
    """The versions a run was made with, as its record keeps them."""
    import torch

    import xentlab

    return {"xentlab": xentlab.__version__, "torch": torch.__version__, "lightning": pl.__version__,
            "python": platform.python_version()}
