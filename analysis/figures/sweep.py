"""Sweep figures: shrinkage against fork prevalence, and coverage curves of base, SFT and mitigations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.conventions import default_strategy, policy_rank, strategy_rank
from analysis.figures.registry import figure
from analysis.figures.style import BASE_COLOR, COL_W, PAGE_W, POLICY_COLORS, fmt_num, k_axis, new_figure, paper_style
from analysis.sweep_stats import sweep_base_mask, sweep_pass, sweep_sft_mask, sweep_shrinkage, sweep_spearman, sweep_summary
from training.errors import UsageError

__all__ = ["headline_lines", "shrinkage_vs_prevalence", "sweep_coverage"]


def _policy_order(policies) -> list[str]:
    return sorted(set(policies), key=policy_rank)


def _strategy_order(df: pd.DataFrame, strategies) -> list[str]:
    default = default_strategy(df)
    return sorted(set(strategies), key=lambda s: (s != default, strategy_rank(s), s))


def headline_lines(df: pd.DataFrame, shrink: pd.DataFrame) -> list[tuple[str, str]]:
    """The (policy, strategy) lines a reader compares: the anchor policy (canonical) at every
    strategy, every other data policy at the default strategy, and the anchor's interpolations
    (``canonical+interp0.5``) at the default strategy. Mixed mitigations stay in the report's table."""
    default = default_strategy(df)
    pairs = set(zip(shrink["policy"], shrink["strategy"]))
    plain = _policy_order(p for p, _ in pairs if "+" not in p)
    anchor = "canonical" if "canonical" in plain else (plain[0] if plain else None)
    out = [(anchor, s) for s in _strategy_order(df, [s for p, s in pairs if p == anchor])]
    out += [(p, default) for p in plain if p != anchor and (p, default) in pairs]
    out += [(p, default) for p in _policy_order(p for p, _ in pairs if anchor and p.startswith(anchor + "+"))
            if (p, default) in pairs]
    return out


def _line_style(i: int, policy: str, strategy: str, default: str) -> dict:
    """A colour per line; solid for data policies, dashed for decoding strategies, dotted for interpolation."""
    ls = ":" if "+" in policy else ("-" if strategy == default else "--")
    return dict(color=POLICY_COLORS[i % len(POLICY_COLORS)], ls=ls, marker="osD^v<>p"[i % 8], ms=3, lw=1.3,
                capsize=1.5, elinewidth=0.8)


@figure(
    "shrinkage_vs_prevalence",
    scope="sweep",
    caption="Coverage shrinkage (base − final SFT pass@16, top) and pass@1 gain (bottom) against fork prevalence, for canonical SFT under each decoding strategy, the other data policies and weight interpolation; mean ± s.d. over seeds; ρ: Spearman, prevalence vs shrinkage of canonical SFT (every line's ρ is in the report).",
)
def shrinkage_vs_prevalence(df: pd.DataFrame, *, lines: list[tuple[str, str]] | None = None) -> Figure:
    """Per task: shrinkage (top) and pass@1 gain (bottom) against fork prevalence, one line per (policy, strategy).

    ``lines`` picks the (policy, strategy) pairs (default :func:`headline_lines`). Points are means
    over seeds, error bars one s.d. over seeds; each top panel gives Spearman rho between prevalence
    and shrinkage over every seed's cell for the first line (canonical SFT, default decoding).
    """
    shrink = sweep_shrinkage(df)
    summ = sweep_summary(shrink)
    rhos = sweep_spearman(shrink).set_index(["task", "policy", "strategy"])["rho"]
    tasks = sorted(set(shrink["task"]))
    default = default_strategy(df)
    chosen = headline_lines(df, shrink) if lines is None else [tuple(x) for x in lines]
    missing = [f"{p}, {s}" for p, s in chosen if not ((summ["policy"] == p) & (summ["strategy"] == s)).any()]
    if missing:
        raise UsageError(f"shrinkage_vs_prevalence: no cells for {'; '.join(missing)}")
    kk = int(shrink["k"].iloc[0])
    with paper_style():
        width = PAGE_W if len(tasks) > 1 else COL_W
        fig = new_figure(width if len(tasks) <= 3 else 2.4 * len(tasks), 4.0 + 0.16 * ((len(chosen) + 1) // 2))
        axes = fig.subplots(2, len(tasks), sharex=True, squeeze=False)
        for j, task in enumerate(tasks):
            top, bottom = axes[0, j], axes[1, j]
            for i, (policy, strategy) in enumerate(chosen):
                d = summ[(summ["task"] == task) & (summ["policy"] == policy) & (summ["strategy"] == strategy)].sort_values("prevalence")
                if d.empty:
                    continue
                style = _line_style(i, policy, strategy, default)
                x = d["prevalence"].to_numpy(float)
                top.errorbar(x, d["shrinkage_mean"].to_numpy(float), yerr=d["shrinkage_std"].to_numpy(float),
                             label=f"{policy}, {strategy}", **style)
                bottom.errorbar(x, d["pass1_gain_mean"].to_numpy(float), yerr=d["pass1_gain_std"].to_numpy(float), **style)
            for ax in (top, bottom):
                ax.axhline(0, color="0.8", lw=0.6, zorder=0)
            rho = rhos.get((task, *chosen[0]), math.nan)
            top.text(0.03, 0.95, f"ρ = {fmt_num(rho)} ({chosen[0][0]}, {chosen[0][1]})", transform=top.transAxes, va="top", ha="left", fontsize="small")
            top.set_title(f"task: {task}")
            bottom.set_xlabel("fork prevalence (share of SFT examples)")
        axes[0, 0].set_ylabel(f"shrinkage\nbase − SFT pass@{kk}")
        axes[1, 0].set_ylabel("pass@1 gain\nSFT − base pass@1")
        fig.align_ylabels(axes[:, 0])
        handles, labels = axes[0, 0].get_legend_handles_labels()
        n_seeds = shrink["seed"].nunique()
        spread = "one seed" if n_seeds == 1 else f"mean ± s.d. over {n_seeds} seeds"
        fig.suptitle(f"Shrinkage vs fork prevalence ({spread})", fontsize=8.5)
        fig.legend(handles, labels, loc="outside lower center", ncol=2 if width > COL_W else 1, handlelength=2.6,
                   title="policy, strategy", fontsize=6.5, title_fontsize=6.5)
    return fig


@figure(
    "sweep_coverage",
    scope="sweep",
    caption="pass@k curves of the base, the final SFT model per data policy, and canonical SFT with the diversity decoding strategy.",
)
def sweep_coverage(df: pd.DataFrame, *, task: str | None = None, prevalence: float | None = None) -> Figure:
    """pass@k curves of the base, each policy's final SFT model, and canonical SFT with each diversity strategy.

    One panel per task (``task`` picks one), each at ``prevalence`` (default: the task's highest).
    Values are means over seeds; bands are the min-max over seeds (the bootstrap interval when
    there is one seed).
    """
    p = sweep_pass(df, "sweep_coverage")
    tasks = sorted(set(p["task"]))
    if task is not None and task not in tasks:
        raise UsageError(f"sweep_coverage: task {task!r} is not in the table; tasks: {', '.join(map(str, tasks))}")
    chosen = headline_lines(df, sweep_shrinkage(df))  # the same lines, colours and styles as the headline figure
    panels = [_sweep_coverage_panel(df, p[p["task"] == t], t, prevalence, chosen)
              for t in ([task] if task is not None else tasks)]
    ks = sorted(set(p["k"]))
    with paper_style():
        n = len(panels)
        fig = new_figure(COL_W if n == 1 else min(PAGE_W, COL_W * n * 0.9), 3.3)
        axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
        for ax, (title, lines) in zip(axes, panels):
            for label, c, style in lines:
                ax.plot(c.index.to_numpy(int), c["value"].to_numpy(float), label=label, ms=2.5, **style)
                if np.isfinite(c["lo"].to_numpy(float)).any():
                    ax.fill_between(c.index.to_numpy(int), c["lo"].to_numpy(float), c["hi"].to_numpy(float), color=style["color"], alpha=0.13, lw=0)
            k_axis(ax, ks)
            ax.set_title(title if n == 1 else title.split(" (")[0])
        if n > 1:
            fig.suptitle(f"decoding: {default_strategy(df) or 'default'} unless a strategy is named", fontsize="medium")
        for ax in axes[1:]:
            ax.set_ylabel("")
        labels = [label for label, _, _ in panels[0][1]]
        longest = max((len(label) for label in labels), default=0)
        handles, names = axes[0].get_legend_handles_labels()
        if n == 1:
            axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2 if longest <= 26 else 1, handlelength=2.2)
        else:
            fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2 if longest <= 40 else 1, handlelength=2.2)
    return fig


def _sweep_coverage_panel(df: pd.DataFrame, p: pd.DataFrame, task: str, prevalence: float | None,
                          chosen: list[tuple[str, str]]):
    """(title, [(label, curve, style)]) for one task's coverage panel."""
    is_base = sweep_base_mask(p)
    sft = p[sweep_sft_mask(p, is_base)]
    if sft.empty:
        raise UsageError(f"sweep_coverage: task {task!r} has no SFT rows")
    prevs = sorted(set(sft["prevalence"].astype(float)))
    want = prevs[-1] if prevalence is None else prevalence
    close = [v for v in prevs if math.isclose(v, float(want), abs_tol=1e-9)]
    if not close:
        raise UsageError(f"sweep_coverage: prevalence {want} is not in the table for task {task!r}; measured: {prevs}")
    sft = sft[np.isclose(sft["prevalence"].astype(float), close[0])]
    sft = sft[sft["step"] == sft.groupby(["policy", "seed"])["step"].transform("max")]
    default = default_strategy(df)

    def curve(rows: pd.DataFrame) -> pd.DataFrame:
        per_seed = rows.groupby(["seed", "k"]).agg(value=("value", "mean"), lo=("ci_low", "mean"), hi=("ci_high", "mean"))
        g = per_seed.groupby("k")
        out = pd.DataFrame({"value": g["value"].mean(), "lo": g["value"].min(), "hi": g["value"].max(), "seeds": g.size()})
        one = out["seeds"] == 1
        out.loc[one, "lo"] = g["lo"].mean()[one]
        out.loc[one, "hi"] = g["hi"].mean()[one]
        return out.sort_index()

    lines = []
    base_rows = p[is_base & (p["strategy"] == default)]
    if not base_rows.empty:
        lines.append(("base", curve(base_rows), dict(color=BASE_COLOR, lw=2.0, ls="-", marker="o")))
    for i, (policy, strategy) in enumerate(chosen):
        rows = sft[(sft["policy"] == policy) & (sft["strategy"] == strategy)]
        if rows.empty:
            continue
        style = {k: v for k, v in _line_style(i, policy, strategy, default).items() if k not in ("capsize", "elinewidth", "ms")}
        lines.append((f"SFT {policy}" if strategy == default else f"SFT {policy} + {strategy}", curve(rows), style))
    return f"task {task}, fork prevalence {close[0]:g} ({default or 'default decoding'})", lines

