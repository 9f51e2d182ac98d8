"""How the results table (:mod:`analysis.table`) is read: the one place figures, the report and
the mitigation numbers learn its conventions.

- checkpoints are ordered by :func:`training.phases.series_key` (pretrain < base < sft < others,
  then step), and the *base* and *final* checkpoints come from
  :func:`training.phases.base_position` / :func:`training.phases.final_position`, the rule loading
  uses, so a table and the checkpoints it came from never disagree about which model is which;
- pass@k is read under one decoding strategy, by default :func:`default_strategy` (plain sampling
  at temperature 1 where the table has it);
- rows of kind ``all`` fall back to kind ``""`` (metrics measured without a kind split).
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from analysis.table import ALL_KINDS, COLUMNS, SWEEP_COLUMNS
from training.errors import UsageError
from training.phases import base_position, final_position, phase_rank, series_key

__all__ = [
    "ROW_KEYS",
    "require_columns",
    "is_sweep_table",
    "before_sft",
    "checkpoint_info",
    "checkpoint_order",
    "base_of",
    "base_checkpoint",
    "base_reason",
    "final_checkpoint",
    "checkpoint_label",
    "strategy_rank",
    "default_strategy",
    "kind_rows",
    "select_rows",
    "pick_kind",
    "pick_k",
]

ROW_KEYS = ["checkpoint", "metric", "kind", "layer", "k", "strategy"]
"""The columns that identify a row within one run: a duplicate means several runs are mixed."""


def require_columns(df: pd.DataFrame) -> None:
    """Refuse anything but a non-empty results table, saying how to get one."""
    if not isinstance(df, pd.DataFrame):
        raise UsageError(f"expected a results table (pandas DataFrame), got {type(df).__name__}; load it with pandas.read_parquet")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise UsageError(f"not a results table: missing column(s) {', '.join(missing)}; build it with analysis.table.to_frame")
    if df.empty:
        raise UsageError("the results table is empty; run `probes run` first")


def is_sweep_table(df: pd.DataFrame) -> bool:
    """True when the table has every sweep column (task, prevalence, policy, seed)."""
    return all(c in df.columns for c in SWEEP_COLUMNS)


def before_sft(phase: pd.Series) -> pd.Series:
    """Rows whose phase comes before SFT in series order (pretrain, base): never an SFT result."""
    return phase.map(lambda p: phase_rank(str(p)) < phase_rank("sft"))


# --------------------------------------------------------------------------- checkpoints


def checkpoint_info(df: pd.DataFrame) -> pd.DataFrame:
    """Checkpoints in series order (:func:`training.phases.series_key`), indexed by name, with phase and step."""
    info = df[["checkpoint", "phase", "step"]].drop_duplicates()
    clash = info["checkpoint"][info["checkpoint"].duplicated()]
    if len(clash):
        raise UsageError(
            f"checkpoint {clash.iloc[0]!r} appears with several (phase, step) pairs; the table mixes runs, filter it to one run first"
        )
    keys = [series_key(str(p), int(s), str(c)) for c, p, s in zip(info["checkpoint"], info["phase"], info["step"])]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return info.iloc[order].set_index("checkpoint")[["phase", "step"]]


def _entries(info: pd.DataFrame) -> list[tuple[str, int]]:
    return [(str(p), int(s)) for p, s in zip(info["phase"], info["step"])]


def checkpoint_order(df: pd.DataFrame) -> list[str]:
    """Checkpoint names in series order (phase: pretrain < base < sft < others, then step)."""
    return list(checkpoint_info(df).index)


def base_of(info: pd.DataFrame) -> tuple[str, str]:
    """(base checkpoint, why) for a :func:`checkpoint_info` frame; the reason is one of
    :func:`training.phases.base_position`'s: "sft step 0", "base phase", "last pretrain", "earliest"."""
    i, reason = base_position(_entries(info))
    return str(info.index[i]), reason


def base_checkpoint(df: pd.DataFrame) -> str:
    """The model before SFT: sft step 0, else the last base-phase, else the last pretrain checkpoint, else the earliest."""
    return base_of(checkpoint_info(df))[0]


def base_reason(df: pd.DataFrame) -> str:
    """Why :func:`base_checkpoint` is the base; "earliest" means no model before SFT is in the table."""
    return base_of(checkpoint_info(df))[1]


def final_checkpoint(df: pd.DataFrame) -> str:
    """The last checkpoint in series order (the base itself when it is the only one)."""
    info = checkpoint_info(df)
    return str(info.index[final_position(_entries(info))])


def checkpoint_label(df: pd.DataFrame, name: str, *, short: bool = False) -> str:
    """Readable label: 'base' for the base, 'SFT step 400' (or '400' when short), 'pretrain step 9000'."""
    info = checkpoint_info(df)
    if name == base_of(info)[0]:
        return "base"
    phase, step = info.loc[name, "phase"], int(info.loc[name, "step"])
    if phase == "sft":
        return str(step) if short else f"SFT step {step}"
    return f"{phase} {step}" if short else f"{phase} step {step}"


# --------------------------------------------------------------------------- policies


def policy_rank(policy: str) -> tuple:
    """Data policies in reading order: plain ones before their mitigations (``canonical+interp0.5``),
    canonical before balanced, then by name."""
    base, _, mitigation = str(policy).partition("+")
    return (bool(mitigation), {"canonical": 0, "balanced": 1}.get(base, 2), str(policy))


# --------------------------------------------------------------------------- strategies


def strategy_rank(name: str) -> int:
    """Plain baselines first (temperature 1, other temperatures, top_p, min_p), then others, greedy, fork_*."""
    s = name.lower()
    if s in ("temperature:1", "temperature:1.0"):
        return 0
    if s.startswith("temperature:"):
        return 1
    if s.startswith(("top_p:", "top-p:")):
        return 2
    if s.startswith(("min_p:", "min-p:")):
        return 3
    if s.startswith("fork"):  # the diversity-encouraging strategies
        return 6
    if s == "greedy":
        return 5
    return 4


def default_strategy(df: pd.DataFrame) -> str:
    """The pass@k strategy figures and the report use unless told: a plain baseline, preferring temperature 1.

    Ranked by :func:`strategy_rank`, then by how many rows use it, then by name.
    """
    p = df[df["metric"] == "pass@k"]
    if p.empty:
        raise UsageError("the table has no pass@k rows; measure with sampling (probes run --n-samples ...)")
    counts = p["strategy"].value_counts()
    return sorted(counts.index, key=lambda s: (strategy_rank(str(s)), -int(counts[s]), str(s)))[0]


# --------------------------------------------------------------------------- rows


def kind_rows(sub: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Rows of one kind; 'all' falls back to '' (metrics measured without a kind split)."""
    out = sub[sub["kind"] == kind]
    if out.empty and kind == "all":
        out = sub[sub["kind"] == ""]
    return out


def select_rows(
    df: pd.DataFrame,
    metric: str,
    *,
    what: str,
    kind: str | None = None,
    strategy: str | None = None,
    one_run: bool = True,
) -> pd.DataFrame:
    """Rows of one metric (and kind / strategy), refusing an empty selection with a clear reason.

    ``what`` names the caller in the message; ``one_run`` refuses a table that holds several runs.
    """
    sub = df[df["metric"] == metric]
    if sub.empty:
        raise UsageError(f"{what} needs {metric} rows and the table has none")
    if kind is not None:
        have = sorted(set(sub["kind"]))
        sub = kind_rows(sub, kind)
        if sub.empty:
            raise UsageError(f"{what} needs {metric} rows of kind {kind!r}; the table has kinds {have}")
    if strategy is not None:
        have = sorted(set(sub["strategy"]))
        sub = sub[sub["strategy"] == strategy]
        if sub.empty:
            raise UsageError(f"{what} needs {metric} rows for strategy {strategy!r}; the table has {have}")
    if one_run and sub.duplicated(subset=ROW_KEYS).any():
        raise UsageError(
            f"{what}: the table holds several {metric} rows per checkpoint/kind/layer/k/strategy "
            "(a sweep or a concatenation of runs); filter it to one run first"
        )
    return sub


def pick_kind(df: pd.DataFrame, metric: str, preferred: Sequence[str]) -> str | None:
    """First kind in `preferred` (then any) that `metric` has rows for; None when it has none."""
    kinds = set(df.loc[df["metric"] == metric, "kind"])
    for k in list(preferred) + list(ALL_KINDS) + [""]:
        if k in kinds:
            return k
    return None


def pick_k(ks: Sequence[int], want: int = 16) -> int:
    """`want` when measured, else the largest k measured."""
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise UsageError("no pass@k values of k in the table")
    return want if want in ks else ks[-1]
