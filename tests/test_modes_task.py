"""The reasoning-modes task: generation, annotations, verifier and synthesis, against hand-made cases."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from training.config import load_config
from training.errors import UsageError
from training.schema import KINDS, Problem, read_jsonl
from training.synth import build_data
from training.tasks import get_task
from training.tasks.modes import ModesTask

# A hand-made problem, budget 3: chain n1 -> n2 -> ... -> n7 and a distractor n8 -> n9 -> n10, so the
# prompt holds 6 + 2 = 8 pairs. Query n3 is 2 hops from the head and 4 from the tail: only fwd reaches it.
CHAIN = [1, 2, 3, 4, 5, 6, 7]
PAIRS = "n5 n6 n8 n9 n1 n2 n3 n4 n9 n10 n2 n3 n6 n7 n4 n5"


def task(**sizes) -> ModesTask:
    return get_task({"name": "modes", **sizes})


def hand_problem(q: str = "n3", cue: str = "?", pairs: str = PAIRS):
    return task(), Problem(f"{pairs} | n1 n7 {q} {cue} :", " fwd n1 n2 n3 = 2", "", [])


def chain_of(t: ModesTask, p: Problem) -> list[str]:
    succ, head, tail, q = t.parse_prompt(p.prompt)
    chain = [head]
    while chain[-1] in succ:
        chain.append(succ[chain[-1]])
    return chain


def test_generator_is_deterministic_by_seed():
    t = task()
    for kind in KINDS:
        a = [t.problem(kind, np.random.default_rng(7)).to_dict() for _ in range(3)]
        b = [t.problem(kind, np.random.default_rng(7)).to_dict() for _ in range(3)]
        assert a == b
    pa = [t.pretrain_example(r).to_dict() for r in [np.random.default_rng(3)] for _ in range(20)]
    pb = [t.pretrain_example(r).to_dict() for r in [np.random.default_rng(3)] for _ in range(20)]
    assert pa == pb
    other = [t.pretrain_example(r).to_dict() for r in [np.random.default_rng(4)] for _ in range(20)]
    assert other != pa


def test_demo_changes_only_the_taken_mode():
    t = task()
    a = t.problem("multi-valid", np.random.default_rng(1), demo=0)
    b = t.problem("multi-valid", np.random.default_rng(1), demo=1)
    assert a.prompt == b.prompt and a.decision_points[0].valid == b.decision_points[0].valid
    assert a.completion.split()[0] == "fwd" and b.completion.split()[0] == "bwd"  # demo 0 = the style rule
    assert t.verify(a, a.completion) and t.verify(b, b.completion)


def test_annotation_points_at_the_mode_token_and_gold_verifies():
    t = task()
    tok = t.tokenizer()
    rng = np.random.default_rng(0)
    problems = [t.problem(k, rng, demo=d) for k in KINDS for d in range(3) for _ in range(10)]
    problems += [t.pretrain_example(rng) for _ in range(100)]
    lengths = set()
    for p in problems:
        (dp,) = p.decision_points
        text = p.prompt + p.completion
        pieces = tok.encode_with_offsets(text)
        at = len(p.prompt) + dp.char
        hit = [i for i, (_, (s, e)) in enumerate(pieces) if s <= at < e]
        assert len(hit) == 1
        assert tok.vocab[pieces[hit[0]][0]] == dp.taken == p.completion.split()[0]
        assert hit[0] == len(tok.encode(p.prompt))  # the mode token is the first completion token
        assert p.completion.startswith(" ") and dp.branches == ["fwd", "bwd"]
        lengths.add(len(tok.encode(p.prompt)))
        assert len(tok.encode(p.completion)) + 1 <= t.max_completion_tokens
        assert len(tok.encode(text)) + 1 <= t.max_seq_len
        # a demonstration verifies exactly when it took a valid mode
        assert t.verify(p, p.completion) == (dp.taken in dp.valid)
    assert lengths == {t.prompt_tokens}


def test_pretraining_takes_both_modes_and_fails_out_of_budget():
    t = task()
    rng = np.random.default_rng(5)
    ex = [t.pretrain_example(rng) for _ in range(2000)]
    taken = Counter(p.decision_points[0].taken for p in ex)
    assert abs(taken["fwd"] / len(ex) - 0.5) < 0.05
    invalid = [p for p in ex if p.decision_points[0].taken not in p.decision_points[0].valid]
    assert 0.15 < len(invalid) / len(ex) < 0.45  # a third of problems are multi-valid, half the rest pick wrong
    for p in invalid:
        words = p.completion.split()
        assert words[-1] == "fail" and len(words) == 1 + t.cfg.budget + 1 + 1  # mode, budget+1 nodes, fail


def test_valid_sets_and_hop_counts_per_kind():
    t = task()  # budget 3, overshoot 1
    assert t.valid_modes(2, 4) == ["fwd"] and t.valid_modes(4, 1) == ["bwd"]
    assert t.valid_modes(3, 3) == ["fwd", "bwd"] and t.valid_modes(4, 4) == []
    rng = np.random.default_rng(2)
    hops: dict[str, Counter] = {k: Counter() for k in KINDS}
    lengths: dict[str, set[int]] = {k: set() for k in KINDS}
    for kind in KINDS:
        for _ in range(2000):
            p = t.problem(kind, rng)
            chain = chain_of(t, p)
            succ, head, tail, q = t.parse_prompt(p.prompt)
            assert chain[-1] == tail and len(succ) == 8 and q in chain[1:-1]
            a, c = chain.index(q), len(chain) - 1 - chain.index(q)
            valid = p.decision_points[0].valid
            assert valid == [m for m, h in (("fwd", a), ("bwd", c)) if h <= 3]
            cue = p.prompt.split()[-2]
            if kind == "multi-valid":
                assert a <= 3 and c <= 3 and cue == "?"
            else:
                assert min(a, c) <= 3 and max(a, c) == 4
                assert cue == ("?" if kind == "indecipherable" else {"fwd": "<", "bwd": ">"}[valid[0]])
            taken = p.decision_points[0].taken
            hops[kind][{"fwd": a, "bwd": c}[taken]] += 1
            lengths[kind].add(len(chain))
    for kind in KINDS:  # the demonstrated walk's hop count is uniform on 1..budget in every kind
        assert set(hops[kind]) == {1, 2, 3}
        assert max(hops[kind].values()) / min(hops[kind].values()) < 1.25
    assert lengths["multi-valid"] == set(range(3, 8)) and lengths["indecipherable"] == set(range(6, 9))


def test_verifier_on_hand_made_completions():
    t, p = hand_problem()
    good = [" fwd n1 n2 n3 = 2", "fwd n1 n2 n3 = 2", " fwd  n1 n2 n3 =  2 "]
    for c in good:
        assert t.verify(p, c), c
    bad = [
        " bwd n7 n6 n5 n4 fail",  # wrong mode: runs out of budget
        " bwd n7 n6 n5 n4 n3 = 4",  # wrong mode pushed past the budget of 3 hops
        " fwd n1 n2 n3 = 3",  # wrong answer
        " fwd n1 n2 n3 = 5",
        " fwd n1 n3 = 1",  # skipped a hop
        " fwd n1 n2 n4 n3 = 3",  # wrong walk
        " fwd n2 n3 = 1",  # does not start at the head
        " bwd n1 n2 n3 = 2",  # bwd must start at the tail
        " fwd n8 n9 n10 = 2",  # the distractor chain
        " fwd n1 n2 n3 n4 = 3",  # walked past the query
        " fwd n1 n2 n3 = 2 n4",  # trailing words
        " fwd n1 n2 n3 fail",
        " fwd n1 n2 n3",
        " fwd n1 n2 n3 =",
        " n1 n2 n3 = 2",
        " sideways n1 n2 n3 = 2",
        " = = = =",
        "",
        "   ",
        " fwd" + " n1" * 200 + " = 2",
        " <unk> <eos> | :",
        " fwd n99 n2 n3 = 2",
    ]
    for c in bad:
        assert not t.verify(p, c), c
    assert not t.verify(p, None)  # type: ignore[arg-type]
    assert not t.verify(Problem("garbage words", "", "", []), " fwd n1 = 0")
    t2, p2 = hand_problem(q="n5")  # 2 hops from the tail, 4 from the head
    assert t2.verify(p2, " bwd n7 n6 n5 = 2")
    assert not t2.verify(p2, " bwd n7 n6 n5 = 4")  # the answer counts hops of this walk
    assert not t2.verify(p2, " fwd n1 n2 n3 n4 n5 = 4")  # 4 hops: over budget
    t3, p3 = hand_problem(q="n4")  # 3 hops from either end: both modes work
    assert t3.verify(p3, " fwd n1 n2 n3 n4 = 3") and t3.verify(p3, " bwd n7 n6 n5 n4 = 3")


def test_gold_completion_matches_hand_made_walk():
    t = task()
    assert t._completion(CHAIN, 2, "fwd") == " fwd n1 n2 n3 = 2"
    assert t._completion(CHAIN, 2, "bwd") == " bwd n7 n6 n5 n4 fail"
    assert t._completion(CHAIN, 4, "bwd") == " bwd n7 n6 n5 = 2"
    assert t._completion(CHAIN, 4, "fwd") == " fwd n1 n2 n3 n4 fail"
    assert t._completion(CHAIN, 3, "bwd") == " bwd n7 n6 n5 n4 = 3"


def test_tokenizer_round_trip():
    t = task()
    tok = t.tokenizer()
    rng = np.random.default_rng(9)
    for _ in range(50):
        p = t.pretrain_example(rng)
        text = p.prompt + p.completion
        assert tok.decode(tok.encode(text)) == text.strip()
        ids = tok.encode(p.completion) + [tok.eos_id, 5]
        assert tok.decode_completion(ids) == (p.completion, True)
    assert len(tok) == len(set(tok.vocab)) == 2 + 9 + 20 + 3
    assert set(tok.vocab) >= {"fwd", "bwd", "fail", "=", "<", ">", "?", "n19", "1", "3"}


def test_key_ignores_pair_order_and_cue():
    t, p = hand_problem()
    _, p_cue = hand_problem(cue="<")
    reordered = " ".join(reversed([" ".join(pair) for pair in zip(PAIRS.split()[::2], PAIRS.split()[1::2])]))
    _, shuffled = hand_problem(pairs=reordered)
    assert shuffled.prompt != p.prompt
    assert t.key(p) == t.key(p_cue) == t.key(shuffled)
    assert t.key(p) != t.key(hand_problem(q="n4")[1])


@pytest.mark.parametrize(
    "sizes, words",
    [
        ({"budget": 0}, "task.budget"),
        ({"overshoot": 0}, "task.overshoot"),
        ({"pairs": 7}, "task.pairs=7 is too few"),
        ({"budget": 4}, "task.pairs=8 is too few"),
        ({"n_labels": 9}, "task.n_labels"),
        ({"width": 3}, "unknown key task.width"),
    ],
)
def test_bad_sizes_are_one_line_usage_errors(sizes, words):
    with pytest.raises(UsageError, match=words) as e:
        task(**sizes)
    assert "\n" not in str(e.value)


def test_config_sizes_scale_the_sequences():
    t = task(budget=2, overshoot=1, pairs=6, n_labels=8)
    assert t.prompt_tokens == 2 * 6 + 6 and t.max_seq_len == t.prompt_tokens + 7
    rng = np.random.default_rng(0)
    for kind in KINDS:
        for _ in range(50):
            p = t.problem(kind, rng)
            assert len(t.tokenizer().encode(p.prompt)) == t.prompt_tokens and t.verify(p, p.completion)
            assert int(p.completion.split()[-1]) in (1, 2)


def small_cfg(**over):
    items = ["data.n_pretrain=300", "data.n_sft=200", "data.n_eval=30"] + [f"{k}={v}" for k, v in over.items()]
    return load_config("modes", items)


def test_build_data_prevalence_and_policy(tmp_path):
    man = build_data(small_cfg(**{"data.prevalence": 1.0}), tmp_path / "p1", log=lambda s: None)
    prev = man["files"]["sft.jsonl"]["prevalence"]
    assert prev["indecipherable"] == 0.0 and prev["multi-valid"] == pytest.approx(0.8)
    assert man["files"]["eval.jsonl"]["count"] == 30
    man0 = build_data(small_cfg(**{"data.prevalence": 0.0}), tmp_path / "p0", log=lambda s: None)
    prev0 = man0["files"]["sft.jsonl"]["prevalence"]
    assert prev0["multi-valid"] == 0.0 and prev0["indecipherable"] == pytest.approx(0.8)

    t = task()
    for sub in ("p1", "p0"):
        sft = read_jsonl(tmp_path / sub / "sft.jsonl")
        assert all(t.verify(p, p.completion) for p in sft)  # SFT demonstrations are correct ones only
    canon = [p for p in read_jsonl(tmp_path / "p1" / "sft.jsonl") if p.kinds == {"multi-valid"}]
    assert {p.decision_points[0].taken for p in canon} == {"fwd"}

    build_data(small_cfg(**{"data.policy": "balanced"}), tmp_path / "bal", log=lambda s: None)
    bal = [p for p in read_jsonl(tmp_path / "bal" / "sft.jsonl") if p.kinds == {"multi-valid"}]
    counts = Counter(p.decision_points[0].taken for p in bal)
    assert abs(counts["fwd"] - counts["bwd"]) <= 1  # balanced cycles through the valid modes

    ev = read_jsonl(tmp_path / "p1" / "eval.jsonl")
    seen = {t.key(p) for name in ("pretrain", "sft") for p in read_jsonl(tmp_path / "p1" / f"{name}.jsonl")}
    assert not seen & {t.key(p) for p in ev}


def test_paired_policy_shows_every_valid_mode_of_one_problem(tmp_path):
    build_data(small_cfg(**{"data.policy": "paired"}), tmp_path, log=lambda s: None)
    multi = [p for p in read_jsonl(tmp_path / "sft.jsonl") if p.kinds == {"multi-valid"}]
    by_prompt: dict[str, set[str]] = {}
    for p in multi:
        by_prompt.setdefault(p.prompt, set()).add(p.decision_points[0].taken)
    full = [modes for modes in by_prompt.values() if len(modes) == 2]
    assert len(full) >= len(by_prompt) - 1  # the count may cut the last pair in half
    assert all(modes == {"fwd", "bwd"} for modes in full)
