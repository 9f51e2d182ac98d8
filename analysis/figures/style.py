"""How every figure looks: the paper rc context, colours, sizes and the shared axes.

Style (seaborn "paper" context, "ticks" style, colour-blind-safe colours) is applied inside each
figure function through ``matplotlib.rc_context``, so nothing leaks into the caller's rcParams.
The base is drawn in black; later checkpoints take viridis colours in series order, earlier ones
(older pretraining checkpoints) greys.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Sequence

import matplotlib
import numpy as np
import pandas as pd
from cycler import cycler
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from analysis.conventions import base_checkpoint, checkpoint_order

__all__ = [
    "KIND_COLORS",
    "POLICY_COLORS",
    "STRATEGY_STYLES",
    "BASE_COLOR",
    "COL_W",
    "PAGE_W",
    "paper_style",
    "new_figure",
    "checkpoint_colors",
    "kind_label",
    "fmt_num",
    "k_axis",
]

# Okabe-Ito colours: distinguishable under the common colour-vision deficiencies.
KIND_COLORS = {
    "indecipherable": "#D55E00",
    "decipherable": "#0072B2",
    "multi-valid": "#009E73",
    "all": "#4D4D4D",
    "": "#4D4D4D",
}
POLICY_COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00")
STRATEGY_STYLES = ("-", "--", ":", "-.")
BASE_COLOR = "#000000"
COL_W = 3.4  # inches: one column of a two-column paper
PAGE_W = 7.0  # inches: both columns


def paper_style() -> AbstractContextManager:
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


def new_figure(width: float, height: float) -> Figure:
    """A bare Figure (no pyplot): headless, and a notebook can restyle it before saving."""
    return Figure(figsize=(width, height), layout="constrained")


def checkpoint_colors(df: pd.DataFrame) -> dict[str, tuple]:
    """One colour per checkpoint, the same in every figure: base black, later ones viridis, earlier ones grey."""
    order = checkpoint_order(df)
    base = base_checkpoint(df)
    i_base = order.index(base)
    before, after = order[:i_base], order[i_base + 1 :]
    cmap = matplotlib.colormaps["viridis"]
    colors: dict[str, tuple] = {base: to_rgb(BASE_COLOR)}
    for j, name in enumerate(after):
        frac = 0.5 if len(after) == 1 else j / (len(after) - 1)
        colors[name] = tuple(cmap(0.18 + 0.7 * frac)[:3])
    for j, name in enumerate(before):
        g = 0.75 - 0.35 * (j / max(len(before) - 1, 1))
        colors[name] = (g, g, g)
    return colors


def kind_label(kind: str) -> str:
    return "all kinds" if kind in ("all", "") else kind


def fmt_num(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def k_axis(ax, ks: Sequence[int]) -> None:
    """The pass@k axes every coverage figure shares: log2 k with the measured k as ticks."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k (fraction of problems)")
