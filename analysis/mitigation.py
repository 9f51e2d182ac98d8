"""How much of the coverage lost to SFT each mitigation wins back, from a sweep table.

The paper's claims 2 and 3 are statements about one ratio: at a given fork prevalence, SFT with
canonical demonstrations decoded at the default strategy loses `lost = base pass@K − canonical
pass@K`; a mitigation (another demonstration policy, another decoding strategy, or both) reaches
pass@K = m, and wins back `(m − canonical pass@K) / lost` of it, at a pass@1 change of
`m's pass@1 − canonical pass@1`, which is also given as a share of what SFT gained in pass@1
(`pass1_cost_share` = −pass1_change / (canonical pass@1 − base pass@1): 1/3 means a third of the
gain given back). The base is always read at the default strategy: the loss is
measured against what the base model does when sampled plainly.
"""

from __future__ import annotations

import math

import pandas as pd

from analysis.conventions import default_strategy
from analysis.sweep_stats import sweep_shrinkage
from training.errors import UsageError

__all__ = ["won_back", "won_back_summary"]


def won_back(df: pd.DataFrame, *, prevalence: float | None = None, k: int | None = None,
             reference_policy: str = "canonical") -> pd.DataFrame:
    """One row per task, seed and mitigation (policy, strategy) at ``prevalence`` (default: each
    task's highest): ``lost``, ``won_back`` (NaN where nothing was lost), ``pass1_change``, the
    reference's ``pass1_gain`` over the base and ``pass1_cost_share`` (NaN where SFT gained nothing).

    The reference is ``reference_policy`` decoded at the table's default strategy.
    """
    shrink = sweep_shrinkage(df, k=k)
    default = default_strategy(df)
    if reference_policy not in set(shrink["policy"]):
        raise UsageError(f"won_back: no {reference_policy!r} cells in the table; policies: {sorted(set(shrink['policy']))}")
    rows = []
    for task, t in shrink.groupby("task"):
        prevs = sorted(set(t["prevalence"].astype(float)))
        want = prevs[-1] if prevalence is None else float(prevalence)
        match = [p for p in prevs if math.isclose(p, want, abs_tol=1e-9)]
        if not match:
            raise UsageError(f"won_back: prevalence {want:g} is not in the table for task {task!r}; measured: {prevs}")
        at = t[t["prevalence"].astype(float) == match[0]]
        base = t[t["strategy"] == default].groupby("seed")[["base_pass1", "base_passk"]].first()
        for seed, s in at.groupby("seed"):
            ref = s[(s["policy"] == reference_policy) & (s["strategy"] == default)]
            if ref.empty or seed not in base.index:
                continue
            ref_k, ref_1 = float(ref["final_passk"].iloc[0]), float(ref["final_pass1"].iloc[0])
            lost = float(base.loc[seed, "base_passk"]) - ref_k
            gain = ref_1 - float(base.loc[seed, "base_pass1"])
            for _, r in s.iterrows():
                if r["policy"] == reference_policy and r["strategy"] == default:
                    continue
                rows.append({
                    "task": task, "seed": seed, "prevalence": match[0], "policy": r["policy"], "strategy": r["strategy"],
                    "k": int(r["k"]), "base_passk": float(base.loc[seed, "base_passk"]), "reference_passk": ref_k,
                    "passk": float(r["final_passk"]), "lost": lost,
                    "won_back": (float(r["final_passk"]) - ref_k) / lost if lost > 0 else float("nan"),
                    "pass1_change": float(r["final_pass1"]) - ref_1, "pass1_gain": gain,
                    "pass1_cost_share": (ref_1 - float(r["final_pass1"])) / gain if gain > 0 else float("nan"),
                })
    cols = ["task", "seed", "prevalence", "policy", "strategy", "k", "base_passk", "reference_passk", "passk",
            "lost", "won_back", "pass1_change", "pass1_gain", "pass1_cost_share"]
    return pd.DataFrame(rows, columns=cols)


def won_back_summary(wb: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds (and each seed's value, in seed order) of won_back, pass1_change and pass1_cost_share."""
    g = wb.sort_values("seed").groupby(["task", "prevalence", "policy", "strategy"], sort=False)
    out = g.agg(
        won_back_mean=("won_back", "mean"),
        won_back_seeds=("won_back", list),
        pass1_change_mean=("pass1_change", "mean"),
        pass1_change_seeds=("pass1_change", list),
        pass1_cost_share_mean=("pass1_cost_share", "mean"),
        lost_mean=("lost", "mean"),
        n_seeds=("seed", "nunique"),
    )
    return out.reset_index()
