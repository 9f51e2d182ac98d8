"""What every task provides, so synthesis, training and measurement never special-case one."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from training.errors import UsageError
from training.schema import Problem
from training.tokenizer import WordTokenizer


def _check_type(key: str, value: Any, default: Any) -> None:
    """A task size must have its default's type (a list of whole numbers where the default is one)."""
    def ok(v: Any, like: Any) -> bool:
        if isinstance(like, bool):
            return isinstance(v, bool)
        if isinstance(like, int):
            return isinstance(v, int) and not isinstance(v, bool)
        if isinstance(like, float):
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        if isinstance(like, list):
            return isinstance(v, list) and all(ok(x, like[0]) for x in v) if like else isinstance(v, list)
        return isinstance(v, type(like))

    if not ok(value, default):
        names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
        kind = f"a list like {default}" if isinstance(default, list) else f"{names.get(type(default), type(default).__name__)} like {default!r}"
        raise UsageError(f"config key {key} takes {kind}, got {value!r}")


class Task:
    """A family of problems. Subclasses set ``name`` and ``Config`` (a dataclass of sizes)."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> "Task":
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(d) - fields - {"name"})
        if unknown:
            raise UsageError(
                f"unknown key task.{unknown[0]} for task {cls.name!r}; known: {', '.join(sorted(fields))}"
            )
        defaults = cls.Config()
        for f in dataclasses.fields(cls.Config):
            if f.name in d:
                _check_type(f"task.{f.name}", d[f.name], getattr(defaults, f.name))
        cfg = cls.Config(**{k: v for k, v in d.items() if k != "name"})
        cls.validate(cfg)
        return cls(cfg)

    def config_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.cfg)}

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Raise UsageError for sizes that cannot make a problem."""

    # --- generation -------------------------------------------------------------------
    def tokenizer(self) -> WordTokenizer:
        raise NotImplementedError

    def problem(self, kind: str, rng: np.random.Generator, demo: int = 0) -> Problem:
        """A problem of ``kind`` with its gold completion.

        ``demo`` picks which valid branch a multi-valid decision point's demonstration takes, as
        an index into the valid branches in canonical order (0 = the canonical style rule).
        """
        raise NotImplementedError

    def pretrain_example(self, rng: np.random.Generator) -> Problem:
        """A diverse example: at every fork the continuation is drawn uniformly over branches."""
        raise NotImplementedError

    def verify(self, problem: Problem, completion: str) -> bool:
        """Whether a sampled completion text solves the problem. Never raises on garbage."""
        raise NotImplementedError

    def key(self, problem: Problem) -> str:
        """Identity of a problem instance, so eval problems can be kept disjoint from training."""
        return problem.prompt

    @property
    def max_completion_tokens(self) -> int:
        raise NotImplementedError

    @property
    def max_seq_len(self) -> int:
        raise NotImplementedError
