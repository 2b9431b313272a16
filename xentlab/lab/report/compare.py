"""Groups of runs and their comparisons with a baseline group: the numbers behind comparisons.csv, the
verdict lines and the ★ marks.

Runs are grouped by every override except the seed. Within each context (the non-loss settings that vary,
e.g. one imbalance ratio) every group is compared with the baseline group (default `loss=ce`) per metric,
on the seeds both ran; p-values are Holm-adjusted across every comparison of the report.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

from xentlab.lab.report.stats import (
    ALPHA,
    MIN_SEEDS,
    Paired,
    difference_range,
    holm,
    metric_range,
    paired_test,
    seeds_needed,
    summarize,
)
from xentlab.lab.report.sweep import Run, override_dict
from xentlab.lab.validation import flatten

# Overrides that do not change what a run measures: the seed is what a group averages over, `seeds`
# (several seeds in one job) is how they were run.
NOT_GROUPING = frozenset({"seed", "seeds", "ckpt_path", "threads"})
DEFAULT_BASELINE = "loss=ce"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool

    @property
    def heading(self) -> str:
        return f"{self.label} {'↑' if self.higher_is_better else '↓'}"


KEY_METRICS = (
    Metric("test/balanced_accuracy", "balanced acc", True),
    Metric("test/macro_f1", "macro-F1", True),
    Metric("test/minority_recall", "minority recall", True),
    Metric("test/ece", "ECE", False),
    Metric("test/nll", "NLL", False),
)
MINORITY = "test/minority_recall"


@dataclass
class Group:
    """Completed runs sharing every grouping override; `label` shows only the overrides that vary."""

    settings: dict
    label: str
    context: str
    runs: list
    stats: dict
    shown: list
    is_baseline: bool = False


@dataclass
class Comparison:
    """One group against its context's baseline on one metric, over their matched seeds."""

    context: str
    metric: Metric
    group: Group
    baseline: Group
    paired: Paired
    p_adjusted: float = math.nan
    needed: int | None = None

    @property
    def significant(self) -> bool:
        """Holm-adjusted p < 0.05 on at least MIN_SEEDS matched seeds."""
        return self.paired.n >= MIN_SEEDS and self.p_adjusted < ALPHA

    @property
    def better(self) -> bool:
        """Significant, in the metric's good direction."""
        return self.significant and (self.paired.diff > 0) == self.metric.higher_is_better

    def claim(self) -> str:
        """`loss=wce better than loss=ce by +0.200 [+0.150, +0.250] (10/10 seeds, adjusted p = 0.001)`."""
        d = self.paired
        agree = d.positive if d.diff > 0 else d.negative
        word = "better" if self.better else "worse"
        return (f"{self.group.label} {word} than {self.baseline.label} by {signed(d.diff)} "
                f"[{signed(d.low)}, {signed(d.high)}] ({agree}/{d.n} seeds, "
                f"adjusted p = {self.p_adjusted:.2g})")


def signed(x: float) -> str:
    """`+0.200`; a difference too small for three decimals in scientific form (`+2.1e-05`), not `+0.000`."""
    return f"{x:+.1e}" if 0 < abs(x) < 5e-4 else f"{x:+.3f}"


def flat_strings(config: dict) -> dict:
    """A run's config as `{"group.key": "value"}`, values as the strings overrides are compared with."""
    return {key: str(value) for key, value in flatten(config).items()}


def run_settings(runs: list[Run]) -> list[dict]:
    """Per run, the `key -> value` choices that define its group: its overrides, minus NOT_GROUPING.

    When some run has no recorded overrides, the config values that differ between runs stand in for them.
    """
    if all(run.overrides is not None for run in runs):
        settings = [override_dict(run.overrides) for run in runs]
    else:
        flat = [flat_strings(run.config) for run in runs]
        settings = [{k: f.get(k, "-") for k in varying_keys(flat)} for f in flat]
    return [{k: v for k, v in s.items() if k not in NOT_GROUPING} for s in settings]


def varying_keys(dicts: list[dict]) -> list[str]:
    """The keys, sorted, whose value (None where missing) is not the same in every dict."""
    keys = sorted({k for d in dicts for k in d})
    return [k for k in keys if len({d.get(k) for d in dicts}) > 1]


def is_loss_key(key: str) -> bool:
    """Whether an override key chooses the loss or one of its parameters (`loss`, `loss.gamma`, ...)."""
    return key == "loss" or key.startswith("loss.") or key.startswith("loss/")


def layout(settings: list[dict]) -> tuple[list[str], list[str]]:
    """Varying keys split into contender keys (the loss and its parameters) and context keys (the rest).

    When no loss setting varies, every varying key is a contender and there is a single context.
    """
    varying = varying_keys(settings)
    contenders = [k for k in varying if is_loss_key(k)]
    if not contenders:
        return varying, []
    return contenders, [k for k in varying if not is_loss_key(k)]


def describe(setting: dict, keys: list[str]) -> str:
    """`key=value, ...` for the given keys of a setting, in that order."""
    return ", ".join(f"{k}={setting[k]}" for k in keys if k in setting)


def fixed_label(runs: list[Run]) -> str:
    """A label for a group when nothing but the seed varies: its loss, which every run shares."""
    names = {str(run.config["loss"].get("name")) for run in runs if isinstance(run.config.get("loss"), dict)}
    return f"loss={names.pop()}" if len(names) == 1 else "every run (only the seed varies)"


def seed_of(run: Run) -> object:
    """The run's seed (from its config), which pairs runs of different groups on the same data split."""
    return run.config.get("seed", run.path.name)


def equal_classes(run: Run) -> bool:
    """Whether the run's classes had equal sizes (imbalance ratio 1, no explicit counts), where "minority
    recall" names an arbitrary class."""
    data = run.config.get("data")
    if not isinstance(data, dict):
        return False
    ratio = data.get("imbalance_ratio")
    return isinstance(ratio, (int, float)) and ratio == 1 and not data.get("counts")


def build_groups(runs: list[Run]) -> list[Group]:
    """Completed runs grouped by their settings, each metric summarised (within its range) over the runs.

    Runs that did not complete (failed, unreadable, malformed) neither form groups nor shape the labels.
    """
    done = [run for run in runs if run.status == "completed"]
    settings = run_settings(done)
    contenders, context = layout(settings)
    members: dict[tuple, list[Run]] = defaultdict(list)
    by_key = {}
    for run, setting in zip(done, settings, strict=True):
        key = tuple(sorted(setting.items()))
        by_key[key] = setting
        members[key].append(run)
    groups = []
    for key, group_runs in members.items():
        setting = by_key[key]
        names = sorted({m for run in group_runs for m in run.metrics})
        if all(equal_classes(run) for run in group_runs):
            names = [m for m in names if m != MINORITY]
        summaries = {m: summarize([run.metrics[m] for run in group_runs if m in run.metrics], metric_range(m))
                     for m in names}
        label = describe(setting, contenders) or fixed_label(group_runs)
        groups.append(Group(setting, label, describe(setting, context), group_runs, summaries,
                            contenders + context))
    return sorted(groups, key=lambda g: (sort_key(g.context), sort_key(g.label)))


def sort_key(text: str) -> tuple:
    """Numbers inside labels compare as numbers, so ratio=10 sorts after ratio=2."""
    return tuple((0, float(p), "") if re.fullmatch(r"-?\d+(\.\d+)?", p) else (1, 0.0, p)
                 for p in re.split(r"([=, ])", text))


def contexts(groups: list[Group]) -> dict[str, list[Group]]:
    """Groups by context, in order: each block is one comparison (e.g. every loss at one ratio)."""
    blocks: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        blocks[group.context].append(group)
    return dict(blocks)


def parse_baseline(text: str) -> dict[str, str]:
    """`loss=focal` or `loss=focal,loss.gamma=2` → {"loss": "focal", "loss.gamma": "2"}."""
    pairs = [part.strip() for part in str(text).split(",") if part.strip()]
    if not pairs or not all("=" in p and p.partition("=")[0] for p in pairs):
        raise ValueError(f"baseline {text!r} should be key=value pairs, e.g. loss=ce or "
                         "loss=focal,loss.gamma=2")
    return dict(p.partition("=")[::2] for p in pairs)


def matches(group: Group, baseline: dict[str, str]) -> bool:
    """Whether a group is the baseline: each baseline `key=value` is one of its settings or, when not
    recorded as an override, the value in all its runs' configs (`loss` stands for `loss.name`)."""
    for key, value in baseline.items():
        if key in group.settings:
            if group.settings[key] != value:
                return False
            continue
        path = "loss.name" if key == "loss" else key
        if not all(flat_strings(run.config).get(path) == value for run in group.runs):
            return False
    return True


@dataclass
class Comparisons:
    """Every comparison of a report, and a note per context where no single baseline group exists."""

    items: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def compare(groups: list[Group], metrics: list[Metric], baseline: dict[str, str]) -> Comparisons:
    """Per context: every group against the context's baseline group, per metric, on matched seeds; then
    Holm's adjustment over all comparisons with at least MIN_SEEDS matched seeds (the others can make no
    claim, so they are not part of the family) and, for those below, the seeds a claim would need."""
    found = Comparisons()
    spec = ",".join(f"{k}={v}" for k, v in baseline.items())
    for context, block in contexts(groups).items():
        if len(block) < 2:
            continue
        bases = [g for g in block if matches(g, baseline)]
        where = f"{context}: " if context else ""
        if len(bases) != 1:
            found.notes.append(f"{where}no comparison: {len(bases)} groups match the baseline {spec}"
                               + (f" ({'; '.join(g.label for g in bases)})" if bases else
                                  f"; choose one of {'; '.join(g.label for g in block)} with --baseline"))
            continue
        base = bases[0]
        base.is_baseline = True
        for group in block:
            if group is base:
                continue
            for metric in metrics:
                if metric.key in group.stats and metric.key in base.stats:
                    found.items.append(Comparison(context, metric, group, base,
                                                  paired_test(matched_differences(group, base, metric.key),
                                                              difference_range(metric.key))))
    eligible = [c for c in found.items if c.paired.n >= MIN_SEEDS]
    for c, p in zip(eligible, holm([c.paired.p for c in eligible]), strict=True):
        c.p_adjusted = float(p)
    for c in found.items:
        if c.paired.n < MIN_SEEDS:
            c.needed = seeds_needed(c.paired, len(found.items))
    return found


def matched_differences(group: Group, base: Group, key: str) -> list[float]:
    """group − baseline on each seed both ran with a finite value (same seed ⇒ same data split)."""
    a = {seed_of(r): r.metrics[key] for r in group.runs if math.isfinite(r.metrics.get(key, math.nan))}
    b = {seed_of(r): r.metrics[key] for r in base.runs if math.isfinite(r.metrics.get(key, math.nan))}
    return [a[s] - b[s] for s in sorted(set(a) & set(b), key=str)]


def verdict_lines(comparisons: Comparisons) -> list[str]:
    """One sentence per (context, metric): the significant differences from the baseline, then what shows
    no detectable difference, then what has too few matched seeds for any claim and how many it needs."""
    blocks: dict[tuple, list[Comparison]] = defaultdict(list)
    for c in comparisons.items:
        blocks[(c.context, c.metric)].append(c)
    lines = []
    for (context, metric), items in blocks.items():
        base = items[0].baseline.label
        parts = [c.claim() for c in items if c.significant]
        quiet = [c for c in items if not c.significant and c.paired.n >= MIN_SEEDS]
        for n in sorted({c.paired.n for c in quiet}):
            names = ", ".join(c.group.label for c in quiet if c.paired.n == n)
            parts.append(f"no detectable difference from {base} at n = {n}: {names}")
        few = [c for c in items if c.paired.n < MIN_SEEDS]
        if few:
            parts.append("no claim with fewer than {} matched seeds: {}".format(
                MIN_SEEDS, "; ".join(few_seeds(c) for c in few)))
        where = f"{context}, " if context else ""
        lines.append(f"{where}{metric.heading}: " + "; ".join(parts) + ".")
    return lines + comparisons.notes


def few_seeds(c: Comparison) -> str:
    """`loss=focal +0.400 on n = 3 (p = 0.25); ~6 seeds would detect a difference this size`."""
    d = c.paired
    if d.n == 0:
        return f"{c.group.label} shares no seed with {c.baseline.label}"
    text = f"{c.group.label} {signed(d.diff)} on n = {d.n} (p = {d.p:.2g})"
    if c.needed is not None:
        text += f", ~{c.needed} seeds would detect a difference this size"
    return text

