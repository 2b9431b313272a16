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
import functools
import importlib.util
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Any Lightning Trainer argument and any parameter a loss accepts may be set as `trainer.<arg>=` and
# `loss.<param>=` without Hydra's `+`: these groups are left open, and the checks below name a typo instead.
OPEN_GROUPS = ("loss", "trainer")
GPU_ACCELERATORS = ("gpu", "cuda")


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
    """Raise ConfigError for the first invalid top-level, trainer or loss setting of a composed run config."""
    check_top_level(cfg)
    task = check_data(cfg.data)
    check_trainer(cfg.trainer)
    check_loss(cfg.loss, task)
    check_optimizer_arguments(cfg.optimizer)


def check_data(data: DictConfig) -> str | None:
    """The data settings that can be checked without generating the data; returns the dataset's task (None
    when only the data can tell: a table, an image folder, a factory's data)."""
    from xentlab.lab.datasets import check_settings

    check_required(data, "data")
    try:
        return check_settings(**OmegaConf.to_container(data, resolve=True))
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from error


def check_required(group: DictConfig, prefix: str) -> None:
    """Refuse a `???` value left in `group` (a file, a folder, a `_target_` the config cannot guess)."""
    raw = OmegaConf.to_container(group, resolve=False)
    for key, value in raw.items():
        if value == "???":
            choice = raw.get("name")
            where = f" ({prefix}={choice} needs it)" if isinstance(choice, str) and "$" not in choice else ""
            raise ConfigError(f"{prefix}.{key} must be set{where}: add {prefix}.{key}=<value> to the command")


def check_top_level(cfg: DictConfig) -> None:
    """The run's own keys: an integer seed, a figure interval, a checkpoint that exists."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    every = cfg.get("figure_every_n_epochs", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"figure_every_n_epochs must be an integer >= 0 (0: only the last epoch), "
                          f"got {every!r}")
    ckpt = cfg.get("ckpt_path")
    if ckpt not in (None, "last") and not Path(str(ckpt)).is_file():
        raise ConfigError(f"ckpt_path must be null, last or the path of a .ckpt file, got {ckpt!r} "
                          f"(no such file)")


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
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in GPU_ACCELERATORS:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator}, but torch finds no CUDA GPU on this "
                              f"machine; train on the CPU with trainer=cpu (or trainer.accelerator=cpu)")


def check_loss(loss: DictConfig, task: str | None = None) -> None:
    """The loss's name and parameters, and that it supports the dataset's `task`, checked by its own
    constructor on placeholder class counts (the real counts come with the data); anything the real counts
    could still refuse is checked at build time."""
    import torch

    from xentlab.losses import build_loss

    if OmegaConf.is_missing(loss, "_target_"):
        raise ConfigError("loss=custom needs the class to build: loss._target_=pkg.module.Class")
    params = OmegaConf.to_container(loss, resolve=True)
    label = params.get("name") or params.get("_target_")
    try:
        build_loss(**params, task=task, class_counts=torch.full((2,), 10), num_examples=40)
    except (ValueError, TypeError) as error:
        message = str(error)
        raise ConfigError(message if message.startswith("loss ") else f"loss {label!r}: {message}") from error


def check_optimizer_arguments(optimizer: DictConfig) -> None:
    """The optimizer, built over one placeholder parameter: its class must import and its own constructor
    accept the arguments (torch's optimizers refuse e.g. a negative lr or momentum); otherwise the mistake
    would surface only when Lightning configures the optimizers, after the whole run is built."""
    import torch
    from hydra.errors import HydraException
    from hydra.utils import instantiate

    target = optimizer.get("_target_", "?")
    try:
        instantiate(optimizer)([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError, ImportError, HydraException) as error:
        # Hydra's first line ("Error locating target ...") is the message; its advice about HYDRA_FULL_ERROR
        # and the full_key line after it are not.
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        reason = reason.split(", set env var HYDRA_FULL_ERROR")[0]
        raise ConfigError(f"optimizer {target}: {reason}") from error


@functools.cache
def lightning_trainer_arguments() -> tuple[str, ...]:
    """The keyword arguments of the installed Lightning's `Trainer.__init__`, read from its source without
    importing it (importing Lightning takes seconds); empty when the source cannot be read, and Lightning
    itself then refuses an unknown argument."""
    spec = importlib.util.find_spec("pytorch_lightning")
    if spec is None or spec.origin is None:
        return ()
    try:
        tree = ast.parse((Path(spec.origin).parent / "trainer" / "trainer.py").read_text())
    except (OSError, SyntaxError):
        return ()
    for node in ast.walk(tree):
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
        node = cfg.get(group)
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
    # Hydra's search-path listing after the choices is for debugging plugins, not for a typo.
    lines = [str(error).split("\nConfig search path:")[0].strip()]
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return "\n".join(line for line in lines if line)
