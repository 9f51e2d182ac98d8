"""The reasoning-modes task: find a query node on a chain, walking from the head or from the tail.

The prompt lists ``pairs`` shuffled (node, next) pairs — a chain plus a disconnected distractor
chain — then the chain's head, its tail, the query node q and a cue slot. The first completion
word is the mode, the decision point: ``fwd`` walks from the head along the pairs, ``bwd`` walks
from the tail against them. The trace lists every node visited (a hop is one lookup: the partner
of the current node in its pair) and, on reaching q, writes ``= h``, the hops it took. A mode may
take at most ``budget`` hops; one that runs out first ends its trace with ``fail``.

Which mode reaches q in budget depends on how far q lies from each end, which only chasing the
pointers reveals, and the distractor keeps the chain's length out of sight (the pair count is
fixed). ``indecipherable``: q is within budget of one end only, and the cue is ``?``.
``multi-valid``: q is within budget of both ends, cue ``?``; the canonical demonstration is
``fwd`` (an arbitrary style rule). ``decipherable``: like indecipherable, but the cue names the
end to start from (``<`` the head, ``>`` the tail): a control SFT should learn. In every kind the
valid walk's hop count is uniform on 1..budget, so a fine-tuning mix without some kind never
teaches the model a shorter walk than that kind needs.

Each trace step is one induction-style lookup, as in the graph task. The defaults (8 pairs, walks
of at most 3 hops) are sized for the default 3-layer d_model-64 model on the CPU budget: it walks
without error after 2,500 pretraining steps, whereas with 12 pairs (budget 4) it had not learned a
single lookup by then, and a 15-pair chain walked for up to 9 hops never learned in 5,500 steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from training.errors import UsageError
from training.schema import DecisionPoint, Problem
from training.tasks import register
from training.tasks.base import Task
from training.tokenizer import WordTokenizer

SEP, QUERY, EQ, FAIL = "|", ":", "=", "fail"
MODES = ("fwd", "bwd")  # canonical order: demo 0 (the style rule) is fwd
CUE = {"fwd": "<", "bwd": ">", None: "?"}


@dataclass
class ModesConfig:
    budget: int = 3
    """Most hops a walk may take before it gives up with ``fail``."""
    overshoot: int = 1
    """How far past the budget the far end of a single-valid problem lies: budget+1 .. budget+overshoot hops."""
    pairs: int = 8
    """Pairs in every prompt (chain plus distractor), so prompts have one length and hide the chain's."""
    n_labels: int = 20
    """Node labels to draw from."""


def node(i: int) -> str:
    return f"n{i}"


@register
class ModesTask(Task):
    name = "modes"
    Config = ModesConfig

    @classmethod
    def validate(cls, cfg: ModesConfig) -> None:
        if cfg.budget < 1:
            raise UsageError(f"task.budget must be ≥ 1 hop, got {cfg.budget}")
        if cfg.overshoot < 1:
            raise UsageError(f"task.overshoot must be ≥ 1 hop, got {cfg.overshoot}")
        need = 2 * cfg.budget + cfg.overshoot + 1
        if cfg.pairs < need:
            raise UsageError(
                f"task.pairs={cfg.pairs} is too few: a chain of up to {need - 1} pairs plus a distractor pair "
                f"needs task.pairs ≥ {need}"
            )
        if cfg.n_labels < cfg.pairs + 2:
            raise UsageError(f"task.n_labels={cfg.n_labels} is too small: {cfg.pairs} pairs use {cfg.pairs + 2} nodes")

    def tokenizer(self) -> WordTokenizer:
        words = [SEP, QUERY, EQ, FAIL, *MODES, CUE["fwd"], CUE["bwd"], CUE[None]]
        words += [node(i) for i in range(self.cfg.n_labels)]
        words += [str(h) for h in range(1, self.cfg.budget + 1)]
        return WordTokenizer(words)

    @property
    def prompt_tokens(self) -> int:
        return 2 * self.cfg.pairs + 6  # pairs, |, head, tail, query, cue, :

    @property
    def max_completion_tokens(self) -> int:
        return self.cfg.budget + 5  # mode, up to budget + 1 nodes, "= h", <eos>

    @property
    def max_seq_len(self) -> int:
        return self.prompt_tokens + self.max_completion_tokens

    # --- problems ---------------------------------------------------------------------
    def valid_modes(self, hops_from_head: int, hops_from_tail: int) -> list[str]:
        """Modes that reach q within budget, in canonical order."""
        hops = {"fwd": hops_from_head, "bwd": hops_from_tail}
        return [m for m in MODES if hops[m] <= self.cfg.budget]

    def _draw(self, kind: str, rng: np.random.Generator):
        """The chain (head first), the distractor, q's hops from the head and the cue."""
        cfg = self.cfg
        a = int(rng.integers(1, cfg.budget + 1))  # hops from the head to q
        if kind == "multi-valid":
            c = int(rng.integers(1, cfg.budget + 1))  # hops from the tail to q
        elif kind in ("indecipherable", "decipherable"):
            c = int(rng.integers(cfg.budget + 1, cfg.budget + cfg.overshoot + 1))
            if rng.integers(2):
                a, c = c, a
        else:
            raise UsageError(f"unknown decision-point kind {kind!r}")
        labels = rng.permutation(cfg.n_labels)[: cfg.pairs + 2].tolist()
        chain, distractor = labels[: a + c + 1], labels[a + c + 1 :]
        cue = CUE[self.valid_modes(a, c)[0]] if kind == "decipherable" else CUE[None]
        return chain, distractor, a, cue

    def _prompt(self, chain: list[int], distractor: list[int], a: int, cue: str, rng: np.random.Generator) -> str:
        edges = list(zip(chain[:-1], chain[1:])) + list(zip(distractor[:-1], distractor[1:]))
        words = []
        for i in rng.permutation(len(edges)):
            words += [node(edges[i][0]), node(edges[i][1])]
        words += [SEP, node(chain[0]), node(chain[-1]), node(chain[a]), cue, QUERY]
        return " ".join(words)

    def _completion(self, chain: list[int], a: int, mode: str) -> str:
        """The mode word, the visited nodes, then ``= hops`` or, out of budget, ``fail``."""
        walk, hops = (chain, a) if mode == "fwd" else (chain[::-1], len(chain) - 1 - a)
        if hops <= self.cfg.budget:
            words = [node(v) for v in walk[: hops + 1]] + [EQ, str(hops)]
        else:
            words = [node(v) for v in walk[: self.cfg.budget + 1]] + [FAIL]
        return "".join(" " + w for w in [mode, *words])

    def _problem(self, kind: str, rng: np.random.Generator, pick: Callable[[list[str]], str]) -> Problem:
        chain, distractor, a, cue = self._draw(kind, rng)
        prompt = self._prompt(chain, distractor, a, cue, rng)
        valid = self.valid_modes(a, len(chain) - 1 - a)
        mode = pick(valid)
        completion = self._completion(chain, a, mode)
        dp = DecisionPoint(char=1, branches=list(MODES), valid=valid, kind=kind, taken=mode)
        return Problem(prompt, completion, completion.strip(), [dp], {"task": self.name, "kind": kind})

    def problem(self, kind: str, rng: np.random.Generator, demo: int = 0) -> Problem:
        return self._problem(kind, rng, lambda valid: valid[demo % len(valid)])

    def pretrain_example(self, rng: np.random.Generator) -> Problem:
        kind = ("indecipherable", "decipherable", "multi-valid")[int(rng.integers(3))]
        # uniform over every mode, valid or not: a wrong one shows the walk running out of budget
        return self._problem(kind, rng, lambda valid: MODES[int(rng.integers(len(MODES)))])

    # --- checking ---------------------------------------------------------------------
    @staticmethod
    def parse_prompt(prompt: str):
        """(successor map, head, tail, query) from a prompt, or None when it is not one."""
        words = prompt.split()
        try:
            sep = words.index(SEP)
            head, tail, q = words[sep + 1], words[sep + 2], words[sep + 3]
        except (ValueError, IndexError):
            return None
        body = words[:sep]
        succ = {body[i]: body[i + 1] for i in range(0, len(body) - 1, 2)}
        return succ, head, tail, q

    def verify(self, problem: Problem, completion: str) -> bool:
        """The mode, every hop of the walk (within budget), the stop at q and the hop count."""
        try:
            parsed = self.parse_prompt(problem.prompt)
            if parsed is None or not isinstance(completion, str):
                return False
            succ, head, tail, q = parsed
            words = completion.split()
            if len(words) < 4 or words[0] not in MODES or words[-2] != EQ:
                return False
            mode, walk, answer = words[0], words[1:-2], words[-1]
            if len(walk) > self.cfg.budget + 1 or walk[0] != (head if mode == "fwd" else tail):
                return False
            step = succ if mode == "fwd" else {v: u for u, v in succ.items()}
            if any(step.get(u) != v for u, v in zip(walk[:-1], walk[1:])):
                return False
            return walk[-1] == q and q not in walk[:-1] and answer == str(len(walk) - 1)
        except Exception:  # a verifier must never crash on garbage
            return False

    def key(self, problem: Problem) -> str:
        parsed = self.parse_prompt(problem.prompt)
        if parsed is None:
            return problem.prompt
        succ, head, tail, q = parsed
        return f"{sorted(succ.items())}|{head}|{tail}|{q}"
