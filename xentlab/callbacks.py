"""Callbacks around a run: the sweep report at the end of every multirun, and a stop on a non-finite loss."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    """Hydra callback (`hydra.callbacks.report`, conf/hydra/default.yaml): writes and prints the sweep report.

    Runs in the process that launched the sweep, after every job returned, whatever the launcher. A report
    that cannot be written is logged, never raised: the jobs' results are already on disk and
    `xentlab report <sweep dir>` can rebuild it.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from xentlab.report import write_report  # matplotlib and scipy only when a sweep ends

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            write_report(sweep_dir)
        except Exception as error:  # noqa: BLE001 - a broken report must not turn a finished sweep into a failure
            log.warning("sweep report for %s failed: %s: %s", sweep_dir, type(error).__name__, error)


class FiniteLossCheck(pl.Callback):
    """Stops a run whose epoch-mean training loss is NaN or infinite, raising FloatingPointError.

    A diverged run would otherwise train to the end and report metrics of a broken model; in a sweep the
    raised error marks the job as failed, with this message, and the other jobs go on. Checked once per
    epoch on the logged mean (NaN in any batch makes it NaN), so no per-step device sync.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"train/loss is {float(loss)} at epoch {trainer.current_epoch} (step {trainer.global_step}); "
                "try a lower optimizer.lr or check the loss parameters")
