"""Sweep statistics: base vs final SFT coverage per sweep cell, summarised over seeds, and how it
tracks fork prevalence.

A sweep table holds one SFT run per (task, prevalence, policy, seed) cell, each from its
(task, seed)'s base model. Within every (task, seed) the base is chosen by the same rule as for
one run (:func:`training.phases.base_position`), so a sweep and its cells agree on the base.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from analysis.conventions import before_sft, is_sweep_table, kind_rows, pick_k, require_columns
from analysis.table import SWEEP_COLUMNS
from training.errors import UsageError
from training.phases import base_position

__all__ = [
    "correlations",
    "spearman",
    "require_sweep",
    "sweep_base_mask",
    "sweep_sft_mask",
    "sweep_pass",
    "sweep_shrinkage",
    "sweep_summary",
    "sweep_spearman",
]


def correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Pearson r and Spearman rho; NaN when fewer than 3 points or a constant input."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho, NaN where :func:`correlations` gives none."""
    return correlations(np.asarray(x, float), np.asarray(y, float))[1]


def require_sweep(df: pd.DataFrame, what: str) -> None:
    """Refuse a table without every sweep column, naming the caller and the missing columns."""
    require_columns(df)
    if not is_sweep_table(df):
        missing = [c for c in SWEEP_COLUMNS if c not in df.columns]
        raise UsageError(f"{what} needs a sweep table (columns {', '.join(SWEEP_COLUMNS)}); missing: {', '.join(missing)}")


def sweep_base_mask(p: pd.DataFrame) -> pd.Series:
    """Base rows per (task, seed): the rows at the (phase, step) that :func:`training.phases.base_position`
    picks among that group's (phase, step) pairs (every cell repeats its base, so all its rows count)."""
    mask = pd.Series(False, index=p.index)
    for _, g in p.groupby(["task", "seed"], sort=False):
        entries = list(dict.fromkeys((str(ph), int(st)) for ph, st in zip(g["phase"], g["step"])))
        phase, step = entries[base_position(entries)[0]]
        mask[g.index[(g["phase"] == phase) & (g["step"] == step)]] = True
    return mask


def sweep_sft_mask(p: pd.DataFrame, is_base: pd.Series) -> pd.Series:
    """SFT result rows: neither a base row nor a phase before SFT."""
    return ~is_base & ~before_sft(p["phase"])


def sweep_pass(df: pd.DataFrame, what: str) -> pd.DataFrame:
    """The sweep's pass@k rows of kind 'all' (or no kind) with an integer k; ``what`` names the caller."""
    require_sweep(df, what)
    p = df[df["metric"] == "pass@k"]
    if p.empty:
        raise UsageError(f"{what} needs pass@k rows and the table has none")
    p = kind_rows(p, "all")
    if p.empty:
        raise UsageError(f"{what} needs pass@k rows of kind 'all' (or no kind)")
    return with_interpolation(p[p["k"].notna()].assign(k=lambda d: d["k"].astype(int)))


def with_interpolation(p: pd.DataFrame) -> pd.DataFrame:
    """Interpolated checkpoints (an ``alpha`` column) as mitigations of their own: policy
    ``canonical+interp0.5`` is canonical SFT's final checkpoint interpolated halfway to its base."""
    if "alpha" not in p.columns or not p["alpha"].notna().any():
        return p
    alpha = p["alpha"].astype(float)
    label = p["policy"].astype(str) + "+interp" + alpha.map(lambda a: f"{a:g}")
    return p.assign(policy=p["policy"].where(alpha.isna(), label))


def sweep_shrinkage(df: pd.DataFrame, *, k: int | None = None) -> pd.DataFrame:
    """Per sweep cell (task, prevalence, policy, seed) and strategy: base vs final SFT pass@1 and pass@K.

    The base is that task/seed's base row (:func:`sweep_base_mask`) with the same strategy; the final
    SFT checkpoint is the cell's largest step. shrinkage = base pass@K - final pass@K;
    pass1_gain = final pass@1 - base pass@1. K = 16 unless absent (then the largest k) or given.
    """
    p = sweep_pass(df, "sweep_shrinkage")
    kk = pick_k(p["k"]) if k is None else int(k)
    if 1 not in set(p["k"]) or kk not in set(p["k"]):
        raise UsageError(f"sweep_shrinkage needs pass@1 and pass@{kk}; the table has k = {sorted(set(p['k']))}")
    p = p[p["k"].isin([1, kk])]
    is_base = sweep_base_mask(p)
    base = p[is_base].groupby(["task", "seed", "strategy", "k"])["value"].mean().unstack("k")
    sft = p[sweep_sft_mask(p, is_base)]
    if sft.empty or base.empty:
        raise UsageError("sweep_shrinkage needs both base rows (sft step 0) and later SFT rows")
    cell = ["task", "prevalence", "policy", "seed"]
    last = sft.groupby(cell)["step"].transform("max")
    fin = sft[sft["step"] == last]
    fin_v = fin.groupby(cell + ["strategy", "k"])["value"].mean().unstack("k")
    meta = fin.groupby(cell + ["strategy"]).agg(final_checkpoint=("checkpoint", "first"), final_step=("step", "first"),
                                                 n_problems=("n", "max"))
    out = fin_v.join(meta).reset_index()
    b = base.rename(columns={1: "base_pass1", kk: "base_passk"}).reset_index()
    out = out.rename(columns={1: "final_pass1", kk: "final_passk"}).merge(b, on=["task", "seed", "strategy"], how="inner")
    out["k"] = kk
    out["shrinkage"] = out["base_passk"] - out["final_passk"]
    out["pass1_gain"] = out["final_pass1"] - out["base_pass1"]
    out = out.dropna(subset=["shrinkage", "pass1_gain"])
    if out.empty:
        raise UsageError("sweep_shrinkage found no cell whose strategy was also measured on its base")
    cols = cell + ["strategy", "k", "final_checkpoint", "final_step", "n_problems", "base_pass1", "final_pass1", "base_passk", "final_passk", "shrinkage", "pass1_gain"]
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
    seed's cell, ``rho_seed_means`` over the per-prevalence means (seed noise averaged out first).

    NaN where the cells' shrinkage spans less than half of one problem's share of pass@K
    (0.5 / problems): ranks of float round-off (a pass@16 of 0.99995 against 0.99998) are no trend.
    """
    rows = []
    for (task, policy, strategy), g in shrink.groupby(["task", "policy", "strategy"]):
        means = g.groupby("prevalence")["shrinkage"].mean()
        flat = "n_problems" in g and np.ptp(g["shrinkage"].to_numpy(float)) < 0.5 / float(g["n_problems"].max())
        rows.append(
            {
                "task": task,
                "policy": policy,
                "strategy": strategy,
                "rho": math.nan if flat else spearman(g["prevalence"].to_numpy(float), g["shrinkage"].to_numpy(float)),
                "rho_seed_means": math.nan if flat else spearman(means.index.to_numpy(float), means.to_numpy(float)),
                "n": len(g),
            }
        )
    return pd.DataFrame(rows, columns=["task", "policy", "strategy", "rho", "rho_seed_means", "n"])
