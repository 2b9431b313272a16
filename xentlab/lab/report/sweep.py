"""What the report reads from a sweep folder, treated as untrusted data: every job's `metrics.json`, the
`.hydra/overrides.yaml` of jobs that started, the planned grid in `multirun.yaml` and the validation
curves in TensorBoard event files. Files are parsed (JSON, safe YAML, Hydra's override grammar, event
protobufs), never executed; a file of the wrong shape becomes a problem entry naming its path and why.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from xentlab.lab.board import board_tag

# Same name as xentlab.lab.runs.METRICS_FILE; not imported from there, which would pull OmegaConf in.
METRICS_FILE = "metrics.json"
PLANNED_FILE = "multirun.yaml"  # Hydra writes the sweep's full config there when a multirun starts
MAX_RECORD_BYTES = 16 * 2 ** 20  # a metrics.json is a few kB; anything this large is not one
MAX_DEPTH = 32  # a run's config nests a few levels; deeper would only exhaust the report's recursion


@dataclass(frozen=True)
class Run:
    """One job as its metrics.json recorded it (`overrides` is None in files written before they were)."""

    path: Path
    status: str
    metrics: dict
    config: dict
    overrides: tuple[str, ...] | None
    error: str | None = None
    warnings: tuple[str, ...] = ()


def load_runs(sweep_dir: Path) -> tuple[list[Run], list[Path]]:
    """Every metrics.json at any depth under `sweep_dir` (a bad one as a Run with status "unreadable" or
    "malformed" and the reason as its error), and the job folders that started (have `.hydra/`) with no
    metrics.json at or below them."""
    runs = [read_run(file) for file in sorted(sweep_dir.rglob(METRICS_FILE)) if file.is_file()]
    recorded = [run.path for run in runs]
    pending = sorted(marker.parent for marker in sweep_dir.rglob(".hydra")
                     if not any(path == marker.parent or marker.parent in path.parents for path in recorded))
    return runs, pending


def read_run(file: Path) -> Run:
    """The Run a metrics.json file records; never raises for what the file holds."""
    try:
        if file.stat().st_size > MAX_RECORD_BYTES:
            raise ValueError(f"{file.stat().st_size} bytes, more than a metrics.json holds")
        record = json.loads(file.read_text())
    # UnicodeDecodeError and JSONDecodeError are ValueErrors; absurdly deep nesting is a RecursionError.
    except (OSError, ValueError, RecursionError) as error:
        return Run(file.parent, "unreadable", {}, {}, None, f"{type(error).__name__}: {error}")
    problem = shape_problem(record)
    if problem:
        return Run(file.parent, "malformed", {}, {}, None, problem)
    overrides = record.get("overrides")
    return Run(file.parent, record["status"], {k: float(v) for k, v in (record.get("metrics") or {}).items()},
               record.get("config") or {}, None if overrides is None else tuple(overrides),
               record.get("error"), tuple(text(w) for w in record.get("warnings") or ()))


def shape_problem(record: object) -> str | None:
    """Why a parsed metrics.json cannot be a run record, or None when it can."""
    if not isinstance(record, dict):
        return f"expected a JSON object, found {json_type(record)}"
    if not isinstance(record.get("status"), str):
        return f"'status' should be a string, found {json_type(record.get('status'))}"
    for key, kind, check in (("metrics", "an object", dict), ("config", "an object", dict),
                             ("overrides", "a list of strings", list), ("warnings", "a list", list),
                             ("error", "a string", str)):
        value = record.get(key)
        if value is not None and not isinstance(value, check):
            return f"'{key}' should be {kind}, found {json_type(value)}"
    if not all(isinstance(v, str) for v in record.get("overrides") or ()):
        return "'overrides' should be a list of strings, found an item that is not a string"
    for name, value in (record.get("metrics") or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {name!r} should be a number, found {json_type(value)}"
    if depth(record.get("config")) > MAX_DEPTH:
        return f"'config' is nested more than {MAX_DEPTH} levels deep"
    seed = (record.get("config") or {}).get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, str))):
        return f"'config.seed' should be an integer, found {json_type(seed)}"
    return None


def depth(value: object) -> int:
    """How deeply dicts nest in `value` (0 for a scalar), counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, level + 1)
            stack.extend((child, level + 1) for child in node.values())
    return deepest


def text(item: object) -> str:
    """A warning as one line: strings as they are, anything else (an object with details) as compact JSON."""
    return item if isinstance(item, str) else json.dumps(item, sort_keys=True)


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def override_dict(overrides) -> dict[str, str]:
    """`["loss=ce", "+x=1"]` → {"loss": "ce", "x": "1"}: the `key=value` pairs of Hydra overrides."""
    return dict(o.lstrip("+~").partition("=")[::2] for o in overrides)


def started_jobs(sweep_dir: Path, runs: list[Run]) -> list[dict[str, str]]:
    """The override sets of every job that started: in a metrics.json or in a `.hydra/overrides.yaml`."""
    import yaml

    found = [override_dict(run.overrides) for run in runs if run.overrides is not None]
    for file in sweep_dir.rglob(".hydra/overrides.yaml"):
        try:
            overrides = yaml.safe_load(file.read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if isinstance(overrides, list) and all(isinstance(o, str) for o in overrides):
            found.append(override_dict(overrides))
    return found


def planned_jobs(sweep_dir: Path) -> tuple[list[dict[str, str]] | None, str]:
    """The sweep's job grid from `multirun.yaml`, as override dicts, and a note; None when there is no
    readable grid (no file, or a sweeper such as Optuna that picks its jobs as it goes).

    The grid is what Hydra's basic sweeper launches: `hydra.sweeper.params` then the command-line task
    overrides (a later key replaces an earlier one), each `a,b,c` or `range(...)` expanded, then their
    cartesian product. The YAML is read with `yaml.safe_load` and the overrides with Hydra's override
    parser; interpolations are left as text, never resolved.
    """
    import yaml

    file = sweep_dir / PLANNED_FILE
    if not file.is_file():
        return None, f"no {PLANNED_FILE}"
    try:
        config = yaml.safe_load(file.read_text())
        hydra = config["hydra"]
        sweeper = hydra.get("sweeper") or {}
        target = str(sweeper.get("_target_", ""))
        params = sweeper.get("params") or {}
        task = hydra.get("overrides", {}).get("task") or []
        if not target.endswith("BasicSweeper"):
            return None, f"sweeper {target or 'unknown'} has no fixed grid"
        if not isinstance(params, dict) or not isinstance(task, list):
            raise TypeError("hydra.sweeper.params or hydra.overrides.task has the wrong type")
        return expand_grid([f"{k}={v}" for k, v in params.items()] + [str(o) for o in task]), ""
    except Exception as error:  # noqa: BLE001 - any bad content is reported, never raised
        return None, f"{PLANNED_FILE} unreadable: {type(error).__name__}: {error}"


def expand_grid(overrides: list[str]) -> list[dict[str, str]]:
    """Hydra's basic-sweeper expansion of override strings into one `key -> value` dict per job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if override.is_hydra_override():
            continue
        if override.is_sweep_override():
            choices[key] = list(override.sweep_string_iterator())
        else:
            # The text as given: Hydra's own string form would escape `${...}` interpolations.
            choices[key] = [override.input_line.partition("=")[2]]
    keys = [k.lstrip("+~") for k in choices]
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*choices.values())]


def never_started(planned: list[dict[str, str]], started: list[dict[str, str]]) -> list[dict[str, str]]:
    """Planned jobs that no started job covers (a started job's overrides include the planned ones; a
    job that runs several seeds records `seed=<s>` on top of them)."""
    return [job for job in planned
            if not any(all(s.get(k) == v for k, v in job.items()) for s in started)]


def read_curve(job_dir: Path, tag: str) -> list[float]:
    """A run's per-validation-epoch values of the scalar `tag` from the TensorBoard event files in its
    folder, read with TensorBoard's own EventAccumulator; [] when there are none.

    Steps logged twice (a resumed run rewrites the epoch it was interrupted in) keep the last value.
    """
    if not any(job_dir.glob("events.out.tfevents.*")):
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Its directory watcher logs every file switch at INFO, which Hydra's logging would print per run.
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    # Only scalars are kept in memory; images, histograms and PR curves are skipped while reading.
    guidance = {"scalars": 0, "images": 1, "histograms": 1, "tensors": 1, "audio": 1,
                "compressedHistograms": 1}
    accumulator = EventAccumulator(str(job_dir), size_guidance=guidance)
    try:
        accumulator.Reload()
    except Exception:  # noqa: BLE001 - a truncated or foreign event file means no curve, not a crash
        return []
    # xentlab's TensorBoard tag of the name (`val/x` is `1_val/x`), or the plain name in older runs.
    scalars = accumulator.Tags().get("scalars", [])
    tag = next((t for t in (board_tag(tag), tag) if t in scalars), None)
    if tag is None:
        return []
    by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
    return [float(by_step[step]) for step in sorted(by_step)]
