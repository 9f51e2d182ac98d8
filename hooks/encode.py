"""Annotated problems to token positions, with any tokenizer that reports character offsets.

A decision point's ``char`` is an offset into the completion; here it becomes the index of the
token that starts the branch, and each branch string becomes the first token it would produce at
that point. Points that fall inside a token, or whose branches share a first token, cannot be
read from next-token probabilities: they are skipped and counted, never guessed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from training.schema import Problem


@dataclass
class EncodedFork:
    pos: int
    """Index of the token that starts the branch; the model's choice is read at ``pos - 1``."""
    kind: str
    branch_ids: list[int]
    """First token of each branch, in the branches' canonical order (ascending token id)."""
    valid: list[bool]
    taken: int | None
    """Index into ``branch_ids`` of the demonstration's branch, where annotated."""
    branches: list[str]


@dataclass
class EncodedProblem:
    index: int
    problem: Problem
    ids: list[int]
    """Prompt, gold completion and EOS."""
    prompt_len: int
    forks: list[EncodedFork]

    @property
    def first_fork(self) -> EncodedFork | None:
        return self.forks[0] if self.forks else None

    @property
    def kind(self) -> str:
        """The problem's kind: that of its first decision point."""
        return self.forks[0].kind if self.forks else ""


@dataclass
class EncodeReport:
    skipped: Counter = field(default_factory=Counter)
    problems_without_forks: int = 0

    def to_dict(self) -> dict:
        return {"skipped_decision_points": dict(self.skipped), "problems_without_forks": self.problems_without_forks}


def _token_at(offsets: list[tuple[int, int]], text: str, char: int, first: int) -> int | None:
    """The token that starts at ``char``, allowing tokens that carry leading whitespace (BPE)."""
    for j in range(first, len(offsets)):
        start, end = offsets[j]
        if start == char or (start < char and text[start:char].isspace()):
            return j
        if start > char or end > char:
            return None
    return None


def encode_problem(tokenizer, problem: Problem, index: int, report: EncodeReport) -> EncodedProblem | None:
    text = problem.prompt + problem.completion
    enc = tokenizer.encode_with_offsets(text)
    ids = [t for t, _ in enc]
    offsets = [o for _, o in enc]
    boundary = len(problem.prompt)
    prompt_len = sum(1 for s, _ in offsets if s < boundary)
    if any(s < boundary < e for s, e in offsets):
        report.skipped["prompt boundary inside a token"] += len(problem.decision_points)
        return None
    forks = []
    for dp in problem.decision_points:
        char = boundary + dp.char
        j = _token_at(offsets, text, char, prompt_len)
        if j is None or j == 0:
            report.skipped["inside a token"] += 1
            continue
        prefix = text[:char]
        branch_ids = []
        for b in dp.branches:
            benc = tokenizer.encode_with_offsets(prefix + b)
            bj = _token_at([o for _, o in benc], prefix + b, char, 0)
            branch_ids.append(None if bj is None else benc[bj][0])
        if any(b is None for b in branch_ids):
            report.skipped["branch starts inside a token"] += 1
            continue
        if len(set(branch_ids)) != len(branch_ids):
            report.skipped["branches share a first token"] += 1
            continue
        order = sorted(range(len(branch_ids)), key=lambda i: branch_ids[i])
        branches = [dp.branches[i] for i in order]
        taken = branches.index(dp.taken) if dp.taken is not None else None
        forks.append(
            EncodedFork(
                pos=j,
                kind=dp.kind,
                branch_ids=[branch_ids[i] for i in order],
                valid=[b in dp.valid for b in branches],
                taken=taken,
                branches=branches,
            )
        )
    if not forks:
        report.problems_without_forks += 1
    return EncodedProblem(index, problem, ids + [tokenizer.eos_id], prompt_len, forks)


def encode_problems(tokenizer, problems: list[Problem]) -> tuple[list[EncodedProblem], EncodeReport]:
    report = EncodeReport()
    out = []
    for i, p in enumerate(problems):
        e = encode_problem(tokenizer, p, i, report)
        if e is not None:
            out.append(e)
    return out, report
