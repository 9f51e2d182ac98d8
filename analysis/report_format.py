"""How the report reads single numbers from the table and writes them: one rule for every section."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from analysis.conventions import kind_rows

__all__ = ["_f", "_one", "_pair", "_plain", "_with_ci"]


def _one(df: pd.DataFrame, checkpoint: str, metric: str, **match: Any) -> dict[str, float] | None:
    """The single row of `metric` for `checkpoint` matching `match` (kind 'all' also matches ''), or None."""
    sub = df[(df["checkpoint"] == checkpoint) & (df["metric"] == metric)]
    if "kind" in match:
        sub = kind_rows(sub, match.pop("kind"))
    for col, val in match.items():
        sub = sub[sub[col] == val]
    if sub.empty:
        return None
    r = sub.iloc[0]
    return {"value": float(r["value"]), "ci_low": float(r["ci_low"]), "ci_high": float(r["ci_high"]), "n": int(r["n"])}


def _pair(df: pd.DataFrame, base: str, final: str, metric: str, **match: Any) -> dict[str, Any]:
    return {"base": _one(df, base, metric, **dict(match)), "final": _one(df, final, metric, **dict(match))}



def _f(x: float | None, nd: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _with_ci(cell: dict[str, float] | None) -> str:
    if cell is None:
        return "not measured"
    s = _f(cell["value"])
    if math.isfinite(cell["ci_low"]) and math.isfinite(cell["ci_high"]):
        s += f" [{_f(cell['ci_low'])}, {_f(cell['ci_high'])}]"
    return s


def _plain(cell: dict[str, float] | None) -> str:
    return "not measured" if cell is None else _f(cell["value"])
