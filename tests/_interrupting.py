"""Stopping a run from inside its training loop, as a signal from outside lands in the middle of an epoch."""

from __future__ import annotations

import os
import signal

import pytest


def signal_during_training(monkeypatch: pytest.MonkeyPatch, sig: signal.Signals, epoch: int,
                           batch_idx: int = 0, *, flush: bool = False) -> None:
    """Send `sig` to this process when training reaches batch `batch_idx` of epoch `epoch` (0-based); the run
    notes it there and stops when the next batch starts. `flush` first writes the epoch's points so far to
    the event files, as a long epoch's would have reached them."""
    from xentlab.lab.module import ClassifierModule

    step = ClassifierModule.training_step

    def signalling(self, batch, index):
        if self.current_epoch == epoch and index == batch_idx:
            if flush:
                for logger in self.loggers:
                    logger.experiment.flush()
            os.kill(os.getpid(), sig)
        return step(self, batch, index)

    monkeypatch.setattr(ClassifierModule, "training_step", signalling)
