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
    "tuned_lens_mass_valid": "tuned lens (per-layer affine translators, Belrose et al. 2023): mass_valid per layer",
    "tuned_lens_mass_top_branch": "tuned lens: mass_top_branch per layer",
    "tuned_lens_kl_final": "tuned lens: KL(final || layer) in nats per layer (0 at layer n_layers, the model's output)",
    "patch_recovered_share": "activation patching, reference -> checkpoint at the decision position per layer: share of "
                             "the top-branch share shift undone, (s_ckpt - s_patched) / (s_ckpt - s_ref)",
    "patch_induced_share": "activation patching, checkpoint -> reference at the decision position per layer: share of "
                           "the top-branch share shift produced, (s_ref_patched - s_ref) / (s_ckpt - s_ref)",
    "probe_acc_valid": "candidate-conditioned probe accuracy per layer for the valid branch (forks with one right branch)",
    "probe_acc_taken": "candidate-conditioned probe accuracy per layer for the branch the checkpoint puts most mass on",
    "probe_acc_demonstrated": "candidate-conditioned probe accuracy per layer for the demonstration's (annotated taken) branch",
    "probe_selectivity_valid": "probe_acc_valid minus the control task's accuracy (labels shuffled within kind)",
    "probe_selectivity_taken": "probe_acc_taken minus the control task's accuracy (labels shuffled within kind)",
    "probe_selectivity_demonstrated": "probe_acc_demonstrated minus the control task's accuracy (labels shuffled within kind)",
    "probe_chance_valid": "chance accuracy of the valid-branch probe: mean 1/b over the tested forks",
    "probe_chance_taken": "chance accuracy of the taken-branch probe: mean 1/b over the tested forks",
    "probe_chance_demonstrated": "chance accuracy of the demonstrated-branch probe: mean 1/b over the tested forks",
    "pass@k": "unbiased pass@k, 1 - C(n-c,k)/C(n,k), 95% bootstrap interval over problems",
    "fork_valid_rate": "share of samples whose first fork move is a valid branch",
    "fork_reached_rate": "share of samples that followed the gold completion up to its first fork (the rest make no fork move)",
    "branch_coverage": "mean number of distinct valid branches among a problem's n samples",
    "truncated_rate": "share of samples that hit the max-new-tokens budget before a stop (scored as failures)",
    "branch_value_valid": "success rate of continuations after forcing a valid branch at the first fork (mean over them)",
    "branch_value_invalid": "success rate of continuations after forcing an invalid branch at the first fork",
    "branch_value_preferred": "success rate after forcing the branch this checkpoint puts the most mass on",
    "forced_pass@k": "pass@k when the first fork is split evenly over the valid branches, then the model continues",
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
