"""The kinds of data xentlab trains on. A dataset has one task; a loss declares the tasks it supports."""

from __future__ import annotations

TASKS = ("multiclass", "multilabel", "binary")


def check_task(task: str) -> None:
    """Refuse a task name that is not one of TASKS, naming the valid ones."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
