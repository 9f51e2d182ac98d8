"""Paper figures from the tidy results table (:mod:`analysis.table`).

Each public figure function takes the table and returns a :class:`matplotlib.figure.Figure`
built without pyplot, so nothing global changes, it works headless, and a notebook can restyle
it before saving. Style (seaborn "paper" context, "ticks" style, colour-blind-safe colours) is
applied inside each function through ``matplotlib.rc_context``. :func:`make_figures` draws every
figure the table supports and saves each as PDF (vector) and 200-dpi PNG.

Conventions shared by every figure (and by :mod:`analysis.report`):

- checkpoints are ordered by (phase: pretrain < sft < others, step);
- the *base* is the ``sft`` checkpoint at step 0 (the pretrained model before SFT); without one,
  the ``pretrain`` checkpoint with the largest step; without either, the first checkpoint;
- the base is drawn in black; later checkpoints take viridis colours in training order,
  earlier ones (older pretraining checkpoints) greys;
- pass@k uses one decoding strategy, by default :func:`default_strategy` (plain sampling at
  temperature 1 where the table has it).
"""

from __future__ import annotations

import math
import os
import uuid
import warnings
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Sequence

import matplotlib
import numpy as np
import pandas as pd
from cycler import cycler
from matplotlib.colors import Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from scipy import stats

from analysis.table import ALL_KINDS, COLUMNS, KINDS, SWEEP_COLUMNS
from training.errors import UsageError

__all__ = [
    "FIGURES",
    "coverage_curves",
    "dynamics",
    "lens_heatmap",
    "probe_heatmap",
    "entropy_vs_coverage",
    "shrinkage_vs_prevalence",
    "sweep_coverage",
    "make_figures",
    "checkpoint_order",
    "base_checkpoint",
    "final_checkpoint",
    "checkpoint_colors",
    "checkpoint_label",
    "default_strategy",
    "is_sweep_table",
    "pick_k",
    "sweep_shrinkage",
    "sweep_summary",
    "sweep_spearman",
    "KIND_COLORS",
]

FIGURES = (
    "coverage_curves",
    "dynamics",
    "lens_mass_top_branch",
    "lens_mass_valid",
    "probes",
    "entropy_vs_coverage",
    "shrinkage_vs_prevalence",
    "sweep_coverage",
)
"""Stable file stems, in the order :func:`make_figures` draws them."""

_PER_RUN = FIGURES[:6]
_SWEEP = FIGURES[6:]

# Okabe-Ito colours: distinguishable under the common colour-vision deficiencies.
KIND_COLORS = {
    "indecipherable": "#D55E00",
    "decipherable": "#0072B2",
    "multi-valid": "#009E73",
    "all": "#4D4D4D",
    "": "#4D4D4D",
}
_POLICY_COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00")
_STRATEGY_STYLES = ("-", "--", ":", "-.")
_BASE_COLOR = "#000000"
_COL_W = 3.4  # inches: one column of a two-column paper
_PAGE_W = 7.0  # inches: both columns

_ROW_KEYS = ["checkpoint", "metric", "kind", "layer", "k", "strategy"]


# --------------------------------------------------------------------------- style


def _style() -> AbstractContextManager:
    """Paper rc settings for the duration of one figure; nothing leaks into the caller's rcParams."""
    import seaborn as sns  # deferred: only the style dictionaries are needed

    rc = {}
    rc.update(sns.axes_style("ticks"))
    rc.update(sns.plotting_context("paper"))
    rc.update(
        {
            "axes.prop_cycle": cycler(color=sns.color_palette("colorblind")),
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": 8.5,
            "axes.labelsize": 8,
            "xtick.labelsize": 7,
            "ytick.labelsize": 7,
            "legend.fontsize": 6.5,
            "legend.title_fontsize": 6.5,
            "legend.frameon": False,
            "font.size": 7.5,
            "pdf.fonttype": 42,  # editable text in the PDF
            "ps.fonttype": 42,
            "savefig.dpi": 200,
            "figure.dpi": 100,
        }
    )
    return matplotlib.rc_context(rc)


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


# --------------------------------------------------------------------------- table reading


def _require_columns(df: pd.DataFrame) -> None:
    if not isinstance(df, pd.DataFrame):
        raise UsageError(f"expected a results table (pandas DataFrame), got {type(df).__name__}; load it with pandas.read_parquet")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise UsageError(f"not a results table: missing column(s) {', '.join(missing)}; build it with analysis.table.to_frame")
    if df.empty:
        raise UsageError("the results table is empty; run `probes run` first")


def is_sweep_table(df: pd.DataFrame) -> bool:
    """True when the table has every sweep column (task, prevalence, policy, seed)."""
    return all(c in df.columns for c in SWEEP_COLUMNS)


def _phase_rank(phase: str) -> int:
    return {"pretrain": 0, "sft": 1}.get(str(phase), 2)


def _checkpoint_info(df: pd.DataFrame) -> pd.DataFrame:
    """Checkpoints in training order, indexed by name, with phase and step."""
    info = df[["checkpoint", "phase", "step"]].drop_duplicates()
    clash = info["checkpoint"][info["checkpoint"].duplicated()]
    if len(clash):
        raise UsageError(
            f"checkpoint {clash.iloc[0]!r} appears with several (phase, step) pairs; the table mixes runs, filter it to one run first"
        )
    info = info.assign(_rank=info["phase"].map(_phase_rank)).sort_values(["_rank", "phase", "step", "checkpoint"])
    return info.set_index("checkpoint")[["phase", "step"]]


def checkpoint_order(df: pd.DataFrame) -> list[str]:
    """Checkpoint names ordered by (phase: pretrain < sft < others, step)."""
    return list(_checkpoint_info(df).index)


def _base_of(info: pd.DataFrame) -> str:
    sft0 = info[(info["phase"] == "sft") & (info["step"] == 0)]
    if len(sft0):
        return str(sft0.index[0])
    pre = info[info["phase"] == "pretrain"]
    if len(pre):
        return str(pre["step"].idxmax())
    return str(info.index[0])


def base_checkpoint(df: pd.DataFrame) -> str:
    """The pretrained model before SFT: sft step 0, else the last pretrain checkpoint, else the first."""
    return _base_of(_checkpoint_info(df))


def final_checkpoint(df: pd.DataFrame) -> str:
    """The last checkpoint in training order (the base itself when it is the only one)."""
    return checkpoint_order(df)[-1]


def checkpoint_colors(df: pd.DataFrame) -> dict[str, tuple]:
    """One colour per checkpoint, the same in every figure: base black, later ones viridis, earlier ones grey."""
    order = checkpoint_order(df)
    base = base_checkpoint(df)
    i_base = order.index(base)
    before, after = order[:i_base], order[i_base + 1 :]
    cmap = matplotlib.colormaps["viridis"]
    colors: dict[str, tuple] = {base: to_rgb(_BASE_COLOR)}
    for j, name in enumerate(after):
        frac = 0.5 if len(after) == 1 else j / (len(after) - 1)
        colors[name] = tuple(cmap(0.18 + 0.7 * frac)[:3])
    for j, name in enumerate(before):
        g = 0.75 - 0.35 * (j / max(len(before) - 1, 1))
        colors[name] = (g, g, g)
    return colors


def checkpoint_label(df: pd.DataFrame, name: str, *, short: bool = False) -> str:
    """Readable label: 'base' for the base, 'SFT step 400' (or '400' when short), 'pretrain step 9000'."""
    info = _checkpoint_info(df)
    if name == _base_of(info):
        return "base"
    phase, step = info.loc[name, "phase"], int(info.loc[name, "step"])
    if phase == "sft":
        return str(step) if short else f"SFT step {step}"
    return f"{phase} {step}" if short else f"{phase} step {step}"


def _strategy_rank(name: str) -> int:
    s = name.lower()
    if s in ("temperature:1", "temperature:1.0"):
        return 0
    if s.startswith("temperature:"):
        return 1
    if s.startswith(("top_p:", "top-p:")):
        return 2
    if s.startswith(("min_p:", "min-p:")):
        return 3
    if s.startswith("fork"):  # the diversity-encouraging strategies
        return 6
    if s == "greedy":
        return 5
    return 4


def default_strategy(df: pd.DataFrame) -> str:
    """The pass@k strategy figures use unless told: a plain baseline, preferring temperature 1.

    Ranked by kind (temperature:1, other temperatures, top_p, min_p, others, greedy, fork_*),
    then by how many rows use it, then by name.
    """
    p = df[df["metric"] == "pass@k"]
    if p.empty:
        raise UsageError("the table has no pass@k rows; measure with sampling (probes run --n-samples ...)")
    counts = p["strategy"].value_counts()
    return sorted(counts.index, key=lambda s: (_strategy_rank(str(s)), -int(counts[s]), str(s)))[0]


def _kind_rows(sub: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Rows of one kind; 'all' falls back to '' (metrics measured without a kind split)."""
    out = sub[sub["kind"] == kind]
    if out.empty and kind == "all":
        out = sub[sub["kind"] == ""]
    return out


def _rows(
    df: pd.DataFrame,
    metric: str,
    *,
    what: str,
    kind: str | None = None,
    strategy: str | None = None,
    one_run: bool = True,
) -> pd.DataFrame:
    """Rows of one metric (and kind / strategy), refusing an empty selection with a clear reason."""
    sub = df[df["metric"] == metric]
    if sub.empty:
        raise UsageError(f"{what} needs {metric} rows and the table has none")
    if kind is not None:
        have = sorted(set(sub["kind"]))
        sub = _kind_rows(sub, kind)
        if sub.empty:
            raise UsageError(f"{what} needs {metric} rows of kind {kind!r}; the table has kinds {have}")
    if strategy is not None:
        have = sorted(set(sub["strategy"]))
        sub = sub[sub["strategy"] == strategy]
        if sub.empty:
            raise UsageError(f"{what} needs {metric} rows for strategy {strategy!r}; the table has {have}")
    if one_run and sub.duplicated(subset=_ROW_KEYS).any():
        raise UsageError(
            f"{what}: the table holds several {metric} rows per checkpoint/kind/layer/k/strategy "
            "(a sweep or a concatenation of runs); filter it to one run first"
        )
    return sub


def _pick_kind(df: pd.DataFrame, metric: str, preferred: Sequence[str]) -> str | None:
    """First kind in `preferred` (then any) that `metric` has rows for; None when it has none."""
    kinds = set(df.loc[df["metric"] == metric, "kind"])
    for k in list(preferred) + list(ALL_KINDS) + [""]:
        if k in kinds:
            return k
    return None


def pick_k(ks: Sequence[int], want: int = 16) -> int:
    """`want` when measured, else the largest k measured."""
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise UsageError("no pass@k values of k in the table")
    return want if want in ks else ks[-1]


def _series(sub: pd.DataFrame, col: str = "value") -> dict[str, float]:
    return {str(c): float(v) for c, v in zip(sub["checkpoint"], sub[col])}


def _kind_label(kind: str) -> str:
    return "all kinds" if kind in ("all", "") else kind


def _fmt_num(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def _correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Pearson r and Spearman rho; NaN when fewer than 3 points or a constant input."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return _correlations(np.asarray(x, float), np.asarray(y, float))[1]


# --------------------------------------------------------------------------- per-run figures


def _k_axis(ax, ks: Sequence[int]) -> None:
    """The pass@k axes every coverage figure shares: log2 k with the measured k as ticks."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k (fraction of problems)")


def coverage_curves(df: pd.DataFrame, *, kind: str = "all", strategy: str | None = None) -> Figure:
    """pass@k against k (log2 axis), one line per checkpoint with its bootstrap band; base in black."""
    _require_columns(df)
    strategy = default_strategy(df) if strategy is None else strategy
    sub = _rows(df, "pass@k", what="coverage_curves", kind=kind, strategy=strategy)
    sub = sub[sub["k"].notna()]
    colors = checkpoint_colors(df)
    base = base_checkpoint(df)
    order = [c for c in checkpoint_order(df) if c in set(sub["checkpoint"])]
    ks = sorted({int(k) for k in sub["k"]})
    with _style():
        fig = _new_figure(_COL_W, 2.7 if len(order) <= 6 else 2.7 + 0.14 * math.ceil(len(order) / 3))
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
        _k_axis(ax, ks)
        ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]), top=min(1.02, max(ax.get_ylim()[1], 0.05)))
        ax.set_title(f"Coverage ({_kind_label(kind)}; {strategy or 'default decoding'})")
        if len(order) <= 6:
            ax.legend(loc="best", handlelength=1.5)
        else:  # many checkpoints: below the axes, where the legend hides no curve
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, handlelength=1.5, columnspacing=0.8)
    return fig


def _sft_axis(df: pd.DataFrame) -> dict[str, int]:
    """Checkpoint -> SFT step for the base (0) and every SFT checkpoint, in training order."""
    info = _checkpoint_info(df)
    base = _base_of(info)
    xs = {base: 0}
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


def dynamics(df: pd.DataFrame, *, strategy: str | None = None) -> Figure:
    """How the measures move over SFT: pass@1/pass@16, fork entropy per kind, top-branch share per kind.

    x is the SFT step (the base at 0; symlog when steps span more than 20x). Panels without rows
    in the table are left out; at least one must remain.
    """
    _require_columns(df)
    xs = _sft_axis(df)
    if len(xs) < 2:
        raise UsageError(f"dynamics needs the base and at least one SFT checkpoint; the table has {len(xs)} on the SFT axis")
    names = list(xs)
    panels: list[Callable] = []

    has = set(df["metric"])
    if "pass@k" in has:
        strat = default_strategy(df) if strategy is None else strategy
        p = _rows(df, "pass@k", what="dynamics", kind="all", strategy=strat)
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
        sub = _rows(df, metric, what="dynamics")
        sub = sub[sub["checkpoint"].isin(names)]
        kinds = [k for k in KINDS if k in set(sub["kind"])] or [k for k in ("all", "") if k in set(sub["kind"])]
        if not kinds:
            return None

        def draw(ax):
            for kind in kinds:
                d = sub[sub["kind"] == kind].set_index("checkpoint")
                d = d.reindex([n for n in names if n in d.index])
                ax.plot([xs[n] for n in d.index], d["value"].to_numpy(float), color=KIND_COLORS[kind], marker="o", ms=3, lw=1.3, label=_kind_label(kind))
            if extra is not None:
                extra(ax)
            ax.set_ylabel(ylabel)
            ax.legend(loc="best")

        return draw

    def draw_other(ax):
        if "entropy_other" not in has:
            return
        o = _rows(df, "entropy_other", what="dynamics")
        o = _kind_rows(o, "all") if not _kind_rows(o, "all").empty else o
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

    with _style():
        fig = _new_figure(_COL_W, 0.6 + 1.55 * len(panels))
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for ax, draw in zip(axes, panels):
            draw(ax)
            _step_axis(ax, list(xs.values()))
        for ax in axes[:-1]:
            ax.tick_params(labelbottom=False)
        axes[-1].set_xlabel("SFT step (0 = base)")
        fig.align_ylabels(axes)
    return fig


def _heatmap(ax, mat: np.ndarray, *, xlabels, ylabels, cmap, norm, annotate: bool, fontsize: float):
    """Cells as a QuadMesh (one per layer x checkpoint), optionally with the value written in."""
    nrow, ncol = mat.shape
    mesh = ax.pcolormesh(
        np.arange(ncol + 1) - 0.5, np.arange(nrow + 1) - 0.5, np.ma.masked_invalid(mat), cmap=cmap, norm=norm, shading="flat"
    )
    ax.set_xticks(range(ncol))
    rotate = ncol > 4 or max((len(s) for s in xlabels), default=0) > 6
    ax.set_xticklabels(xlabels, rotation=45 if rotate else 0, ha="right" if rotate else "center", rotation_mode="anchor")
    ax.set_yticks(range(nrow))
    ax.set_yticklabels(ylabels)
    ax.set_xlim(-0.5, ncol - 0.5)
    ax.set_ylim(-0.5, nrow - 0.5)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)
    if annotate:
        cm = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
        for i in range(nrow):
            for j in range(ncol):
                v = mat[i, j]
                if np.isfinite(v):
                    r, g, b = to_rgb(cm(norm(v)))
                    dark = 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fontsize, color="white" if dark else "black")
    return mesh


def _layer_matrix(df: pd.DataFrame, sub: pd.DataFrame) -> tuple[np.ndarray, list[str], list[int]]:
    """layer x checkpoint matrix of values (NaN where not measured), checkpoints in training order."""
    sub = sub[sub["layer"].notna()]
    order = [c for c in checkpoint_order(df) if c in set(sub["checkpoint"])]
    layers = sorted({int(x) for x in sub["layer"]})
    piv = sub.assign(layer=sub["layer"].astype(int)).pivot(index="layer", columns="checkpoint", values="value")
    piv = piv.reindex(index=layers, columns=order)
    return piv.to_numpy(float), order, layers


def _heatmap_size(ncol: int, nrow: int, *, panels: int = 1) -> tuple[float, float, bool, float]:
    """(width, height, annotate?, font size) for `panels` heatmaps side by side, at most a page wide.

    Cells are annotated only while a cell stays wide and tall enough to hold "0.00".
    """
    fixed = 1.3  # y labels, colorbar, margins
    width = min(max(_COL_W if panels == 1 else _PAGE_W, fixed + 0.42 * ncol * panels), _PAGE_W)
    cell_w = (width - fixed) / (ncol * panels)
    height = 1.2 + 0.24 * max(nrow, 3)
    annotate = cell_w >= 0.2 and nrow <= 32
    fontsize = 6.0 if cell_w >= 0.32 else 5.0
    return width, height, annotate, fontsize


_LENS_LABELS = {
    "lens_mass_top_branch": ("top-branch share\n(probability)", (0.0, 1.0), "viridis"),
    "lens_mass_valid": ("valid-branch mass\n(probability)", (0.0, 1.0), "viridis"),
    "lens_kl_final": ("KL(final ‖ layer)\n(nats)", None, "magma_r"),
}


def lens_heatmap(df: pd.DataFrame, *, metric: str = "lens_mass_top_branch", kind: str = "indecipherable") -> Figure:
    """Logit lens: a metric per layer (y; 0 = residual before block 0) and checkpoint (x), cells annotated."""
    _require_columns(df)
    if metric not in _LENS_LABELS:
        raise UsageError(f"lens_heatmap draws one of {', '.join(_LENS_LABELS)}, not {metric!r}")
    sub = _rows(df, metric, what=f"lens_heatmap({metric})", kind=kind)
    mat, order, layers = _layer_matrix(df, sub)
    if mat.size == 0:
        raise UsageError(f"lens_heatmap needs {metric} rows with a layer; the table has none")
    label, lims, cmap = _LENS_LABELS[metric]
    vmin, vmax = lims if lims else (0.0, float(np.nanmax(mat)) if np.isfinite(mat).any() else 1.0)
    norm = Normalize(vmin=vmin, vmax=max(vmax, vmin + 1e-12))
    width, height, annotate, fs = _heatmap_size(len(order), len(layers))
    with _style():
        fig = _new_figure(width, height)
        ax = fig.add_subplot()
        mesh = _heatmap(
            ax,
            mat,
            xlabels=[checkpoint_label(df, c, short=True) for c in order],
            ylabels=[str(l) for l in layers],
            cmap=cmap,
            norm=norm,
            annotate=annotate,
            fontsize=fs,
        )
        cb = fig.colorbar(mesh, ax=ax, shrink=0.9, pad=0.02)
        cb.set_label(label)
        cb.outline.set_visible(False)
        ax.set_xlabel("checkpoint (SFT step)")
        ax.set_ylabel("layer (0 = before block 0)")
        ax.set_title(f"Logit lens, {_kind_label(kind)} forks")
    return fig


_PROBE_PANELS = (
    ("probe_acc_taken", "taken branch"),
    ("probe_acc_valid", "valid branch"),
    ("probe_selectivity_taken", "taken branch"),
    ("probe_selectivity_valid", "valid branch"),
)


def probe_heatmap(df: pd.DataFrame, *, kind: str | None = None) -> Figure:
    """Linear probes: accuracy (top row) and selectivity = accuracy - control accuracy (bottom row).

    Each panel is layer x checkpoint; `kind` defaults to 'all' (else whatever kind the probes have).
    A probe the table lacks leaves its panel with a note instead of cells.
    """
    _require_columns(df)
    present = [m for m, _ in _PROBE_PANELS if m in set(df["metric"])]
    if not present:
        raise UsageError("probe_heatmap needs probe_acc_* / probe_selectivity_* rows; the table has none (run with probes on)")
    if kind is None:
        kind = _pick_kind(df, present[0], ["all", ""])
    mats = {}
    for metric in present:
        sub = _kind_rows(df[df["metric"] == metric], kind)
        if sub.empty:
            continue
        _rows(sub, metric, what="probe_heatmap")  # one run only
        mats[metric] = _layer_matrix(df, sub)
    if not mats:
        raise UsageError(f"probe_heatmap needs probe rows of kind {kind!r}; the table has none")
    ncol = max(len(o) for _, o, _ in mats.values())
    nrow = max(len(l) for _, _, l in mats.values())
    w, h, annotate, fs = _heatmap_size(ncol, nrow, panels=2)
    sel_max = max([float(np.nanmax(np.abs(m))) for name, (m, _, _) in mats.items() if "selectivity" in name and np.isfinite(m).any()] or [0.5])
    norms = {"acc": Normalize(0.0, 1.0), "sel": Normalize(-sel_max, sel_max)}
    with _style():
        fig = _new_figure(w, 2 * h + 0.2)
        axes = fig.subplots(2, 2, squeeze=False)
        meshes = {}
        for ax, (metric, title) in zip(axes.flat, _PROBE_PANELS):
            row = "sel" if "selectivity" in metric else "acc"
            ax.set_title(f"{'accuracy' if row == 'acc' else 'selectivity'}, {title}")
            if metric not in mats:
                ax.text(0.5, 0.5, f"{metric}\nnot in the table", ha="center", va="center", transform=ax.transAxes, color="0.4")
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            mat, order, layers = mats[metric]
            meshes[row] = _heatmap(
                ax,
                mat,
                xlabels=[checkpoint_label(df, c, short=True) for c in order],
                ylabels=[str(l) for l in layers],
                cmap="viridis" if row == "acc" else "RdBu_r",
                norm=norms[row],
                annotate=annotate,
                fontsize=fs,
            )
            ax.set_xlabel("checkpoint (SFT step)")
        for ax in axes[:, 0]:
            ax.set_ylabel("layer (0 = before block 0)")
        for r, row in enumerate(("acc", "sel")):
            if row in meshes:
                cb = fig.colorbar(meshes[row], ax=list(axes[r]), shrink=0.9, pad=0.02)
                cb.set_label("accuracy" if row == "acc" else "selectivity\n(acc. - control acc.)")
                cb.outline.set_visible(False)
        fig.suptitle(f"Linear probes at forks ({_kind_label(kind)})", fontsize=8.5)
    return fig


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


def entropy_vs_coverage(df: pd.DataFrame, *, kind: str = "indecipherable", strategy: str | None = None) -> Figure:
    """Fork entropy (x) against pass@16 - pass@1 (y), one point per checkpoint; Pearson r and Spearman rho in the legend."""
    _require_columns(df)
    strategy = default_strategy(df) if strategy is None else strategy
    ent = _rows(df, "entropy_fork", what="entropy_vs_coverage", kind=kind)
    p = _rows(df, "pass@k", what="entropy_vs_coverage", kind="all", strategy=strategy)
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
    r, rho = _correlations(x, y)
    colors = checkpoint_colors(df)
    with _style():
        fig = _new_figure(_COL_W, 2.8)
        ax = fig.add_subplot()
        ax.plot(x, y, color="0.8", lw=0.8, zorder=1)  # training trajectory
        ax.scatter(x, y, c=[colors[c] for c in order], s=22, edgecolors="white", linewidths=0.5, zorder=3)
        rising = len(order) >= 2 and np.ptp(x) > 0 and np.polyfit(x, y, 1)[0] > 0
        offset = (4, -7) if rising else (4, 3)  # the side of each point away from the trend line
        for i in _spaced(x, y, first=[order.index(base_checkpoint(df))] if base_checkpoint(df) in order else []):
            ax.annotate(checkpoint_label(df, order[i], short=True), (x[i], y[i]), xytext=offset, textcoords="offset points", fontsize=5.5, color="0.3")
        label = f"Pearson r = {_fmt_num(r)}\nSpearman ρ = {_fmt_num(rho)}\n({len(order)} checkpoints{'' if len(order) >= 3 else '; r, ρ need ≥ 3'})"
        if len(order) >= 2 and np.ptp(x) > 0:
            slope, icpt = np.polyfit(x, y, 1)
            xx = np.linspace(x.min(), x.max(), 2)
            ax.plot(xx, slope * xx + icpt, color="#D55E00", lw=0.9, ls="--", zorder=2, label=label)
        else:  # constant entropy: no fit line, the legend still reports the correlations
            ax.plot([], [], " ", label=label)
        ax.legend(loc="best", handlelength=1.5)
        ax.set_xlabel(f"entropy at {_kind_label(kind)} forks (nats)")
        ax.set_ylabel(f"pass@{kmax} − pass@1 (fraction)")
        ax.set_title(f"Entropy vs coverage gap ({strategy or 'default decoding'})")
        ax.margins(0.12)
    return fig


# --------------------------------------------------------------------------- sweeps


def _require_sweep(df: pd.DataFrame, what: str) -> None:
    _require_columns(df)
    if not is_sweep_table(df):
        missing = [c for c in SWEEP_COLUMNS if c not in df.columns]
        raise UsageError(f"{what} needs a sweep table (columns {', '.join(SWEEP_COLUMNS)}); missing: {', '.join(missing)}")


def _sweep_base_mask(p: pd.DataFrame) -> pd.Series:
    """Base rows per (task, seed): sft step 0, else the last pretrain step (the same rule as base_checkpoint)."""
    sft0 = (p["phase"] == "sft") & (p["step"] == 0)
    group = [p["task"], p["seed"]]
    has_sft0 = sft0.groupby(group).transform("any")
    pre = p["phase"] == "pretrain"
    pre_max = p["step"].where(pre).groupby(group).transform("max")
    return sft0 | (~has_sft0 & pre & (p["step"] == pre_max))


def _sweep_pass(df: pd.DataFrame, what: str) -> pd.DataFrame:
    _require_sweep(df, what)
    p = df[df["metric"] == "pass@k"]
    if p.empty:
        raise UsageError(f"{what} needs pass@k rows and the table has none")
    p = _kind_rows(p, "all")
    if p.empty:
        raise UsageError(f"{what} needs pass@k rows of kind 'all' (or no kind)")
    return p[p["k"].notna()].assign(k=lambda d: d["k"].astype(int))


def sweep_shrinkage(df: pd.DataFrame, *, k: int | None = None) -> pd.DataFrame:
    """Per sweep cell (task, prevalence, policy, seed) and strategy: base vs final SFT pass@1 and pass@K.

    The base is that task/seed's base row (sft step 0) with the same strategy; the final SFT
    checkpoint is the cell's largest step. shrinkage = base pass@K - final pass@K;
    pass1_gain = final pass@1 - base pass@1. K = 16 unless absent (then the largest k) or given.
    """
    p = _sweep_pass(df, "sweep_shrinkage")
    kk = pick_k(p["k"]) if k is None else int(k)
    if 1 not in set(p["k"]) or kk not in set(p["k"]):
        raise UsageError(f"sweep_shrinkage needs pass@1 and pass@{kk}; the table has k = {sorted(set(p['k']))}")
    p = p[p["k"].isin([1, kk])]
    is_base = _sweep_base_mask(p)
    base = p[is_base].groupby(["task", "seed", "strategy", "k"])["value"].mean().unstack("k")
    sft = p[~is_base & (p["phase"] != "pretrain")]
    if sft.empty or base.empty:
        raise UsageError("sweep_shrinkage needs both base rows (sft step 0) and later SFT rows")
    cell = ["task", "prevalence", "policy", "seed"]
    last = sft.groupby(cell)["step"].transform("max")
    fin = sft[sft["step"] == last]
    fin_v = fin.groupby(cell + ["strategy", "k"])["value"].mean().unstack("k")
    meta = fin.groupby(cell + ["strategy"]).agg(final_checkpoint=("checkpoint", "first"), final_step=("step", "first"))
    out = fin_v.join(meta).reset_index()
    b = base.rename(columns={1: "base_pass1", kk: "base_passk"}).reset_index()
    out = out.rename(columns={1: "final_pass1", kk: "final_passk"}).merge(b, on=["task", "seed", "strategy"], how="inner")
    out["k"] = kk
    out["shrinkage"] = out["base_passk"] - out["final_passk"]
    out["pass1_gain"] = out["final_pass1"] - out["base_pass1"]
    out = out.dropna(subset=["shrinkage", "pass1_gain"])
    if out.empty:
        raise UsageError("sweep_shrinkage found no cell whose strategy was also measured on its base")
    cols = cell + ["strategy", "k", "final_checkpoint", "final_step", "base_pass1", "final_pass1", "base_passk", "final_passk", "shrinkage", "pass1_gain"]
    return out[cols].sort_values(cell + ["strategy"]).reset_index(drop=True)


def sweep_summary(shrink: pd.DataFrame) -> pd.DataFrame:
    """Mean, s.d. (ddof=1; 0 with one seed), min and max over seeds of shrinkage and pass@1 gain."""
    g = shrink.groupby(["task", "prevalence", "policy", "strategy"])
    out = g.agg(
        shrinkage_mean=("shrinkage", "mean"),
        shrinkage_std=("shrinkage", lambda s: float(s.std(ddof=1)) if len(s) > 1 else 0.0),
        shrinkage_min=("shrinkage", "min"),
        shrinkage_max=("shrinkage", "max"),
        pass1_gain_mean=("pass1_gain", "mean"),
        pass1_gain_std=("pass1_gain", lambda s: float(s.std(ddof=1)) if len(s) > 1 else 0.0),
        n_seeds=("seed", "nunique"),
    )
    return out.reset_index()


def sweep_spearman(shrink: pd.DataFrame) -> pd.DataFrame:
    """Spearman rho between prevalence and shrinkage per (task, policy, strategy): ``rho`` over every
    seed's cell, ``rho_seed_means`` over the per-prevalence means (seed noise averaged out first)."""
    rows = []
    for (task, policy, strategy), g in shrink.groupby(["task", "policy", "strategy"]):
        means = g.groupby("prevalence")["shrinkage"].mean()
        rows.append(
            {
                "task": task,
                "policy": policy,
                "strategy": strategy,
                "rho": _spearman(g["prevalence"].to_numpy(float), g["shrinkage"].to_numpy(float)),
                "rho_seed_means": _spearman(means.index.to_numpy(float), means.to_numpy(float)),
                "n": len(g),
            }
        )
    return pd.DataFrame(rows, columns=["task", "policy", "strategy", "rho", "rho_seed_means", "n"])


def _policy_order(policies) -> list[str]:
    return sorted(set(policies), key=lambda p: ({"canonical": 0, "balanced": 1}.get(p, 2), p))


def _strategy_order(df: pd.DataFrame, strategies) -> list[str]:
    default = default_strategy(df)
    return sorted(set(strategies), key=lambda s: (s != default, _strategy_rank(s), s))


def shrinkage_vs_prevalence(df: pd.DataFrame) -> Figure:
    """Per task: shrinkage (top) and pass@1 gain (bottom) against fork prevalence, one line per (policy, strategy).

    Points are means over seeds, error bars one s.d. over seeds; the legend gives Spearman rho
    between prevalence and shrinkage over every seed's cell.
    """
    shrink = sweep_shrinkage(df)
    summ = sweep_summary(shrink)
    rhos = sweep_spearman(shrink).set_index(["task", "policy", "strategy"])["rho"]
    tasks = sorted(set(shrink["task"]))
    policies = _policy_order(shrink["policy"])
    strategies = _strategy_order(df, shrink["strategy"])
    kk = int(shrink["k"].iloc[0])
    with _style():
        width = max(_COL_W, 2.6 * len(tasks)) if len(tasks) > 3 else min(max(_COL_W, 2.6 * len(tasks)), _PAGE_W)
        legend_fs = 6.5 if width / len(tasks) >= 2.6 else 5.5
        fig = _new_figure(width, 4.6)
        axes = fig.subplots(2, len(tasks), sharex=True, squeeze=False)
        for j, task in enumerate(tasks):
            top, bottom = axes[0, j], axes[1, j]
            for pi, policy in enumerate(policies):
                for si, strategy in enumerate(strategies):
                    d = summ[(summ["task"] == task) & (summ["policy"] == policy) & (summ["strategy"] == strategy)].sort_values("prevalence")
                    if d.empty:
                        continue
                    style = dict(
                        color=_POLICY_COLORS[pi % len(_POLICY_COLORS)],
                        ls=_STRATEGY_STYLES[si % len(_STRATEGY_STYLES)],
                        marker="os^D"[si % 4],
                        ms=3,
                        lw=1.2,
                        capsize=1.5,
                        elinewidth=0.8,
                    )
                    rho = rhos.get((task, policy, strategy), math.nan)
                    x = d["prevalence"].to_numpy(float)
                    label = f"{policy}, {strategy} (ρ = {_fmt_num(rho)})"
                    top.errorbar(x, d["shrinkage_mean"].to_numpy(float), yerr=d["shrinkage_std"].to_numpy(float), label=label, **style)
                    bottom.errorbar(x, d["pass1_gain_mean"].to_numpy(float), yerr=d["pass1_gain_std"].to_numpy(float), **style)
            for ax in (top, bottom):
                ax.axhline(0, color="0.8", lw=0.6, zorder=0)
            top.set_title(f"task: {task}")
            bottom.set_xlabel("fork prevalence (share of SFT examples)" if len(tasks) < 3 else "fork prevalence (share)")
            handles, labels = top.get_legend_handles_labels()
            if handles:  # below the column, where it hides no data
                bottom.legend(
                    handles,
                    labels,
                    loc="upper center",
                    bbox_to_anchor=(0.5, -0.32),
                    title="policy, strategy (ρ: prevalence vs shrinkage)",
                    handlelength=2.2,
                    fontsize=legend_fs,
                    title_fontsize=legend_fs,
                )
        axes[0, 0].set_ylabel(f"shrinkage (fraction)\nbase − SFT pass@{kk}")
        axes[1, 0].set_ylabel("pass@1 gain (fraction)\nSFT − base pass@1")
        fig.align_ylabels(axes[:, 0])
        n_seeds = shrink["seed"].nunique()
        spread = "one seed" if n_seeds == 1 else f"mean ± s.d. over {n_seeds} seeds"
        fig.suptitle(f"Shrinkage vs fork prevalence ({spread})", fontsize=8.5)
    return fig


def sweep_coverage(df: pd.DataFrame, *, task: str | None = None, prevalence: float | None = None) -> Figure:
    """pass@k curves of the base, each policy's final SFT model, and canonical SFT with each diversity strategy.

    One panel per task (``task`` picks one), each at ``prevalence`` (default: the task's highest).
    Values are means over seeds; bands are the min-max over seeds (the bootstrap interval when
    there is one seed).
    """
    p = _sweep_pass(df, "sweep_coverage")
    tasks = sorted(set(p["task"]))
    if task is not None and task not in tasks:
        raise UsageError(f"sweep_coverage: task {task!r} is not in the table; tasks: {', '.join(map(str, tasks))}")
    panels = [_sweep_coverage_panel(df, p[p["task"] == t], t, prevalence) for t in ([task] if task is not None else tasks)]
    ks = sorted(set(p["k"]))
    with _style():
        n = len(panels)
        fig = _new_figure(_COL_W if n == 1 else min(_PAGE_W, _COL_W * n * 0.9), 3.3)
        axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
        for ax, (title, lines) in zip(axes, panels):
            for label, c, style in lines:
                ax.plot(c.index.to_numpy(int), c["value"].to_numpy(float), label=label, ms=2.5, **style)
                if np.isfinite(c["lo"].to_numpy(float)).any():
                    ax.fill_between(c.index.to_numpy(int), c["lo"].to_numpy(float), c["hi"].to_numpy(float), color=style["color"], alpha=0.13, lw=0)
            _k_axis(ax, ks)
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


def _sweep_coverage_panel(df: pd.DataFrame, p: pd.DataFrame, task: str, prevalence: float | None):
    """(title, [(label, curve, style)]) for one task's coverage panel."""
    is_base = _sweep_base_mask(p)
    sft = p[~is_base & (p["phase"] != "pretrain")]
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
    policies = _policy_order(sft["policy"])
    anchor = "canonical" if "canonical" in policies else policies[0]
    diversity = [s for s in _strategy_order(df, sft.loc[sft["policy"] == anchor, "strategy"]) if s != default]

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
        lines.append(("base", curve(base_rows), dict(color=_BASE_COLOR, lw=2.0, ls="-", marker="o")))
    for i, policy in enumerate(policies):
        rows = sft[(sft["policy"] == policy) & (sft["strategy"] == default)]
        if not rows.empty:
            lines.append((f"SFT {policy}", curve(rows), dict(color=_POLICY_COLORS[i % len(_POLICY_COLORS)], lw=1.3, ls="-", marker="o")))
    for j, strategy in enumerate(diversity):
        rows = sft[(sft["policy"] == anchor) & (sft["strategy"] == strategy)]
        lines.append(
            (f"SFT {anchor} + {strategy}", curve(rows), dict(color=_POLICY_COLORS[policies.index(anchor) % len(_POLICY_COLORS)], lw=1.3, ls=_STRATEGY_STYLES[(j + 1) % 4], marker="s"))
        )
    return f"task {task}, fork prevalence {close[0]:g} ({default or 'default decoding'})", lines


# --------------------------------------------------------------------------- saving


_FORMATS = ("pdf", "png", "svg")


def _save_atomic(fig: Figure, path: Path, fmt: str) -> None:
    """Save to a hidden temp file beside `path`, then rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format=fmt, dpi=200, bbox_inches="tight", pad_inches=0.03)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _lens_kind(df: pd.DataFrame, metric: str) -> str:
    kind = _pick_kind(df, metric, ["indecipherable", "all", ""])
    if kind is None:
        raise UsageError(f"the table has no {metric} rows (run with the logit lens on)")
    return kind


def make_figures(df: pd.DataFrame, out_dir: str | os.PathLike, formats: Sequence[str] = ("pdf", "png")) -> tuple[list[Path], list[str]]:
    """Draw and save every figure the table supports; returns (files written, 'skipped <figure>: <why>' lines).

    Per-run figures need a table of one run; sweep figures need the sweep columns. A figure that
    cannot be drawn from this table is skipped with its reason, never raised.
    """
    _require_columns(df)
    bad = [f for f in formats if f not in _FORMATS]
    if bad or not formats:
        raise UsageError(f"figure formats must be among {', '.join(_FORMATS)}; got {list(formats)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep = is_sweep_table(df)

    def ent_kind() -> str:
        kind = _pick_kind(df, "entropy_fork", ["indecipherable", "all", ""])
        if kind is None:
            raise UsageError("entropy_vs_coverage needs entropy_fork rows and the table has none")
        return kind

    draws: dict[str, Callable[[], Figure]] = {
        "coverage_curves": lambda: coverage_curves(df),
        "dynamics": lambda: dynamics(df),
        "lens_mass_top_branch": lambda: lens_heatmap(df, metric="lens_mass_top_branch", kind=_lens_kind(df, "lens_mass_top_branch")),
        "lens_mass_valid": lambda: lens_heatmap(df, metric="lens_mass_valid", kind=_lens_kind(df, "lens_mass_valid")),
        "probes": lambda: probe_heatmap(df),
        "entropy_vs_coverage": lambda: entropy_vs_coverage(df, kind=ent_kind()),
        "shrinkage_vs_prevalence": lambda: shrinkage_vs_prevalence(df),
        "sweep_coverage": lambda: sweep_coverage(df),
    }
    written: list[Path] = []
    skipped: list[str] = []
    for name in FIGURES:
        if sweep and name in _PER_RUN:
            skipped.append(f"skipped {name}: this is a sweep table (many runs); filter it to one (task, prevalence, policy, seed) cell and drop the sweep columns to draw it")
            continue
        if not sweep and name in _SWEEP:
            skipped.append(f"skipped {name}: no sweep columns ({', '.join(SWEEP_COLUMNS)}) in the table")
            continue
        try:
            fig = draws[name]()
        except UsageError as exc:
            skipped.append(f"skipped {name}: {exc}")
            continue
        except Exception as exc:  # a figure bug must not cost the others; say so loudly
            warnings.warn(f"figure {name} failed: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
            skipped.append(f"skipped {name}: failed with {type(exc).__name__}: {exc}")
            continue
        try:
            for fmt in formats:
                path = out / f"{name}.{fmt}"
                _save_atomic(fig, path, fmt)
                written.append(path)
        finally:
            fig.clear()  # bare Figure (no pyplot registry): clearing frees the artists
    return written, skipped
