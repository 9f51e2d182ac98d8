"""Task registry: a task is a generator, a verifier and decision-point annotations."""

from __future__ import annotations

from typing import Any

from training.errors import UsageError
from training.tasks.base import Task

_REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    _REGISTRY[cls.name] = cls
    return cls


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(cfg: dict[str, Any]) -> Task:
    """Build a task from its config dict (``{"name": ..., **sizes}``)."""
    name = cfg.get("name")
    if name not in _REGISTRY:
        raise UsageError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return _REGISTRY[name].from_config(cfg)


from training.tasks import graph, modes  # noqa: E402,F401  (each registers itself)
