"""What the report reads from a folder, treated as untrusted data with bounds: every job's `metrics.json`,
the `.hydra/overrides.yaml` of jobs that started, each sweep's `multirun.yaml` (planned grid, baseline,
command) and the validation curves in TensorBoard event files.

Files are parsed (JSON, safe YAML without aliases, Hydra's override grammar, event protobufs), never
executed. Every read is bounded: the folder walk (entries, depth, symlinked folders not followed), each
file's size and kind (regular files only: a FIFO or a link to /dev/zero is never opened for reading), YAML
nesting and aliases, the planned grid's size. A file that breaks a bound or has the wrong shape becomes
one line naming it and why (`Folder.skipped`, or a Run with status "unreadable" / "malformed"), and the
rest of the folder is read as usual.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path

from xentlab.lab.board import board_tag, read_scalars

# Same name as xentlab.lab.runs.METRICS_FILE; not imported from there, which would pull OmegaConf in.
METRICS_FILE = "metrics.json"
PLANNED_FILE = "multirun.yaml"  # Hydra writes the sweep's full config there when a multirun starts
OVERRIDES_FILE = ".hydra/overrides.yaml"
EVENTS_PREFIX = "events.out.tfevents."

# Bounds on what a folder may make the report do. Each is far above what xentlab writes (a metrics.json
# is a few kB, a multirun.yaml ~5 kB, an events file a few MB) and far below what would exhaust memory.
MAX_RECORD_BYTES = 16 * 2 ** 20
MAX_YAML_BYTES = 2 ** 20
MAX_EVENTS_BYTES = 2 ** 30
MAX_DEPTH = 32  # config / YAML nesting; a run's config nests a few levels
MAX_FOLDER_DEPTH = 24  # parent of sweeps / sweep / job / seed=<s> is 4 deep
MAX_ENTRIES = 2_000_000  # folder entries the walk looks at
MAX_RUNS = 100_000  # metrics.json files (and overrides.yaml files) read
MAX_PLANNED = 10_000  # jobs of a planned grid expanded and checked
MAX_GRID_TEXT = 128 * 2 ** 10  # characters of overrides Hydra's (slow, pure Python) parser is given

# Config keys that do not change what a run measures: two runs differing only in these are the same run
# (a seed of a batch and the single run with that seed; a job resumed with more threads).
NOT_MEASURED = frozenset({"seeds", "ckpt_path", "threads", "figure_every_n_epochs", "objective"})


class Untrusted(ValueError):
    """A file the report will not read, or will not use, with the reason."""


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
    versions: dict = field(default_factory=dict)


@dataclass
class Folder:
    """What a walk of a report's folder found: records, started job folders, sweep plans, event files,
    and one `path: reason` line per entry it would not read."""

    root: Path
    records: list = field(default_factory=list)  # metrics.json files
    started: list = field(default_factory=list)  # job folders holding .hydra/
    plans: list = field(default_factory=list)  # multirun.yaml files
    skipped: list = field(default_factory=list)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append(f"{relative(path, self.root)}: {reason}")


def relative(path: Path, root: Path) -> str:
    """`path` relative to the report's folder, for short job names."""
    try:
        return str(path.relative_to(root)) if path != root else "."
    except ValueError:
        return str(path)


def scan(root: Path) -> Folder:
    """Walk `root` once, iteratively and within the bounds above. Symlinked folders are not entered (a
    link loop or a link to `/` cannot make the walk endless); symlinked files are judged by what they
    point at when read. Records come out in path order, which `--dedupe first|last` relies on."""
    found = Folder(root)
    stack, seen = [(root, 0)], 0
    while stack:
        folder, level = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            found.skip(folder, f"folder not readable: {error.strerror or error}")
            continue
        seen += len(entries)
        if seen > MAX_ENTRIES:
            found.skip(folder, f"the walk stopped after {MAX_ENTRIES} entries; the rest is not read")
            break
        if any(e.name == ".hydra" for e in entries):
            found.started.append(Path(folder))
        for entry in reversed(entries):  # pushed in reverse, popped in name order
            path = Path(entry.path)
            if entry.name == METRICS_FILE:
                found.records.append(path)
            elif entry.name == PLANNED_FILE:
                found.plans.append(path)
            elif entry.name.startswith(EVENTS_PREFIX):
                problem = unreadable_file(path, MAX_EVENTS_BYTES)
                if problem:
                    found.skip(path, f"event file not read: {problem}")
            elif entry.is_dir(follow_symlinks=False):
                if level + 1 > MAX_FOLDER_DEPTH:
                    found.skip(path, f"more than {MAX_FOLDER_DEPTH} folders deep; not read")
                else:
                    stack.append((path, level + 1))
    found.records.sort(key=str)
    if len(found.records) > MAX_RUNS:
        found.skip(found.records[MAX_RUNS].parent, f"more than {MAX_RUNS} {METRICS_FILE} files; this one "
                   "and the rest are not read")
        del found.records[MAX_RUNS:]
    found.started.sort(key=str)
    found.plans.sort(key=str)
    return found


def unreadable_file(path: Path, limit: int) -> str | None:
    """Why `path` is not a file the report reads (not a regular file, larger than `limit`), or None."""
    try:
        info = path.stat()
    except OSError as error:
        return f"{error.strerror or error}"
    if not stat.S_ISREG(info.st_mode):
        kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                 (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"))
        kind = next((name for test, name in kinds if test(info.st_mode)), "a special file")
        return f"{kind}, not a regular file"
    if info.st_size > limit:
        return f"{info.st_size} bytes, more than the {limit} such a file may hold"
    return None


def read_bounded(path: Path, limit: int) -> str:
    """The text of a regular file of at most `limit` bytes; Untrusted otherwise (a device or FIFO is never
    opened for reading, and a file that grows past the limit while read is cut off and refused)."""
    problem = unreadable_file(path, limit)
    if problem:
        raise Untrusted(problem)
    # O_NONBLOCK: should the path be swapped for a FIFO after the check, open() does not wait for a writer.
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise Untrusted(f"more than the {limit} bytes such a file may hold")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Untrusted(f"not UTF-8 text ({error.reason} at byte {error.start})") from error


def load_yaml(text: str):
    """`yaml.safe_load` for files Hydra wrote, refusing what Hydra never writes and what makes a small file
    expensive: aliases (an "alias bomb" expands a few lines into billions of nodes once walked) and
    nesting deeper than MAX_DEPTH. Raises Untrusted or yaml.YAMLError."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    level = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.AliasEvent):
            raise Untrusted("YAML aliases (*name), which Hydra never writes; not expanded")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            level += 1
            if level > MAX_DEPTH:
                raise Untrusted(f"YAML nested more than {MAX_DEPTH} levels deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            level -= 1
    return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader (CSafeLoader or SafeLoader)


def read_yaml(path: Path):
    """A bounded YAML file, parsed as data; Untrusted with the reason for anything else."""
    import yaml

    try:
        return load_yaml(read_bounded(path, MAX_YAML_BYTES))
    except Untrusted:
        raise
    except (OSError, yaml.YAMLError, RecursionError) as error:
        raise Untrusted(f"{type(error).__name__}: {one_line(str(error))}") from error


def one_line(text: str, limit: int = 300) -> str:
    """Text on one line, at most `limit` characters: for messages quoting a file's content."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def load_runs(folder: Folder) -> tuple[list[Run], list[Path]]:
    """The Run of every metrics.json the walk found (a bad one as a Run with status "unreadable" or
    "malformed" and the reason as its error), and the job folders that started (have `.hydra/`) with no
    metrics.json at or below them."""
    runs = [read_run(file) for file in folder.records]
    recorded = {folder for run in runs for folder in (run.path, *run.path.parents)}
    return runs, [job for job in folder.started if job not in recorded]


def read_run(file: Path) -> Run:
    """The Run a metrics.json file records; never raises for what the file holds."""
    try:
        record = json.loads(read_bounded(file, MAX_RECORD_BYTES))
    # JSONDecodeError (and an integer of more than 4300 digits) are ValueErrors, Untrusted too; absurdly
    # deep nesting is a RecursionError.
    except (OSError, ValueError, RecursionError) as error:
        reason = str(error) if isinstance(error, Untrusted) else f"{type(error).__name__}: {error}"
        return Run(file.parent, "unreadable", {}, {}, None, one_line(reason))
    problem = shape_problem(record)
    if problem:
        return Run(file.parent, "malformed", {}, {}, None, problem)
    overrides = record.get("overrides")
    versions = record.get("versions") if isinstance(record.get("versions"), dict) else {}
    return Run(file.parent, record["status"], {k: float(v) for k, v in (record.get("metrics") or {}).items()},
               record.get("config") or {}, None if overrides is None else tuple(overrides),
               record.get("error"), tuple(text(w) for w in record.get("warnings") or ()),
               {str(k): str(v) for k, v in versions.items()})


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
            return f"metric {one_line(repr(name), 80)} should be a number, found {json_type(value)}"
        if isinstance(value, int) and not -2 ** 1023 < value < 2 ** 1023:
            return (f"metric {one_line(repr(name), 80)} is an integer of {len(str(abs(value)))} digits, "
                    "outside the range of a float")
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


def finite(value: object) -> float | None:
    """`value` as a finite float, or None (not a number, NaN, infinite, or an integer beyond float range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def override_dict(overrides) -> dict[str, str]:
    """`["loss=ce", "+x=1"]` → {"loss": "ce", "x": "1"}: the `key=value` pairs of Hydra overrides."""
    return dict(o.lstrip("+~").partition("=")[::2] for o in overrides)


def identity(run: Run) -> str | None:
    """What makes two records the same run: the config (seed included) minus NOT_MEASURED, as canonical
    JSON; None for a record without a config (it cannot be matched)."""
    if not run.config:
        return None
    kept = {k: v for k, v in run.config.items() if k not in NOT_MEASURED}
    return json.dumps(kept, sort_keys=True, default=str)


def duplicates(runs: list[Run]) -> list[list[Run]]:
    """Completed runs recorded more than once (same configuration and seed), each set in path order: a
    parent folder of two sweeps of the same settings, or a copied job folder, would count them twice."""
    copies: dict[str, list[Run]] = {}
    for run in runs:
        key = identity(run) if run.status == "completed" else None
        if key is not None:
            copies.setdefault(key, []).append(run)
    return [sorted(same, key=lambda r: str(r.path)) for same in copies.values() if len(same) > 1]


@dataclass
class Plan:
    """One sweep's `multirun.yaml`: its planned grid (None when there is none to check: another sweeper
    than the basic one, or a `problem` when the file broke a bound or had the wrong shape), its
    `report.baseline` and the command that launched it."""

    path: Path
    jobs: list | None
    baseline: str | None = None
    command: str | None = None
    problem: str = ""

    @property
    def sweep_dir(self) -> Path:
        return self.path.parent


def read_plan(file: Path) -> Plan:
    """A sweep's plan from its `multirun.yaml`; never raises for what the file holds.

    The grid is what Hydra's basic sweeper launches: `hydra.sweeper.params` then the command-line task
    overrides (a later key replaces an earlier one), each `a,b,c` or `range(...)` expanded, then their
    cartesian product. Interpolations are left as text, never resolved.
    """
    try:
        config = read_yaml(file)
    except Untrusted as error:
        return Plan(file, None, problem=str(error))
    if not isinstance(config, dict) or not isinstance(config.get("hydra"), dict):
        return Plan(file, None, problem="no 'hydra' section: not a multirun.yaml Hydra wrote")
    report = config.get("report")
    baseline = report.get("baseline") if isinstance(report, dict) else None
    baseline = baseline if isinstance(baseline, str) else None
    hydra = config["hydra"]
    overrides = hydra.get("overrides") if isinstance(hydra.get("overrides"), dict) else {}
    task = overrides.get("task") or []
    command = None
    if isinstance(task, list) and all(isinstance(o, str) for o in task):
        command = shlex.join(["xentlab-train", "-m", *task])
    sweeper = hydra.get("sweeper") if isinstance(hydra.get("sweeper"), dict) else {}
    target = str(sweeper.get("_target_", ""))
    if not target.endswith("BasicSweeper"):  # Optuna and the like have no fixed grid to check
        return Plan(file, None, baseline, command)
    params = sweeper.get("params") or {}
    if not isinstance(params, dict) or command is None:
        return Plan(file, None, baseline, command,
                    "hydra.sweeper.params or hydra.overrides.task has the wrong type; planned grid not read")
    try:
        return Plan(file, expand_grid([f"{k}={v}" for k, v in params.items()] + list(task)), baseline,
                    command)
    except Untrusted as error:
        return Plan(file, None, baseline, command, f"planned grid not expanded: {error}")
    except Exception as error:  # noqa: BLE001 - any bad content is reported, never raised
        return Plan(file, None, baseline, command, f"planned grid not expanded: {type(error).__name__}: "
                    f"{one_line(str(error))}")


def expand_grid(overrides: list[str]) -> list[dict[str, str]]:
    """Hydra's basic-sweeper expansion of override strings into one `key -> value` dict per job; Untrusted
    when the text is too long to parse quickly or the grid holds more than MAX_PLANNED jobs (counted
    before anything is expanded: `range(0,100000000)` costs nothing)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if sum(len(o) for o in overrides) > MAX_GRID_TEXT:
        raise Untrusted(f"its overrides hold more than {MAX_GRID_TEXT} characters")
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if override.is_hydra_override():
            continue
        if override.is_sweep_override():
            values = list(itertools.islice(override.sweep_string_iterator(), MAX_PLANNED + 1))
        else:
            # The text as given: Hydra's own string form would escape `${...}` interpolations.
            values = [override.input_line.partition("=")[2]]
        choices[key] = values
    size = math.prod(len(v) for v in choices.values())
    if size > MAX_PLANNED:
        raise Untrusted(f"the grid plans more than {MAX_PLANNED} jobs; not expanded")
    keys = [k.lstrip("+~") for k in choices]
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*choices.values())]


def started_jobs(folder: Folder, runs: list[Run], under: Path) -> list[dict[str, str]]:
    """The override sets of every job under `under` that started: in a metrics.json or in a
    `.hydra/overrides.yaml` (an unreadable one is listed in `folder.skipped`)."""
    found = [override_dict(run.overrides) for run in runs
             if run.overrides is not None and inside(run.path, under)]
    for job in folder.started:
        if not inside(job, under):
            continue
        file = job / OVERRIDES_FILE
        try:
            overrides = read_yaml(file)
        except Untrusted as error:
            folder.skip(file, str(error))
            continue
        if isinstance(overrides, list) and all(isinstance(o, str) for o in overrides):
            found.append(override_dict(overrides))
        else:
            folder.skip(file, "expected a list of override strings")
    return found


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def never_started(planned: list[dict[str, str]], started: list[dict[str, str]]) -> list[dict[str, str]]:
    """Planned jobs that no started job covers (a started job's overrides include the planned ones; a
    job that runs several seeds records `seed=<s>` on top of them). Linear time: every planned job of a
    grid has the same keys, so each started job is looked up by its values of those keys."""
    if not planned:
        return []
    keys = list(planned[0])
    covered = {tuple(job.get(k) for k in keys) for job in started}
    return [job for job in planned if tuple(job.get(k) for k in keys) not in covered]


def read_curve(job_dir: Path, tag: str) -> list[float]:
    """A run's per-validation-epoch values of the scalar `tag` from the TensorBoard event files in its
    folder (`xentlab.lab.board.read_scalars`: a step logged twice keeps its last value); [] when there are
    none, or when an event file is not one the report reads (`scan` lists those)."""
    files = list(job_dir.glob(EVENTS_PREFIX + "*"))
    if not files or any(unreadable_file(file, MAX_EVENTS_BYTES) for file in files):
        return []
    scalars = read_scalars(job_dir)
    # xentlab's TensorBoard tag of the name (`val/x` is `1_val/x`), or the plain name in older runs.
    by_step = scalars.get(board_tag(tag), scalars.get(tag, {}))
    return [by_step[step] for step in sorted(by_step)]
