"""Groups of runs and their comparisons with a baseline group: the numbers behind comparisons.csv, the
verdict lines and the ★ marks.

Runs are grouped by every override except the seed. Within each context (the non-loss settings that vary,
e.g. one imbalance ratio) every group is compared with the baseline group (default `loss=ce`) per metric,
on the seeds both ran, and also with the baseline's free post-hoc variants (`loss=ce+posthoc_la`: its
decisions after post-hoc logit adjustment; `loss=ce+ts`: its calibration after temperature scaling), which
the same runs logged. p-values are Holm-adjusted across every comparison of the report; each comparison
ends better, worse, equivalent within the metric's margin ±δ, or inconclusive.
"""

from __future__ import annotations

import functools
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

from xentlab.lab.report.stats import (
    ALPHA,
    MIN_SEEDS,
    Paired,
    decision_interval,
    difference_range,
    holm,
    metric_range,
    paired_test,
    seeds_to_decide,
    sesoi,
    summarize,
    tost_p,
)
from xentlab.lab.report.sweep import Run, Untrusted, override_dict, read_yaml
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
    Metric("test/prior_corrected_ece", "ECE, prior-corrected", False),
    Metric("test/nll", "NLL", False),
)
MINORITY = "test/minority_recall"
ECE, PRIOR_CORRECTED_ECE = "test/ece", "test/prior_corrected_ece"

# The free post-hoc variants of the baseline, from metrics every run logs (docs/metrics.md): suffix of the
# label → (what it is, the metric each logged figure stands in for).
POSTHOC = {
    "posthoc_la": ("post-hoc logit adjustment", {
        "test/accuracy": "test/la_accuracy", "test/balanced_accuracy": "test/la_balanced_accuracy",
        "test/macro_f1": "test/la_macro_f1", "test/minority_recall": "test/la_minority_recall"}),
    "ts": ("temperature scaling", {
        "test/ece": "test/ts_ece", "test/nll": "test/ts_nll", "test/brier": "test/ts_brier",
        "test/overconfidence": "test/ts_overconfidence"}),
}


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
    derived: str | None = None  # a POSTHOC key: this group is `source` after that post-hoc adjustment
    source: Group | None = None


@dataclass
class Comparison:
    """One group against a baseline of its context on one metric, over their matched seeds.

    `headline`: this baseline is the one the context's verdict line and the table's marks use for the
    metric. `delta` is the metric's equivalence margin (None: none set), `interval` the simultaneous
    interval (Bonferroni over the report's comparisons) that inverts the comparison's own test.
    """

    context: str
    metric: Metric
    group: Group
    baseline: Group
    paired: Paired
    p_adjusted: float = math.nan
    family: int = 1  # the Holm family's size (all comparisons, for one with too few seeds to be in it)
    headline: bool = True
    delta: float | None = None
    p_equivalence: float = math.nan
    p_equivalence_adjusted: float = math.nan
    interval: tuple = (math.nan, math.nan)

    @property
    def significant(self) -> bool:
        """Holm-adjusted p < 0.05 on at least MIN_SEEDS matched seeds."""
        return self.paired.n >= MIN_SEEDS and self.p_adjusted < ALPHA

    @property
    def better(self) -> bool:
        """Significant, in the metric's good direction, and not shown to be within the margin."""
        return self.decision == "better"

    @property
    def equivalent(self) -> bool:
        """The difference is shown to lie within ±δ: Holm-adjusted two one-sided tests p < 0.05, n ≥ 5."""
        return self.paired.n >= MIN_SEEDS and self.p_equivalence_adjusted < ALPHA

    @functools.cached_property
    def needed(self) -> int | None:
        """Matched seeds an undecided comparison would need for a decision (`stats.seeds_to_decide`)."""
        if self.decision not in ("no claim", "inconclusive"):
            return None
        return seeds_to_decide(self.paired, self.delta, self.family)

    @property
    def decision(self) -> str:
        """better | worse | equivalent | inconclusive | no claim (fewer than MIN_SEEDS matched seeds)."""
        if self.paired.n < MIN_SEEDS:
            return "no claim"
        if self.equivalent:  # possibly detectably non-zero too, but shown too small to matter
            return "equivalent"
        if self.significant:
            return "better" if (self.paired.diff > 0) == self.metric.higher_is_better else "worse"
        return "inconclusive"

    def span(self) -> str:
        """`+0.200 [+0.150, +0.250]`: the mean difference and its simultaneous interval."""
        low, high = self.interval
        return f"{signed(self.paired.diff)} [{signed(low)}, {signed(high)}]"

    def claim(self) -> str:
        """`loss=wce better than loss=ce by +0.200 [+0.150, +0.250] (10/10 seeds, adjusted p = 0.001)`, for a
        comparison decided better or worse."""
        d = self.paired
        agree = d.positive if d.diff > 0 else d.negative
        return (f"{self.group.label} {self.decision} than {self.baseline.label} by {self.span()} "
                f"({agree}/{d.n} seeds, adjusted p = {self.p_adjusted:.2g})")

    def record(self) -> dict:
        """The comparison as one comparisons.csv row (COLUMNS → value; docs/statistics.md lists them)."""
        d, up = self.paired, self.metric.higher_is_better
        values = [self.context, self.metric.key, self.group.label, self.baseline.label, text(self.headline),
                  d.n, d.diff, d.low, d.high, self.interval[0], self.interval[1], d.p, blank(self.p_adjusted),
                  text(self.significant), text(self.better), "" if self.delta is None else self.delta,
                  blank(self.p_equivalence), blank(self.p_equivalence_adjusted), text(self.equivalent),
                  self.decision, d.test, d.positive if up else d.negative, d.negative if up else d.positive,
                  text(up), self.needed or ""]
        return dict(zip(COLUMNS, values, strict=True))


COLUMNS = ("context", "metric", "loss", "baseline", "headline", "n", "diff", "ci_low", "ci_high",
           "simultaneous_low", "simultaneous_high", "p", "p_adjusted", "significant", "better", "sesoi",
           "p_equivalence", "p_equivalence_adjusted", "equivalent", "decision", "test", "seeds_better",
           "seeds_worse", "higher_is_better", "seeds_needed")


def sweep_margins(plans: list) -> dict[str, float]:
    """The `report.sesoi` margins of the sweeps read (their multirun.yaml files, read as untrusted YAML):
    the first sweep's that sets any; ValueError for a malformed setting."""
    for plan in plans:
        try:
            config = read_yaml(plan.path)
        except Untrusted:
            continue
        report = config.get("report") if isinstance(config, dict) else None
        found = margins(report.get("sesoi") if isinstance(report, dict) else None)
        if found:
            return found
    return {}


def margins(setting) -> dict[str, float]:
    """report.sesoi as {metric name: δ}: a mapping of names to positive numbers; ValueError otherwise."""
    if setting is None:
        return {}
    if not isinstance(setting, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in setting.values()):
        raise ValueError(f"report.sesoi should map metric names to positive margins, e.g. "
                         f"{{balanced_accuracy: 0.01, ece: 0.005}}; got {setting!r}")
    return {str(k).rpartition("/")[2]: float(v) for k, v in setting.items()}


def text(flag: bool) -> str:
    return str(flag).lower()


def blank(x: float) -> float | str:
    """NaN as an empty cell."""
    return "" if math.isnan(x) else x


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


def build_groups(runs: list[Run], baseline: dict[str, str] | None = None) -> list[Group]:
    """Completed runs grouped by their settings, each metric summarised (within its range) over the runs;
    with a `baseline`, each context's baseline group is followed by its post-hoc variants (POSTHOC).

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
        label = describe(setting, contenders) or fixed_label(group_runs)
        groups.append(Group(setting, label, describe(setting, context), group_runs,
                            summaries(group_runs, names), contenders + context))
    if baseline is not None:
        groups += posthoc_groups(groups, split_posthoc(baseline)[0])
    return sorted(groups, key=lambda g: (sort_key(g.context), sort_key(g.label)))


def summaries(runs: list[Run], names: list[str]) -> dict:
    """Each metric's summary (within its range) over the runs that recorded it; minority recall is left
    out where the classes had equal sizes."""
    if all(equal_classes(run) for run in runs):
        names = [m for m in names if m != MINORITY]
    return {m: summarize([run.metrics[m] for run in runs if m in run.metrics], metric_range(m))
            for m in names}


def posthoc_groups(groups: list[Group], baseline: dict[str, str]) -> list[Group]:
    """Per context, the baseline group after each post-hoc adjustment its runs logged: the same runs and
    seeds, with e.g. `test/la_balanced_accuracy` read as `test/balanced_accuracy`. Post-hoc logit
    adjustment is left out where the training classes had equal sizes (it changes no decision there)."""
    derived = []
    for block in contexts(groups).values():
        bases = [g for g in block if matches(g, baseline)]
        if len(bases) != 1:
            continue  # compare() says why
        base = bases[0]
        for kind, (_, figures) in POSTHOC.items():
            if kind == "posthoc_la" and all(equal_classes(run) for run in base.runs):
                continue
            runs = [Run(run.path, run.status, {key: run.metrics[source] for key, source in figures.items()
                                               if source in run.metrics}, run.config, run.overrides)
                    for run in base.runs]
            if not any(run.metrics for run in runs):
                continue
            settings = {k: f"{v}+{kind}" if k in baseline else v for k, v in base.settings.items()}
            names = sorted({m for run in runs for m in run.metrics})
            derived.append(Group(settings, f"{base.label}+{kind}", base.context, runs, summaries(runs, names),
                                 base.shown, derived=kind, source=base))
    return derived


def split_posthoc(baseline: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """`{"loss": "ce+posthoc_la"}` → ({"loss": "ce"}, "posthoc_la"); a plain baseline → (itself, None)."""
    for kind in POSTHOC:
        if any(v.endswith(f"+{kind}") for v in baseline.values()):
            return {k: v.removesuffix(f"+{kind}") for k, v in baseline.items()}, kind
    return baseline, None


def prior_shift(group: Group) -> bool:
    """Whether the group's training classes were imbalanced while its test split was balanced
    (`data.eval_split=balanced`): then training and test class priors differ."""
    def shifted(run: Run) -> bool:
        data = run.config.get("data")
        return isinstance(data, dict) and data.get("eval_split") == "balanced" and not equal_classes(run)
    return bool(group.runs) and all(shifted(run) for run in group.runs)


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
    """Every comparison of a report, a note per context where no single baseline group exists, and the
    reason a (context, metric)'s verdict uses the baseline it uses, where it is not the plain one."""

    items: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    headline_notes: dict = field(default_factory=dict)


def compare(groups: list[Group], metrics: list[Metric], baseline: dict[str, str],
            margins: dict | None = None) -> Comparisons:
    """Per context: every group against the context's baseline group and its post-hoc variants (for the
    metrics each covers), per metric, on matched seeds. Then Holm's adjustment over all comparisons with at
    least MIN_SEEDS matched seeds (the others can make no claim, so they are not part of the family), of
    the difference tests and, separately, of the equivalence tests (margin δ from `margins`, the config's
    report.sesoi, else stats.SESOI); the simultaneous intervals at level α/m; and, for the undecided ones,
    the seeds a decision would need.

    A baseline `loss=ce+posthoc_la` (or `+ts`) makes that variant the headline. Otherwise, where the
    training split is imbalanced and the test split balanced, a metric's headline baseline is the stronger
    (by mean) of the plain baseline and its post-hoc logit adjustment: a loss trained for the tail must
    beat what adjusting CE's decisions gives for free. Where the priors differ so, calibration is judged
    by the prior-corrected ECE rather than the raw one (which there measures the shift).
    """
    found = Comparisons()
    plain, kind = split_posthoc(baseline)
    spec = ",".join(f"{k}={v}" for k, v in baseline.items())
    for context, block in contexts(groups).items():
        real = [g for g in block if g.derived is None]
        if len(block) < 2:
            continue
        bases = [g for g in real if matches(g, plain)]
        where = f"{context}: " if context else ""
        if len(bases) != 1:
            found.notes.append(f"{where}no comparison: {len(bases)} groups match the baseline {spec}"
                               + (f" ({'; '.join(g.label for g in bases)})" if bases else
                                  f"; choose one of {'; '.join(g.label for g in real)} with --baseline"))
            continue
        base = bases[0]
        variants = {g.derived: g for g in block if g.source is base}
        if kind is not None and kind not in variants:
            found.notes.append(f"{where}no comparison: the runs of {base.label} logged no "
                               f"{POSTHOC[kind][0]} figures for the baseline {spec}")
            continue
        for group in (base, *variants.values()):
            group.is_baseline = True
        shifted = prior_shift(base)
        for metric in metrics:
            if metric.key == (ECE if shifted and PRIOR_CORRECTED_ECE in base.stats else PRIOR_CORRECTED_ECE):
                continue  # one calibration figure per context: prior-corrected where the priors differ
            if metric.key not in base.stats:
                continue
            candidates = [base] + [g for g in variants.values() if metric.key in g.stats]
            lead = headline(metric, base, variants, kind, shifted, found.headline_notes, context)
            for against in candidates:
                for group in real:
                    if group is against or metric.key not in group.stats:
                        continue
                    found.items.append(Comparison(
                        context, metric, group, against,
                        paired_test(matched_differences(group, against, metric.key),
                                    difference_range(metric.key)),
                        headline=against is lead, delta=sesoi(metric.key, margins)))
    decide(found.items)
    return found


def headline(metric: Metric, base: Group, variants: dict, kind: str | None, shifted: bool, notes: dict,
             context: str) -> Group:
    """The baseline a (context, metric)'s verdict line and marks use (see `compare`), noting why when it
    is not the plain baseline."""
    if kind is not None:
        return variants[kind] if metric.key in variants[kind].stats else base
    adjusted = variants.get("posthoc_la")
    if not shifted or adjusted is None or metric.key not in adjusted.stats:
        return base
    a, b = base.stats[metric.key].mean, adjusted.stats[metric.key].mean
    stronger = adjusted if (b > a) == metric.higher_is_better and b != a else base
    notes[(context, metric.key)] = (
        f"against {stronger.label}, the stronger of {base.label} ({a:.3f}) and {adjusted.label} ({b:.3f}) "
        "on this metric, since training is imbalanced and the test split balanced")
    return stronger


def decide(items: list[Comparison]) -> None:
    """Holm over the difference tests and over the equivalence tests of the comparisons with ≥ MIN_SEEDS
    matched seeds, and every comparison's simultaneous interval at α/m."""
    eligible = [c for c in items if c.paired.n >= MIN_SEEDS]
    family = max(1, len(eligible))
    for c in items:
        diffs = matched_differences(c.group, c.baseline, c.metric.key)
        if c.delta is not None:
            c.p_equivalence = tost_p(diffs, c.delta, c.paired.test)
        c.interval = decision_interval(diffs, ALPHA / family, c.paired.test, difference_range(c.metric.key))
    for c, p in zip(eligible, holm([c.paired.p for c in eligible]), strict=True):
        c.p_adjusted = float(p)
    for c, p in zip(eligible, holm([c.p_equivalence for c in eligible]), strict=True):
        c.p_equivalence_adjusted = float(p)
    for c in items:
        c.family = len(items) if c.paired.n < MIN_SEEDS else family


def matched_differences(group: Group, base: Group, key: str) -> list[float]:
    """group − baseline on each seed both ran with a finite value (same seed ⇒ same data split)."""
    a = {seed_of(r): r.metrics[key] for r in group.runs if math.isfinite(r.metrics.get(key, math.nan))}
    b = {seed_of(r): r.metrics[key] for r in base.runs if math.isfinite(r.metrics.get(key, math.nan))}
    return [a[s] - b[s] for s in sorted(set(a) & set(b), key=str)]


def verdict_lines(comparisons: Comparisons) -> list[str]:
    """One sentence per (context, metric, baseline), the headline baseline first: the significant
    differences, what is equivalent within ±δ, what is inconclusive and how many seeds would decide it, and
    what has too few matched seeds for any claim."""
    blocks: dict[tuple, list[Comparison]] = defaultdict(list)
    for c in comparisons.items:
        blocks[(c.context, c.metric, not c.headline, c.baseline.label)].append(c)
    lines = []
    for (context, metric, aside, base), items in sorted(blocks.items(), key=lambda kv: order(kv[0], blocks)):
        parts = [c.claim() for c in items if c.decision in ("better", "worse")]
        for word, chosen in (("equivalent to", [c for c in items if c.decision == "equivalent"]),
                             ("inconclusive against", [c for c in items if c.decision == "inconclusive"])):
            for n, delta in sorted({(c.paired.n, c.delta or 0.0) for c in chosen}):
                same = [c for c in chosen if c.paired.n == n and (c.delta or 0.0) == delta]
                margin = f"within ±{delta:g}" if delta else "no equivalence margin set for this metric"
                parts.append(f"{word} {base} ({margin}) at n = {n}: " + "; ".join(undecided(c) for c in same))
        few = [c for c in items if c.paired.n < MIN_SEEDS]
        if few:
            parts.append("no claim with fewer than {} matched seeds: {}".format(
                MIN_SEEDS, "; ".join(few_seeds(c) for c in few)))
        where = f"{context}, " if context else ""
        note = comparisons.headline_notes.get((context, metric.key)) if not aside else None
        against = f" ({note})" if note else (f" against {base}" if aside else "")
        lines.append(f"{where}{metric.heading}{against}: " + "; ".join(parts) + ".")
    return lines + comparisons.notes


def order(key: tuple, blocks: dict) -> tuple:
    """Verdict lines in the order their comparisons were made, each headline before its asides."""
    first = {k: i for i, k in enumerate(blocks)}
    context, metric, aside, _ = key
    lead = min(first[k] for k in blocks if k[0] == context and k[1] == metric)
    return (lead, aside, first[key])


def undecided(c: Comparison) -> str:
    """`loss=focal +0.004 [-0.003, +0.011]`, with the seeds that would decide it when inconclusive."""
    text = f"{c.group.label} {c.span()}"
    if c.decision == "equivalent" and c.significant:
        text += " (detectably non-zero, but inside the margin)"
    if c.decision == "inconclusive" and c.needed is not None:
        text += f", ~{c.needed} seeds would decide"
    return text


def few_seeds(c: Comparison) -> str:
    """`loss=focal +0.400 on n = 3 (p = 0.25); ~6 seeds would decide`."""
    d = c.paired
    if d.n == 0:
        return f"{c.group.label} shares no seed with {c.baseline.label}"
    text = f"{c.group.label} {signed(d.diff)} on n = {d.n} (p = {d.p:.2g})"
    if c.needed is not None:
        text += f", ~{c.needed} seeds would decide"
    return text
