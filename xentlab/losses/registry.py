"""The loss registry: short names → loss classes, the tasks each supports, and where its defaults live.

Three ways in: built-ins (`builtin.py`), third-party packages through the entry-point group `xentlab.losses`
(discovered lazily, on the first lookup or listing; `name = pkg.module:Class` registers that class as `name`,
`name = pkg.module` imports a module that registers its losses itself), and `_target_=pkg.module.Class` for
any importable loss without registration.

The class-count hook: a loss that needs the training split's statistics declares `class_counts` (samples
per class; positives per label for multilabel data) and, if it also needs the split's size, `num_examples`
as keywords of `__init__`; `build_loss` passes them to such losses only, and no loss ever sees the data.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import logging
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from xentlab.tasks import TASKS, check_task

ENTRY_POINT_GROUP = "xentlab.losses"
BUILTIN = "built-in"
HOOK_KEYWORDS = ("class_counts", "num_examples")
# Keys of a conf/loss/*.yaml that select the loss rather than parametrise it.
SELECTOR_KEYS = ("name", "_target_", "defaults")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossEntry:
    """A registered loss: its class, the tasks it supports, its defaults file and where it came from."""

    name: str
    cls: type[nn.Module]
    tasks: tuple[str, ...]
    config: Path | None = None
    source: str = BUILTIN

    def defaults(self) -> dict:
        """The loss's parameter defaults from its YAML (`config`), the one place they are written down."""
        if self.config is None:
            return {}
        if not self.config.is_file():
            raise ValueError(f"loss {self.name!r}: defaults file {self.config} does not exist")
        values = OmegaConf.to_container(OmegaConf.load(self.config), resolve=True)
        return {k: v for k, v in values.items() if k not in SELECTOR_KEYS}

    def parameters(self) -> dict:
        """Every parameter the loss accepts with its default: the signature's, overridden by the YAML's;
        a parameter with neither shows as `???` (Hydra's "required")."""
        accepted, _ = constructor_parameters(self.cls)
        params = {name: "???" if p.default is inspect.Parameter.empty else p.default
                  for name, p in accepted.items() if name not in HOOK_KEYWORDS}
        return {**params, **self.defaults()}

    @property
    def hooks(self) -> tuple[str, ...]:
        """The class-count hook keywords the loss declares."""
        return hook_keywords(self.cls)


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point that could not be loaded: shown by `xentlab losses`, otherwise skipped."""

    entry_point: str
    distribution: str
    error: str


@dataclass
class _State:
    losses: dict[str, LossEntry] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)
    discovered: bool = False


_STATE = _State()
_LOCK = threading.RLock()


def register_loss(name: str, *, tasks=("multiclass",), config: str | Path | None = None):
    """Class decorator registering a loss module under `name` for the given tasks.

    `config` is the YAML file holding the loss's parameter defaults (the same file Hydra composes as
    `loss=<name>`); `build_loss(name)` fills missing parameters from it. Registering the same class again
    under its name is a no-op (Hydra's joblib launcher reuses worker processes), a re-definition of it (same
    module and qualified name) replaces it, and any other class under a taken name is a ValueError naming
    both.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"loss name must be a non-empty string without surrounding spaces, got {name!r}")
    tasks = _check_tasks(name, tasks)
    config = None if config is None else Path(config)

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"loss {name!r} must be an nn.Module subclass, got {cls!r}")
        with _LOCK:
            taken = _STATE.losses.get(name)
            if taken is not None and taken.cls is cls:
                return cls
            # A class of the same qualified name is the same class defined again (importlib.reload, a
            # notebook cell run twice): the new definition replaces the old one.
            if taken is not None and _qualname(taken.cls) != _qualname(cls):
                raise ValueError(f"loss name {name!r} is taken by {_qualname(taken.cls)} ({taken.source}); "
                                 f"cannot register {_qualname(cls)} under it")
            source = taken.source if taken is not None else _default_source(cls)
            _STATE.losses[name] = LossEntry(name, cls, tasks, config, source)
        return cls

    return decorate


def get_loss(name: str) -> LossEntry:
    """The registry entry for `name`; an unknown name is a ValueError listing the registered names and the
    closest match."""
    losses = _losses()
    if name not in losses:
        for broken in _STATE.broken:
            if broken.entry_point.partition(" = ")[0] == name:
                raise ValueError(f"loss {name!r} comes from the plugin {broken.distribution} "
                                 f"({broken.entry_point}), which failed to load: {broken.error}")
        close = difflib.get_close_matches(str(name), list(losses), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown loss {name!r}.{hint} Registered losses: {', '.join(sorted(losses))}")
    return losses[name]


def list_losses() -> list[LossEntry]:
    """Every registered loss (built-ins and discovered plugins), sorted by name."""
    return [entry for _, entry in sorted(_losses().items())]


def broken_plugins() -> list[BrokenPlugin]:
    """Entry points in `xentlab.losses` that failed to load, with their distribution and error."""
    _losses()
    return list(_STATE.broken)


def losses_for_task(task: str) -> list[str]:
    """Names of the registered losses that support `task`."""
    return [entry.name for entry in list_losses() if task in entry.tasks]


def build_loss(name: str | None = None, *, task: str | None = None, class_counts=None, num_examples=None,
               **params) -> nn.Module:
    """Instantiate a loss for a dataset of the given task: the registered `name` with `params` over the
    defaults of its YAML, or, when `params` holds `_target_`, that importable class (registered or not).

    `class_counts` and `num_examples` (the training split's per-class counts and size) reach only losses
    that declare those keywords. A task the loss does not support is a ValueError naming the losses that do;
    `task=None` skips that check. An unregistered `_target_` class may declare its tasks as a class
    attribute `xentlab_tasks`; without one the task check is skipped.
    """
    target = params.pop("_target_", None)
    params = {key: _plain(value) for key, value in params.items()}
    if target is not None:
        cls = import_loss_class(target)
        _check_label(name, cls, target)
        label, tasks = name or target, getattr(cls, "xentlab_tasks", None)
        registered = [e for e in _losses().values() if e.cls is cls]
        if registered:  # a registered class reached by path keeps its declared tasks and YAML defaults
            tasks, params = registered[0].tasks, {**registered[0].defaults(), **params}
    else:
        if name is None:
            raise ValueError("build_loss needs a registered loss name or a `_target_` class path")
        entry = get_loss(name)
        label, cls, tasks, params = name, entry.cls, entry.tasks, {**entry.defaults(), **params}
    if task is not None:
        _check_task_fits(label, task, tasks)
    hooks = {"class_counts": class_counts, "num_examples": num_examples}
    return instantiate_loss(cls, params, hooks, label=label)


def instantiate_loss(cls: type, params: Mapping, hooks: Mapping | None = None, *,
                     label: str | None = None) -> nn.Module:
    """`cls(**params)`, adding each non-None hook value (class_counts, num_examples) that `cls` declares; an
    unknown parameter is a TypeError naming it, the closest accepted one and all of them (before the
    constructor's own, vaguer error)."""
    label = label or _qualname(cls)
    params = dict(params)
    accepted, open_ended = constructor_parameters(cls)
    params.update({k: v for k, v in (hooks or {}).items()
                   if k in HOOK_KEYWORDS and k in accepted and v is not None})
    for key in params:
        if key not in accepted and not open_ended:
            close = difflib.get_close_matches(key, list(accepted), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"loss {label!r} has no parameter {key!r}{hint}; its parameters: "
                            f"{', '.join(accepted) or 'none'}")
    return cls(**params)


def constructor_parameters(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword parameters `cls(...)` accepts, following `**kwargs` passed up to base-class `__init__`s
    (the `super().__init__(**common)` pattern), and whether it still accepts arbitrary keywords after that."""
    accepted = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            return accepted, False
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]  # without self
        for p in parameters:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                accepted.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return accepted, False
    return accepted, True


def hook_keywords(cls: type) -> tuple[str, ...]:
    """The class-count hook keywords (`class_counts`, `num_examples`) that `cls.__init__` declares."""
    accepted, _ = constructor_parameters(cls)
    return tuple(k for k in HOOK_KEYWORDS if k in accepted)


def import_loss_class(path: str) -> type[nn.Module]:
    """The nn.Module class at the dotted `path` (`pkg.module.Class`), imported; any failure is a ValueError
    naming the path and the reason."""
    module_name, _, attribute = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attribute) if module_name else None
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import loss _target_ {path!r}: {type(error).__name__}: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"loss _target_ {path!r} must name an nn.Module subclass as pkg.module.Class, "
                         f"got {cls!r}")
    return cls


def discover(*, refresh: bool = False) -> None:
    """Load every entry point in the `xentlab.losses` group once (again with `refresh`); a plugin that fails
    is recorded with its distribution name and error, warned about, and skipped."""
    with _LOCK:
        if _STATE.discovered and not refresh:
            return
        _STATE.discovered = True
        _STATE.broken.clear()
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _load_plugin(entry_point)


# ---------------------------------------------------------------- internals


def _losses() -> dict[str, LossEntry]:
    discover()
    return _STATE.losses


def _load_plugin(entry_point) -> None:
    """Two forms: `name = pkg.module:Class` registers that class under `name` (tasks from its `xentlab_tasks`,
    default multiclass; defaults from its `xentlab_config` or else `<pkg>/conf/loss/<name>.yaml`), and
    `name = pkg.module` imports a module whose `@register_loss` decorators register its losses."""
    dist = entry_point.dist.name if entry_point.dist is not None else "unknown distribution"
    package = entry_point.module.split(".")[0]
    try:
        loaded = entry_point.load()
        if isinstance(loaded, type):
            _register_entry_point_class(entry_point.name, loaded)
            mine = [_STATE.losses[entry_point.name]]
        else:
            # Credit by package, not by "registered during this import": the plugin's module may have been
            # imported (and its losses registered) before discovery ran, e.g. by the plugin's own tests.
            mine = [e for e in _STATE.losses.values() if e.cls.__module__.split(".")[0] == package]
        if not mine:
            raise TypeError(f"{entry_point.value} registered no loss; name the loss class in the entry point "
                            f"(`{entry_point.name} = {entry_point.value}:LossClass`) or decorate it with "
                            f"@xentlab.losses.register_loss(...)")
        for entry in mine:
            _STATE.losses[entry.name] = replace(entry, source=dist)
    except Exception as error:  # a broken plugin must never take the registry down with it
        broken = BrokenPlugin(f"{entry_point.name} = {entry_point.value}", dist,
                              f"{type(error).__name__}: {error}")
        _STATE.broken.append(broken)
        message = f"skipping xentlab loss plugin {broken.entry_point!r} from {dist}: {broken.error}"
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def _register_entry_point_class(name: str, cls: type) -> None:
    """Registers the class an entry point names under the entry point's name, unless a decorator already
    registered it there."""
    taken = _STATE.losses.get(name)
    if taken is not None and taken.cls is cls:
        return
    config = getattr(cls, "xentlab_config", None)
    if config is None:
        config = _packaged_config(cls.__module__.split(".")[0], name)
    register_loss(name, tasks=getattr(cls, "xentlab_tasks", ("multiclass",)), config=config)(cls)


def _packaged_config(package: str, name: str) -> Path | None:
    """`<package>/conf/loss/<name>.yaml`, the file a plugin's Hydra search path (`pkg://<package>.conf`)
    composes for `loss=<name>`, if the package has it."""
    from importlib.resources import files

    try:
        path = Path(str(files(package))) / "conf" / "loss" / f"{name}.yaml"
    except TypeError:  # a single-file module, not a package: it has no conf/
        return None
    return path if path.is_file() else None


def _default_source(cls: type) -> str:
    """Built-in for xentlab's own modules; otherwise the defining module until discovery names the
    distribution."""
    return BUILTIN if cls.__module__.split(".")[0] == "xentlab" else f"module {cls.__module__}"


def _check_tasks(name: str, tasks) -> tuple[str, ...]:
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise ValueError(f"loss {name!r}: tasks must be a non-empty subset of {TASKS}, got {tasks!r}")
    return tasks


def _check_task_fits(label: str, task: str, tasks) -> None:
    check_task(task)
    if tasks is not None and task not in tasks:
        fits = ", ".join(losses_for_task(task)) or "none registered"
        raise ValueError(f"loss {label!r} does not support {task} data (it supports {', '.join(tasks)}); "
                         f"losses for {task} data: {fits}")


def _check_label(name: str | None, cls: type, target: str) -> None:
    """A config naming a registered loss and a `_target_` of another class would mislabel every run."""
    if name is None or name == target or name not in _losses():
        return
    named = _losses()[name].cls
    if named is not cls:
        raise ValueError(f"the loss config names {name!r} ({_qualname(named)}) but its _target_ is "
                         f"{target!r}; select `loss=custom loss._target_={target}` or drop the _target_")


def _plain(value):
    """OmegaConf containers (lists of weights from YAML) as plain Python values."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
