"""The graph task: determinism, annotations at the right token, verifier, tokenizer round trip."""

import numpy as np
import pytest

from hooks.encode import encode_problems
from training.schema import KINDS, problem_from_dict
from training.tasks import get_task

TASK = get_task({"name": "graph"})


def _problems(seed, n=30):
    rng = np.random.default_rng(seed)
    return [TASK.problem(KINDS[i % 3], rng, demo=i) for i in range(n)]


def test_generator_is_deterministic_by_seed():
    a = [p.to_dict() for p in _problems(3)]
    b = [p.to_dict() for p in _problems(3)]
    c = [p.to_dict() for p in _problems(4)]
    assert a == b
    assert a != c


def test_every_annotation_points_at_the_branch_token():
    tok = TASK.tokenizer()
    problems = _problems(0, 60) + [TASK.pretrain_example(np.random.default_rng(i)) for i in range(30)]
    encoded, report = encode_problems(tok, problems)
    assert len(encoded) == len(problems) and not report.skipped
    for e in encoded:
        dp = e.problem.decision_points[0]
        # the token at the fork position is the demonstration's branch, and it follows the source
        assert tok.vocab[e.ids[e.forks[0].pos]] == dp.taken
        assert e.problem.completion[dp.char:].split()[0] == dp.taken
        assert tok.vocab[e.ids[e.prompt_len]] == e.problem.completion.split()[0]
        assert set(dp.valid) <= set(dp.branches) and dp.taken in dp.branches


def test_kinds_have_the_right_valid_sets():
    rng = np.random.default_rng(1)
    for _ in range(50):
        ind = TASK.problem("indecipherable", rng)
        dec = TASK.problem("decipherable", rng)
        mv = TASK.problem("multi-valid", rng)
        assert len(ind.decision_points[0].valid) == 1 and len(ind.decision_points[0].branches) >= 2
        assert len(dec.answer.split()) == 2  # the target is a child of the source
        dpm = mv.decision_points[0]
        assert len(dpm.valid) == 2
        # the canonical demonstration takes the smaller label; both valid first moves reach the target
        assert dpm.taken == min(dpm.valid, key=lambda t: int(t[1:]))
        edges, s, t = TASK.parse_prompt(mv.prompt)
        for first in dpm.valid:
            node, seen = first, 0
            while node != t and seen < 10:
                node = next(v for u, v in edges if u == node)
                seen += 1
            assert node == t


def test_verifier_on_hand_made_paths():
    prompt = "n1 n2 n2 n3 n1 n4 n4 n5 n7 n8 . . | n1 n3 :"
    p = problem_from_dict({"prompt": prompt, "completion": " n1 n2 n3", "answer": "n1 n2 n3", "decision_points": []})
    assert TASK.verify(p, " n1 n2 n3")
    assert TASK.verify(p, "n1 n2 n3")
    for bad in [" n1 n4 n5", " n1 n3", " n2 n3", " n1 n2", " n1 n2 n3 n3", "", "   ", " n1 n2 zz", "<eos>",
                " n1 " * 40, None, 7, " n1 n2 n3 n7 n8"]:
        assert TASK.verify(p, bad) is False


def test_tokenizer_round_trip_and_unknown_word():
    tok = TASK.tokenizer()
    for p in _problems(2, 20):
        text = p.prompt + p.completion
        assert tok.decode(tok.encode(text)) == text.strip()
        ids = tok.encode(text)
        assert tok.encode(tok.decode(ids)) == ids
    text, finished = tok.decode_completion(tok.encode(" n3 n4") + [tok.eos_id, 5, 6])
    assert (text, finished) == (" n3 n4", True)
    assert tok.decode_completion(tok.encode(" n3 n4"))[1] is False
    from training.errors import UsageError

    with pytest.raises(UsageError, match="unknown token 'n999'"):
        tok.encode("n1 n999")


def test_balanced_and_paired_policies_spread_demonstrations():
    from training.config import load_config
    from training.synth import make_sft

    cfg = load_config("tiny", ["data.n_sft=400", "data.policy=balanced"])
    mv = [p for p in make_sft(TASK, cfg.data, 0) if p.decision_points[0].kind == "multi-valid"]
    firsts = [p.decision_points[0].valid.index(p.decision_points[0].taken) for p in mv]
    assert abs(firsts.count(0) - firsts.count(1)) <= 1
    cfg = load_config("tiny", ["data.n_sft=400", "data.policy=canonical"])
    mv = [p for p in make_sft(TASK, cfg.data, 0) if p.decision_points[0].kind == "multi-valid"]
    assert all(p.decision_points[0].valid.index(p.decision_points[0].taken) == 0 for p in mv)
    cfg = load_config("tiny", ["data.n_sft=400", "data.policy=paired"])
    mv = [p for p in make_sft(TASK, cfg.data, 0) if p.decision_points[0].kind == "multi-valid"]
    prompts = {}
    for p in mv:
        prompts.setdefault(p.prompt, set()).add(p.decision_points[0].taken)
    assert sum(len(v) == 2 for v in prompts.values()) >= 0.9 * len(prompts)


def test_prevalence_knob_sets_the_kind_mix():
    from training.config import load_config
    from training.synth import make_sft, prevalence

    for p_mv, expect in [(0.0, 0.0), (0.5, 0.4), (1.0, 0.8)]:
        cfg = load_config("tiny", ["data.n_sft=500", f"data.prevalence={p_mv}"])
        prev = prevalence(make_sft(TASK, cfg.data, 0))
        assert prev["multi-valid"] == pytest.approx(expect, abs=0.002)
        assert prev["decipherable"] == pytest.approx(0.2, abs=0.002)
