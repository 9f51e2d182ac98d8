"""Annotated problems to token positions, with any tokenizer that reports character offsets.

A decision point's ``char`` is an offset into the completion where its branches start. With
``prefix = prompt + completion[:char]``, each branch ``b`` is encoded as ``prefix + b``; the
*branch token* is the first token at which those encodings differ, and the model's choice is read
at the position before it. Comparing whole encodings (not offsets alone) handles what real
tokenizers do at a boundary: a space carried by the next word (GPT-2's ``Ġword``, SentencePiece's
``▁word``), a space kept as a token of its own (``Ġ`` before a digit in Llama-family
tokenizers, the ``\n`` that ends a chat template's assistant header), and a merge that changes
the prefix's last token (``Ġ`` + ``B`` -> ``ĠB``). The gold sequence must agree with the taken
branch's encoding up to and including the branch token, so the position read is one the
teacher-forced sequence really has.

Decision points that cannot be read from one next-token distribution are skipped and counted
(``EncodeReport.skipped``), never guessed; the reasons are in :data:`SKIP_REASONS`.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

from training.schema import Problem


@dataclass
class EncodedFork:
    pos: int
    """Index in ``ids`` of the branch token (the first token at which the branches' encodings
    differ); the model's choice is read at ``pos - 1``."""
    kind: str
    branch_ids: list[int]
    """Each branch's token at ``pos``, in the branches' canonical order (ascending token id)."""
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


SKIP_REASONS = {
    "boundary": "prompt boundary inside a token",
    "inside": "inside a token",
    "before": "branch token in the prompt",
    "first": "nothing before the branch token",
    "shared": "branches share a first token",
    "blank": "branch token is only whitespace",
    "mismatch": "annotation does not match the text",
    "merged": "branch merges with the text after it",
}
"""Why a decision point is skipped, as counted in ``EncodeReport.skipped`` (and printed as
"k of n decision points skipped (reason: count)"):

- ``boundary``: the prompt/completion boundary falls inside a token (every point of the problem);
- ``inside``: the branch token holds prefix text before ``char`` other than whitespace (``char``
  is inside a word-piece);
- ``before``: the branches' encodings first differ inside the prompt;
- ``first``: the branch token is the sequence's first (an empty prompt and no BOS);
- ``shared``: two branches have the same token where the encodings first differ, or one branch's
  encoding ends there (``7`` and ``75`` as ``7`` then ``5``);
- ``blank``: a branch's token there is whitespace alone (``7`` / ``x`` after ``= `` as ``Ġ`` ``7``
  / ``Ġx``): its probability is that of every word after a space, not the branch's;
- ``mismatch``: the gold text does not continue with the taken branch (or, unannotated, with any
  branch): the annotation does not match the text;
- ``merged``: the gold text continues with the branch, but its tokens do not match the branch's up
  to the branch token (``Ġyes`` where the branch is ``y``).
"""


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def _read_fork(tokenizer, text: str, ids: list[int], prompt_len: int, boundary: int, dp) -> tuple[int, list[int]] | str:
    """``(pos, branch_ids)`` for one decision point (branch ids in ``dp.branches`` order), or the
    key of the reason it is skipped."""
    char = boundary + dp.char
    prefix = text[:char]
    encs = [tokenizer.encode_with_offsets(prefix + b) for b in dp.branches]
    seqs = [[t for t, _ in e] for e in encs]
    d = _common_prefix(seqs)
    # One branch's encoding ending where another's goes on ("7" and "75" as "7" "5"), or two
    # branches with the same token there: one next-token distribution cannot tell them apart.
    if any(len(s) == d for s in seqs) or len({s[d] for s in seqs}) != len(seqs):
        return "shared"
    if d < prompt_len:
        return "before"
    if d == 0:
        return "first"  # an empty prompt and no BOS: no position to read the choice at
    # The branch token may carry whitespace from before ``char`` (``ĠB``, ``▁B``: a merge that
    # changes the prefix's last token); any other text of the prefix inside it means the fork is
    # not at a token boundary, and the distribution before it is not the one at the fork. (Text
    # the branches share after ``char``, such as ``Ġ`` before ``7`` / ``8``, is in every branch:
    # the choice is made at the token after it.)
    for e in encs:
        start = e[d][1][0]
        if start < char and not prefix[start:char].isspace():
            return "inside"
    # A branch whose token there is whitespace alone (``Ġ`` before ``7`` against ``Ġx``; a bare
    # ``▁`` piece) would be scored by the mass of every word that starts with a space.
    for b, e in zip(dp.branches, encs):
        start, end = e[d][1]
        if not (prefix + b)[start:end].strip() and b.strip():
            return "blank"
    # The gold text must go on with the taken branch (unannotated: with one of the branches), and
    # the gold tokens must be that branch's up to and including the branch token, so ``pos - 1``
    # is a position the teacher-forced sequence has and ``ids[pos]`` is the branch's token.
    if dp.taken is not None:
        follows = [dp.branches.index(dp.taken)] if text.startswith(dp.taken, char) else []
    else:
        follows = [i for i, b in enumerate(dp.branches) if text.startswith(b, char)]
    if not follows:
        return "mismatch"
    gold = ids[: d + 1]
    if not any(seqs[i][: d + 1] == gold for i in follows):
        return "merged"
    return d, [s[d] for s in seqs]


def encode_problem(tokenizer, problem: Problem, index: int, report: EncodeReport) -> EncodedProblem | None:
    text = problem.prompt + problem.completion
    enc = tokenizer.encode_with_offsets(text)
    ids = [t for t, _ in enc]
    offsets = [o for _, o in enc]
    boundary = len(problem.prompt)
    prompt_len = sum(1 for s, _ in offsets if s < boundary)
    if any(s < boundary < e for s, e in offsets):
        report.skipped[SKIP_REASONS["boundary"]] += len(problem.decision_points)
        return None
    forks = []
    for dp in problem.decision_points:
        got = _read_fork(tokenizer, text, ids, prompt_len, boundary, dp)
        if isinstance(got, str):
            report.skipped[SKIP_REASONS[got]] += 1
            continue
        pos, branch_ids = got
        order = sorted(range(len(branch_ids)), key=lambda i: branch_ids[i])
        branches = [dp.branches[i] for i in order]
        taken = branches.index(dp.taken) if dp.taken is not None else None
        forks.append(
            EncodedFork(
                pos=pos,
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


def pad_ids(rows: Sequence[Sequence[int]], fill: int) -> Int[Tensor, "rows width"]:
    """Token-id rows right-padded with ``fill`` into one [rows, width] batch (width at least 1)."""
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out
