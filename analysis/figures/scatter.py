"""Per-run scatter: entropy at forks against the coverage gap, one point per checkpoint."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.conventions import (
    base_checkpoint,
    checkpoint_label,
    checkpoint_order,
    default_strategy,
    pick_k,
    pick_kind,
    require_columns,
    select_rows,
)
from analysis.figures.registry import figure
from analysis.figures.style import COL_W, checkpoint_colors, fmt_num, kind_label, new_figure, paper_style
from analysis.sweep_stats import correlations
from training.errors import UsageError

__all__ = ["entropy_vs_coverage"]


def _series(sub: pd.DataFrame, col: str = "value") -> dict[str, float]:
    return {str(c): float(v) for c, v in zip(sub["checkpoint"], sub[col])}


def _spaced(x: np.ndarray, y: np.ndarray, *, first: Sequence[int] = (), min_dist: float = 0.08) -> list[int]:
    """Indices of points to label so that no two labels sit closer than `min_dist` (axes fraction)."""
    sx, sy = max(float(np.ptp(x)), 1e-12), max(float(np.ptp(y)), 1e-12)
    u, v = (x - x.min()) / sx, (y - y.min()) / sy
    chosen: list[int] = []
    for i in list(first) + [len(x) - 1] + list(range(len(x))):
        if i in chosen:
            continue
        if all(math.hypot(u[i] - u[j], v[i] - v[j]) >= min_dist for j in chosen):
            chosen.append(i)
    return chosen


def _entropy_args(df: pd.DataFrame) -> dict[str, str]:
    """make_figures' arguments: indecipherable forks, else whatever kind entropy_fork has."""
    kind = pick_kind(df, "entropy_fork", ["indecipherable", "all", ""])
    if kind is None:
        raise UsageError("entropy_vs_coverage needs entropy_fork rows and the table has none")
    return {"kind": kind}


@figure(
    "entropy_vs_coverage",
    scope="run",
    caption="Entropy at forks against the coverage gap pass@16 − pass@1, one point per checkpoint; Pearson r and Spearman ρ in the legend.",
    kwargs=_entropy_args,
)
def entropy_vs_coverage(df: pd.DataFrame, *, kind: str = "indecipherable", strategy: str | None = None) -> Figure:
    """Fork entropy (x) against pass@16 - pass@1 (y), one point per checkpoint; Pearson r and Spearman rho in the legend."""
    require_columns(df)
    strategy = default_strategy(df) if strategy is None else strategy
    ent = select_rows(df, "entropy_fork", what="entropy_vs_coverage", kind=kind)
    p = select_rows(df, "pass@k", what="entropy_vs_coverage", kind="all", strategy=strategy)
    p = p[p["k"].notna()]
    kmax = pick_k(p["k"])
    if kmax == 1:
        raise UsageError("entropy_vs_coverage needs pass@k for some k > 1; the table has only pass@1")
    p1, pk = _series(p[p["k"] == 1]), _series(p[p["k"] == kmax])
    e = _series(ent)
    order = [c for c in checkpoint_order(df) if c in e and c in p1 and c in pk]
    if len(order) < 2:
        raise UsageError(f"entropy_vs_coverage needs at least two checkpoints with both entropy_fork and pass@k rows; the table has {len(order)}")
    x = np.array([e[c] for c in order])
    y = np.array([pk[c] - p1[c] for c in order])
    r, rho = correlations(x, y)
    colors = checkpoint_colors(df)
    with paper_style():
        fig = new_figure(COL_W, 2.8)
        ax = fig.add_subplot()
        ax.plot(x, y, color="0.8", lw=0.8, zorder=1)  # training trajectory
        ax.scatter(x, y, c=[colors[c] for c in order], s=22, edgecolors="white", linewidths=0.5, zorder=3)
        rising = len(order) >= 2 and np.ptp(x) > 0 and np.polyfit(x, y, 1)[0] > 0
        offset = (4, -7) if rising else (4, 3)  # the side of each point away from the trend line
        for i in _spaced(x, y, first=[order.index(base_checkpoint(df))] if base_checkpoint(df) in order else []):
            ax.annotate(checkpoint_label(df, order[i], short=True), (x[i], y[i]), xytext=offset, textcoords="offset points", fontsize=5.5, color="0.3")
        label = f"Pearson r = {fmt_num(r)}\nSpearman ρ = {fmt_num(rho)}\n({len(order)} checkpoints{'' if len(order) >= 3 else '; r, ρ need ≥ 3'})"
        if len(order) >= 2 and np.ptp(x) > 0:
            slope, icpt = np.polyfit(x, y, 1)
            xx = np.linspace(x.min(), x.max(), 2)
            ax.plot(xx, slope * xx + icpt, color="#D55E00", lw=0.9, ls="--", zorder=2, label=label)
        else:  # constant entropy: no fit line, the legend still reports the correlations
            ax.plot([], [], " ", label=label)
        ax.legend(loc="best", handlelength=1.5)
        ax.set_xlabel(f"entropy at {kind_label(kind)} forks (nats)")
        ax.set_ylabel(f"pass@{kmax} − pass@1 (fraction)")
        ax.set_title(f"Entropy vs coverage gap ({strategy or 'default decoding'})")
        ax.margins(0.12)
    return fig
