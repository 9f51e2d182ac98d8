"""Synthetic results tables that tell the paper's story, for tests of figures, the report and notebooks.

Built with :func:`analysis.table.row` / :func:`analysis.table.to_frame`, so they follow the same
contract as `probes run` / `probes sweep` output. The numbers come from small closed-form models:

- pass@k: a share `s` of problems has collapsed onto one branch (right with probability 0.6:
  per-sample success 0.95, else 0.01); the rest keep the base's per-sample success 0.2, so
  pass@k = mean over problems of 1 - (1 - p)^k. SFT raises `s`, so pass@1 rises and pass@16 falls.
- entropy at forks falls and the top-branch share rises with SFT; the logit lens reaches the
  final value earlier in the stack as training goes on.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.table import KINDS, row, to_frame

DEFAULT_STRATEGY = "temperature:1"
DIVERSITY_STRATEGY = "fork_temp:2,0.5,1"


def pass_at_k(collapse: float, k: int, *, p_base: float = 0.2, right: float = 0.6) -> float:
    """The closed-form pass@k of the mixture described in the module docstring."""
    base = 1 - (1 - p_base) ** k
    hit = 1 - (1 - 0.95) ** k
    miss = 1 - (1 - 0.01) ** k
    return (1 - collapse) * base + collapse * (right * hit + (1 - right) * miss)


def sft_steps(n_checkpoints: int) -> list[int]:
    """0 (the base) then log-spaced SFT steps 50, 200, 800, ..."""
    return [0] + [50 * 4**i for i in range(n_checkpoints - 1)]


def _ckpt(phase: str, step: int) -> str:
    return f"{phase}-step{step:06d}"


_ENTROPY = {"indecipherable": (0.69, 0.08), "decipherable": (0.62, 0.02), "multi-valid": (1.05, 0.30)}
_TOP = {"indecipherable": (0.55, 0.96), "decipherable": (0.62, 0.99), "multi-valid": (0.42, 0.88)}
_VALID = {"indecipherable": (0.50, 0.60), "decipherable": (0.62, 0.98), "multi-valid": (0.92, 0.97)}


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def synthetic_results(
    n_checkpoints: int = 5,
    n_layers: int = 3,
    ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
    seed: int = 0,
    *,
    strategies: tuple[str, ...] = (DEFAULT_STRATEGY,),
    with_pretrain: bool = False,
    lens: bool = True,
    probes: bool = True,
) -> pd.DataFrame:
    """A one-run results table: base (sft step 0) plus `n_checkpoints - 1` SFT checkpoints.

    `with_pretrain` adds a pretraining checkpoint before the base; `lens`/`probes` False leave those
    metrics out. Interval widths carry a little seeded noise; the values follow the closed forms.
    """
    rng = np.random.default_rng(seed)
    rows = []
    checkpoints = [("sft", s) for s in sft_steps(n_checkpoints)]
    if with_pretrain:
        checkpoints = [("pretrain", 20000)] + checkpoints
    n_prob, n_forks = 200, 300
    for i, (phase, step) in enumerate(checkpoints):
        name = _ckpt(phase, step)
        t = 0.0 if phase == "pretrain" or n_checkpoints == 1 else step / max(sft_steps(n_checkpoints)[-1], 1)
        t = math.sqrt(t)  # fast early change, as in the log-spaced schedule
        common = dict(checkpoint=name, phase=phase, step=step)
        for strategy in strategies:
            diversity = 0.5 if strategy != DEFAULT_STRATEGY else 1.0  # a diversity strategy undoes half the collapse
            collapse = 0.85 * t * diversity
            for k in ks:
                v = pass_at_k(collapse, k)
                half = 0.02 + 0.01 * rng.random()
                rows.append(row(**common, metric="pass@k", value=v, kind="all", k=k, strategy=strategy,
                                ci_low=max(0.0, v - half), ci_high=min(1.0, v + half), n=n_prob))
            for kind in KINDS:
                rows.append(row(**common, metric="fork_valid_rate", value=_lerp(_VALID[kind][0], _VALID[kind][1], t * diversity),
                                kind=kind, strategy=strategy, n=n_prob))
                rows.append(row(**common, metric="branch_coverage", value=_lerp(1.9, 1.1, t * diversity),
                                kind=kind, strategy=strategy, n=n_prob))
        for kind in KINDS:
            e0, e1 = _ENTROPY[kind]
            e = _lerp(e0, e1, t)
            rows.append(row(**common, metric="entropy_fork", value=e, kind=kind, ci_low=e - 0.02, ci_high=e + 0.02, n=n_forks))
            top = _lerp(*_TOP[kind], t)
            rows.append(row(**common, metric="mass_top_branch", value=top, kind=kind, n=n_forks))
            valid = _lerp(*_VALID[kind], t)
            rows.append(row(**common, metric="mass_valid", value=valid, kind=kind, n=n_forks))
            if lens:
                uniform = 0.34
                gamma = 3.0 - 2.6 * t  # later checkpoints commit earlier in the stack
                for layer in range(n_layers + 1):
                    frac = (layer / n_layers) ** gamma
                    rows.append(row(**common, metric="lens_mass_top_branch", value=_lerp(uniform, top, frac), kind=kind, layer=layer, n=n_forks))
                    rows.append(row(**common, metric="lens_mass_valid", value=_lerp(uniform, valid, frac), kind=kind, layer=layer, n=n_forks))
                    rows.append(row(**common, metric="lens_kl_final", value=2.0 * (1 - frac), kind=kind, layer=layer, n=n_forks))
        rows.append(row(**common, metric="entropy_other", value=_lerp(1.2, 0.9, t), kind="", n=5000))
        if probes:
            for layer in range(n_layers + 1):
                depth = layer / n_layers
                control = 0.5 + 0.3 * depth**2  # control tasks get easier deep in the stack
                acc_taken = 0.5 + (0.3 + 0.15 * t) * math.sin(math.pi / 2 * depth) + 0.01 * rng.random()
                acc_valid = 0.5 + (0.2 + 0.1 * t) * depth
                rows += [
                    row(**common, metric="probe_acc_taken", value=acc_taken, kind="all", layer=layer, n=n_forks),
                    row(**common, metric="probe_acc_valid", value=acc_valid, kind="all", layer=layer, n=n_forks),
                    row(**common, metric="probe_selectivity_taken", value=acc_taken - control, kind="all", layer=layer, n=n_forks),
                    row(**common, metric="probe_selectivity_valid", value=acc_valid - control, kind="all", layer=layer, n=n_forks),
                ]
    return to_frame(rows)


POLICY_STRENGTH = {"canonical": 1.0, "balanced": 0.3}
"""How much of the fork-heavy data each policy turns into collapse (balanced SFT spreads the branches)."""


def synthetic_sweep(
    tasks: tuple[str, ...] = ("arith", "maze"),
    prevalences: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    policies: tuple[str, ...] = ("canonical", "balanced"),
    seeds: tuple[int, ...] = (0, 1),
    steps: tuple[int, ...] = (0, 100, 400),
    ks: tuple[int, ...] = (1, 2, 4, 8, 16),
    strategies: tuple[str, ...] = (DEFAULT_STRATEGY, DIVERSITY_STRATEGY),
    seed: int = 0,
) -> pd.DataFrame:
    """A sweep table: per (task, prevalence, policy, seed) cell an SFT run from that task/seed's base.

    Every cell repeats its base rows (phase sft, step 0; identical across prevalence and policy).
    Final collapse = prevalence x policy strength x (1 + seeded noise), halved by the diversity strategy.
    """
    rng = np.random.default_rng(seed)
    rows = []
    last = max(steps)
    p_base = {task: 0.2 + 0.05 * i for i, task in enumerate(tasks)}
    for task in tasks:
        for s in seeds:
            for prev in prevalences:
                for policy in policies:
                    noise = 1.0 + 0.1 * rng.standard_normal()
                    for step in steps:
                        name = _ckpt("sft", step)
                        for strategy in strategies:
                            diversity = 0.5 if strategy != DEFAULT_STRATEGY else 1.0
                            collapse = min(1.0, max(0.0, 0.9 * prev * POLICY_STRENGTH.get(policy, 0.5) * noise * diversity * step / last))
                            for k in ks:
                                v = pass_at_k(collapse, k, p_base=p_base[task])
                                rows.append(row(name, "sft", step, "pass@k", v, kind="all", k=k, strategy=strategy,
                                                ci_low=max(0.0, v - 0.03), ci_high=min(1.0, v + 0.03), n=100,
                                                task=task, prevalence=float(prev), policy=policy, seed=int(s)))
                        ent = 0.69 * (1 - 0.8 * prev * POLICY_STRENGTH.get(policy, 0.5) * step / last)
                        rows.append(row(name, "sft", step, "entropy_fork", ent, kind="indecipherable", n=100,
                                        task=task, prevalence=float(prev), policy=policy, seed=int(s)))
    return to_frame(rows)


def expected_shrinkage(df: pd.DataFrame, task: str, policy: str, strategy: str, k: int = 16) -> dict[float, list[tuple[float, float]]]:
    """Independent loop reference: prevalence -> [(shrinkage, pass@1 gain) per seed], base = that task/seed's step 0."""
    p = df[(df["metric"] == "pass@k") & (df["task"] == task) & (df["strategy"] == strategy)]
    out: dict[float, list[tuple[float, float]]] = {}
    for s in sorted(set(p["seed"])):
        ps = p[p["seed"] == s]
        base = ps[ps["step"] == 0]
        b1 = float(base[base["k"] == 1]["value"].iloc[0])
        bk = float(base[base["k"] == k]["value"].iloc[0])
        for prev in sorted(set(ps["prevalence"])):
            cell = ps[(ps["prevalence"] == prev) & (ps["policy"] == policy)]
            last = cell[cell["step"] == cell["step"].max()]
            f1 = float(last[last["k"] == 1]["value"].iloc[0])
            fk = float(last[last["k"] == k]["value"].iloc[0])
            out.setdefault(float(prev), []).append((bk - fk, f1 - b1))
    return out


def series_table(
    checkpoints: list[tuple[str, str, int]],
    pass1: list[float],
    pass16: list[float],
    entropy: list[float] | None = None,
    *,
    sweep: dict | None = None,
) -> pd.DataFrame:
    """A small hand-made run table: per (name, phase, step) its pass@1, pass@16 (95% CI +-0.02) and,
    when given, entropy at indecipherable forks; `sweep` adds the sweep columns to every row."""
    rows = []
    extra = dict(sweep or {})
    for i, (name, phase, step) in enumerate(checkpoints):
        for k, v in ((1, pass1[i]), (16, pass16[i])):
            rows.append(row(name, phase, step, "pass@k", v, kind="all", k=k, strategy=DEFAULT_STRATEGY,
                            ci_low=v - 0.02, ci_high=v + 0.02, n=100, **extra))
        if entropy is not None:
            rows.append(row(name, phase, step, "entropy_fork", entropy[i], kind="indecipherable", n=50, **extra))
    return to_frame(rows)
