"""The report's set-up section: what was run (data and its imbalance ratio, model, epochs, optimizer,
seeds, xentlab and torch versions, the command), read from the runs' recorded configs and versions and
the sweeps' `multirun.yaml`, never from the running process: the report describes the files.

A setting that differs between runs shows every value it took, `{10, 100}`.
"""

from __future__ import annotations

import json
import shlex

from xentlab.lab.report.compare import seed_of
from xentlab.lab.report.sweep import PLANNED_FILE
from xentlab.lab.validation import flatten

# (row, config keys shown in it); a key no run recorded is left out.
ITEMS = (
    ("data", ("data.name", "data.n_classes", "data.n_samples", "data.imbalance_ratio", "data.profile",
              "data.counts", "data.eval_split", "data.sampler", "data.label_noise", "data.batch_size")),
    ("model", ("model.name", "model.hidden_sizes", "model.head", "model.dropout")),
    ("epochs", ("trainer.max_epochs", "checkpoint")),
    ("optimizer", ("optimizer._target_", "optimizer.lr", "optimizer.weight_decay", "optimizer.momentum")),
    ("scheduler", ("scheduler.name", "scheduler.warmup_epochs")),
)
MAX_SHOWN = 12  # distinct values listed per key before "… N more"


def shown(value: object) -> str:
    """A config value as text: `torch.optim.Adam` → `Adam`, lists as JSON, strings as they are."""
    if isinstance(value, str):
        return value.rpartition(".")[2] if value.startswith("torch.") else value
    return json.dumps(value, default=str)


def values_text(values: list) -> str:
    """One value as it is; several as `{a, b}` in the order first seen, cut after MAX_SHOWN."""
    distinct = list(dict.fromkeys(shown(v) for v in values))
    if len(distinct) == 1:
        return distinct[0]
    more = f", … {len(distinct) - MAX_SHOWN} more" if len(distinct) > MAX_SHOWN else ""
    return "{" + ", ".join(distinct[:MAX_SHOWN]) + more + "}"


def seeds_text(seeds: list) -> str:
    """`0–9 (10 seeds)` for a run of integers, else the seeds listed."""
    distinct = sorted(set(seeds), key=lambda s: (0, s, "") if isinstance(s, int) else (1, 0, str(s)))
    count = f"{len(distinct)} seed{'s' if len(distinct) != 1 else ''}"
    if all(isinstance(s, int) for s in distinct) and len(distinct) > 2 \
            and distinct[-1] - distinct[0] == len(distinct) - 1:
        return f"{distinct[0]}–{distinct[-1]} ({count})"
    listed = ", ".join(str(s) for s in distinct[:MAX_SHOWN])
    return f"{listed}{', …' if len(distinct) > MAX_SHOWN else ''} ({count})"


def versions_text(runs: list) -> str:
    found = [", ".join(f"{name} {version}" for name, version in sorted(run.versions.items()))
             for run in runs if run.versions]
    if not found:
        return "not recorded by these runs (made before xentlab recorded its versions)"
    missing = len(runs) - len(found)
    return values_text(found) + (f"; not recorded by {missing} run(s)" if missing else "")


def commands(report) -> str:
    """The command each sweep was launched with (from its multirun.yaml); without one, the runs'
    recorded overrides as the one multirun that covers them."""
    found = [plan.command for plan in report.plans if plan.command]
    if found:
        return values_text(found)
    choices: dict[str, list[str]] = {}
    for run in (run for g in report.trained for run in g.runs if run.overrides is not None):
        for override in run.overrides:
            key, _, value = override.partition("=")
            if value not in choices.setdefault(key, []):
                choices[key].append(value)
    if not choices:
        return "not recorded"
    return (shlex.join(["xentlab-train", "-m", *(f"{k}={','.join(v)}" for k, v in choices.items())])
            + f" (the runs' overrides as one multirun; no {PLANNED_FILE} was read)")


def recipe(report) -> list[tuple[str, str]]:
    """(item, text) rows of the set-up section, over the report's completed runs."""
    runs = [run for g in report.trained for run in g.runs]
    flat = [flatten(run.config) for run in runs]
    rows = []
    for item, keys in ITEMS:
        parts = []
        for key in keys:
            values = [f[key] for f in flat if key in f and f[key] is not None]
            if values:
                name = key.partition(".")[2] or key
                # The class an optimizer is (`torch.optim.Adam` → `Adam`) names it, without its key.
                parts.append(values_text(values) if name == "_target_" else f"{name}={values_text(values)}")
        if parts:
            rows.append((item, ", ".join(parts)))
    rows.append(("seeds", seeds_text([seed_of(run) for run in runs])))
    rows.append(("versions", versions_text(runs)))
    rows.append(("command", commands(report)))
    return rows
