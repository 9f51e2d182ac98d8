"""Fork discovery scored and summarised: fork prevalence, and precision/recall against annotations.

See :mod:`analysis.forks` for the rule; a *match* is a discovered decision point at the same token
position as an annotated one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any, Sequence

import pandas as pd

from hooks.encode import EncodeReport, encode_problems
from training.errors import UsageError
from training.schema import KINDS, Problem

from analysis.forks_plan import ForkPlan, given_points


def prevalence_knob(problems: Sequence[Problem]) -> float:
    """The generator's ``data.prevalence`` read off annotated problems: the share of multi-valid
    examples among the examples that are multi-valid or indecipherable (an example's kind: its
    multi-valid fork if it has one, else its indecipherable one); NaN when there are none."""
    mv = sum("multi-valid" in p.kinds for p in problems)
    ind = sum("multi-valid" not in p.kinds and "indecipherable" in p.kinds for p in problems)
    return mv / (mv + ind) if mv + ind else float("nan")


def fork_prevalence(problems: Sequence[Problem]) -> dict[str, float]:
    """Fork prevalence: the share of examples with at least one decision point, any and per kind."""
    n = max(len(problems), 1)
    c: Counter[str] = Counter()
    for p in problems:
        c.update(p.kinds)
    return {"any": sum(bool(p.decision_points) for p in problems) / n, **{k: c[k] / n for k in KINDS}}


def _summary(plan: ForkPlan, decided: pd.DataFrame, annotated: list[Problem], positions: int, H: float,
             seconds: float) -> dict[str, Any]:
    cands = decided.drop_duplicates(["problem", "pos"]) if len(decided) else decided
    dec = Counter(cands["decision"]) if len(cands) else Counter()
    tested = sum(v for k, v in dec.items() if k not in ("untested", ""))
    confirmed = sum(dec[k] for k in KINDS)
    written = sum(len(p.decision_points) for p in annotated)
    s = plan.settings
    return {
        "problems": len(annotated), "positions": positions, "entropy_threshold": H,
        "entropy_quantile": s.entropy_quantile, "p": s.p, "tau": s.tau, "samples": s.samples,
        "strategy": s.strategy, "verifier": plan.verifier_spec, "max_new_tokens": plan.budget,
        "candidates": int(len(cands)), "untested": int(dec["untested"]), "tested": int(tested),
        "confirmed": int(confirmed), "rejected": int(dec["rejected"]),
        "confirmed_by_kind": {k: int(dec[k]) for k in KINDS},
        "not_expressible": int(confirmed - written),
        "decision_points": int(written), "forks_per_example": written / max(len(annotated), 1),
        "prevalence": fork_prevalence(annotated), "prevalence_knob": prevalence_knob(annotated),
        "continuations": int(decided["samples"].sum()) if len(decided) else 0,
        "truncated": int(decided["truncated"].sum()) if len(decided) else 0,
        "seconds": round(seconds, 2),
    }


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as the few lines ``probes forks`` prints."""
    s = summary
    q = f"quantile {s['entropy_quantile']:g}" if s.get("entropy_quantile") is not None else "given"
    prev = s["prevalence"]
    kinds = ", ".join(f"{k} {s['confirmed_by_kind'][k]}" for k in KINDS)
    shares = ", ".join(f"{k} {prev[k]:.3f}" for k in KINDS)
    return [
        f"forks: {s['problems']} problems, {s['positions']} completion positions; entropy threshold "
        f"{s['entropy_threshold']:.3f} nats ({q}), p {s['p']:g}, tau {s['tau']:g}, m {s['samples']}, "
        f"verifier {s['verifier']}",
        f"candidates {s['candidates']}: {s['untested']} with one alternative (not tested), {s['tested']} tested "
        f"({s['continuations']} continuations, {s['truncated']} truncated), {s['confirmed']} confirmed ({kinds}), "
        f"{s['rejected']} rejected by the outcome test",
        f"decision points written {s['decision_points']} ({s['not_expressible']} not expressible as text branches), "
        f"{s['forks_per_example']:.2f} per example; fork prevalence: any {prev['any']:.3f}, {shares}; "
        f"multi-valid share of non-decipherable {s['prevalence_knob']:.3f} ({s['seconds']:.1f}s)",
    ]


def score_discovery(found: Sequence[Problem], truth: Sequence[Problem] | None, tokenizer: Any) -> dict[str, Any]:
    """Discovered decision points against ground-truth annotations, matched by token position.

    ``found``: problems whose ``decision_points`` are the discovered ones; ``truth``: the same
    problems annotated (default: each found problem's ``decision_points_given``). Both are mapped
    to token positions with ``hooks.encode`` (truth points it cannot read are counted in
    ``truth_skipped``). Returns precision (matched / found), recall (matched / true), kind
    accuracy on the matches, per-kind recall (by true kind) and precision (by found kind), the
    confusion counts, and fork prevalence (and the prevalence knob) of both.
    """
    if truth is None:
        truth = [replace(p, decision_points=given_points(p)) for p in found]
    if len(truth) != len(found):
        raise UsageError(f"score_discovery: {len(found)} found problems but {len(truth)} true ones")

    def positions(problems: Sequence[Problem]) -> tuple[dict[tuple[int, int], str], EncodeReport]:
        enc, report = encode_problems(tokenizer, list(problems))
        return {(e.index, f.pos): f.kind for e in enc for f in e.forks}, report

    f_pos, _ = positions(found)
    t_pos, t_report = positions(truth)
    matched = sorted(set(f_pos) & set(t_pos))
    kinds_ok = sum(f_pos[k] == t_pos[k] for k in matched)

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    confusion = {tk: {fk: sum(1 for k in matched if t_pos[k] == tk and f_pos[k] == fk) for fk in KINDS} for tk in KINDS}
    return {
        "found": len(f_pos), "true": len(t_pos), "matched": len(matched),
        "truth_skipped": int(sum(t_report.skipped.values())),
        "precision": ratio(len(matched), len(f_pos)), "recall": ratio(len(matched), len(t_pos)),
        "kind_accuracy": ratio(kinds_ok, len(matched)),
        "recall_by_kind": {k: ratio(sum(1 for m in matched if t_pos[m] == k), sum(v == k for v in t_pos.values()))
                           for k in KINDS},
        "precision_by_kind": {k: ratio(sum(1 for m in matched if f_pos[m] == k), sum(v == k for v in f_pos.values()))
                              for k in KINDS},
        "confusion": confusion,
        "prevalence_found": fork_prevalence(found), "prevalence_true": fork_prevalence(truth),
        "knob_found": prevalence_knob(found), "knob_true": prevalence_knob(truth),
    }


# ----------------------------------------------------------------------------- the run
