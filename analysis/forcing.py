"""Branch forcing: what each branch of a fork is worth, and the coverage a perfect fork choice reaches.

At each problem's first decision point, each branch's first token is forced after the gold
prefix and m continuations are sampled (the toolkit's sampler: every problem x branch in one
call) and scored by the run's verifier on the whole completion text. A branch's *value* is its
continuations' success rate. This separates "SFT prefers a worse branch" (the preferred branch's
value below the other valid ones') from "SFT prefers one of several equally good branches", and
``forced_pass@k`` — pass@k of a policy that splits the fork evenly over the valid branches and
then continues as the model does — is the coverage a perfect fork choice would reach, to set
beside the model's own pass@k.

Rows (per kind and ``all``, with bootstrap intervals over problems):
``branch_value_valid`` / ``branch_value_invalid`` (mean over a problem's valid / invalid
branches, then over problems), ``branch_value_preferred`` (the branch this checkpoint puts the
most mass on, from the teacher-forced pass), ``forced_pass@k`` (the pooled continuations of the
valid branches, m each, through the unbiased estimator; k up to m).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from analysis.measure import ForkCapture, Verifier, _by_kind, cut_at_stop, estimate_row, seed_for
from analysis.passk import pass_at_k_array
from hooks.base import Instrumented
from hooks.encode import EncodedProblem
from training.errors import UsageError

__all__ = ["ForcingOutcome", "forcing_outcomes", "forcing_rows"]


@dataclass
class ForcingOutcome:
    """Per problem with a first fork: successes out of m per branch (in the fork's branch order)."""

    problem: list[int]
    """Index into the encoded problems."""
    kind: list[str]
    successes: list[np.ndarray]
    valid: list[np.ndarray]
    m: int


def forcing_outcomes(model: Instrumented, encoded: Sequence[EncodedProblem], verifier: Verifier, m: int, seed: int,
                     strategy: str, max_new_tokens: int, stop_strings: Sequence[str] = (),
                     batch_size: int | None = None) -> ForcingOutcome:
    """m continuations after forcing each branch of each problem's first fork, verified.

    ``max_new_tokens`` is the run's budget for a whole completion; a forced continuation gets
    what is left after the gold prefix and the forced token. A problem without a fork is left out
    (it has nothing to force); an eval set with no fork at all is a user error.
    """
    from hooks.sampler import NonFiniteLogits, generate

    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise UsageError(f"forcing needs m ≥ 1 continuations per branch, got {m!r}")
    with_fork = [i for i, p in enumerate(encoded) if p.first_fork is not None]
    if not with_fork:
        raise UsageError("branch forcing needs decision points, and no problem of the eval set has one the tokenizer can read")
    tok = model.tokenizer
    prompts, owners = [], []
    for i in with_fork:
        p = encoded[i]
        f = p.first_fork
        for b, bid in enumerate(f.branch_ids):
            prompts.append(p.ids[: f.pos] + [bid])
            owners.append((i, b))
    used = max(len(pr) - encoded[i].prompt_len for pr, (i, _) in zip(prompts, owners))
    budget = max(1, max_new_tokens - used)
    if batch_size is None:
        batch_size = 4096 if model.device.type == "cuda" else 256
    gen = torch.Generator().manual_seed(seed)
    try:
        out = generate(model.stepper(), prompts, m, budget, sorted(tok.stop_ids), tok.pad_id, strategy, gen,
                       batch_size=batch_size)
    except NonFiniteLogits as e:
        raise UsageError(f"{model.path}: {e}; no number is reported for it") from None
    succ = {i: np.zeros(len(encoded[i].first_fork.branch_ids), dtype=int) for i in with_fork}
    tokens, finished = out.tokens.tolist(), out.finished.tolist()
    for r, (i, b) in enumerate(owners):
        p = encoded[i]
        head = prompts[r][p.prompt_len:]
        for cont, done in zip(tokens[r], finished[r]):
            text, _ = tok.decode_completion(head + cont)
            text = cut_at_stop(text, stop_strings)[0] if stop_strings else text
            succ[i][b] += bool(done) and verifier(p.problem, text)
    return ForcingOutcome(with_fork, [encoded[i].kind for i in with_fork], [succ[i] for i in with_fork],
                          [np.asarray(encoded[i].first_fork.valid, dtype=bool) for i in with_fork], m)


def forcing_rows(out: ForcingOutcome, cap: ForkCapture, encoded: Sequence[EncodedProblem], strategy: str,
                 ks: Sequence[int], where: dict[str, Any], n_boot: int = 1000) -> list[dict]:
    """Branch values and forced_pass@k per kind (their own bootstrap stream: no other interval moves)."""
    rng = np.random.default_rng(seed_for(where.get("checkpoint"), strategy, "forcing"))
    first_item = {}  # problem index -> its first fork's row in the teacher-forced capture
    for item, prob in enumerate(cap.problem.tolist()):
        first_item.setdefault(prob, item)
    rate = [s / out.m for s in out.successes]
    valid_v = np.array([r[v].mean() if v.any() else np.nan for r, v in zip(rate, out.valid)])
    invalid_v = np.array([r[~v].mean() if (~v).any() else np.nan for r, v in zip(rate, out.valid)])
    preferred = []
    for i, r in zip(out.problem, rate):
        item = first_item.get(encoded[i].index)
        nb = len(r)
        preferred.append(r[int(np.argmax(cap.mass[item, :nb]))] if item is not None else np.nan)
    preferred = np.array(preferred)
    pooled_n = np.array([out.m * int(v.sum()) for v in out.valid])
    pooled_c = np.array([int(s[v].sum()) for s, v in zip(out.successes, out.valid)])
    rows: list[dict] = []

    def add(metric: str, values: np.ndarray, kind: str, k: int | None = None) -> None:
        r = estimate_row(metric, values, rng, n_boot, where, kind=kind, k=k, strategy=strategy)
        if r is not None:
            rows.append(r)

    for kind, sel in _by_kind(out.kind):
        add("branch_value_valid", valid_v[sel], kind)
        add("branch_value_invalid", invalid_v[sel], kind)
        add("branch_value_preferred", preferred[sel], kind)
        for k in ks:
            if k > out.m:
                continue
            vals = np.array([pass_at_k_array(int(n), np.array([c]), k)[0] for n, c in zip(pooled_n[sel], pooled_c[sel])])
            add("forced_pass@k", vals, kind, k)
    return rows
