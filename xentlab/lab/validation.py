"""Checks of a composed run config, made before anything is built: one clear line per mistake.

`xentlab-train` prints a `ConfigError`, and Hydra's own composition errors, as one message naming the key,
the bad value and the valid choices, and exits with status 2 (`HYDRA_FULL_ERROR=1` shows the traceback).
The checks here need neither data nor Lightning, and all but the loss's (which builds it) and a GPU's
need no torch either, so they answer within a few seconds of the command: settings, the dataset's
(`xentlab.lab.datasets.check_settings`), and the loss for the dataset's task. What only generated data can
tell (a ratio that leaves a class too few samples) is checked where the data is built, and reported the
same way.
"""

from __future__ import annotations

import ast
import difflib
import errno
import functools
import importlib.util
import inspect
import math
import re
from pathlib import Path

from hydra.errors import MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from xentlab.lab.loss_configs import with_signature_defaults

# Any Lightning Trainer argument and any parameter a loss accepts may be set as `trainer.<arg>=` and
# `loss.<param>=` without Hydra's `+`: these groups are left open, and the checks below name a typo instead.
# A tuning grid names any settings (`tune.grid={optimizer.lr: [...]}`); `xentlab.lab.tuning` checks them.
OPEN_GROUPS = ("loss", "trainer", "tune.grid", "tune.loss_grid")
GPU_ACCELERATORS = ("gpu", "cuda")
ACCELERATORS = ("auto", "cpu", *GPU_ACCELERATORS, "mps")
DEFAULT_OBJECTIVE = "val/balanced_accuracy"
STAGES = ("train", "val", "test", "hp")  # the prefixes of a run's metrics; hp/<m> is the final test/<m>


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _at_least(low: int, *, none_ok: bool = False):
    return lambda value: (none_ok and value is None) or (_integer(value) and value >= low)


def _batches(value) -> bool:
    """A `limit_*_batches` value: a count of batches or a fraction of them."""
    return value is None or (_integer(value) and value >= 0) \
        or (isinstance(value, float) and 0.0 <= value <= 1.0)


def _devices(value) -> bool:
    if isinstance(value, str):
        value = value.strip()
        return value == "auto" or value == "-1" or all(part.strip().isdigit() for part in value.split(",")) \
            and (value.count(",") > 0 or int(value) >= 1)
    if _integer(value):
        return value >= 1 or value == -1
    return isinstance(value, (list, tuple, ListConfig)) and len(value) > 0 \
        and all(_integer(v) and v >= 0 for v in value)


def _val_check_interval(value) -> bool:
    """Batches (int >= 1), a fraction of the epoch in (0, 1], or a time 'DD:HH:MM:SS'."""
    if isinstance(value, str):
        return re.fullmatch(r"\d+:\d+:\d+:\d+", value.strip()) is not None
    if isinstance(value, float):
        return 0.0 < value <= 1.0
    return value is None or (_integer(value) and value >= 1)


# Lightning Trainer arguments whose values are checked here, before Lightning is imported (it refuses
# them itself only after seconds of importing, and with a traceback). Lightning's documented ranges.
TRAINER_VALUES = {
    "devices": (_devices, "a positive integer, -1 (all), auto or a list of device indices"),
    "num_nodes": (_at_least(1), "an integer >= 1"),
    "min_epochs": (_at_least(0, none_ok=True), "an integer >= 0 or null"),
    "max_steps": (lambda v: v == -1 or _at_least(1)(v), "an integer >= 1, or -1 (no limit)"),
    "min_steps": (_at_least(0, none_ok=True), "an integer >= 0 or null"),
    "log_every_n_steps": (_at_least(1, none_ok=True), "an integer >= 1 (steps between logged points)"),
    "check_val_every_n_epoch": (_at_least(1, none_ok=True), "an integer >= 1 or null"),
    "val_check_interval": (_val_check_interval, "an integer >= 1 (batches), a fraction in (0, 1] of the "
                                                "epoch, a time DD:HH:MM:SS or null"),
    "num_sanity_val_steps": (_at_least(-1, none_ok=True), "an integer >= -1 (-1: all) or null"),
    "accumulate_grad_batches": (_at_least(1), "an integer >= 1"),
    "reload_dataloaders_every_n_epochs": (_at_least(0), "an integer >= 0"),
    "gradient_clip_val": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and v >= 0), "a number >= 0 or null"),
    "gradient_clip_algorithm": (lambda v: v in (None, "norm", "value"), "norm, value or null"),
    "deterministic": (lambda v: v in (None, True, False, "warn"), "true, false, warn or null"),
    "fast_dev_run": (lambda v: isinstance(v, bool) or _at_least(0)(v), "true, false or a number of batches"),
    **{f"limit_{stage}_batches": (_batches, "a number of batches (an integer >= 0), a fraction in [0, 1] "
                                            "or null") for stage in ("train", "val", "test", "predict")},
    **{key: (lambda v: v is None or isinstance(v, bool), "true, false or null") for key in (
        "enable_checkpointing", "enable_progress_bar", "enable_model_summary", "benchmark", "inference_mode",
        "detect_anomaly", "barebones", "sync_batchnorm", "use_distributed_sampler")},
}


class ConfigError(ValueError):
    """An invalid setting: what is wrong, with the key, the bad value and the valid choices."""


def flatten(config: dict, prefix: str = "") -> dict:
    """A nested plain config (dicts of values) as `{"group.key": value}`, e.g. `loss.gamma`."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid top-level, data, trainer, report, loss, optimizer or
    objective setting of a composed run config."""
    check_settings_alone(cfg)
    check_with_torch(cfg)


def check_settings_alone(cfg: DictConfig) -> None:
    """The checks that read the config only (no torch): the run's own keys, the data's, the trainer's and
    the report's."""
    check_top_level(cfg)
    check_data(cfg.data)
    check_trainer(cfg.trainer)
    check_baseline(cfg)


def check_with_torch(cfg: DictConfig) -> None:
    """The checks that build something with torch: the loss on the data's class count, the optimizer, and
    the metric names the objective must be one of."""
    task, num_classes = check_data(cfg.data), class_count(cfg.data)
    check_loss(cfg.loss, task, num_classes)
    check_optimizer_arguments(cfg.optimizer)
    check_objective(str(cfg.get("objective", DEFAULT_OBJECTIVE)), task, num_classes)
    grid_of(cfg)


def grid_of(cfg: DictConfig) -> dict[str, list]:
    """The job's tuning grid (`xentlab.lab.tuning`): `tune.grid` and the loss's own
    `tune.loss_grid[<loss name>]`, key → candidate values ({} when the job is not tuned); ConfigError for a
    malformed one."""
    tune = OmegaConf.to_container(cfg.tune, resolve=True) if cfg.get("tune") else {}
    loss_grid = (tune.get("loss_grid") or {}).get(str(cfg.loss.get("name"))) or {}
    grid = {str(key): values for key, values in {**(tune.get("grid") or {}), **loss_grid}.items()}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"tune: the candidates of {key} must be a non-empty list, e.g. [0.001, 0.003, "
                              f"0.01]; got {values!r}")
        if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            raise ConfigError(f"tune: {key} is not a setting of this run's config, so it cannot be tuned")
    if grid and not str(cfg.objective).startswith("val/"):
        raise ConfigError(f"tune: settings are chosen on the validation split, so `objective` must be a val/ "
                          f"metric such as val/balanced_accuracy; got {cfg.objective!r}")
    return grid


# Settings whose validity depends on each other (a dataset's size, ratio and classes; a loss's per-class
# vectors and the data's classes; the objective and the data's task): a sweep checks every combination of
# their values among its jobs, not only each value once.
JOINT_GROUPS = ("data", "loss", "experiment", "method", "objective")


def sweep_jobs_to_check(jobs: list[list[str]]) -> list[list[str]]:
    """A few jobs that together hold every value of every swept key and every combination of values of
    JOINT_GROUPS keys that the sweep runs: greedily, the job bringing the most of these not yet covered.
    Every other setting is checked by itself, so one job per value finds its mistakes; a 210-job grid (7
    losses x 3 ratios x 10 seeds) keeps 21 jobs, not 210."""
    def joint(overrides: list[str]) -> tuple[str, ...]:
        return tuple(sorted(o for o in overrides
                            if o.lstrip("+~").partition("=")[0].split(".")[0].split("/")[0] in JOINT_GROUPS))

    items = [{*overrides, joint(overrides)} for overrides in jobs]
    uncovered = set().union(*items) if items else set()
    kept = []
    while uncovered:
        best = max(range(len(jobs)), key=lambda j: len(uncovered.intersection(items[j])))
        kept.append(jobs[best])
        uncovered.difference_update(items[best])
    return kept or jobs[:1]  # a multirun without sweeps: its one job


def check_sweep(config: DictConfig, jobs: list[list[str]]) -> None:
    """Every job's settings through check_config before the sweep starts (`sweep_jobs_to_check` finds
    the jobs whose configs hold every value and combination there is to check): an invalid setting stops
    the sweep with one message instead of failing its jobs one by one."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    loader, composed = GlobalHydra.instance().config_loader(), []
    for overrides in sweep_jobs_to_check(jobs):  # all composed first: a typo is found in a second
        try:
            composed.append((overrides, loader.load_sweep_config(config, overrides)))
        except (HydraException, OmegaConfBaseException) as error:
            raise ConfigError(describe_composition_error(error)) from error
    for check in (check_settings_alone, check_with_torch):  # torch only once every plain check passed
        for overrides, job_cfg in composed:
            try:
                name_the_loss(job_cfg, job_cfg.hydra.runtime.choices)
                check(job_cfg)
            except ConfigError as error:
                raise ConfigError(f"{error} (in job {','.join(overrides)}; no job was started)") from error


def name_the_loss(cfg: DictConfig, choices) -> None:
    """A loss YAML need not repeat its name: without `name` (or a `_target_`) the loss is its group choice.
    A plugin loss without a YAML gets its constructor's parameters and defaults (xentlab.lab.loss_configs)."""
    with open_dict(cfg):
        if "name" not in cfg.loss and "_target_" not in cfg.loss:
            cfg.loss.name = choices.loss
        try:
            completed = with_signature_defaults(cfg.loss, choices.loss)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        if completed is not cfg.loss:
            cfg.loss = completed


def check_data(data: DictConfig) -> str | None:
    """The data settings that can be checked without generating the data; returns the dataset's task (None
    when only the data can tell: a table, an image folder, a factory's data). For generated datasets this
    includes the class counts the sizes and the imbalance ratio give."""
    from xentlab.lab.datasets import check_settings

    check_required(data, "data")
    params = OmegaConf.to_container(data, resolve=True)
    try:
        task = check_settings(**params)
        check_generated_counts(params, task)
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from error
    return task


def builder_settings(data: dict) -> tuple[str, dict]:
    """The dataset's name and every parameter of its built-in builder: the given ones over the builder's
    defaults (none for the user's own data: a table, an image folder or a factory)."""
    from xentlab.lab.datasets import DATASETS

    name = data.get("name")
    if data.get("_target_") is not None or name not in DATASETS:
        return name, {}
    make, _ = DATASETS[name]
    defaults = {key: arg.default for key, arg in inspect.signature(make).parameters.items()}
    return name, defaults | {key: value for key, value in data.items() if key in defaults}


def check_generated_counts(data: dict, task: str) -> None:
    """A generated single-label dataset's training counts under the natural split (the builders'
    `counts_for_total` and `check_min_count`, before any sample is drawn): a ratio or a size that leaves
    a class too few samples is refused here, not when the run builds its data. The balanced split and
    the bundled datasets' counts depend on the data and are checked when it is built."""
    from xentlab.lab.datasets import check_min_count, counts_for_total

    _, params = builder_settings(data)
    if task in (None, "multilabel") or "n_samples" not in params \
            or data.get("eval_split", "natural") != "natural":
        return
    ratio = params.get("imbalance_ratio", 1)
    counts = params.get("counts") or counts_for_total(
        params["n_samples"], params.get("n_classes", 2), ratio, params.get("profile", "exponential"))
    check_min_count(list(counts), params.get("min_class_samples", 1), ratio)


# The class counts of the bundled datasets, which are fixed (a ratio subsamples, never drops a class);
# generated datasets take theirs from `data.n_classes` (2 for the binary ones).
BUNDLED_CLASSES = {"digits": 10, "wine": 3, "breast_cancer": 2, "mnist": 10, "cifar10_lt": 10,
                   "cifar100_lt": 100}


def class_count(data: DictConfig) -> int | None:
    """The number of classes (labels, for multilabel data) the run's data will have, known from its
    settings alone for the built-in datasets; None when it cannot be told."""
    name, params = builder_settings(OmegaConf.to_container(data, resolve=True))
    if params.get("counts") is not None:
        count = len(params["counts"])
    elif "n_classes" in params:
        count = params["n_classes"]
    else:
        count = BUNDLED_CLASSES.get(name, 2 if "n_samples" in params else None)
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 2 else None


def check_required(group: DictConfig, prefix: str) -> None:
    """Refuse a `???` value left in `group` (a file, a folder, a `_target_` the config cannot guess)."""
    raw = OmegaConf.to_container(group, resolve=False)
    for key, value in raw.items():
        if value == "???":
            choice = raw.get("name")
            where = f" ({prefix}={choice} needs it)" if isinstance(choice, str) and "$" not in choice else ""
            raise ConfigError(f"{prefix}.{key} must be set{where}: add {prefix}.{key}=<value> to the command")


def check_top_level(cfg: DictConfig) -> None:
    """The run's own keys: an integer seed and seed count, a figure interval, a checkpoint that exists."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    check_seeds(cfg.get("seeds", 1))
    check_threads(cfg.get("threads"))
    every = cfg.get("figure_every_n_epochs", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"figure_every_n_epochs must be an integer >= 0 (0: only the last epoch), "
                          f"got {every!r}")
    ckpt = cfg.get("ckpt_path")
    if ckpt not in (None, "last") and not Path(str(ckpt)).is_file():
        raise ConfigError(f"ckpt_path must be null, last or the path of a .ckpt file, got {ckpt!r} "
                          f"(no such file)")
    checkpoint = cfg.get("checkpoint", "last")
    if checkpoint not in ("last", "best"):
        raise ConfigError(f"checkpoint must be last (test the last epoch's weights) or best (the weights of "
                          f"the validation epoch with the best `objective`), got {checkpoint!r}")
    if checkpoint == "best" and not str(cfg.get("objective", "")).startswith("val/"):
        raise ConfigError(f"checkpoint=best chooses the epoch by `objective` on the validation split, so "
                          f"it must be a val/ metric such as val/balanced_accuracy; got "
                          f"{cfg.get('objective')!r}")


def check_threads(threads) -> int | None:
    """`threads` (torch's intra-op threads) as a positive int or None (automatic), else a ConfigError."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer or null (automatic), got {threads!r}")
    return threads


def check_seeds(seeds) -> int:
    """`seeds` as a positive int, else a ConfigError naming the value."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds (how many seeds to train together: seed, seed+1, ...) must be an integer "
                          f">= 1, got {seeds!r}")
    return seeds


def check_trainer(trainer: DictConfig) -> None:
    """Trainer arguments Lightning has, settings that can train, and an accelerator this machine has."""
    accepted = lightning_trainer_arguments()
    for key in trainer:
        if accepted and key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=3, cutoff=0.6)
            if close:
                raise ConfigError(f"trainer.{key} is not a Lightning Trainer argument; did you mean "
                                  f"{' or '.join(f'trainer.{c}' for c in close)}?")
            raise ConfigError(f"trainer.{key} is not a Lightning Trainer argument; its arguments: "
                              f"{', '.join(accepted)}")
    epochs = trainer.get("max_epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"trainer.max_epochs must be an integer >= 1, got {epochs!r}")
    for key in ("max_steps", "limit_train_batches"):
        if key in trainer and trainer[key] is not None and not isinstance(trainer[key], bool) \
                and trainer[key] == 0:
            raise ConfigError(f"trainer.{key}=0 trains nothing; drop it or give a positive value")
    for key, value in trainer.items():
        if key in TRAINER_VALUES:
            valid, rule = TRAINER_VALUES[key]
            if not valid(value):
                raise ConfigError(f"trainer.{key} must be {rule}, got {value!r}")
    precision = trainer.get("precision")
    choices = lightning_precisions()
    if precision is not None and choices and precision not in choices:
        raise ConfigError(f"trainer.precision must be one of {', '.join(dict.fromkeys(map(str, choices)))}, "
                          f"got {precision!r}")
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator must be one of {', '.join(ACCELERATORS)} (Lightning's "
                          f"others, e.g. tpu, need their own packages and hardware), got {accelerator!r}")
    if accelerator == "mps" or accelerator in GPU_ACCELERATORS:
        import torch

        apple = accelerator == "mps"
        if not (torch.backends.mps.is_available() if apple else torch.cuda.is_available()):
            raise ConfigError(f"trainer.accelerator={accelerator}, but torch finds no "
                              f"{'Apple' if apple else 'CUDA'} GPU on this machine; train on the CPU with "
                              "trainer=cpu (or trainer.accelerator=cpu)")


def check_loss(loss: DictConfig, task: str | None = None, num_classes: int | None = None) -> None:
    """The loss's name and parameters, and that it supports the dataset's `task`: its own constructor
    builds it on placeholder class counts of the data's `num_classes` classes (the real counts come with
    the data), and it computes one placeholder batch, so that a per-class vector of the wrong length or
    with a negative entry (`loss.weights`, `loss.alpha`, `loss.pos_weight`) is refused now rather than at
    the first training step. Without `num_classes` the batch is skipped; the real counts can still refuse
    what they alone decide when the run is built."""
    import torch

    from xentlab.losses import build_loss

    if OmegaConf.is_missing(loss, "_target_"):
        raise ConfigError("loss=custom needs the class to build: loss._target_=pkg.module.Class")
    params = OmegaConf.to_container(loss, resolve=True)
    label = params.get("name") or params.get("_target_")
    required = [f"loss.{key}" for key in loss if OmegaConf.is_missing(loss, key)]
    if required:  # a parameter its constructor gives no default (a plugin loss without a YAML)
        raise ConfigError(f"loss {label!r} has no default for {', '.join(required)}: set "
                          f"{' '.join(f'{key}=<value>' for key in required)}")
    classes = num_classes or 2
    try:
        built = build_loss(**params, task=task, class_counts=torch.full((classes,), 10), num_examples=40)
        if num_classes is not None:
            logits = torch.zeros(2, classes)
            target = torch.zeros(2, classes) if task == "multilabel" else torch.tensor([0, classes - 1])
            built(logits, target)
    except (ValueError, TypeError) as error:
        message = str(error)
        raise ConfigError(message if message.startswith("loss ") else f"loss {label!r}: {message}") from error
    except Exception as error:  # noqa: BLE001 - a plugin's own failure, named, instead of a traceback
        raise ConfigError(f"loss {label!r}{loss_source(params)} could not be built: "
                          f"{type(error).__name__}: {error}") from error


def loss_source(params: dict) -> str:
    """` (plugin <distribution>)` for a loss a plugin registered, else nothing."""
    from xentlab.losses import list_losses
    from xentlab.losses.registry import BUILTIN

    for entry in list_losses():
        qualified = f"{entry.cls.__module__}.{entry.cls.__qualname__}"
        if entry.name == params.get("name") or qualified == params.get("_target_"):
            return "" if entry.source == BUILTIN else f" (plugin {entry.source})"
    return ""


def check_optimizer_arguments(optimizer: DictConfig) -> None:
    """The optimizer, built over one placeholder parameter: its class must import and its own constructor
    accept the arguments (torch's optimizers refuse e.g. a negative lr or momentum); otherwise the mistake
    would surface only when Lightning configures the optimizers, after the whole run is built."""
    import torch
    from hydra.errors import HydraException
    from hydra.utils import instantiate

    target = optimizer.get("_target_", "?")
    lr = optimizer.get("lr")
    if isinstance(lr, bool) or (lr is not None and not isinstance(lr, (int, float))) \
            or (isinstance(lr, (int, float)) and not (math.isfinite(lr) and lr > 0)):
        raise ConfigError(f"optimizer.lr must be a finite number > 0 (at 0 nothing trains), got {lr!r}")
    try:
        instantiate(optimizer)([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError, ImportError, HydraException) as error:
        # Hydra's first line ("Error locating target ...") is the message; its advice about HYDRA_FULL_ERROR
        # and the full_key line after it are not.
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        reason = reason.split(", set env var HYDRA_FULL_ERROR")[0]
        raise ConfigError(f"optimizer {target}: {reason}") from error


def check_objective(objective: str, task: str | None, num_classes: int | None) -> None:
    """`objective` must name a metric the run reports (`<stage>/<metric>`), as its metrics.json will
    hold it; the names come from the metric code itself, for this task and class count (the stage alone
    where only the data will tell the task: a table, an image folder, a factory's data)."""
    stage, _, name = objective.partition("/")
    if objective in (DEFAULT_OBJECTIVE, "val/loss", "test/balanced_accuracy", "hp/balanced_accuracy"):
        return  # reported by every run
    if stage not in STAGES or not name:
        raise ConfigError(f"objective must be <stage>/<metric> with stage {', '.join(STAGES)}, e.g. "
                          f"{DEFAULT_OBJECTIVE}; got {objective!r}")
    if task is None:
        return
    names = reported_metrics(task, num_classes or 2)[stage]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {stage}/{close[0]}? " if close else ""
        raise ConfigError(f"objective {objective!r} is not a metric this run reports; {hint}"
                          f"{stage}/ metrics: {', '.join(sorted(names))}")


@functools.cache
def reported_metrics(task: str, num_classes: int) -> dict[str, tuple[str, ...]]:
    """The metric names (without the stage) each stage of a run on `task` data with `num_classes` classes
    reports: one placeholder batch through the stage metrics and the post-hoc adjustments."""
    import torch

    from xentlab.lab.metrics import StageMetrics, logit_adjusted, temperature_scaled

    logits = torch.tensor([[2.0] + [0.0] * (num_classes - 1), [0.0] * (num_classes - 1) + [2.0]])
    target = torch.eye(num_classes)[[0, -1]] if task == "multilabel" else torch.tensor([0, num_classes - 1])
    epoch = StageMetrics(task, num_classes)
    epoch.update(logits[None], target[None], torch.ones(1))
    full = [*epoch.compute()[0], "minority_recall"]
    step = StageMetrics(task, num_classes, full=False)
    step.update(logits[None], target[None], torch.ones(1))
    posthoc = list(temperature_scaled(logits, target, logits, target, task))
    if task != "multilabel":
        posthoc += list(logit_adjusted(logits, target, torch.ones(num_classes)))
    tested = tuple(full + posthoc)
    return {"train": tuple(step.compute()[0]), "val": tuple(full), "test": tested,
            "hp": tuple(n for n in tested if n != "loss")}


def check_baseline(cfg: DictConfig) -> None:
    """`report.baseline`: `key=value` pairs whose keys are settings of the run (`loss` names the loss)."""
    report = cfg.get("report")
    baseline = report.get("baseline") if isinstance(report, DictConfig) else None
    if baseline is None:
        return
    pairs = [part.strip() for part in str(baseline).split(",") if part.strip()]
    for pair in pairs or [""]:
        key, equals, _ = pair.partition("=")
        if not equals or not key:
            raise ConfigError(f"report.baseline must be key=value pairs naming the group every other is "
                              f"compared with, e.g. loss=ce or "
                              f"'report.baseline=\"loss=focal,loss.gamma=2\"'; got {baseline!r}")
        if key not in cfg and OmegaConf.select(cfg, key, default=None) is None:
            raise ConfigError(f"report.baseline={baseline}: {key} is not a setting of this run")


@functools.cache
def lightning_precisions() -> tuple:
    """The `precision` values the installed Lightning accepts (the literals of its `_PRECISION_INPUT`),
    read from its source without importing it; empty when they cannot be read."""
    tree = lightning_source("lightning_fabric", "plugins/precision/precision.py")
    values = []
    for node in ast.walk(tree) if tree is not None else ():
        names = [t.id for t in getattr(node, "targets", ()) if isinstance(t, ast.Name)]
        if any(n.startswith("_PRECISION_INPUT_") and "CONVERSION" not in n for n in names):
            values += [c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)
                       and isinstance(c.value, (int, str)) and c.value != "Literal"]
    return tuple(values)


def lightning_source(package: str, path: str) -> ast.Module | None:
    """The parsed source of `<package>/<path>` of an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    try:
        return ast.parse((Path(spec.origin).parent / path).read_text())
    except (OSError, SyntaxError):
        return None


@functools.cache
def lightning_trainer_arguments() -> tuple[str, ...]:
    """The keyword arguments of the installed Lightning's `Trainer.__init__`, read from its source without
    importing it (importing Lightning takes seconds); empty when the source cannot be read, and Lightning
    itself then refuses an unknown argument."""
    tree = lightning_source("pytorch_lightning", "trainer/trainer.py")
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    arguments = [*item.args.args[1:], *item.args.kwonlyargs]
                    return tuple(a.arg for a in arguments)
    return ()


def open_groups(cfg: DictConfig) -> None:
    """Lets overrides add keys to OPEN_GROUPS (`trainer.gradient_clip_val=1`, `loss.reduction=sum`), and to a
    data or model group that names its own `_target_` (the factory's or class's arguments), without `+`:
    Hydra closes the whole config before applying overrides, but a node whose own struct flag is False
    stays open."""
    for group in (*OPEN_GROUPS, "data", "model"):
        node = OmegaConf.select(cfg, group)
        # `in node.keys()`: `"_target_" in node` is False while its value is still `???`.
        if isinstance(node, DictConfig) and (group in OPEN_GROUPS or "_target_" in node.keys()):
            OmegaConf.set_struct(node, False)


def install_open_groups() -> None:
    """Makes Hydra call `open_groups` on every config it composes, between merging the defaults and applying
    the command-line overrides (the one point where that is possible; hydra-core is pinned to 1.3)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    compose = ConfigLoaderImpl._compose_config_from_defaults_list
    if getattr(compose, "opens_groups", False):
        return

    @functools.wraps(compose)
    def compose_with_open_groups(*args, **kwargs):
        cfg = compose(*args, **kwargs)
        open_groups(cfg)
        return cfg

    compose_with_open_groups.opens_groups = True
    ConfigLoaderImpl._compose_config_from_defaults_list = compose_with_open_groups


def describe_composition_error(error: Exception) -> str:
    """Hydra's composition error as one message; for a key that does not exist, the closest real keys
    instead of Hydra's advice to add it with `+`."""
    cause = error.__cause__
    parent = getattr(cause, "parent_node", None)
    key = getattr(cause, "key", None)
    full_key = getattr(cause, "full_key", None)
    if "is not in struct" in str(cause) and isinstance(parent, DictConfig) and key is not None:
        group = str(full_key).rpartition(".")[0]
        keys = [str(k) for k in parent]
        close = difflib.get_close_matches(str(key), keys, n=3, cutoff=0.6)
        prefix = f"{group}." if group else ""
        hint = f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
        where = f"{group} has" if group else "the config has"
        if key == "_target_" and group in ("data", "model"):  # the user's own factory or class
            hint = f"; to build your own, choose {group}=custom {group}._target_=<pkg.module.name>"
        return f"{full_key} is not a setting{hint} ({where}: {', '.join(keys)})"
    missing = cause if isinstance(cause, MissingConfigException) else error
    if isinstance(missing, MissingConfigException) and missing.options is not None \
            and missing.missing_cfg_file:
        group, _, choice = missing.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(choice, missing.options, n=1)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        return f"{group}={choice}: no such {group} config; {hint}choose one of: {', '.join(missing.options)}"
    # Hydra's search-path listing after the choices is for debugging plugins, not for a typo.
    lines = str(error).split("\nConfig search path:")[0].strip().splitlines()
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return "; ".join(line.strip() for line in lines if line.strip())


def describe_startup_error(error: Exception) -> str | None:
    """One line for the failures that stop `xentlab-train` before a run could start or be recorded, none
    of them a bug of xentlab's: a folder it may not write (Hydra's log file or `.hydra/`), a Hydra plugin
    module under `hydra_plugins` that raises when Hydra imports it at start-up. None for anything else."""
    cause = error if isinstance(error, OSError) else error.__cause__
    if isinstance(cause, OSError) and cause.filename is not None:
        advice = "free some space" if cause.errno == errno.ENOSPC else \
            "choose a folder you may write to (hydra.run.dir=... or hydra.sweep.dir=...)"
        return f"cannot write {cause.filename}: {cause.strerror or cause}; {advice}"
    trace = error.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code.co_name == "_scan_all_plugins":  # Hydra importing its plugins
            module = trace.tb_frame.f_locals.get("modname", "a module under hydra_plugins")
            return f"the Hydra plugin module {module} fails to import ({type(error).__name__}: {error}); " \
                   "fix or uninstall the package that installs it"
        trace = trace.tb_next
    return None
