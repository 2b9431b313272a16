"""The loss registry: names → loss classes, with the tasks each supports."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LossEntry:
    name: str
    cls: type[nn.Module]
    tasks: tuple[str, ...]


_REGISTRY: dict[str, LossEntry] = {}


def register_loss(name: str, *, tasks=("multiclass",)):
    """Class decorator registering a loss under `name` for the given tasks."""

    def decorate(cls):
        entry = LossEntry(name, cls, tuple(tasks))
        taken = _REGISTRY.get(name)
        if taken is not None and taken.cls is not cls:
            raise ValueError(f"loss name {name!r} is taken by {taken.cls.__qualname__}; cannot register {cls.__qualname__}")
        _REGISTRY[name] = entry
        return cls

    return decorate


def get_loss(name: str) -> LossEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; registered losses: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_loss(name: str, *, task: str, class_counts=None, **params) -> nn.Module:
    """Instantiate the loss `name` with `params` for a dataset of the given task."""
    entry = get_loss(name)
    if task not in entry.tasks:
        raise ValueError(f"loss {name!r} does not support task {task!r} (it supports {', '.join(entry.tasks)})")
    return entry.cls(**params)
