"""The report's sweep section: shrinkage against prevalence, Spearman ρ, and what each mitigation wins back."""

from __future__ import annotations

from typing import Any

import pandas as pd

from analysis.conventions import policy_rank
from analysis.report_format import _f

__all__ = ["sweep_section"]


def sweep_section(kn: dict[str, Any]) -> list[str]:
    if kn.get("shrinkage") is None:
        return [f"Sweep numbers unavailable: {kn.get('sweep_note', 'no pass@k rows')}.", ""]
    k = kn["k"]
    summ = pd.DataFrame(kn["shrinkage"])
    rho = pd.DataFrame(kn["spearman"])
    default = kn["strategy"]
    combos = sorted({(r["policy"], r["strategy"]) for r in kn["shrinkage"]}, key=lambda ps: _combo_order(ps, default))
    tasks = sorted(set(summ["task"]))
    lines = [
        f"Shrinkage = base pass@{k} − final SFT pass@{k} (fraction of problems; mean ± s.d. over seeds; the base "
        "is each task/seed's SFT step 0, the final SFT checkpoint each cell's last step), one row per data policy "
        "and decoding strategy, one column per fork prevalence. The last column is Spearman ρ between prevalence "
        "and shrinkage over every seed's cell (in brackets: over the mean of each prevalence's seeds); – where the "
        "shrinkage varies by less than half a problem's share of pass@k across the cells (nothing to rank). pass@1 "
        "gains are in `shrinkage_vs_prevalence`.",
        "",
    ]
    for task in tasks:
        t = summ[summ["task"] == task]
        prevs = sorted(set(t["prevalence"]))
        lines += [f"**{task}**", "",
                  "| policy | strategy | " + " | ".join(f"prevalence {v:g}" for v in prevs) + " | Spearman ρ |",
                  "| --- | --- | " + " | ".join("---" for _ in prevs) + " | --- |"]
        for p, s in combos:
            cells = []
            for prev in prevs:
                r = t[(t["prevalence"] == prev) & (t["policy"] == p) & (t["strategy"] == s)]
                cells.append("–" if r.empty else f"{_f(r['shrinkage_mean'].iloc[0])} ± {_f(r['shrinkage_std'].iloc[0])}")
            r = rho[(rho["task"] == task) & (rho["policy"] == p) & (rho["strategy"] == s)]
            cells.append("–" if r.empty else f"{_f(r['rho'].iloc[0], 2)} ({_f(r['rho_seed_means'].iloc[0], 2)})")
            lines.append(f"| {p} | `{s}` | " + " | ".join(cells) + " |")
        lines.append("")
    return lines + _mitigation_section(kn, combos)


def _combo_order(ps: tuple[str, str], default: str) -> tuple:
    """Policies in :func:`~analysis.conventions.policy_rank` order; the default strategy first."""
    policy, strategy = ps
    return (*policy_rank(policy), strategy != default, strategy)


def _mitigation_section(kn: dict[str, Any], combos: list[tuple[str, str]]) -> list[str]:
    """Share of the lost pass@K each mitigation wins back at the highest prevalence (claims 2 and 3)."""
    if kn.get("won_back") is None:
        return [f"Mitigations: unavailable ({kn.get('won_back_note', 'no reference cells')}).", ""] if "won_back_note" in kn else []
    wb = pd.DataFrame(kn["won_back"])
    if wb.empty:
        return []
    k, default = kn["k"], kn["strategy"]
    lines = [
        "### Mitigations",
        "",
        f"At each task's highest prevalence: the pass@{k} that canonical SFT (decoded `{default}`) lost against the "
        f"base (decoded `{default}`), the share of it each mitigation wins back, (mitigation pass@{k} − canonical "
        f"pass@{k}) / lost, its pass@1 change against canonical SFT (mean over seeds, then each seed), and that "
        "change as a share of the pass@1 canonical SFT gained over the base (the pass@1 it gives back).",
        "",
        f"| task | prevalence | lost pass@{k} | policy, strategy | won back | pass@1 change | pass@1 gain given back |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {c: i for i, c in enumerate(combos)}
    wb = wb.assign(_o=[order.get((p, s), len(order)) for p, s in zip(wb["policy"], wb["strategy"])])
    for _, r in wb.sort_values(["task", "_o"]).iterrows():
        seeds_wb = " / ".join("–" if pd.isna(v) else f"{100 * v:.0f}%" for v in r["won_back_seeds"])
        seeds_p1 = " / ".join(f"{v:+.3f}" for v in r["pass1_change_seeds"])
        mean_wb = "–" if pd.isna(r["won_back_mean"]) else f"{100 * r['won_back_mean']:.0f}%"
        share = r.get("pass1_cost_share_mean", float("nan"))
        share = "–" if pd.isna(share) else f"{100 * share + 0.0:.0f}%".replace("-0%", "0%")
        lines.append(f"| {r['task']} | {r['prevalence']:g} | {_f(r['lost_mean'])} | {r['policy']}, `{r['strategy']}` | "
                     f"{mean_wb} ({seeds_wb}) | {r['pass1_change_mean']:+.3f} ({seeds_p1}) | {share} |")
    lines += ["", _both_tasks_line(wb.sort_values(["task", "_o"]), k), ""]
    return lines


def _both_tasks_line(wb: pd.DataFrame, k: int) -> str:
    """The mitigations that win back half the loss at a third of the pass@1 gain on every task (claim 3's bar)."""
    tasks = set(wb["task"])
    good = wb[(wb["won_back_mean"] >= 0.5) & (wb["pass1_cost_share_mean"].fillna(float("inf")) <= 1 / 3)]
    names = [f"{p}, `{s}`" for (p, s), g in good.groupby(["policy", "strategy"], sort=False) if set(g["task"]) == tasks]
    head = f"Won back ≥ 50% of the lost pass@{k} at ≤ 1/3 of SFT's pass@1 gain on every task"
    return f"{head}: {'; '.join(names)}." if names else f"{head}: none."
