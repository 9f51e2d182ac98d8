"""Fork discovery (``probes forks``): exact mechanics on a scripted model, plumbing on the tiny run.

The scripted model's next-token distribution is a table of the prefix, so every number the
discovery reports (entropy, alternatives and their mass, branch values, kinds, char offsets) is
known in advance; continuations after a forced branch are deterministic except where a test
makes them a coin.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.forks_outcomes import _ContextStepper
from analysis.forks import (candidates_path, decide, entropy_threshold, find_forks, prevalence_knob,
                            read_problems, score_discovery)
from tests.test_bad_input import one_line_exit_2, run_cli
from training.schema import DecisionPoint, Problem, read_jsonl, write_jsonl
from training.tokenizer import WordTokenizer

WORDS = ["q1", "q2", "q3", "q4", "q5", "q6", ":", "a", "b", "c", "e", "f"]
EPS = 1e-9


class ScriptedLM:
    """A 'model' whose next-token distribution is ``table(prefix words)``: capture and a KV-free
    stepper (the toolkit's sampler drives it) read the same table."""

    format = "native"
    path = "scripted"

    def __init__(self, table, n_ctx=None):
        self.tokenizer = WordTokenizer(WORDS)
        self.table = table
        self.n_ctx = n_ctx
        self.device = torch.device("cpu")
        self.prefills: list[tuple[int, int, int]] = []

    def logits(self, ids: list[int]) -> torch.Tensor:
        words = [self.tokenizer.vocab[i] for i in ids]
        probs = torch.full((len(self.tokenizer),), EPS)
        for w, pr in self.table(words).items():
            probs[self.tokenizer.index[w]] = pr
        return torch.log(probs / probs.sum())

    def capture(self, input_ids, attention_mask, resid_pos, logit_pos):
        out = torch.stack([torch.stack([self.logits(input_ids[b, : q + 1].tolist()) for q in logit_pos[b].tolist()])
                           for b in range(input_ids.shape[0])])
        return out, torch.zeros((input_ids.shape[0], resid_pos.shape[1], 1, 1))

    def stepper(self):
        lm = self

        class Stepper:
            device = torch.device("cpu")

            def prefill(self, input_ids, max_new_tokens=1, repeats=1, lengths=None):
                s = input_ids.shape[1]
                lm.prefills.append((input_ids.shape[0], s, max_new_tokens))
                if lm.n_ctx is not None:
                    assert s + max_new_tokens - 1 <= lm.n_ctx, "past the context"
                lens = lengths.tolist() if lengths is not None else [s] * input_ids.shape[0]
                self.seqs = [input_ids[b, s - n:].tolist() for b, n in enumerate(lens) for _ in range(repeats)]
                return torch.stack([lm.logits(q) for q in self.seqs])

            def step(self, next_ids):
                for q, t in zip(self.seqs, next_ids.tolist()):
                    q.append(t)
                return torch.stack([lm.logits(q) for q in self.seqs])

        return Stepper()


def table(words: list[str]) -> dict[str, float]:
    """q1: b .6 / c .4, both reach e (multi-valid); q2: b .7 -> f, c .3 -> e (indecipherable);
    q3: b .9 -> e, c .1 -> f (decipherable); q4: b .5 / c .5, both reach f (rejected);
    q5: no choice at all; q6: b .5 -> e, c .5 -> e (.8) or f (.2) by a coin."""
    q, done = words[0], words[words.index(":") + 1:]
    if not done:
        return {"a": 1.0}
    if done == ["a"]:
        return {"q1": {"b": .6, "c": .4}, "q2": {"b": .7, "c": .3}, "q3": {"b": .9, "c": .1},
                "q4": {"b": .5, "c": .5}, "q5": {"b": 1.0}, "q6": {"b": .5, "c": .5}}[q]
    if len(done) == 2:
        branch = done[1]
        nxt = {("q2", "b"): "f", ("q3", "c"): "f", ("q4", "b"): "f", ("q4", "c"): "f"}.get((q, branch), "e")
        if (q, branch) == ("q6", "c"):
            return {"e": .8, "f": .2}
        return {nxt: 1.0}
    return {"<eos>": 1.0}


def problems() -> list[Problem]:
    gold = {"q1": " a b e", "q2": " a c e", "q3": " a b e", "q4": " a b f", "q5": " a b e", "q6": " a b e"}
    out = []
    for q, c in gold.items():
        given = [DecisionPoint(3, ["b", "c"], ["b"], "indecipherable", c.split()[1])] if q == "q2" else []
        out.append(Problem(f"{q} :", c, "e", given, {"task": "toy", "note": q}))
    return out


def ends_with_answer(problem: Problem, completion: str) -> bool:
    words = completion.split()
    return bool(words) and words[-1] == problem.answer


QUIET = dict(log=lambda *_: None)


def test_scripted_discovery_is_exact(tmp_path):
    lm = ScriptedLM(table)
    out = tmp_path / "found.jsonl"
    res = find_forks(lm, problems(), out=out, verifier=ends_with_answer, samples=64, entropy=5.0, tau=0.5, **QUIET)
    found, cands = res  # unpacks as (problems, table)
    assert cands is res.candidates and found is res.problems
    # one candidate per problem with a choice, at the token after "a" (index 3: "q :" then "a")
    by = cands.groupby("problem")
    assert sorted(by.groups) == [0, 1, 2, 3, 5]
    assert set(cands["pos"]) == {3} and set(cands["offset"]) == {1} and set(cands["char"]) == {3}
    mass = {(int(r.problem), r.branch): r.mass for r in cands.itertuples()}
    for (i, tok), want in {(0, "b"): .6, (0, "c"): .4, (1, "b"): .7, (1, "c"): .3, (2, "c"): .1}.items():
        assert mass[(i, tok)] == pytest.approx(want, abs=1e-6)
    ent = cands.drop_duplicates("problem").set_index("problem")["entropy"]
    assert ent[0] == pytest.approx(-(.6 * math.log(.6) + .4 * math.log(.4)), abs=1e-5)
    # branch values: deterministic continuations give exact rates, the coin a binomial one
    rate = {(int(r.problem), r.branch): r.success_rate for r in cands.itertuples()}
    assert [rate[(0, "b")], rate[(0, "c")], rate[(1, "b")], rate[(1, "c")], rate[(2, "b")], rate[(2, "c")]] == [1, 1, 0, 1, 1, 0]
    assert rate[(3, "b")] == rate[(3, "c")] == 0 and rate[(5, "b")] == 1.0
    assert 0.6 < rate[(5, "c")] < 0.95  # 64 coins of .8: outside (.6, .95) with probability ~2e-3
    assert (cands["samples"] == 64).all() and (cands["truncated"] == 0).all()
    decision = cands.drop_duplicates("problem").set_index("problem")["decision"].to_dict()
    assert decision == {0: "multi-valid", 1: "indecipherable", 2: "decipherable", 3: "rejected", 5: "multi-valid"}

    # the annotated JSONL: char offsets into the completion, branches by mass, valid, taken
    dps = [[dp.to_dict() for dp in p.decision_points] for p in found]
    assert dps[0] == [{"char": 3, "branches": ["b", "c"], "valid": ["b", "c"], "kind": "multi-valid", "taken": "b"}]
    assert dps[1] == [{"char": 3, "branches": ["b", "c"], "valid": ["c"], "kind": "indecipherable", "taken": "c"}]
    assert dps[2] == [{"char": 3, "branches": ["b", "c"], "valid": ["b"], "kind": "decipherable", "taken": "b"}]
    assert dps[3] == [] and dps[4] == []
    back = read_jsonl(out)
    assert [p.to_dict() for p in back] == [p.to_dict() for p in found]
    assert back[1].extra["decision_points_given"] == [problems()[1].decision_points[0].to_dict()]
    assert "decision_points_given" in back[0].extra and back[0].extra["note"] == "q1"  # extra fields kept
    on_disk = pd.read_parquet(candidates_path(out))
    pd.testing.assert_frame_equal(on_disk.reset_index(drop=True), cands.reset_index(drop=True), check_dtype=False)

    s = res.summary
    assert (s["candidates"], s["tested"], s["untested"], s["confirmed"], s["rejected"]) == (5, 5, 0, 4, 1)
    assert s["decision_points"] == 4 and s["forks_per_example"] == pytest.approx(4 / 6)
    assert s["prevalence"] == pytest.approx({"any": 4 / 6, "indecipherable": 1 / 6, "decipherable": 1 / 6,
                                             "multi-valid": 2 / 6})
    assert s["prevalence_knob"] == pytest.approx(2 / 3)

    # scoring against the given annotations: q2's point is found, with its kind
    score = score_discovery(found, None, lm.tokenizer)
    assert (score["true"], score["found"], score["matched"]) == (1, 4, 1)
    assert score["recall"] == 1.0 and score["precision"] == 0.25 and score["kind_accuracy"] == 1.0


def test_decide_rederives_stricter_settings_and_the_quantile():
    lm = ScriptedLM(table)
    res = find_forks(lm, problems()[:5], verifier=ends_with_answer, samples=4, entropy=5.0, tau=0.5, **QUIET)
    # p = 0.15 drops q3's c (mass .1): one token holds p, so q3 is no candidate at all
    strict = decide(res.candidates, p=0.15, entropy=5.0, tau=0.5)
    d = strict.drop_duplicates("problem").set_index("problem")["decision"].to_dict()
    assert d == {0: "multi-valid", 1: "indecipherable", 2: "", 3: "rejected"}
    # ... which is what a run with p = 0.15 decides
    again = find_forks(lm, problems()[:5], verifier=ends_with_answer, samples=4, p=0.15, entropy=5.0, **QUIET)
    assert again.candidates.drop_duplicates("problem").set_index("problem")["decision"].to_dict() == {
        k: v for k, v in d.items() if v}
    # an entropy candidate with a single alternative is listed but cannot be tested
    low = decide(res.candidates, p=0.15, entropy=0.3, tau=0.5)
    assert low.drop_duplicates("problem").set_index("problem")["decision"][2] == "untested"
    # tau = 1 with a stricter bar changes nothing on deterministic branches
    assert decide(res.candidates, 0.05, 5.0, 1.0)["decision"].tolist() == res.candidates["decision"].tolist()
    # the default entropy threshold is the 0.7 quantile over every completion position
    q = find_forks(lm, problems()[:5], verifier=ends_with_answer, samples=2, **QUIET)
    assert len(q.entropies) == 15  # 5 problems x (a, branch, last word); the EOS is not a position
    assert q.summary["entropy_threshold"] == pytest.approx(float(np.quantile(q.entropies, 0.7)))
    assert entropy_threshold(np.array([0.0, 1.0]), 0.5) == 0.5


def test_context_stepper_gives_each_prompt_its_own_room():
    """Forced prompts of different lengths in one sampler chunk: each row may run to the context,
    none past it (the inner stepper asserts), and a full context ends the row with a stop id."""
    from hooks.sampler import generate

    lm = ScriptedLM(lambda words: {"a": 1.0}, n_ctx=8)  # never stops by itself
    tok = lm.tokenizer
    eos = tok.eos_id
    short, long = tok.encode("q1 : a"), tok.encode("q1 : a a a a")
    stepper = _ContextStepper(lm.stepper, 8, eos)
    out = generate(stepper, [short, long], 2, 6, [eos], tok.pad_id, "temperature:1.0", torch.Generator().manual_seed(0))
    a = tok.index["a"]
    # room = n_ctx - length + 1 new tokens: 6 for the short prompt, 3 for the long one, then EOS
    assert out.tokens[0, :, :6].eq(a).all()
    assert out.tokens[1, :, :3].eq(a).all() and out.tokens[1, :, 3].eq(eos).all()
    assert all(s + n - 1 <= 8 for _, s, n in lm.prefills)


def test_prevalence_knob_and_read_problems(tmp_path):
    mv = Problem("p", " x", "x", [DecisionPoint(1, ["x", "y"], ["x", "y"], "multi-valid", "x")])
    ind = Problem("p", " x", "x", [DecisionPoint(1, ["x", "y"], ["x"], "indecipherable", "x")])
    dec = Problem("p", " x", "x", [DecisionPoint(1, ["x", "y"], ["x"], "decipherable", "x")])
    assert prevalence_knob([mv, mv, mv, ind, dec]) == 0.75
    assert math.isnan(prevalence_knob([dec]))
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": "p", "completion": " x", "answer": "x", "id": 7}) + "\n"
                 + json.dumps(mv.to_dict()) + "\n")
    got = read_problems(f)
    assert got[0].decision_points == [] and got[0].extra == {"id": 7}  # no decision_points: nothing given
    assert got[1].decision_points == [] and got[1].extra["decision_points_given"] == [mv.decision_points[0].to_dict()]


# ----------------------------------------------------------------------------- the tiny trained run
def _accept_all(tmp_path: Path) -> str:
    f = tmp_path / "accept.py"
    f.write_text("def yes(problem, completion):\n    return True\n")
    return f"{f}:yes"


def test_probes_forks_end_to_end_on_tiny_run(tiny_run, tmp_path, capsys):
    """The verb on a native checkpoint; its output loads, keeps the given points, and `probes run
    --eval` measures the discovered ones. (The tiny model is barely trained, so the verifier
    here accepts every completion: each tested candidate is multi-valid, and there are some.)"""
    from probes.cli import main
    from probes.runner import run

    ck = tiny_run / "checkpoints" / "sft-step000000"
    data = tiny_run / "data" / "eval.jsonl"
    out = tmp_path / "eval.forks.jsonl"
    code = main(["forks", "--model", str(ck), "--data", str(data), "--out", str(out), "--samples", "2", "--p", "0.02",
                 "--verifier", _accept_all(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0 and "fork prevalence" in printed and "candidates" in printed
    annotated = read_jsonl(out)
    original = read_jsonl(data)
    assert len(annotated) == len(original)
    for a, o in zip(annotated, original):
        assert (a.prompt, a.completion, a.answer) == (o.prompt, o.completion, o.answer)
        assert a.extra["decision_points_given"] == [dp.to_dict() for dp in o.decision_points]
    table = pd.read_parquet(candidates_path(out))
    assert {"problem", "pos", "char", "entropy", "token", "mass", "success_rate", "decision"} <= set(table.columns)
    n_points = sum(len(p.decision_points) for p in annotated)
    assert n_points > 0 and n_points == int(table.drop_duplicates(["problem", "pos"])["written"].sum())
    df = run([str(ck)], eval=out, out=tmp_path / "res", samples=2, probes=False, progress=False, log=lambda *_: None,
             n_boot=20)
    ent = df[(df.metric == "entropy_fork") & (df.kind == "all")]
    assert len(ent) == 1 and int(ent["n"].iloc[0]) == n_points  # every discovered point measured, none skipped
    # the same data scored against the generator's annotations: one point per problem, all matched by position
    from hooks.record import read_record

    score = score_discovery(annotated, None, read_record(ck).tokenizer)
    assert score["true"] == len(original) and 0.0 <= score["recall"] <= 1.0


def test_find_forks_is_public():
    import probes

    assert probes.find_forks.__module__ == "probes.api"


# ----------------------------------------------------------------------------- bad input
def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _case(name, tiny_run, tmp):
    ck = str(tiny_run / "checkpoints" / "sft-step000000")
    data = tmp / "data.jsonl"
    data.write_text((tiny_run / "data" / "eval.jsonl").read_text())
    base = ["forks", "--model", ck, "--data", str(data), "--out", str(tmp / "out.jsonl")]
    if name == "samples_one":
        return base + ["--samples", "1"], "--samples must be a whole number ≥ 2"
    flags = {"p_zero": (["--p", "0"], "--p must lie in (0, 1)"), "p_one": (["--p", "1"], "--p must lie in (0, 1)"),
             "tau_zero": (["--tau", "0"], "--tau must lie in (0, 1]"), "tau_big": (["--tau", "1.5"], "--tau must lie in (0, 1]"),
             "q_zero": (["--entropy-quantile", "0"], "--entropy-quantile must lie in (0, 1)"),
             "q_one": (["--entropy-quantile", "1"], "--entropy-quantile must lie in (0, 1)"),
             "h_negative": (["--entropy", "-0.5"], "--entropy must be ≥ 0")}
    if name in flags:
        extra, needle = flags[name]
        return base + extra, needle
    if name == "out_is_input":
        return base[:-1] + [str(data)], "is the input"
    if name == "no_round_trip":  # two spaces decode as one: the completion is not what the tokenizer writes
        lines = data.read_text().splitlines()
        first = json.loads(lines[0])
        first["completion"] = first["completion"].replace(" ", "  ", 2)
        data.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
        return base, "does not round-trip"
    if name == "unknown_word":
        lines = data.read_text().splitlines()
        first = json.loads(lines[0])
        first["completion"] += " zebra"
        data.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
        return base, "cannot encode"
    if name == "no_verifier":  # a Hugging Face model and data of no native task
        from tests.hf_fixtures import build_hf_checkpoint

        hf = build_hf_checkpoint(tmp / "gpt2", "gpt2")
        write_jsonl(data, [Problem("Q: what is 2 + 3? A:", " 2 + 3 = 5 answer: 5", "5", [])])
        return ["forks", "--model", str(hf), "--data", str(data), "--out", str(tmp / "out.jsonl")], "pass --verifier"
    raise KeyError(name)


CASES = ["samples_one", "p_zero", "p_one", "tau_zero", "tau_big", "q_zero", "q_one", "h_negative", "out_is_input",
         "no_round_trip", "unknown_word", "no_verifier"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, tiny_run, tmp_path, capsys):
    argv, needle = _case(name, tiny_run, tmp_path)
    capsys.readouterr()  # what building the case printed (save_pretrained's progress bar)
    before = _snapshot(tmp_path)
    code, err = run_cli(argv, capsys)
    one_line_exit_2(code, err, needle)
    assert _snapshot(tmp_path) == before


def test_forks_speed_benchmark_runs_at_a_tiny_size(tiny_run):
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "forks_speed.py"), "--threads", "1",
         "--checkpoint", str(tiny_run / "checkpoints" / "sft-step000020"), "--eval", str(tiny_run / "data" / "eval.jsonl"),
         "--problems", "6", "--samples", "2", "--m-grid", "2", "--lengths", ""],
        cwd=repo, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert re.match(r"^forks_speed: ratio (nan|[0-9.]+) \(target .+\)$", lines[-1]), lines[-1]
    assert any(ln.startswith("discovery ") and "ms per problem" in ln for ln in lines)


class _ChatWords(WordTokenizer):
    """A word tokenizer whose 'chat template' turns the user turn ``q1`` into ``q1 :``."""

    def chat_prompt(self, user: str) -> str:
        return f"{user} :"


def test_chat_template_reads_the_templated_prompt_and_writes_the_users(tmp_path):
    """With ``chat_template`` the model reads each prompt through the tokenizer's template (here the
    table only answers after ``:``), and the annotated output keeps the line's own prompt."""
    plain = find_forks(ScriptedLM(table), problems(), verifier=ends_with_answer, samples=64, entropy=5.0, **QUIET)
    lm = ScriptedLM(table)
    lm.tokenizer = _ChatWords(WORDS)
    users = [p.__class__(p.prompt[: -len(" :")], p.completion, p.answer, p.decision_points, p.extra) for p in problems()]
    out = tmp_path / "chat.forks.jsonl"
    chat = find_forks(lm, users, out=out, verifier=ends_with_answer, samples=64, entropy=5.0, chat_template=True, **QUIET)
    assert [p.prompt for p in chat.problems] == [u.prompt for u in users] == ["q1", "q2", "q3", "q4", "q5", "q6"]
    assert [[d.to_dict() for d in p.decision_points] for p in chat.problems] == \
        [[d.to_dict() for d in p.decision_points] for p in plain.problems]
    pd.testing.assert_frame_equal(chat.candidates.drop(columns=["pos"]), plain.candidates.drop(columns=["pos"]))
    assert [p.prompt for p in read_jsonl(out)] == ["q1", "q2", "q3", "q4", "q5", "q6"]
    with pytest.raises(Exception, match="needs a Hugging Face tokenizer with a chat template"):
        find_forks(ScriptedLM(table), users, verifier=ends_with_answer, chat_template=True, **QUIET)
