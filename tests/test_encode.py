"""Decision points to token positions on real tokenizer families (``hooks.encode``).

The rule: encode ``prefix + branch`` for every branch (prefix = prompt + completion[:char]); the
branch token is the first token at which those encodings differ, the model is read at the
position before it, and the gold sequence must agree with the taken branch's encoding up to and
including it. Every expectation below was checked by hand against the tokens each tokenizer
produces (they are written out in the comments); ``ids[pos - 1]`` is the token the choice is read
at. Families: GPT-2-style byte-level BPE (``Ġ`` carries the space), the real SmolLM2 tokenizer
(Llama architecture; digits split, and the space before a digit a token of its own), a
SentencePiece-style BPE (``▁`` carries the space; digits split so `` 7`` is ``▁`` ``7``, as in
Llama 2), and the word tokenizer.
"""

from __future__ import annotations

import pytest

from hooks.encode import SKIP_REASONS, encode_problems
from hooks.hf import HFTokenizer
from tests.hf_fixtures import SENTENCES, build_tokenizer
from tests.real_model import smollm2_tokenizer
from training.schema import DecisionPoint, Problem
from training.tokenizer import WordTokenizer

GRAPH_PROMPT = "Q: go from A to D. A:"
GRAPH = " A -> B -> D answer: D"


def dp(completion: str, at: str, branches: list[str], taken: str | None = "", offset: int = 0,
       valid: list[str] | None = None, kind: str = "multi-valid") -> DecisionPoint:
    """A decision point at the first occurrence of ``at`` (plus ``offset``); ``taken`` defaults to
    the first branch, ``None`` leaves it unannotated."""
    assert at in completion
    return DecisionPoint(completion.index(at) + offset, branches, valid or list(branches), kind,
                         branches[0] if taken == "" else taken)


def encode_one(tok, prompt: str, completion: str, points: list[DecisionPoint]):
    encoded, report = encode_problems(tok, [Problem(prompt, completion, "", points)])
    return (encoded[0] if encoded else None), report


def names(tok: HFTokenizer, ids) -> list[str]:
    return tok.tok.convert_ids_to_tokens([int(i) for i in ids])


def check_fork(tok, enc, fork, before: list[str], branch_tokens: dict[str, str]) -> None:
    """The tokens just before the branch token are ``before`` (the last is ``ids[pos - 1]``, where
    the choice is read), each branch maps to its token, the gold token at ``pos`` is the taken
    branch's, and the branches are in canonical order (ascending id)."""
    name = (lambda ids: [tok.vocab[i] for i in ids]) if isinstance(tok, WordTokenizer) else (lambda ids: names(tok, ids))
    assert enc.prompt_len <= fork.pos < len(enc.ids) - 1
    assert name(enc.ids[fork.pos - len(before): fork.pos]) == before
    assert dict(zip(fork.branches, name(fork.branch_ids))) == branch_tokens
    assert fork.branch_ids == sorted(fork.branch_ids) and len(set(fork.branch_ids)) == len(fork.branch_ids)
    if fork.taken is not None:
        assert enc.ids[fork.pos] == fork.branch_ids[fork.taken]


# ------------------------------------------------------------------------------- GPT-2 style
@pytest.fixture(scope="module")
def gpt2():
    return HFTokenizer(build_tokenizer())


def test_gpt2_leading_space_tokens(gpt2):
    # Q : ĠgoĠfromĠA ĠtoĠD . ĠA : | ĠA Ġ-> ĠB Ġ-> ĠD Ġanswer : ĠD
    points = [dp(GRAPH, "A", ["A", "C"]), dp(GRAPH, "B", ["B", "C"]), dp(GRAPH, " D", [" D", " B"], offset=0)]
    enc, report = encode_one(gpt2, GRAPH_PROMPT, GRAPH, points)
    assert not report.skipped
    start, mid, at_space = enc.forks
    assert start.pos == enc.prompt_len  # the completion's first token
    check_fork(gpt2, enc, start, ["ĠA", ":"], {"A": "ĠA", "C": "ĠC"})
    check_fork(gpt2, enc, mid, ["ĠA", "Ġ->"], {"B": "ĠB", "C": "ĠC"})
    check_fork(gpt2, enc, at_space, ["ĠB", "Ġ->"], {" D": "ĠD", " B": "ĠB"})  # char at the space: same token


def test_gpt2_fork_after_a_newline_ended_prompt(gpt2):
    # A prompt ending in "\n", as every chat template's assistant header does: "Ċ" is a token of
    # its own and the branch token "5" follows it. (The old rule took "Ċ" as every branch's token.)
    prompt, completion = "Q: what is 2 + 3?\nA:\n", "5 answer: 5"
    enc, report = encode_one(gpt2, prompt, completion, [dp(completion, "5", ["5", "8"])])
    assert not report.skipped
    (fork,) = enc.forks
    assert fork.pos == enc.prompt_len
    check_fork(gpt2, enc, fork, [":", "Ċ"], {"5": "5", "8": "8"})


def test_gpt2_digits_carry_the_space(gpt2):
    completion = " 2 + 3 = 5 answer: 5"
    enc, report = encode_one(gpt2, "Q: what is 2 + 3? A:", completion, [dp(completion, "5", ["5", "8"])])
    assert not report.skipped
    check_fork(gpt2, enc, enc.forks[0], ["Ġ3", "Ġ="], {"5": "Ġ5", "8": "Ġ8"})


# ---------------------------------------------------------------------------- SmolLM2 (real)
@pytest.fixture(scope="module")
def smol():
    return HFTokenizer(smollm2_tokenizer())


def _chat_prompt(question: str) -> str:
    return smollm2_tokenizer().apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True)


def test_smollm2_chat_template_and_split_digits(smol):
    # ... <|im_start|> ass istant Ċ | 3 Ġ+ Ġ 4 Ġ= Ġ 7
    prompt = _chat_prompt("What is 3 + 4?")
    assert prompt.endswith("<|im_start|>assistant\n") and smol.bos_id is None
    completion = "3 + 4 = 7"
    points = [dp(completion, "3", ["3", "7"]), dp(completion, "7", ["7", "8"], kind="decipherable", valid=["7"])]
    enc, report = encode_one(smol, prompt, completion, points)
    assert not report.skipped
    start, mid = enc.forks
    assert start.pos == enc.prompt_len
    check_fork(smol, enc, start, ["<|im_start|>", "ass", "istant", "Ċ"], {"3": "3", "7": "7"})
    check_fork(smol, enc, mid, ["4", "Ġ=", "Ġ"], {"7": "7", "8": "8"})  # read at the lone space
    assert names(smol, enc.ids[mid.pos:]) == ["7", "<|im_end|>"]  # the gold token, then EOS
    assert mid.valid == [True, False] and mid.kind == "decipherable"


def test_smollm2_word_forks(smol):
    # Ċ | The Ġanswer Ġis Ġ 7 .    and mid-sentence, mid-completion: Ġis Ġ 7
    prompt = _chat_prompt("What is 3 + 4?")
    completion = "The answer is 7."
    points = [dp(completion, "The", ["The", "It"]), dp(completion, "is", ["is", "was"]),
              dp(completion, "7", ["7", "8"], taken=None)]
    enc, report = encode_one(smol, prompt, completion, points)
    assert not report.skipped
    first, verb, digit = enc.forks
    check_fork(smol, enc, first, ["istant", "Ċ"], {"The": "The", "It": "It"})
    check_fork(smol, enc, verb, ["The", "Ġanswer"], {"is": "Ġis", "was": "Ġwas"})
    check_fork(smol, enc, digit, ["Ġis", "Ġ"], {"7": "7", "8": "8"})
    assert digit.taken is None


def test_smollm2_branches_sharing_leading_text_are_read_where_they_differ(smol):
    # "n19" / "n37" are Ġn 1 9 / Ġn 3 7: the choice is the digit after Ġn. With "n38" as well,
    # "n37" and "n38" share that digit: one next-token distribution cannot tell them apart.
    completion = "The node is n19."
    points = [dp(completion, "n19", ["n19", "n37"]), dp(completion, "n19", ["n19", "n37", "n38"])]
    enc, report = encode_one(smol, "Q:\n", completion, points)
    assert report.skipped == {SKIP_REASONS["shared"]: 1}
    check_fork(smol, enc, enc.forks[0], ["Ġis", "Ġn"], {"n19": "1", "n37": "3"})


def test_smollm2_skips(smol):
    completion = "The answer is 7."
    points = [
        dp(completion, "nswer", ["nswer", "x"]),            # inside Ġanswer
        dp(completion, "7", ["7", "75"]),                  # 7 | 7 5: same first token
        dp(completion, "7", ["7", "x"]),                   # Ġ 7 | Ġx: the 7 branch's token would be Ġ
        dp(completion, "7", ["8", "9"]),                   # the text says 7
        dp(completion, "7", ["8", "9"], taken=None),       # ... and no branch is in the text
        dp(completion, "is", ["i", "was"]),                # Ġi is not the text's Ġis
    ]
    enc, report = encode_one(smol, _chat_prompt("What is 3 + 4?"), completion, points)
    assert enc.forks == []
    assert report.skipped == {"inside a token": 1, "branches share a first token": 1,
                              "branch token is only whitespace": 1, "annotation does not match the text": 2,
                              "branch merges with the text after it": 1}
    assert report.problems_without_forks == 1
    # x Ġ= | Ġ 7   against   x Ġ== Ġ 7: the encodings differ at a prompt token
    _, report = encode_one(smol, "x =", " 7", [DecisionPoint(0, [" 7", "= 7"], [" 7"], "multi-valid", " 7")])
    assert report.skipped == {"branch token in the prompt": 1}


# ------------------------------------------------------------------------ SentencePiece style
@pytest.fixture(scope="module")
def sentencepiece():
    """A Llama-2-like tokenizer: BPE over Metaspace words (``▁`` carries the space, prepended to
    the first word), digits one by one, trained here on the fixture sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(SENTENCES + ["[INST] what is 2 + 3? [/INST]\n5 answer:\n5"], trainer=trainer)
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>"))


def test_sentencepiece_forks_after_a_space_and_at_the_start(sentencepiece):
    # ▁Q: ▁go ▁from ▁A ▁to ▁D. ▁A: | ▁A ▁-> ▁B ▁-> ▁D ▁answer: ▁D
    sp = sentencepiece
    points = [dp(GRAPH, "A", ["A", "C"]), dp(GRAPH, "B", ["B", "C"]), dp(GRAPH, " D", [" D", " B"])]
    enc, report = encode_one(sp, GRAPH_PROMPT, GRAPH, points)
    assert not report.skipped
    start, mid, at_space = enc.forks
    assert start.pos == enc.prompt_len
    check_fork(sp, enc, start, ["▁D.", "▁A:"], {"A": "▁A", "C": "▁C"})
    check_fork(sp, enc, mid, ["▁A", "▁->"], {"B": "▁B", "C": "▁C"})
    check_fork(sp, enc, at_space, ["▁B", "▁->"], {" D": "▁D", " B": "▁B"})


def test_sentencepiece_lone_space_and_newline_tokens(sentencepiece):
    # ▁A: ▁ 2 ▁+ ▁ 3 ▁= ▁ 5: the space before a digit is "▁" on its own, the choice read there
    sp = sentencepiece
    completion = " 2 + 3 = 5 answer: 5"
    enc, report = encode_one(sp, "Q: what is 2 + 3? A:", completion,
                             [dp(completion, "5", ["5", "8"]), dp(completion, "3", ["3", "4"])])
    assert not report.skipped
    five, three = enc.forks
    check_fork(sp, enc, five, ["▁=", "▁"], {"5": "5", "8": "8"})
    check_fork(sp, enc, three, ["▁+", "▁"], {"3": "3", "4": "4"})
    # ... ? \n A : \n | 5: the start of a completion after a newline-ended prompt (a token of its own)
    prompt, completion = "Q: what is 2 + 3?\nA:\n", "5 answer: 5"
    enc, report = encode_one(sp, prompt, completion, [dp(completion, "5", ["5", "8"])])
    assert not report.skipped and enc.forks[0].pos == enc.prompt_len
    check_fork(sp, enc, enc.forks[0], [":", "\n"], {"5": "5", "8": "8"})


# ---------------------------------------------------------------------------- word tokenizer
def test_word_tokenizer():
    tok = WordTokenizer(["Q:", "go", "A", "B", "C", "D", "->", "answer:"])
    prompt = "Q: go A D"
    points = [dp(GRAPH, "A", ["A", "C"]), dp(GRAPH, "B", ["B", "C"]), dp(GRAPH, " D", [" D", " B"]),
              dp(GRAPH, "answer: D", ["D", "B"], offset=8, taken=None)]
    enc, report = encode_one(tok, prompt, GRAPH, points)
    assert not report.skipped and enc.prompt_len == 4
    start, mid, at_space, last = enc.forks
    assert start.pos == enc.prompt_len
    check_fork(tok, enc, start, ["A", "D"], {"A": "A", "C": "C"})
    check_fork(tok, enc, mid, ["A", "->"], {"B": "B", "C": "C"})
    check_fork(tok, enc, at_space, ["B", "->"], {" D": "D", " B": "B"})
    check_fork(tok, enc, last, ["answer:"], {"D": "D", "B": "B"})
    assert last.pos == len(enc.ids) - 2
    # a branch that is not what the text says, and one that shares the first word with another
    _, report = encode_one(tok, prompt, GRAPH, [dp(GRAPH, "B", ["C", "D"]), dp(GRAPH, "B", ["B", "B C", "C"])])
    assert report.skipped == {"annotation does not match the text": 1, "branches share a first token": 1}


# -------------------------------------------------------------------------- GPT-2 skip cases
def test_gpt2_skips(gpt2):
    points = [
        dp(GRAPH, "nswer", ["nswer", "x"]),                   # inside Ġanswer
        dp(GRAPH, "B", ["B", "C", "Bx"]),                     # ĠB | ĠC | ĠB x: B and Bx share ĠB
        dp(GRAPH, "B", ["C", "D"]),                           # the text says B
        dp(GRAPH, "B", ["C", "D"], taken=None),
        dp(GRAPH, "B", ["B", "C"], offset=-1),                # char one early, at the space
        dp(GRAPH, "answer: D", ["D", "B"], taken="B", offset=8),  # taken is not what the text says
    ]
    enc, report = encode_one(gpt2, GRAPH_PROMPT, GRAPH, points)
    assert enc.forks == [] and report.problems_without_forks == 1
    assert report.skipped == {"inside a token": 1, "branches share a first token": 1,
                              "annotation does not match the text": 4}
    # answer : Ġyes, but the branch "y" is answer : Ġ y
    completion = " answer: yes"
    _, report = encode_one(gpt2, "Q:", completion, [dp(completion, "yes", ["y", "n"])])
    assert report.skipped == {"branch merges with the text after it": 1}
    # a prompt ending in a space: ĠA straddles the boundary, so no point of the problem is read
    enc, report = encode_one(gpt2, GRAPH_PROMPT + " ", GRAPH[1:], [dp(GRAPH[1:], "A", ["A", "C"]),
                                                                 dp(GRAPH[1:], "B", ["B", "C"])])
    assert enc is None and report.skipped == {"prompt boundary inside a token": 2}


def test_skip_reasons_are_short():
    assert all(len(r) <= 40 and r == r.lower() for r in SKIP_REASONS.values())
    assert len(set(SKIP_REASONS.values())) == len(SKIP_REASONS)
