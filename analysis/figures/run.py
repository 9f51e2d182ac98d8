"""Per-run line figures: coverage curves over k and the dynamics of the measures over SFT steps."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from analysis.conventions import (
    base_checkpoint,
    base_of,
    checkpoint_info,
    checkpoint_label,
    checkpoint_order,
    default_strategy,
    kind_rows,
    pick_k,
    require_columns,
    select_rows,
)
from analysis.figures.registry import figure
from analysis.figures.style import COL_W, KIND_COLORS, checkpoint_colors, k_axis, kind_label, new_figure, paper_style
from analysis.table import KINDS
from training.errors import UsageError

__all__ = ["coverage_curves", "dynamics"]


@figure(
    "coverage_curves",
    scope="run",
    caption="pass@k against k for every checkpoint (base in black; bands: 95% bootstrap intervals over problems).",
)
def coverage_curves(df: pd.DataFrame, *, kind: str = "all", strategy: str | None = None) -> Figure:
    """pass@k against k (log2 axis), one line per checkpoint with its bootstrap band; base in black."""
    require_columns(df)
    strategy = default_strategy(df) if strategy is None else strategy
    sub = select_rows(df, "pass@k", what="coverage_curves", kind=kind, strategy=strategy)
    sub = sub[sub["k"].notna()]
    colors = checkpoint_colors(df)
    base = base_checkpoint(df)
    order = [c for c in checkpoint_order(df) if c in set(sub["checkpoint"])]
    ks = sorted({int(k) for k in sub["k"]})
    with paper_style():
        fig = new_figure(COL_W, 2.7 if len(order) <= 6 else 2.7 + 0.14 * math.ceil(len(order) / 3))
        ax = fig.add_subplot()
        for name in order:
            d = sub[sub["checkpoint"] == name].sort_values("k")
            k = d["k"].astype(int).to_numpy()
            is_base = name == base
            ax.plot(
                k,
                d["value"].to_numpy(float),
                color=colors[name],
                lw=2.0 if is_base else 1.1,
                marker="o",
                ms=2.5 if is_base else 2.0,
                label=checkpoint_label(df, name),
                zorder=4 if is_base else 3,
            )
            lo, hi = d["ci_low"].to_numpy(float), d["ci_high"].to_numpy(float)
            if np.isfinite(lo).any() and np.isfinite(hi).any():
                ax.fill_between(k, lo, hi, color=colors[name], alpha=0.15, lw=0, zorder=1)
        k_axis(ax, ks)
        ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]), top=min(1.02, max(ax.get_ylim()[1], 0.05)))
        ax.set_title(f"Coverage ({kind_label(kind)}; {strategy or 'default decoding'})")
        if len(order) <= 6:
            ax.legend(loc="best", handlelength=1.5)
        else:  # many checkpoints: below the axes, where the legend hides no curve
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, handlelength=1.5, columnspacing=0.8)
    return fig


def _sft_axis(df: pd.DataFrame) -> dict[str, int]:
    """Checkpoint -> SFT step for the base (0) and every SFT checkpoint, in training order.

    A base that is only the earliest measured checkpoint (no model before SFT in the table) keeps
    its own step: drawing SFT step 400 at 0 would misplace the whole curve.
    """
    info = checkpoint_info(df)
    base, reason = base_of(info)
    xs = {base: int(info.loc[base, "step"]) if reason == "earliest" else 0}
    for name, r in info.iterrows():
        if name != base and r["phase"] == "sft":
            xs[str(name)] = int(r["step"])
    return dict(sorted(xs.items(), key=lambda kv: kv[1]))


def _step_tick(v: float, _pos=None) -> str:
    if v == 0:
        return "0"
    e = math.log10(abs(v))
    if v >= 1e4 and abs(e - round(e)) < 1e-9:
        return f"$10^{{{round(e)}}}$"
    return f"{v:g}"


def _step_axis(ax, steps: Sequence[int]) -> None:
    """SFT-step x axis: symlog (linear up to the first step) when steps span >= 20x; ticks that never collide with 0."""
    steps = sorted(set(int(s) for s in steps))
    pos = [s for s in steps if s > 0]
    log = bool(pos) and max(pos) / min(pos) >= 20
    if log:
        ax.set_xscale("symlog", linthresh=min(pos), linscale=0.6)
    if len(steps) <= 8:
        ticks = steps
    elif log:
        lo, hi = math.ceil(math.log10(min(pos))), math.floor(math.log10(max(pos)))
        ticks = [0] + [10**e for e in range(lo, hi + 1)]
        if len(ticks) > 7:
            ticks = [0] + [10**e for e in range(lo, hi + 1, 2)]
    else:
        return
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(_step_tick))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


@figure(
    "dynamics",
    scope="run",
    caption="pass@1 and pass@16, entropy at forks per kind (nats; dashed: ordinary positions) and top-branch share per kind, over SFT steps.",
)
def dynamics(df: pd.DataFrame, *, strategy: str | None = None) -> Figure:
    """How the measures move over SFT: pass@1/pass@16, fork entropy per kind, top-branch share per kind.

    x is the SFT step (the base at 0; symlog when steps span more than 20x). Panels without rows
    in the table are left out; at least one must remain.
    """
    require_columns(df)
    xs = _sft_axis(df)
    if len(xs) < 2:
        raise UsageError(f"dynamics needs the base and at least one SFT checkpoint; the table has {len(xs)} on the SFT axis")
    names = list(xs)
    panels: list[Callable] = []

    has = set(df["metric"])
    if "pass@k" in has:
        strat = default_strategy(df) if strategy is None else strategy
        p = select_rows(df, "pass@k", what="dynamics", kind="all", strategy=strat)
        p = p[p["k"].notna() & p["checkpoint"].isin(names)]
        if not p.empty:
            kmax = pick_k(p["k"])

            def draw_pass(ax, p=p, kmax=kmax, strat=strat):
                for k, color, marker in ((1, "#0072B2", "o"), (kmax, "#D55E00", "s"))[: 1 if kmax == 1 else 2]:
                    d = p[p["k"] == k].set_index("checkpoint").reindex([n for n in names if n in set(p["checkpoint"])])
                    x = [xs[n] for n in d.index]
                    ax.plot(x, d["value"].to_numpy(float), color=color, marker=marker, ms=3, lw=1.3, label=f"pass@{k}")
                    if np.isfinite(d["ci_low"].to_numpy(float)).any():
                        ax.fill_between(x, d["ci_low"].to_numpy(float), d["ci_high"].to_numpy(float), color=color, alpha=0.18, lw=0)
                ax.set_ylabel("pass@k\n(fraction)")
                ax.legend(loc="best", title=strat or None)

            panels.append(draw_pass)

    def per_kind_panel(metric: str, ylabel: str, extra: Callable | None = None):
        if metric not in has:
            return None
        sub = select_rows(df, metric, what="dynamics")
        sub = sub[sub["checkpoint"].isin(names)]
        kinds = [k for k in KINDS if k in set(sub["kind"])] or [k for k in ("all", "") if k in set(sub["kind"])]
        if not kinds:
            return None

        def draw(ax):
            for kind in kinds:
                d = sub[sub["kind"] == kind].set_index("checkpoint")
                d = d.reindex([n for n in names if n in d.index])
                ax.plot([xs[n] for n in d.index], d["value"].to_numpy(float), color=KIND_COLORS[kind], marker="o", ms=3, lw=1.3, label=kind_label(kind))
            if extra is not None:
                extra(ax)
            ax.set_ylabel(ylabel)
            ax.legend(loc="best")

        return draw

    def draw_other(ax):
        if "entropy_other" not in has:
            return
        o = select_rows(df, "entropy_other", what="dynamics")
        o = kind_rows(o, "all") if not kind_rows(o, "all").empty else o
        o = o[o["checkpoint"].isin(names)].drop_duplicates("checkpoint").set_index("checkpoint")
        o = o.reindex([n for n in names if n in o.index])
        ax.plot([xs[n] for n in o.index], o["value"].to_numpy(float), color="0.55", ls="--", marker=".", lw=1.1, label="ordinary positions")

    ent = per_kind_panel("entropy_fork", "entropy at forks\n(nats)", draw_other)
    if ent is None and "entropy_other" in has:

        def ent(ax):
            draw_other(ax)
            ax.set_ylabel("entropy (nats)")
            ax.legend(loc="best")

    for panel in (ent, per_kind_panel("mass_top_branch", "top-branch share\n(probability)")):
        if panel is not None:
            panels.append(panel)
    if not panels:
        raise UsageError("dynamics needs pass@k, entropy_fork, entropy_other or mass_top_branch rows; the table has none")

    with paper_style():
        fig = new_figure(COL_W, 0.6 + 1.55 * len(panels))
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for ax, draw in zip(axes, panels):
            draw(ax)
            _step_axis(ax, list(xs.values()))
        for ax in axes[:-1]:
            ax.tick_params(labelbottom=False)
        axes[-1].set_xlabel("SFT step (0 = base)")
        fig.align_ylabels(axes)
    return fig
