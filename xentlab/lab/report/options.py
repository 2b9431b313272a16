"""What a report is asked for: which metrics (any logged `test/*` metric, its better direction known from
its name), which file formats, which copy of a run recorded twice to keep. Each choice is checked before
any work starts, with the valid choices in the error.
"""

from __future__ import annotations

from dataclasses import dataclass

from xentlab.lab.report.compare import KEY_METRICS, Metric

FORMATS = ("md", "csv", "latex", "html")
DEFAULT_FORMATS = ("md", "csv")
DEDUPE = ("first", "last")

# Post-hoc variants every run logs beside the plain metric: `la_` after logit adjustment by the training
# prior, `ts_` after temperature scaling (docs/metrics.md).
POST_HOC = {"la_": "after post-hoc LA", "ts_": "after TS"}
LABELS = {m.key.partition("/")[2]: m.label for m in KEY_METRICS} | {
    "accuracy": "accuracy", "brier": "Brier", "overconfidence": "overconfidence", "loss": "loss",
    "micro_f1": "micro-F1", "map": "mAP", "exact_match": "exact match", "hamming_loss": "Hamming loss"}
# Names whose smaller value is better; every other metric is better when larger. Matched on the name
# without its post-hoc prefix and as a suffix (`prior_ece`, `classwise_ece` are ECEs).
LOWER_IS_BETTER = ("ece", "nll", "brier", "loss", "overconfidence", "error")
# Logged numbers that are not a measure of quality: nothing is better or worse about them.
NO_DIRECTION = frozenset({"temperature"})


def metric_named(key: str) -> Metric:
    """The Metric for a logged name (`test/la_balanced_accuracy` → "balanced acc after post-hoc LA", ↑).
    ValueError for a name that is not a `test/` metric or has no better direction."""
    known = {m.key: m for m in KEY_METRICS}
    if key in known:
        return known[key]
    stage, slash, name = key.partition("/")
    if stage != "test" or not slash or not name:
        raise ValueError(f"--metrics takes test metrics, e.g. test/balanced_accuracy or "
                         f"test/la_balanced_accuracy; {key!r} is not one")
    prefix = next((p for p in POST_HOC if name.startswith(p)), "")
    base = name[len(prefix):]
    if base in NO_DIRECTION:
        raise ValueError(f"{key} has no better or worse direction to compare losses by; choose a quality "
                         "metric such as test/balanced_accuracy or test/ece")
    label = LABELS.get(base, base.replace("_", " "))
    if prefix:
        label += f" {POST_HOC[prefix]}"
    return Metric(key, label, higher_is_better(key))


def higher_is_better(key: str) -> bool:
    """Whether a larger value of a logged metric (any stage, post-hoc or not) is the better one, by name."""
    name = key.rpartition("/")[2]
    base = name[len(next((p for p in POST_HOC if name.startswith(p)), "")):]
    return not any(base == low or base.endswith("_" + low) for low in LOWER_IS_BETTER)


def parse_list(values: list[str] | str | None) -> list[str]:
    """`["a,b", "c"]` → ["a", "b", "c"]: an option given several times or comma-separated, in order,
    each once."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else values
    found = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class Request:
    """The choices behind one report. `metrics` None: the key metrics the runs recorded. `formats`: which
    documents (md: report.md and its PNGs; latex: report.tex; html: report.html with the plots inside),
    besides the CSVs (comparisons.csv, report.csv, runs.csv), which are always written ("csv" may be
    named too). `dedupe`: None (a run recorded twice is an error), "first"
    or "last" (keep that copy, in path order)."""

    metrics: tuple[str, ...] | None = None
    formats: tuple[str, ...] = DEFAULT_FORMATS
    dedupe: str | None = None

    @classmethod
    def parse(cls, metrics=None, formats=None, dedupe: str | None = None) -> Request:
        """A Request from command-line text, or ValueError naming the bad value and the valid ones."""
        chosen = parse_list(metrics)
        for key in chosen:
            metric_named(key)
        kinds = parse_list(formats) or list(DEFAULT_FORMATS)
        wrong = [k for k in kinds if k not in FORMATS]
        if wrong:
            raise ValueError(f"unknown --format {', '.join(wrong)}; choose from {', '.join(FORMATS)} "
                             "(comma-separated)")
        if dedupe is not None and dedupe not in DEDUPE:
            raise ValueError(f"--dedupe {dedupe!r}: choose first or last")
        return cls(tuple(chosen) or None, tuple(kinds), dedupe)
