"""xentlab's TensorBoard layout, in plain Python so the report can read event files without Lightning.

TensorBoard's Time Series sorts tag groups by name and opens only the first two, so the stage groups are
numbered: a logged `val/x` is the tag `1_val/x`, `test/x` is `2_test/x`, `train/x` is `3_train/x`.
metrics.json, the report and the sweeper's `objective` keep the plain names. A run's HParams session
and its `hp/` metrics live in the sub-run `<run>/hparams` (docs/metrics.md, TensorBoard views). A sweep's
per-setting summaries (mean and 95% interval over seeds) are the runs `summary/<setting>`
(xentlab.lab.summary).
"""

from __future__ import annotations

import logging
from pathlib import Path

BOARD_GROUPS = {"val": "1_val", "test": "2_test", "train": "3_train"}
HPARAMS_RUN = "hparams"
# The metrics a comparison of losses reads first, in this order: the sweep's TensorBoard summaries chart
# them and its HParams view lists them first (the report's key metrics are the same).
HEADLINE_METRICS = ("balanced_accuracy", "macro_f1", "minority_recall", "ece", "nll")


def board_tag(name: str) -> str:
    """The TensorBoard tag of a logged name: `val/x` -> `1_val/x`, `test/x` -> `2_test/x`,
    `train/x` -> `3_train/x`; other names unchanged."""
    stage, slash, rest = name.partition("/")
    return f"{BOARD_GROUPS[stage]}/{rest}" if slash and stage in BOARD_GROUPS else name


def logged_name(tag: str) -> str:
    """The logged name of a TensorBoard tag, board_tag's inverse: `1_val/x` -> `val/x`."""
    group, slash, rest = tag.partition("/")
    stages = {numbered: stage for stage, numbered in BOARD_GROUPS.items()}
    return f"{stages[group]}/{rest}" if slash and group in stages else tag


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the event files directly in `run_dir` (not its sub-runs) as `{tag: {step: value}}`,
    read with TensorBoard's own EventAccumulator; a step logged twice (a resumed run rewrites the epoch it
    was interrupted in) keeps its last value. {} for a folder without readable event files."""
    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    # Only scalars are kept in memory; images, histograms and PR curves are skipped while reading.
    accumulator = event_reader(run_dir, {"scalars": 0, "images": 1, "histograms": 1, "tensors": 1,
                                         "audio": 1, "compressedHistograms": 1})
    try:
        accumulator.Reload()
    except Exception:  # noqa: BLE001 - a truncated or foreign event file means no curves, not a crash
        return {}
    return {tag: {event.step: float(event.value) for event in accumulator.Scalars(tag)}
            for tag in accumulator.Tags().get("scalars", [])}


def event_reader(run_dir: Path, size_guidance: dict):
    """TensorBoard's EventAccumulator for the event files in `run_dir`, not yet loaded (`Reload()`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Its directory watcher logs every file switch at INFO, which Hydra's logging would print per run, and
    # a resumed run's purge (`purge_from`) as a warning about a "TensorFlow restart": what a resume means.
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    return EventAccumulator(str(run_dir), size_guidance=size_guidance)


def purge_from(writer, step: int) -> None:
    """Marks the event files of `writer` (a SummaryWriter) so that TensorBoard's reader drops every point
    and image at `step` or later written before the mark: a restart at `step` (SummaryWriter's
    `purge_step`, for a writer already open). A run resumed from a checkpoint at global step `step`
    logs those steps again, and each then holds the resumed run's point only."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer.file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
