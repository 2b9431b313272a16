"""Per-setting TensorBoard summaries of a sweep or a seed batch: what a comparison of losses over seeds
looks at, instead of one line per seed.

For every setting (the runs whose overrides differ only in the seed, grouped as the report groups them),
the run `<sweep>/summary/<setting>` (e.g. `summary/loss=focal`) holds, for every scalar curve its runs
logged, the mean over the seeds under the curve's own tag and the bounds of its 95% Student t interval
(the report's, clipped to the metric's range) under `interval/<tag>/low` and `interval/<tag>/high`, at
every step all of its seeds logged. Each summary run also carries

- a Custom Scalars layout: one Margin chart per headline validation metric (and the training loss), the
  mean with its interval band, one line per setting;
- the sweep's HParams experiment: the hyperparameters of every run's session with the values they took,
  and the `hp/` metrics with the headline metrics first (without one, TensorBoard sorts the metric
  columns by name). It is written once the sweep's sessions are all known, so it never hides a loss's
  parameters, as a per-run experiment would (xentlab.lab.module.write_hparams).

Written from the event files with TensorBoard's own reader when a sweep ends (xentlab.lab.callbacks) and
when a single command's seed batch ends; written again, replacing the old ones, when a sweep is resumed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from xentlab.lab.board import (
    HEADLINE_METRICS,
    HPARAMS_RUN,
    board_tag,
    event_reader,
    logged_name,
    read_scalars,
)

log = logging.getLogger(__name__)

SUMMARY_DIR = "summary"
INTERVAL_GROUP = "interval"
LAYOUT_CATEGORY = "mean and 95% interval over seeds, per setting"
# The Margin charts: the headline metrics along training (on the validation split), then the training loss.
CHARTED = (*(f"val/{name}" for name in HEADLINE_METRICS), "train/loss")


def interval_tags(tag: str) -> tuple[str, str]:
    """The tags of the lower and upper 95% interval bounds of a summarised curve."""
    return f"{INTERVAL_GROUP}/{tag}/low", f"{INTERVAL_GROUP}/{tag}/high"


def write_summaries(sweep_dir: str | Path) -> list[Path]:
    """Writes `<sweep_dir>/summary/<setting>` for every setting with a completed run (replacing any summary
    written before) and returns those folders; [] when no run completed. Raises the report's
    DuplicateRuns when the folder holds a run twice."""
    from torch.utils.tensorboard import SummaryWriter

    from xentlab.lab.report import without_duplicates
    from xentlab.lab.report.compare import build_groups
    from xentlab.lab.report.sweep import load_runs, scan

    sweep_dir = Path(sweep_dir)
    runs, _ = load_runs(scan(sweep_dir))
    # A run recorded twice (a copied job folder) would count twice: refused, as the report refuses it.
    groups = build_groups(without_duplicates(runs, None)[0])
    target = sweep_dir / SUMMARY_DIR
    if target.is_dir():
        shutil.rmtree(target)
    experiment = experiment_summary(sweep_dir)
    written = []
    for group in groups:
        folder = target / setting_name(group)
        curves = summarize_curves([read_scalars(run.path) for run in group.runs])
        with SummaryWriter(str(folder)) as writer:
            for tag, points in curves.items():
                low_tag, high_tag = interval_tags(tag)
                for step, summary in points:
                    writer.add_scalar(tag, summary.mean, step)
                    if summary.n > 1:  # one seed has no interval
                        writer.add_scalar(low_tag, summary.low, step)
                        writer.add_scalar(high_tag, summary.high, step)
            # The same layout and experiment in every summary run: TensorBoard merges identical layouts
            # and reads the first experiment it finds, so any subset of the runs shows them.
            writer.add_custom_scalars(margin_layout())
            if experiment is not None:
                writer.file_writer.add_summary(experiment)
        written.append(folder)
    return written


def setting_name(group) -> str:
    """`loss=focal,data.imbalance_ratio=100`: the values of the keys the sweep varies, or, when only the
    seed varies, the group's label (its loss)."""
    shown = [f"{key}={group.settings[key]}" for key in group.shown if key in group.settings]
    return ",".join(shown) or group.label


def summarize_curves(per_run: list[dict[str, dict[int, float]]]) -> dict[str, list[tuple[int, object]]]:
    """Per tag every run logged, the report's summary (mean, 95% interval clipped to the metric's range,
    n) of the runs' values at each step they all logged."""
    from xentlab.lab.report.stats import metric_range, summarize

    if not per_run:
        return {}
    tags = set.intersection(*(set(scalars) for scalars in per_run))
    curves = {}
    for tag in sorted(tags):
        steps = sorted(set.intersection(*(set(scalars[tag]) for scalars in per_run)))
        bounds = metric_range(logged_name(tag))
        curves[tag] = [(step, summarize([scalars[tag][step] for scalars in per_run], bounds))
                       for step in steps]
    return {tag: points for tag, points in curves.items() if points}


def margin_layout() -> dict:
    """The Custom Scalars layout: a Margin chart (mean, lower, upper) per charted curve. Listed last to
    first: TensorBoard draws a category's charts in the reverse of their order in the layout."""
    return {LAYOUT_CATEGORY: {name: ["Margin", [board_tag(name), *interval_tags(board_tag(name))]]
                              for name in reversed(CHARTED)}}


def experiment_summary(sweep_dir: Path):
    """The HParams experiment of every session under `sweep_dir` (its `hparams` sub-runs): each
    hyperparameter with every value it took, and the `hp/` metrics, headline metrics first; None when
    there is no session."""
    from google.protobuf import struct_pb2
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    values: dict[str, dict[str, struct_pb2.Value]] = {}
    metrics: set[str] = set()
    sessions = [path for path in sweep_dir.rglob(HPARAMS_RUN)
                if path.is_dir() and SUMMARY_DIR not in path.relative_to(sweep_dir).parts]
    for session in sessions:
        events = event_reader(session, {"scalars": 0, "tensors": 0})
        try:
            events.Reload()
            content = events.PluginTagToContent("hparams")
        except Exception:  # noqa: BLE001 - no session in it (KeyError) or an unreadable file: skipped
            continue
        for raw in content.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(raw)
            if data.HasField("session_start_info"):
                for name, value in data.session_start_info.hparams.items():
                    values.setdefault(name, {})[value.SerializeToString(deterministic=True)] = value
        metrics.update(events.Tags().get("scalars", []))
    if not values:
        return None
    kinds = {"string_value": api_pb2.DATA_TYPE_STRING, "number_value": api_pb2.DATA_TYPE_FLOAT64,
             "bool_value": api_pb2.DATA_TYPE_BOOL}
    infos = []
    for name, taken in sorted(values.items()):
        (kind, *mixed) = {value.WhichOneof("kind") for value in taken.values()}
        if mixed or kind not in kinds:  # values of several types (0.25 and "None"): a column, no domain
            infos.append(api_pb2.HParamInfo(name=name, differs=True))
            continue
        domain = sorted(taken.values(), key=lambda value: getattr(value, kind))
        infos.append(api_pb2.HParamInfo(name=name, type=kinds[kind], differs=len(domain) > 1,
                                        domain_discrete=struct_pb2.ListValue(values=domain)))
    headline = [f"hp/{name}" for name in HEADLINE_METRICS if f"hp/{name}" in metrics]
    ordered = [*headline, *sorted(metrics - set(headline))]
    metric_infos = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=tag) for tag in ordered]
    # As tensorboard.plugins.hparams.summary.experiment_pb builds it (that module imports TensorFlow).
    data = plugin_data_pb2.HParamsPluginData(
        experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos),
        version=metadata.PLUGIN_DATA_VERSION)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString())
    value = Summary.Value(tag=metadata.EXPERIMENT_TAG, metadata=SummaryMetadata(plugin_data=plugin))
    return Summary(value=[value])
