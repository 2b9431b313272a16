"""What a run knows about itself beyond its metrics: which configuration a folder holds, whether training
diverged, and whether it was stopped by a signal. `xentlab.train` writes all of it into `metrics.json`."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Iterator

import pytorch_lightning as pl

from xentlab.validation import ConfigError

# Keys a resumed run may change without becoming another run: where it resumes from, how many threads
# compute it, what the sweeper reads, how often figures are drawn, and how long it trains (resuming a
# finished run with a larger trainer.max_epochs trains it on).
RESUME_MAY_CHANGE = frozenset({"ckpt_path", "threads", "objective", "figure_every_n_epochs",
                               "trainer.max_epochs"})
# The last epoch's training loss above this multiple of the loss before the first update is divergence.
DIVERGED_FACTOR = 2.0


class FolderHoldsAnotherRun(ConfigError):
    """`ckpt_path=last` found a record or checkpoint of a different configuration in the job's folder."""


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested plain config → {"group.key": value}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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


class RunRecorder(pl.Callback):
    """Keeps what the run's record needs and a checkpoint must carry for a resume.

    The training loss of the first batch (before any update) and each epoch's mean training loss feed
    `divergence_warnings`; the run's config is stamped into every checkpoint, so a resumed job can tell
    whether a folder's checkpoint is its own. All of it is callback state, saved and restored with the
    checkpoint. Losses are summed on the device and read once per epoch (no per-step sync).
    """

    def __init__(self, config: dict):
        self.config = config
        self.initial_loss: float | None = None
        self.epoch_losses: list[float] = []
        self._sum = self._count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        size = len(batch[1]) if isinstance(batch, (tuple, list)) and len(batch) > 1 else 1
        if self.initial_loss is None and trainer.global_step <= 1:
            self.initial_loss = float(loss)
        self._sum = self._sum + loss.detach().double() * size
        self._count += size

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._count:
            self.epoch_losses.append(float(self._sum / self._count))
        self._sum = self._count = 0

    def state_dict(self) -> dict:
        return {"config": self.config, "initial_loss": self.initial_loss, "epoch_losses": self.epoch_losses}

    def load_state_dict(self, state_dict: dict) -> None:
        self.initial_loss = state_dict.get("initial_loss")
        self.epoch_losses = list(state_dict.get("epoch_losses", []))

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

    def exit_code(self) -> int:
        return 128 + (signal.SIGTERM if self.signal == "SIGTERM" else signal.SIGINT)

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
