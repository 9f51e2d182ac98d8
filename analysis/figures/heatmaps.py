"""Per-run heatmaps, layer x checkpoint: the logit lens and the linear probes."""

from __future__ import annotations

from typing import Callable

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, TwoSlopeNorm, to_rgb
from matplotlib.figure import Figure

from analysis.conventions import checkpoint_label, checkpoint_order, kind_rows, pick_kind, require_columns, select_rows
from analysis.figures.registry import figure
from analysis.figures.style import COL_W, PAGE_W, kind_label, new_figure, paper_style
from training.errors import UsageError

__all__ = ["PROBE_KINDS", "PROBE_TARGETS", "lens_heatmap", "probe_heatmap"]


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
    width = min(max(COL_W if panels == 1 else PAGE_W, fixed + 0.42 * ncol * panels), PAGE_W)
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


def _lens_args(metric: str) -> Callable[[pd.DataFrame], dict[str, str]]:
    """make_figures' arguments for one lens stem: that metric at indecipherable forks (else any kind it has)."""

    def kwargs(df: pd.DataFrame) -> dict[str, str]:
        kind = pick_kind(df, metric, ["indecipherable", "all", ""])
        if kind is None:
            raise UsageError(f"the table has no {metric} rows (run with the logit lens on)")
        return {"metric": metric, "kind": kind}

    return kwargs


@figure(
    "lens_mass_top_branch",
    scope="run",
    caption="Logit lens: top-branch share per layer (y) and checkpoint (x) at indecipherable forks.",
    kwargs=_lens_args("lens_mass_top_branch"),
)
def lens_heatmap(df: pd.DataFrame, *, metric: str = "lens_mass_top_branch", kind: str = "indecipherable") -> Figure:
    """Logit lens: a metric per layer (y; 0 = residual before block 0) and checkpoint (x), cells annotated."""
    require_columns(df)
    if metric not in _LENS_LABELS:
        raise UsageError(f"lens_heatmap draws one of {', '.join(_LENS_LABELS)}, not {metric!r}")
    sub = select_rows(df, metric, what=f"lens_heatmap({metric})", kind=kind)
    mat, order, layers = _layer_matrix(df, sub)
    if mat.size == 0:
        raise UsageError(f"lens_heatmap needs {metric} rows with a layer; the table has none")
    label, lims, cmap = _LENS_LABELS[metric]
    vmin, vmax = lims if lims else (0.0, float(np.nanmax(mat)) if np.isfinite(mat).any() else 1.0)
    norm = Normalize(vmin=vmin, vmax=max(vmax, vmin + 1e-12))
    width, height, annotate, fs = _heatmap_size(len(order), len(layers))
    with paper_style():
        fig = new_figure(width, height)
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
        ax.set_title(f"Logit lens, {kind_label(kind)} forks")
    return fig


# The same function draws a second saved figure.
figure(
    "lens_mass_valid",
    scope="run",
    caption="Logit lens: mass on the valid branches per layer and checkpoint.",
    kwargs=_lens_args("lens_mass_valid"),
)(lens_heatmap)


PROBE_TARGETS = ("valid", "taken")
"""The probe targets the figure draws, one accuracy and one selectivity row each."""

PROBE_KINDS = ("indecipherable", "decipherable", "multi-valid", "all")
"""One column per kind."""


def _probe_chance(df: pd.DataFrame, target: str, kind: str) -> float | None:
    """The table's chance for (target, kind): one value per checkpoint, averaged (the eval forks are the same)."""
    vals = kind_rows(df[df["metric"] == f"probe_chance_{target}"], kind)["value"].to_numpy(float)
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else None


@figure(
    "probes",
    scope="run",
    caption="Candidate-conditioned linear probes per layer (y) and checkpoint (x), one column per decision-point kind: "
    "accuracy for the valid and for the taken branch (white = chance, given in each panel's title) and selectivity = "
    "accuracy minus control-task accuracy (white = 0).",
)
def probe_heatmap(
    df: pd.DataFrame, *, targets: tuple[str, ...] = PROBE_TARGETS, kinds: tuple[str, ...] = PROBE_KINDS
) -> Figure:
    """Probes: for each target an accuracy row and a selectivity row of layer x checkpoint panels, one per kind.

    Accuracy colours are centred on the panel's chance (``probe_chance_<target>``: white = chance,
    red above, blue below; 0.5 where the table has no chance row), selectivity on 0. A panel the
    table has no rows for says so instead of drawing cells. Each drawn panel's ``get_label()`` is
    ``"<metric>|<kind>"``.
    """
    require_columns(df)
    metrics = {f"probe_{what}_{t}" for t in targets for what in ("acc", "selectivity")}
    if not metrics & set(df["metric"]):
        raise UsageError("probe_heatmap needs probe_acc_* / probe_selectivity_* rows; the table has none (probes are fitted on a probe-training split from a native task's generator: native checkpoints with probes on; an --eval file of your own has none)")
    mats: dict[tuple[str, str], tuple[np.ndarray, list[str], list[int]]] = {}
    for metric in sorted(metrics):
        for kind in kinds:
            sub = kind_rows(df[df["metric"] == metric], kind)
            if sub.empty:
                continue
            select_rows(sub, metric, what="probe_heatmap")  # one run only
            mat = _layer_matrix(df, sub)
            if mat[0].size:
                mats[(metric, kind)] = mat
    if not mats:
        raise UsageError(f"probe_heatmap needs probe rows with a layer for kinds {list(kinds)}; the table has none")
    ncol = max(len(o) for _, o, _ in mats.values())
    nrow = max(len(l) for _, _, l in mats.values())
    w, h, annotate, fs = _heatmap_size(ncol, nrow, panels=len(kinds))
    sels = [m for (metric, _), (m, _, _) in mats.items() if "selectivity" in metric and np.isfinite(m).any()]
    sel_max = max([float(np.nanmax(np.abs(m))) for m in sels] + [0.05])
    sel_norm = Normalize(-sel_max, sel_max)
    cmap = "RdBu_r"
    with paper_style():
        fig = new_figure(w, 2 * len(targets) * 0.85 * h + 0.3)
        axes = fig.subplots(2 * len(targets), len(kinds), squeeze=False)
        for r, (target, what) in enumerate((t, wh) for t in targets for wh in ("acc", "selectivity")):
            metric = f"probe_{what}_{target}"
            for c, kind in enumerate(kinds):
                ax = axes[r, c]
                drawn = (metric, kind) in mats
                chance = _probe_chance(df, target, kind) if what == "acc" else None
                head = kind_label(kind) if r == 0 else ""
                if what == "acc" and drawn:
                    sub = f"chance {chance:.2f}" if chance is not None else "chance not in table"
                    ax.set_title(f"{head}\n{sub}" if head else sub)
                elif head:
                    ax.set_title(head)
                if c == 0:
                    ax.set_ylabel(f"{target}: {'accuracy' if what == 'acc' else 'selectivity'}\nlayer")
                if not drawn:
                    if metric not in set(df["metric"]):
                        why = f"{metric}\nnot in the table"
                    elif target == "valid" and kind == "multi-valid":
                        why = "multi-valid forks have\nno single valid branch"
                    else:
                        why = f"no {metric} rows\nfor {kind} forks"
                    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="0.4")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    for side in ("top", "right", "bottom", "left"):
                        ax.spines[side].set_visible(False)
                    continue
                mat, order, layers = mats[(metric, kind)]
                if what == "acc":
                    centre = chance if chance is not None and 0.0 < chance < 1.0 else 0.5
                    norm = TwoSlopeNorm(vmin=0.0, vcenter=centre, vmax=1.0)
                else:
                    norm = sel_norm
                _heatmap(
                    ax,
                    mat,
                    xlabels=[checkpoint_label(df, ck, short=True) for ck in order],
                    ylabels=[str(l) for l in layers],
                    cmap=cmap,
                    norm=norm,
                    annotate=annotate,
                    fontsize=fs,
                )
                ax.set_label(f"{metric}|{kind}")
                if r < 2 * len(targets) - 1:
                    ax.set_xticklabels([])
                else:
                    ax.set_xlabel("checkpoint (SFT step)")
                if c > 0:
                    ax.set_yticklabels([])
            if what == "acc":
                sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
                cb = fig.colorbar(sm, ax=list(axes[r]), shrink=0.9, pad=0.02, ticks=[0.0, 0.5, 1.0])
                cb.ax.set_yticklabels(["0", "chance", "1"])
                cb.set_label("accuracy")
            else:
                cb = fig.colorbar(ScalarMappable(norm=sel_norm, cmap=cmap), ax=list(axes[r]), shrink=0.9, pad=0.02)
                cb.set_label("selectivity\n(acc. - control)")
            cb.outline.set_visible(False)
        fig.suptitle("Candidate-conditioned probes at forks", fontsize=8.5)
    return fig
