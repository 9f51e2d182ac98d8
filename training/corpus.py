"""Corpora as padded token tensors with a loss mask over completion tokens (and the final EOS)."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from training.errors import UsageError
from training.schema import Problem, iter_jsonl
from training.tokenizer import WordTokenizer


@dataclass
class TokenizedCorpus:
    ids: Int[Tensor, "examples pos"]
    loss_mask: Bool[Tensor, "examples pos"]
    """True where position t's next-token prediction (of token t+1) is trained."""
    lengths: Int[Tensor, " examples"]

    def __len__(self) -> int:
        return self.ids.shape[0]


def tokenize_problems(problems, tokenizer: WordTokenizer, max_len: int) -> TokenizedCorpus:
    rows, prompt_lens = [], []
    for p in problems:
        prompt = tokenizer.encode(p.prompt)
        completion = tokenizer.encode(p.completion)
        seq = prompt + completion + [tokenizer.eos_id]
        if len(seq) > max_len:
            raise UsageError(f"an example has {len(seq)} tokens, more than the model's context {max_len}")
        rows.append(seq)
        prompt_lens.append(len(prompt))
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    starts = np.asarray(prompt_lens, dtype=np.int64) - 1
    cols = np.arange(int(lengths.max()))[None, :]
    ids = np.full((len(rows), cols.shape[1]), tokenizer.pad_id, dtype=np.int64)
    ids[cols < lengths[:, None]] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    mask = (cols >= starts[:, None]) & (cols < lengths[:, None] - 1)  # predict every completion token and the EOS
    return TokenizedCorpus(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(lengths))


def load_corpus(path: str | Path, tokenizer: WordTokenizer, max_len: int) -> TokenizedCorpus:
    problems: list[Problem] = list(iter_jsonl(path))
    if not problems:
        raise UsageError(f"{path} holds no problems")
    return tokenize_problems(problems, tokenizer, max_len)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> Int[Tensor, " batch"]:
    """Example indices of one step: epoch-wise permutations derived from (seed, epoch) alone, so a
    resumed run sees exactly the batches an uninterrupted one would."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = _epoch_permutation(n, seed, epoch)
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return torch.tensor(out)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> Int[Tensor, " n"]:
    """One epoch's order, made once and reused by each of its steps (a permutation of 150K
    examples costs about a millisecond, as much as a GPU training step's launches)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)
