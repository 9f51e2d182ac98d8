"""The graph-branching task: find a path from source to target in a small graph.

The first move out of the source is the decision point. ``indecipherable``: b equal arms, the
target ends one (choosing needs planning back from the target, which small next-token models fail
to learn: the path-star task). ``decipherable``: the target is a direct child of the source.
``multi-valid``: two arms merge before the target, so both first moves work; the canonical
demonstration takes the arm whose first node has the smaller label (an arbitrary style rule).
Every graph also carries a disconnected distractor with a merge node, so "a node with two incoming
edges" does not give multi-valid forks away.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from training.errors import UsageError
from training.schema import DecisionPoint, Problem
from training.tasks import register
from training.tasks.base import Task
from training.tokenizer import WordTokenizer

SEP, QUERY, FILL, COMMA = "|", ":", ".", ","


@dataclass
class GraphConfig:
    n_labels: int = 50
    max_edges: int = 16
    arms: list[int] = field(default_factory=lambda: [2, 3])
    arm_len: list[int] = field(default_factory=lambda: [3, 4])
    distractor: bool = True
    edge_sep: bool = False
    """Write each edge as ``u v ,`` so edge boundaries are explicit tokens (easier lookups)."""


def node(i: int) -> str:
    return f"n{i}"


def label(tok: str) -> int:
    return int(tok[1:])


@register
class GraphTask(Task):
    name = "graph"
    Config = GraphConfig

    @classmethod
    def validate(cls, cfg: GraphConfig) -> None:
        if not cfg.arms or min(cfg.arms) < 2:
            raise UsageError(f"task.arms must list arm counts ≥ 2, got {cfg.arms}")
        if not cfg.arm_len or min(cfg.arm_len) < 2:
            raise UsageError(f"task.arm_len must list arm lengths ≥ 2, got {cfg.arm_len}")
        b, L = max(cfg.arms), max(cfg.arm_len)
        need_edges = b * L + (4 if cfg.distractor else 0)
        if cfg.max_edges < need_edges:
            raise UsageError(f"task.max_edges={cfg.max_edges} is too small: {b} arms of length {L} need {need_edges}")
        need_nodes = 1 + b * L + (5 if cfg.distractor else 0)
        if cfg.n_labels < need_nodes:
            raise UsageError(f"task.n_labels={cfg.n_labels} is too small: graphs need up to {need_nodes} nodes")

    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer([SEP, QUERY, FILL, COMMA] + [node(i) for i in range(self.cfg.n_labels)])

    @property
    def max_completion_tokens(self) -> int:
        return max(self.cfg.arm_len) + 2  # source, arm nodes, <eos>

    @property
    def prompt_tokens(self) -> int:
        return (3 if self.cfg.edge_sep else 2) * self.cfg.max_edges + 4

    @property
    def max_seq_len(self) -> int:
        return self.prompt_tokens + self.max_completion_tokens

    # --- graphs -----------------------------------------------------------------------
    def _graph(self, kind: str, rng: np.random.Generator):
        """Edges, source, target, the source's children (branches) and the valid ones."""
        cfg = self.cfg
        # integers(len) draws exactly what choice(list) draws (same stream, same result), without
        # choice's array conversion: the data of a seed is unchanged, made faster.
        b = int(cfg.arms[int(rng.integers(len(cfg.arms)))])
        L = int(cfg.arm_len[int(rng.integers(len(cfg.arm_len)))])
        labels = iter(rng.permutation(cfg.n_labels).tolist())
        s = next(labels)
        edges: list[tuple[int, int]] = []

        def chain(start: int, length: int) -> list[int]:
            nodes = [start] + [next(labels) for _ in range(length)]
            edges.extend(zip(nodes[:-1], nodes[1:]))
            return nodes

        if kind == "indecipherable":
            arms = [chain(s, L) for _ in range(b)]
            win = int(rng.integers(b))
            target = arms[win][-1]
            valid_paths = [arms[win]]
        elif kind == "decipherable":
            target = next(labels)
            edges.append((s, target))
            for _ in range(b - 1):
                chain(s, L)
            valid_paths = [[s, target]]
        elif kind == "multi-valid":
            main = chain(s, L)
            merge_depth = int(rng.integers(2, L)) if L > 2 else 1  # the merge node sits at this depth
            merge = main[merge_depth]
            other = [s] + [next(labels) for _ in range(merge_depth - 1)] + [merge]
            edges.extend(zip(other[:-1], other[1:]))
            for _ in range(b - 2):
                chain(s, L)
            target = main[-1]
            valid_paths = [main, other + main[merge_depth + 1 :]]
        else:
            raise UsageError(f"unknown decision-point kind {kind!r}")
        if cfg.distractor:  # a disconnected merge: a->m, c->m, m->d, d->e
            a, c, m, d, e = (next(labels) for _ in range(5))
            edges.extend([(a, m), (c, m), (m, d), (d, e)])
        children = sorted(v for u, v in edges if u == s)
        return edges, s, target, children, valid_paths

    def _prompt(self, edges, s, t, rng: np.random.Generator) -> str:
        order = rng.permutation(len(edges))
        words = []
        for i in order:
            u, v = edges[i]
            words += [node(u), node(v)] + ([COMMA] if self.cfg.edge_sep else [])
        words += ([FILL, FILL] + ([COMMA] if self.cfg.edge_sep else [])) * (self.cfg.max_edges - len(edges))
        words += [SEP, node(s), node(t), QUERY]
        return " ".join(words)

    @staticmethod
    def _completion(path: list[int]) -> tuple[str, int]:
        """Completion text (leading space) and the char offset of its second node (the fork)."""
        text = "".join(" " + node(v) for v in path)
        return text, len(" " + node(path[0])) + 1

    def problem(self, kind: str, rng: np.random.Generator, demo: int = 0) -> Problem:
        edges, s, t, children, valid_paths = self._graph(kind, rng)
        prompt = self._prompt(edges, s, t, rng)
        valid_paths = sorted(valid_paths, key=lambda p: p[1])  # canonical order: smaller first label
        path = valid_paths[demo % len(valid_paths)]
        completion, fork = self._completion(path)
        dp = DecisionPoint(
            char=fork,
            branches=[node(c) for c in children],
            valid=[node(p[1]) for p in valid_paths],
            kind=kind,
            taken=node(path[1]),
        )
        return Problem(prompt, completion, completion.strip(), [dp], {"task": self.name, "kind": kind})

    def pretrain_example(self, rng: np.random.Generator) -> Problem:
        kind = ("indecipherable", "decipherable", "multi-valid")[int(rng.integers(3))]
        edges, s, t, children, valid_paths = self._graph(kind, rng)
        prompt = self._prompt(edges, s, t, rng)
        succ: dict[int, list[int]] = {}
        for u, v in edges:
            succ.setdefault(u, []).append(v)
        walk = [s]
        while walk[-1] in succ:  # uniform at every fork, ignore the target, stop at a leaf
            nxt = sorted(succ[walk[-1]])
            walk.append(nxt[int(rng.integers(len(nxt)))])
        completion, fork = self._completion(walk)
        dp = DecisionPoint(
            char=fork,
            branches=[node(c) for c in children],
            valid=sorted({node(p[1]) for p in valid_paths}, key=label),
            kind=kind,
            taken=node(walk[1]),
        )
        return Problem(prompt, completion, completion.strip(), [dp], {"task": self.name, "kind": kind})

    # --- checking ---------------------------------------------------------------------
    @staticmethod
    def parse_prompt(prompt: str):
        words = prompt.split()
        try:
            sep = words.index(SEP)
            s, t = words[sep + 1], words[sep + 2]
        except (ValueError, IndexError):
            return None
        body = [w for w in words[:sep] if w != COMMA]
        edges = {(body[i], body[i + 1]) for i in range(0, len(body) - 1, 2) if body[i] != FILL}
        return edges, s, t

    def verify(self, problem: Problem, completion: str) -> bool:
        try:
            parsed = self.parse_prompt(problem.prompt)
            if parsed is None or not isinstance(completion, str):
                return False
            edges, s, t = parsed
            path = completion.split()
            if len(path) < 2 or path[0] != s or path[-1] != t or len(path) > len(edges) + 1:
                return False
            return all((u, v) in edges for u, v in zip(path[:-1], path[1:]))
        except Exception:  # a verifier must never crash on garbage
            return False

    def key(self, problem: Problem) -> str:
        parsed = self.parse_prompt(problem.prompt)
        if parsed is None:
            return problem.prompt
        edges, s, t = parsed
        return f"{sorted(edges)}|{s}|{t}"
