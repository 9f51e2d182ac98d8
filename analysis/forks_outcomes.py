"""The measurements behind fork discovery: position statistics, alternatives, forced continuations.

One teacher-forced pass gives every completion position's entropy and token masses; every
candidate x alternative of a chunk is forced and continued in one sampler call. See
:mod:`analysis.forks` for the rule these numbers feed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from analysis.measure import seed_for
from hooks.distributions import entropy as _entropy
from hooks.distributions import unusable
from training.errors import UsageError

from analysis.forks_plan import Encoded, ForkPlan
from hooks.encode import pad_ids


@dataclass
class PositionStats:
    """One problem's completion positions: the branch token at ``pos[k]`` is read at ``pos[k] - 1``."""

    pos: np.ndarray
    entropy: np.ndarray
    taken: np.ndarray
    taken_mass: np.ndarray
    top_ids: np.ndarray
    """[positions, K] token ids, most probable first (every token with mass ≥ p is among them)."""
    top_mass: np.ndarray
    stop_mass: np.ndarray


def position_stats(model: Any, encoded: Sequence[Encoded], p: float, stop_ids: Sequence[int], pad_id: int,
                   batch_size: int, name: str = "the model") -> list[PositionStats]:
    """Entropy and the tokens holding at least ``p`` of the mass at every completion position:
    one teacher-forced ``capture`` per chunk of ``batch_size`` problems."""
    k = int(math.floor(1.0 / p)) + 1
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
    out: list[PositionStats] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start: start + batch_size]
        positions = [list(range(max(e.prompt_len, 1), len(e.ids) - 1)) for e in chunk]
        ids = pad_ids([e.ids for e in chunk], pad_id)
        attn = pad_ids([[1] * len(e.ids) for e in chunk], 0).bool()
        logit_pos = pad_ids([[t - 1 for t in pos] or [0] for pos in positions], 0)
        logits, _ = model.capture(ids, attn, torch.zeros((len(chunk), 1), dtype=torch.long), logit_pos)
        logits = logits.float()
        real = pad_ids([[1] * len(pos) for pos in positions], 0).bool().to(logits.device)
        if bool((unusable(logits) & real).any()):
            raise UsageError(f"{name}: non-finite logits in the teacher-forced pass (an overflow, or damaged weights); "
                             "no fork is reported from them")
        logp = torch.log_softmax(logits, dim=-1)
        probs = logp.exp()
        ent = _entropy(logits)
        top_mass, top_ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
        taken = pad_ids([[chunk[i].ids[t] for t in pos] or [0] for i, pos in enumerate(positions)], 0).to(probs.device)
        taken_mass = probs.gather(-1, taken[..., None])[..., 0]
        stop_mass = probs[..., stops.to(probs.device)].sum(-1)
        ent, top_mass, top_ids, taken, taken_mass, stop_mass = (
            x.cpu().numpy() for x in (ent, top_mass, top_ids, taken, taken_mass, stop_mass))
        for i, pos in enumerate(positions):
            n = len(pos)
            out.append(PositionStats(np.asarray(pos, dtype=int), ent[i, :n].astype(float), taken[i, :n],
                                     taken_mass[i, :n].astype(float), top_ids[i, :n], top_mass[i, :n].astype(float),
                                     stop_mass[i, :n].astype(float)))
    return out


def entropy_threshold(entropies: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of the completion positions' entropies (linear interpolation); +inf for none."""
    entropies = np.asarray(entropies, dtype=float)
    return float(np.quantile(entropies, quantile)) if len(entropies) else math.inf


def _alternatives(st: PositionStats, k: int, p: float, stops: set[int]) -> list[tuple[int, float]]:
    """(token, mass) of the tokens with mass ≥ p (never a stop id), most probable first."""
    return [(int(t), float(m)) for t, m in zip(st.top_ids[k], st.top_mass[k]) if m >= p and int(t) not in stops]


# ----------------------------------------------------------------------------- sampling
class _ContextStepper:
    """The model's stepper, with every prompt's rows held to the model's context.

    ``generate`` gives one ``max_new_tokens`` to a whole call, while forced prompts of different
    lengths have different room in the context (``limit - length + 1`` new tokens). When a
    sampler chunk's widest prompt has less room than asked, its prompts run as groups of equal
    length, each with a stepper sized to its own room; a group whose context is full is handed
    logits that put all mass on a stop id, so it ends there. Those rows run past their budget
    (``_budget_for`` is never more than the room), so the caller counts them as truncated.
    """

    def __init__(self, make: Callable[[], Any], limit: int | None, stop_id: int):
        self._make, self._limit, self._stop = make, limit, int(stop_id)
        self._device = make().device
        self._groups: list[tuple[Tensor | None, Any, int]] = []
        self._t = 0
        self._rows = 0
        self._vocab = 0

    @property
    def device(self) -> torch.device:
        return self._device

    def prefill(self, input_ids: Tensor, max_new_tokens: int = 1, repeats: int = 1, lengths: Tensor | None = None) -> Tensor:
        b, s = input_ids.shape
        self._t = 0
        if self._limit is None or s + max_new_tokens - 1 <= self._limit:
            inner = self._make()
            kw = {"lengths": lengths} if lengths is not None else {}
            logits = inner.prefill(input_ids, max_new_tokens=max_new_tokens, repeats=repeats, **kw)
            self._groups = [(None, inner, max_new_tokens)]
            return logits
        lens = lengths.tolist() if lengths is not None else [s] * b
        by_len: dict[int, list[int]] = {}
        for i, n in enumerate(lens):
            by_len.setdefault(int(n), []).append(i)
        self._groups, parts = [], []
        for n, idx in sorted(by_len.items()):
            cap = max(1, min(max_new_tokens, self._limit - n + 1))
            sub = input_ids[torch.tensor(idx, device=input_ids.device)][:, s - n:]
            inner = self._make()
            logits = inner.prefill(sub, max_new_tokens=cap, repeats=repeats)
            rows = (torch.tensor(idx)[:, None] * repeats + torch.arange(repeats)[None, :]).flatten().to(logits.device)
            self._groups.append((rows, inner, cap))
            parts.append((rows, logits))
        self._rows, self._vocab = b * repeats, parts[0][1].shape[-1]
        return self._merge(parts)

    def _merge(self, parts: list[tuple[Tensor, Tensor]]) -> Tensor:
        out = torch.empty((self._rows, self._vocab), dtype=parts[0][1].dtype, device=parts[0][1].device)
        for rows, logits in parts:
            out[rows] = logits
        return out

    def step(self, next_ids: Tensor) -> Tensor:
        self._t += 1
        if self._groups[0][0] is None:
            return self._groups[0][1].step(next_ids)
        parts = []
        for rows, inner, cap in self._groups:
            if self._t <= cap - 1:
                parts.append((rows, inner.step(next_ids[rows.to(next_ids.device)])))
            else:  # the context is full: end here
                stop = torch.full((len(rows), self._vocab), -math.inf, device=rows.device)
                stop[:, self._stop] = 0.0
                parts.append((rows, stop))
        return self._merge(parts)


def _budget_for(plan: ForkPlan, prompt_len: int, used: int) -> int:
    """New tokens a continuation may take after a forced prompt of ``prompt_len + used`` tokens."""
    left = plan.budget - used
    if plan.n_ctx:
        left = min(left, plan.n_ctx - (prompt_len + used) + 1)
    return max(0, left)


def _decode_branch(tok: Any, head: list[int], alt: int) -> str:
    """The text an alternative adds after the completion's first tokens ``head``."""
    before, _ = tok.decode_completion(head)
    after, _ = tok.decode_completion(head + [alt])
    return after[len(before):] if after.startswith(before) else after


def _outcomes(plan: ForkPlan, model: Any, tests: list[dict], chunk_index: int) -> None:
    """Sample m continuations after each (candidate, alternative) in ``tests`` (one generate call)
    and write samples / successes / truncated into each."""
    from hooks.sampler import NonFiniteLogits, generate

    if not tests:
        return
    tok = plan.tokenizer
    stops = set(int(s) for s in tok.stop_ids)
    prompts = [t["prompt"] for t in tests]
    budgets = [t["budget"] for t in tests]
    width = max(1, max(budgets))
    gen = torch.Generator().manual_seed(seed_for(plan.settings.seed, "forks", chunk_index))
    stepper = _ContextStepper(model.stepper, plan.n_ctx, min(stops))
    try:
        out = generate(stepper, prompts, plan.settings.samples, width, sorted(stops), tok.pad_id,
                       plan.settings.strategy, gen, batch_size=plan.sample_batch)
    except NonFiniteLogits as e:
        raise UsageError(f"{plan.name}: {e}; no fork is reported from them") from None
    tokens = out.tokens.tolist()
    verdicts: dict[tuple[int, tuple[int, ...]], bool] = {}  # the verifier once per distinct completion
    for r, t in enumerate(tests):
        succ = trunc = 0
        e = plan.encoded[t["problem"]]
        head = t["prompt"][e.prompt_len:]
        problem = plan.problems[t["problem"]]
        for cont in tokens[r]:
            cont = cont[: t["budget"]]
            stop_at = next((i for i, x in enumerate(cont) if x in stops), None)
            if stop_at is None:
                trunc += 1
                continue
            key = (t["problem"], tuple(head + cont[:stop_at]))
            if key not in verdicts:
                text, _ = tok.decode_completion(list(key[1]))
                verdicts[key] = bool(plan.verifier(problem, text))
            succ += verdicts[key]
        t["samples"], t["successes"], t["truncated"] = plan.settings.samples, succ, trunc


# ----------------------------------------------------------------------------- decisions
