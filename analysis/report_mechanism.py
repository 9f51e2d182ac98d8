"""The report's sentences on the mechanism instruments: probes, tuned lens, branch forcing, patching.

One sentence each on what the run shows, every number read from the table (final checkpoint
against the base); an instrument the table lacks gives no sentence. Also the line on decision
points the tokenizer could not read, from the run's manifest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis.conventions import pick_k
from analysis.report_format import _f, _one, _pair, _with_ci

__all__ = ["mechanism_numbers", "mechanism_sentences", "probe_best", "skipped_sentence"]


def probe_best(df: pd.DataFrame, checkpoint: str, target: str, kind: str) -> dict[str, Any] | None:
    """The layer with the highest probe accuracy for ``target`` at ``kind`` forks, with that layer's
    selectivity and the kind's chance (None where the table lacks them)."""
    at = (df["checkpoint"] == checkpoint) & (df["kind"] == kind)
    acc = df[at & (df["metric"] == f"probe_acc_{target}") & df["layer"].notna()]
    acc = acc[np.isfinite(acc["value"].to_numpy(float))]
    if acc.empty:
        return None
    best = acc.sort_values(["value", "layer"], ascending=[False, True]).iloc[0]
    layer = int(best["layer"])
    sel = df[at & (df["metric"] == f"probe_selectivity_{target}") & (df["layer"] == layer)]["value"]
    chance = df[at & (df["metric"] == f"probe_chance_{target}")]["value"]
    return {"layer": layer, "accuracy": float(best["value"]), "ci_low": float(best["ci_low"]), "ci_high": float(best["ci_high"]),
            "n": int(best["n"]), "selectivity": float(sel.iloc[0]) if len(sel) else None,
            "chance": float(chance.iloc[0]) if len(chance) else None}


def _per_layer(df: pd.DataFrame, checkpoint: str, metric: str, kind: str) -> dict[int, float]:
    sub = df[(df["checkpoint"] == checkpoint) & (df["metric"] == metric) & (df["kind"] == kind) & df["layer"].notna()]
    return {int(r.layer): float(r.value) for r in sub.itertuples()}


def mechanism_numbers(df: pd.DataFrame, base: str, final: str) -> dict[str, Any]:
    """The numbers the mechanism sentences state (None where the table lacks the instrument)."""
    out: dict[str, Any] = {}
    kind = "indecipherable" if ((df["metric"] == "branch_value_valid") & (df["kind"] == "indecipherable")).any() else "all"
    if (df["metric"] == "branch_value_valid").any():
        forced = df[(df["metric"] == "forced_pass@k") & (df["kind"] == "all") & (df["checkpoint"] == final)]
        own = df[(df["metric"] == "pass@k") & (df["kind"] == "all") & (df["checkpoint"] == final)]
        ks = sorted(set(forced["k"].dropna().astype(int)) & set(own["k"].dropna().astype(int)))
        k = pick_k(ks) if ks else None
        out["forcing"] = {
            "kind": kind, "k": k,
            "valid": _pair(df, base, final, "branch_value_valid", kind=kind),
            "preferred": _pair(df, base, final, "branch_value_preferred", kind=kind),
            "forced": _one(df, final, "forced_pass@k", kind="all", k=k) if k else None,
            "own": _one(df, final, "pass@k", kind="all", k=k, strategy=forced["strategy"].iloc[0]) if k else None,
        }
    if (df["metric"] == "tuned_lens_kl_final").any():
        out["tuned_lens"] = {w: {"logit": _per_layer(df, c, "lens_kl_final", "all"),
                                 "tuned": _per_layer(df, c, "tuned_lens_kl_final", "all")}
                             for w, c in (("base", base), ("final", final))}
    if (df["metric"] == "patch_recovered_share").any():
        pkind = "indecipherable" if ((df["metric"] == "patch_recovered_share") & (df["kind"] == "indecipherable")).any() else "all"
        out["patching"] = {"kind": pkind, "recovered": _per_layer(df, final, "patch_recovered_share", pkind)}
    return out


def _probe_sentence(kn: dict[str, Any]) -> str:
    """One sentence on the valid-branch probes of the final checkpoint; '' without probe rows."""
    got = {k: v for k, v in (kn.get("probe_valid") or {}).items() if v is not None}
    if not got:
        return ""

    def part(kind: str, p: dict[str, Any]) -> str:
        vs = f"chance {_f(p['chance'])}" if p["chance"] is not None else "chance not in the table"
        sel = f", selectivity {p['selectivity']:+.3f}" if p["selectivity"] is not None else ""
        acc = _with_ci({"value": p["accuracy"], "ci_low": p["ci_low"], "ci_high": p["ci_high"]})
        return f"at {kind} forks its best layer is {p['layer']}, accuracy {acc} vs {vs}{sel} (n = {p['n']} forks)"

    parts = "; ".join(part(k, v) for k, v in got.items())
    return (f"**Probes** — a candidate-conditioned linear probe for the valid branch, final `{kn['final']}` "
            f"(layer 0 = the residual before block 0; accuracy with its 95% interval over problems): {parts}.")


def _forcing_sentence(kn: dict[str, Any]) -> str:
    f = kn.get("forcing")
    if not f or not f["valid"]["final"] or not f["preferred"]["final"]:
        return ""
    v, p = f["valid"], f["preferred"]
    base_part = (f" (base: valid {_f(v['base']['value'])}, preferred {_f(p['base']['value'])})"
                 if v["base"] and p["base"] else "")
    text = (f"**Branch value** — after forcing the first fork, continuations of the valid branches succeed "
            f"{_f(v['final']['value'])} of the time and those of the branch `{kn['final']}` prefers "
            f"{_f(p['final']['value'])} at {f['kind']} forks{base_part}")
    if f["forced"] and f["own"]:
        text += (f"; splitting the fork evenly over the valid branches would give pass@{f['k']} "
                 f"{_with_ci(f['forced'])}, against the model's own {_with_ci(f['own'])}")
    return text + "."


def _lens_sentence(kn: dict[str, Any]) -> str:
    t = kn.get("tuned_lens")
    if not t or not t["final"]["tuned"]:
        return ""
    last = max(t["final"]["tuned"])
    early = [layer for layer in sorted(t["final"]["tuned"]) if layer < last]
    pairs = ", ".join(f"layer {layer} {_f(t['final']['tuned'][layer], 2)} vs {_f(t['final']['logit'].get(layer), 2)}"
                      for layer in early)
    return (f"**Tuned lens** — KL(final ‖ layer) at the forks of `{kn['final']}`, tuned lens vs logit lens (nats): "
            f"{pairs}; layer {last} is the model itself (0).")


def _patching_sentence(kn: dict[str, Any]) -> str:
    p = kn.get("patching")
    if not p or not p["recovered"]:
        return ""
    parts = ", ".join(f"{_f(v, 2)} at layer {layer}" for layer, v in sorted(p["recovered"].items()))
    return (f"**Patching** — the base's residual at the decision position, patched into `{kn['final']}`, undoes "
            f"{parts} of SFT's shift in top-branch share at {p['kind']} forks (1 = the base's branch mass restored; "
            "layer 0 = before block 0, the last = after the last block).")


def mechanism_sentences(kn: dict[str, Any]) -> list[str]:
    """The probe, tuned-lens, branch-value and patching sentences this table supports, in that order."""
    return [s for s in (_probe_sentence(kn), _lens_sentence(kn), _forcing_sentence(kn), _patching_sentence(kn)) if s]


def skipped_sentence(manifest: dict[str, Any] | None) -> str:
    """'3 of 120 decision points were skipped (inside a token: 3).' from the run's manifest, or ''."""
    ev = (manifest or {}).get("eval") or {}
    skipped = ev.get("skipped_decision_points") or {}
    n = sum(skipped.values())
    if not n:
        return ""
    total = ev.get("decision_points")
    reasons = ", ".join(f"{why}: {c}" for why, c in sorted(skipped.items()))
    of = f" of {total}" if total else ""
    return f"{n}{of} decision points were skipped, never guessed ({reasons})."
