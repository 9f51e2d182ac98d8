"""The figure registry: every figure says, where it is defined, its file stem, what table it needs
and its caption, so :func:`analysis.figures.make_figures` and the report never keep a second list.

Registration order is draw order (and the order of the report's figure section).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd
from matplotlib.figure import Figure

__all__ = ["SCOPES", "FigureSpec", "figure", "specs", "stems", "caption"]

SCOPES = ("run", "sweep")
"""``run``: drawn from one run's table; ``sweep``: drawn from a sweep table (the sweep columns)."""


@dataclass(frozen=True)
class FigureSpec:
    """One saved figure: its stem, scope, caption, and how to draw it from a table."""

    stem: str
    scope: str
    caption: str
    fn: Callable[..., Figure]
    kwargs: Callable[[pd.DataFrame], dict[str, Any]] | None = None

    def draw(self, df: pd.DataFrame) -> Figure:
        """``fn(df, **kwargs(df))``; either may raise UsageError when the table cannot support it."""
        return self.fn(df, **(self.kwargs(df) if self.kwargs is not None else {}))


_REGISTRY: dict[str, FigureSpec] = {}


def figure(
    stem: str, *, scope: str, caption: str, kwargs: Callable[[pd.DataFrame], dict[str, Any]] | None = None
) -> Callable[[Callable[..., Figure]], Callable[..., Figure]]:
    """Decorator registering a figure function under ``stem`` (the saved files' name).

    ``kwargs(df)`` gives the arguments :func:`make_figures` draws it with, so one function can be
    registered under several stems: ``figure("b", ...)(fn)`` registers an already defined ``fn`` again.
    """
    if scope not in SCOPES:
        raise ValueError(f"figure {stem!r}: scope must be one of {SCOPES}, not {scope!r}")
    if not caption:
        raise ValueError(f"figure {stem!r} needs a caption")

    def register(fn: Callable[..., Figure]) -> Callable[..., Figure]:
        old = _REGISTRY.get(stem)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"figure stem {stem!r} is already registered by {old.fn.__module__}.{old.fn.__qualname__}")
        _REGISTRY[stem] = FigureSpec(stem, scope, caption, fn, kwargs)  # a module reload replaces in place
        return fn

    return register


def specs() -> tuple[FigureSpec, ...]:
    """Every registered figure, in draw order."""
    return tuple(_REGISTRY.values())


def stems() -> tuple[str, ...]:
    """Every registered stem, in draw order."""
    return tuple(_REGISTRY)


def caption(stem: str) -> str | None:
    """The registered caption of ``stem``; None for a file no figure function drew."""
    spec = _REGISTRY.get(stem)
    return None if spec is None else spec.caption
