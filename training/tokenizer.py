"""A fixed-vocabulary word tokenizer: one token per whitespace-separated word.

Tiny task models need an exact encode/decode round trip and character offsets for every token,
so decision points (character offsets into the completion) map to token positions without
guesswork. Saved inside every checkpoint's config.json.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from training.errors import UsageError

PAD, EOS = "<pad>", "<eos>"
_WORD = re.compile(r"\S+")


class WordTokenizer:
    """Words to ids and back; ``<pad>`` is id 0 and ``<eos>`` id 1 in every vocabulary."""

    kind = "word"

    def __init__(self, words: Sequence[str]):
        vocab = [PAD, EOS] + [w for w in words if w not in (PAD, EOS)]
        if len(set(vocab)) != len(vocab):
            raise ValueError("tokenizer vocabulary has duplicate words")
        bad = [w for w in vocab if not w or _WORD.fullmatch(w) is None]
        if bad:
            raise ValueError(f"tokenizer words must be non-empty and contain no whitespace: {bad[:5]}")
        self.vocab: list[str] = vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.pad_id = 0
        self.eos_id = 1
        self.stop_ids = frozenset([self.eos_id])

    def __len__(self) -> int:
        return len(self.vocab)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer) and other.vocab == self.vocab

    def encode(self, text: str) -> list[int]:
        # str.split() and the \S+ word pattern agree on every code point (both use str.isspace),
        # so the fast path gives the same ids; the slow one is only there to locate an unknown word.
        try:
            return [self.index[w] for w in text.split()]
        except KeyError:
            return [tok for tok, _ in self.encode_with_offsets(text)]

    def encode_with_offsets(self, text: str) -> list[tuple[int, tuple[int, int]]]:
        """(id, (start, end)) per word; an unknown word is a user error naming where it is."""
        out = []
        for m in _WORD.finditer(text):
            tok = self.index.get(m.group())
            if tok is None:
                raise UsageError(
                    f"unknown token {m.group()!r} at character {m.start()}: this checkpoint's tokenizer "
                    f"knows {len(self.vocab)} words (e.g. {', '.join(self.vocab[2:8])}, ...)"
                )
            out.append((tok, (m.start(), m.end())))
        return out

    def chat_prompt(self, user: str) -> str:
        raise UsageError("--chat-template needs a Hugging Face tokenizer with a chat template; "
                         "native checkpoints take prompts as written")

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)

    def decode_completion(self, ids: Sequence[int]) -> tuple[str, bool]:
        """Sampled ids to completion text (a leading space, as the corpora write completions).

        Stops at the first ``<eos>``; returns whether one was emitted, since a completion that ran
        out of budget counts as a failure whatever its text.
        """
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                return "".join(" " + w for w in words), True
            words.append(self.vocab[i] if 0 <= i < len(self.vocab) else "<unk>")
        return "".join(" " + w for w in words), False

    def first_token(self, branch: str) -> int:
        """The id that starts a branch string (its first word)."""
        m = _WORD.search(branch)
        if m is None:
            raise UsageError(f"branch {branch!r} is empty")
        tok = self.index.get(m.group())
        if tok is None:
            raise UsageError(f"branch {branch!r} starts with a word the tokenizer does not know")
        return tok

    def fingerprint(self) -> str:
        """Identity of the vocabulary, to refuse mixing checkpoints that tokenize differently."""
        import hashlib

        return "word:" + hashlib.sha256("\n".join(self.vocab).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab": self.vocab}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WordTokenizer":
        if d.get("kind") != cls.kind or not isinstance(d.get("vocab"), list):
            raise UsageError("checkpoint config has no word tokenizer (expected {'kind': 'word', 'vocab': [...]})")
        return cls(d["vocab"])
