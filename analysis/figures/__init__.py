"""Paper figures from the tidy results table (:mod:`analysis.table`).

Each public figure function takes the table and returns a :class:`matplotlib.figure.Figure` built
without pyplot, so nothing global changes, it works headless, and a notebook can restyle it before
saving. Each registers itself (:func:`analysis.figures.registry.figure`) with its file stem, scope
(``run`` or ``sweep``) and caption; :func:`make_figures` draws every registered figure the table
supports, in registration order. The table's conventions (checkpoint order, base, default
strategy) live in :mod:`analysis.conventions`, the sweep statistics in :mod:`analysis.sweep_stats`.

Modules: ``style`` (rc context, colours, sizes), ``run`` (coverage curves, dynamics), ``heatmaps``
(logit lens, probes), ``scatter`` (entropy vs coverage), ``mechanism`` (tuned lens, branch
value, patching), ``sweep`` (sweep figures), ``make``.
"""

from __future__ import annotations

from analysis.conventions import (
    base_checkpoint,
    checkpoint_label,
    checkpoint_order,
    default_strategy,
    final_checkpoint,
    is_sweep_table,
    pick_k,
)
from analysis.figures import registry

# Import order is registration order, which is draw order: keep run, heatmaps, scatter, mechanism, sweep.
# isort: off
from analysis.figures.run import coverage_curves, dynamics
from analysis.figures.heatmaps import lens_heatmap, probe_heatmap
from analysis.figures.scatter import entropy_vs_coverage
from analysis.figures.mechanism import branch_values, lens_kl, patching_recovery
from analysis.figures.sweep import shrinkage_vs_prevalence, sweep_coverage
# isort: on
from analysis.figures.make import make_figures
from analysis.figures.style import KIND_COLORS, checkpoint_colors
from analysis.sweep_stats import sweep_shrinkage, sweep_spearman, sweep_summary

__all__ = [
    "FIGURES",
    "coverage_curves",
    "dynamics",
    "lens_heatmap",
    "probe_heatmap",
    "entropy_vs_coverage",
    "lens_kl",
    "branch_values",
    "patching_recovery",
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

FIGURES = registry.stems()
"""Stable file stems, in the order :func:`make_figures` draws them (from the registry)."""
