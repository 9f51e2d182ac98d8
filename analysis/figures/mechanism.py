"""Per-run figures of the mechanism instruments: tuned vs logit lens, branch value, patching.

Each compares the base (black) with the final checkpoint (the series' last), the two ends of the
fine-tuning, and skips with a reason when the table lacks the instrument's rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.conventions import base_checkpoint, checkpoint_label, final_checkpoint, kind_rows, require_columns
from analysis.figures.registry import figure
from analysis.figures.style import BASE_COLOR, COL_W, KIND_COLORS, PAGE_W, checkpoint_colors, kind_label, new_figure, paper_style
from training.schema import KINDS
from training.errors import UsageError

__all__ = ["lens_kl", "branch_values", "patching_recovery"]


def _ends(df: pd.DataFrame) -> list[str]:
    base, final = base_checkpoint(df), final_checkpoint(df)
    return [base] if base == final else [base, final]


def _layer_curve(df: pd.DataFrame, metric: str, checkpoint: str, kind: str) -> pd.DataFrame:
    sub = kind_rows(df[(df["metric"] == metric) & (df["checkpoint"] == checkpoint) & df["layer"].notna()], kind)
    return sub.assign(layer=sub["layer"].astype(int)).sort_values("layer")


@figure(
    "lens_kl",
    scope="run",
    caption="KL(final ‖ layer) per layer at the forks, logit lens (dashed) and tuned lens (solid), base and final checkpoint; the last layer is the model itself (0).",
)
def lens_kl(df: pd.DataFrame, *, kind: str = "all") -> Figure:
    """How far each layer's reading is from the model's output, through the logit and the tuned lens."""
    require_columns(df)
    if not (df["metric"] == "tuned_lens_kl_final").any():
        raise UsageError("lens_kl needs tuned_lens_kl_final rows (probes run fits the tuned lens on task text unless --no-tuned-lens: native checkpoints, not an --eval file of your own)")
    colors = checkpoint_colors(df)
    with paper_style():
        fig = new_figure(COL_W, 2.6)
        ax = fig.add_subplot()
        for name in _ends(df):
            for metric, ls, what in (("lens_kl_final", "--", "logit"), ("tuned_lens_kl_final", "-", "tuned")):
                d = _layer_curve(df, metric, name, kind)
                if d.empty:
                    continue
                ax.plot(d["layer"], d["value"], ls=ls, marker="o", ms=2.5, lw=1.3, color=colors[name],
                        label=f"{checkpoint_label(df, name)}, {what} lens")
                if np.isfinite(d["ci_low"]).any():
                    ax.fill_between(d["layer"], d["ci_low"], d["ci_high"], color=colors[name], alpha=0.12, lw=0)
        ax.set_xticks(sorted({int(x) for x in df.loc[df["metric"] == "lens_kl_final", "layer"].dropna()}))
        ax.set_xlabel("layer (0 = before block 0; last = the model's output)")
        ax.set_ylabel("KL(final ‖ layer) (nats)")
        ax.set_title(f"Logit vs tuned lens, {kind_label(kind)} forks")
        ax.set_ylim(bottom=0)
        ax.legend(loc="best")
    return fig


@figure(
    "branch_value",
    scope="run",
    caption="Branch forcing: success rate after forcing the branch the checkpoint prefers, and the mean over valid branches, per kind, base and final checkpoint (95% intervals over problems).",
)
def branch_values(df: pd.DataFrame) -> Figure:
    """What each branch is worth: the preferred branch beside the valid ones, per kind."""
    require_columns(df)
    if not (df["metric"] == "branch_value_valid").any():
        raise UsageError("branch_value needs branch_value_* rows (probes run --forcing)")
    ends = _ends(df)
    kinds = [k for k in KINDS if ((df["metric"] == "branch_value_valid") & (df["kind"] == k)).any()] + ["all"]
    colors = checkpoint_colors(df)
    width = 0.8 / (2 * len(ends))
    with paper_style():
        fig = new_figure(min(PAGE_W, COL_W + 0.4 * len(kinds)), 3.0)
        ax = fig.add_subplot()
        x = np.arange(len(kinds))
        slot = 0
        for name in ends:
            for metric, hatch, what in (("branch_value_preferred", "", "preferred"), ("branch_value_valid", "//", "valid (mean)")):
                sub = df[(df["metric"] == metric) & (df["checkpoint"] == name)].set_index("kind").reindex(kinds)
                pos = x - 0.4 + width * (slot + 0.5)
                err = np.vstack([sub["value"] - sub["ci_low"], sub["ci_high"] - sub["value"]])
                ax.bar(pos, sub["value"], width, color=colors[name] if name != ends[0] else BASE_COLOR, alpha=0.85,
                       hatch=hatch, edgecolor="white", lw=0.4, yerr=np.where(np.isfinite(err), err, 0), capsize=1.5,
                       error_kw={"elinewidth": 0.6}, label=f"{checkpoint_label(df, name)}: {what}")
                slot += 1
        ax.set_xticks(x)
        ax.set_xticklabels([kind_label(k) for k in kinds])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("success rate after forcing\n(fraction of continuations)")
        ax.set_title("Branch value at the first fork")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    return fig


@figure(
    "patching",
    scope="run",
    caption="Activation patching at the forks: share of the final checkpoint's shift in top-branch share undone by the base's residual at each layer (1 = the base's branch mass restored), per kind.",
)
def patching_recovery(df: pd.DataFrame) -> Figure:
    """Where in depth the change SFT made at the fork lives: recovered share per layer and kind."""
    require_columns(df)
    final = final_checkpoint(df)
    sub = df[(df["metric"] == "patch_recovered_share") & (df["checkpoint"] == final)]
    if sub.empty:
        raise UsageError("patching needs patch_recovered_share rows of the final checkpoint (probes run --patching)")
    with paper_style():
        fig = new_figure(COL_W, 2.6)
        ax = fig.add_subplot()
        for kind in [k for k in KINDS if (sub["kind"] == k).any()] + ["all"]:
            d = _layer_curve(df, "patch_recovered_share", final, kind)
            if d.empty:
                continue
            ax.plot(d["layer"], d["value"], marker="o", ms=2.5, lw=1.6 if kind == "all" else 1.1,
                    color=KIND_COLORS[kind], label=kind_label(kind))
            ax.fill_between(d["layer"], d["ci_low"], d["ci_high"], color=KIND_COLORS[kind], alpha=0.12, lw=0)
        ax.axhline(0, color="0.8", lw=0.6, zorder=0)
        ax.axhline(1, color="0.8", lw=0.6, ls=":", zorder=0)
        ax.set_xticks(sorted(int(x) for x in sub["layer"].dropna().unique()))
        ax.set_xlabel("patched layer (0 = before block 0; last = after the last block)")
        ax.set_ylabel("recovered share of SFT's shift")
        ax.set_title(f"Patching {checkpoint_label(df, base_checkpoint(df))} → {checkpoint_label(df, final)}")
        ax.legend(loc="best")
    return fig
