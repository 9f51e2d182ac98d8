"""The tidy results table: one row per checkpoint x metric x kind x layer x k x strategy.

Every producer (``probes run``, ``probes sweep``) builds rows with :func:`row` and every consumer
(figures, report, notebooks) reads the columns named here, so the table is the one contract
between measuring and showing.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from training.schema import KINDS  # the decision-point kinds of DESIGN.md: one definition


ALL_KINDS = KINDS + ("all",)
"""Rows use ``all`` for every kind pooled."""

COLUMNS = (
    "checkpoint",  # checkpoint directory name, e.g. "sft-step000400"
    "phase",  # "pretrain" or "sft" (or what the checkpoint's meta.json says)
    "step",  # optimiser step within the phase
    "metric",  # one of METRICS
    "kind",  # one of ALL_KINDS, or "" where it does not apply
    "layer",  # logit-lens / probe layer (0 = before block 0, n_layers = after the last); NA otherwise
    "k",  # pass@k's k; NA otherwise
    "strategy",  # decoding strategy for sampled metrics, e.g. "temperature:1.0"; "" otherwise
    "value",
    "ci_low",  # 95% interval where there is one; NaN otherwise
    "ci_high",
    "n",  # how many items the value averages over (decision points, problems, ...)
)
"""Columns every results table has. Sweeps add ``SWEEP_COLUMNS``; extra columns are allowed."""

SWEEP_COLUMNS = ("task", "prevalence", "policy", "seed")

METRICS = {
    "entropy_fork": "next-token entropy (nats) at decision points, teacher-forced",
    "entropy_other": "next-token entropy (nats) at ordinary completion positions (control)",
    "mass_valid": "total probability on the valid branches at the fork",
    "mass_top_branch": "largest branch's share of the branch mass (1/b spread, 1 collapsed)",
    "mass_branches": "total probability on all branches at the fork (raw branch mass)",
    "lens_mass_valid": "logit lens: mass_valid read from the residual before each block / after the last",
    "lens_mass_top_branch": "logit lens: mass_top_branch per layer",
    "lens_kl_final": "logit lens: KL(final || layer) in nats per layer",
    "probe_acc_taken": "linear probe accuracy for the branch the checkpoint puts most mass on",
    "probe_acc_valid": "linear probe accuracy for the valid branch (forks with one right branch)",
    "probe_selectivity_taken": "probe_acc_taken minus control-task accuracy",
    "probe_selectivity_valid": "probe_acc_valid minus control-task accuracy",
    "probe_majority_taken": "majority-class baseline accuracy for the taken-branch probe",
    "probe_majority_valid": "majority-class baseline accuracy for the valid-branch probe",
    "pass@k": "unbiased pass@k, 1 - C(n-c,k)/C(n,k), 95% bootstrap interval over problems",
    "fork_valid_rate": "share of samples whose first fork move is a valid branch",
    "branch_coverage": "mean number of distinct valid branches among a problem's n samples",
}


def row(
    checkpoint: str,
    phase: str,
    step: int,
    metric: str,
    value: float,
    *,
    kind: str = "",
    layer: int | None = None,
    k: int | None = None,
    strategy: str = "",
    ci_low: float = math.nan,
    ci_high: float = math.nan,
    n: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """One table row; refuses a metric or kind the table does not know, so typos fail loudly."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if kind not in ALL_KINDS and kind != "":
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(ALL_KINDS)}")
    out = {
        "checkpoint": checkpoint,
        "phase": phase,
        "step": int(step),
        "metric": metric,
        "kind": kind,
        "layer": layer,
        "k": k,
        "strategy": strategy,
        "value": float(value),
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "n": int(n),
    }
    out.update(extra)
    return out


def to_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Rows to a DataFrame with the canonical column order and dtypes (nullable ints)."""
    df = pd.DataFrame(list(rows))
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = pd.NA if col in ("layer", "k") else (np.nan if col in ("value", "ci_low", "ci_high") else "")
    df["step"] = df["step"].astype("int64")
    df["n"] = df["n"].astype("int64")
    df["layer"] = pd.array(df["layer"], dtype="Int64")
    df["k"] = pd.array(df["k"], dtype="Int64")
    for col in ("checkpoint", "phase", "metric", "kind", "strategy"):
        df[col] = df[col].fillna("").astype(str)
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[list(COLUMNS) + extra]
