"""The Hydra callbacks that write the sweep's TensorBoard summaries and its report at the end of every
multirun."""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
# The sweeps this process reported incomplete (failed, unreadable, unfinished or never-started jobs):
# `xentlab-train` then exits with status 1, as `xentlab report` does for them.
INCOMPLETE_SWEEPS: list[Path] = []


class SummaryCallback(Callback):
    """Hydra callback (`hydra.callbacks.summary`, conf/hydra/default.yaml): writes the sweep's per-setting
    TensorBoard summaries, `<sweep dir>/summary/<setting>` (xentlab.lab.summary), when every job returned.
    A failure is logged, never raised: `xentlab.lab.summary.write_summaries(<sweep dir>)` can redo it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from xentlab.lab.summary import SUMMARY_DIR, write_summaries

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            written = write_summaries(sweep_dir)
        except Exception as error:  # noqa: BLE001 - the jobs' results are on disk whatever happens here
            log.warning("TensorBoard summaries for %s failed: %s: %s", sweep_dir, type(error).__name__, error)
            return
        if written:
            print(f"[xentlab] TensorBoard: mean and 95% interval over seeds per setting in "
                  f"{sweep_dir / SUMMARY_DIR} (Custom Scalars tab)", flush=True)


class ReportCallback(Callback):
    """Hydra callback (`hydra.callbacks.report`, conf/hydra/default.yaml): writes and prints the sweep report.

    Runs in the process that launched the sweep, after every job returned, whatever the launcher. Every
    loss is compared with the `report.baseline` group (conf/config.yaml). A sweep that dies on its way
    never reaches `on_multirun_end` (Hydra itself fails writing a job's config on a full disk, Ctrl-C, a
    job that raises); the report of what exists is then written when the process exits. A report that
    cannot be written is logged, never raised: the jobs' results are already on disk and
    `xentlab report <sweep dir>` can rebuild it.
    """

    def __init__(self) -> None:
        self._unreported: tuple[Path, str | None] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._unreported = self._target(config)
        atexit.register(self._report_if_unreported, at_exit=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._unreported = self._target(config)
        self._report_if_unreported()

    @staticmethod
    def _target(config: DictConfig) -> tuple[Path, str | None]:
        baseline = config.get("report", {}).get("baseline") if "report" in config else None
        return Path(str(config.hydra.sweep.dir)), None if baseline is None else str(baseline)

    def _report_if_unreported(self, at_exit: bool = False) -> None:
        if self._unreported is None:
            return
        (sweep_dir, baseline), self._unreported = self._unreported, None
        if at_exit and not any(sweep_dir.rglob("metrics.json")):
            return  # stopped before any job ended (e.g. a refused setting): nothing to report
        from xentlab.lab.report import write_report  # matplotlib and scipy only when a sweep ends

        try:
            report = write_report(sweep_dir, baseline=baseline)
        except Exception as error:  # noqa: BLE001 - a broken report must not turn a finished sweep into a failure
            log.warning("sweep report for %s failed: %s: %s", sweep_dir, type(error).__name__, error)
            return
        if not report.complete:
            INCOMPLETE_SWEEPS.append(sweep_dir)
            log.warning("sweep %s is incomplete: %d failed or unreadable job(s), %d unfinished, %d never "
                        "started (see report.md); exit status 1", sweep_dir, len(report.problems),
                        len(report.pending), len(report.unstarted))
