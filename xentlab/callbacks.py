"""The Hydra callback that writes the sweep report at the end of every multirun."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    """Hydra callback (`hydra.callbacks.report`, conf/hydra/default.yaml): writes and prints the sweep report.

    Runs in the process that launched the sweep, after every job returned, whatever the launcher. Every
    loss is compared with the `report.baseline` group (conf/config.yaml). A report that cannot be written
    is logged, never raised: the jobs' results are already on disk and `xentlab report <sweep dir>` can
    rebuild it.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from xentlab.report import write_report  # matplotlib and scipy only when a sweep ends

        sweep_dir = Path(str(config.hydra.sweep.dir))
        baseline = config.get("report", {}).get("baseline") if "report" in config else None
        try:
            report = write_report(sweep_dir, baseline=None if baseline is None else str(baseline))
        except Exception as error:  # noqa: BLE001 - a broken report must not turn a finished sweep into a failure
            log.warning("sweep report for %s failed: %s: %s", sweep_dir, type(error).__name__, error)
            return
        if not report.complete:
            log.warning("sweep %s is incomplete: %d failed or unreadable job(s), %d unfinished, %d never "
                        "started (see report.md)", sweep_dir, len(report.problems), len(report.pending),
                        len(report.unstarted))
