"""Generation as real models need it: budgets, stop ids and strings, chat prompts, saved samples.

The scripted GPT-2 of ``tests/hf_fixtures.py`` writes a known text whatever it is fed, so every
sample's text, stop and verdict is known exactly; the tiny native run checks the saved samples
against the table they were counted into.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.hf_fixtures import build_scripted_checkpoint, build_tokenizer
from tests.test_bad_input import one_line_exit_2, run_cli
from training.schema import DecisionPoint, Problem, read_jsonl, write_jsonl

QUIET = dict(progress=False, log=lambda *_: None, n_boot=100)
PROMPT = "Q: go from A to D. A:"
TEXT = " A -> B -> D answer: D"


def _eval(tmp_path, completions=(TEXT, " A -> C -> D answer: D")):
    problems = []
    for c in completions:
        mid = c.split("->")[1].strip()
        problems.append(Problem(PROMPT, c, "D", [DecisionPoint(c.index(mid), ["B", "C"], ["B", "C"], "multi-valid", mid)]))
    f = tmp_path / "eval.jsonl"
    write_jsonl(f, problems)
    return f


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    return build_scripted_checkpoint(tmp_path_factory.mktemp("scripted") / "sft", PROMPT + TEXT)


def test_samples_parquet_holds_every_sample_and_agrees_with_the_table(tiny_run, tmp_path):
    from probes.runner import run
    from training.tasks import get_task

    ckpts = [str(tiny_run / "checkpoints" / n) for n in ("sft-step000000", "sft-step000020")]
    df = run(ckpts, out=tmp_path / "res", samples=4, strategies=["temperature:1", "greedy"], **QUIET)
    s = pd.read_parquet(tmp_path / "res" / "samples.parquet")
    problems = read_jsonl(tiny_run / "data" / "eval.jsonl")
    assert len(s) == 2 * 2 * len(problems) * 4
    assert list(s.columns[:14]) == ["checkpoint", "phase", "step", "strategy", "problem", "sample", "kind", "text",
                                    "finished", "correct", "fork_reached", "fork_branch", "fork_valid", "n_tokens"]
    task = get_task(json.loads((tiny_run / "checkpoints" / "sft-step000020" / "config.json").read_text())["task"])
    for r in s.sample(40, random_state=0).itertuples():  # the verdict is the verifier's on the saved text
        assert r.correct == (r.finished and task.verify(problems[r.problem], r.text))
    for (ck, strategy), g in s.groupby(["checkpoint", "strategy"]):
        per_problem = g.groupby("problem")["correct"].mean()
        pass1 = df[(df.checkpoint == ck) & (df.strategy == strategy) & (df.metric == "pass@k") & (df.k == 1) & (df.kind == "all")]
        assert float(pass1.value.iloc[0]) == pytest.approx(per_problem.mean(), abs=1e-12)
        trunc = df[(df.checkpoint == ck) & (df.strategy == strategy) & (df.metric == "truncated_rate") & (df.kind == "all")]
        assert float(trunc.value.iloc[0]) == pytest.approx(1 - g["finished"].mean(), abs=1e-12)
        # a fork move is made only by a sample that reached the fork; the rates are shares of all samples
        assert not (g["fork_branch"].ne("") & ~g["fork_reached"]).any()
        for metric, col in (("fork_reached_rate", g["fork_reached"]), ("fork_valid_rate", g["fork_valid"].fillna(False))):
            got = df[(df.checkpoint == ck) & (df.strategy == strategy) & (df.metric == metric) & (df.kind == "all")]
            want = col.astype(float).groupby(g["problem"]).mean().mean()
            assert float(got.value.iloc[0]) == pytest.approx(want, abs=1e-12), metric
        valid = df[(df.checkpoint == ck) & (df.strategy == strategy) & (df.metric == "fork_valid_rate") & (df.kind == "all")]
        assert float(valid.value.iloc[0]) == pytest.approx(g["fork_valid"].fillna(False).groupby(g["problem"]).mean().mean(), abs=1e-12)
    # samples are written with the table: a rerun that measures nothing leaves the same file
    before = (tmp_path / "res" / "samples.parquet").read_bytes()
    run(ckpts, out=tmp_path / "res", samples=4, strategies=["temperature:1", "greedy"], **QUIET)
    assert (tmp_path / "res" / "samples.parquet").read_bytes() == before


def test_a_budget_too_small_is_reported_as_truncation(tiny_run, tmp_path):
    from probes.runner import run

    df = run([str(tiny_run / "checkpoints" / "sft-step000020")], out=tmp_path / "res", samples=3, max_new_tokens=1, **QUIET)
    trunc = df[(df.metric == "truncated_rate") & (df.kind == "all")].value.iloc[0]
    s = pd.read_parquet(tmp_path / "res" / "samples.parquet")
    assert trunc == pytest.approx(1 - s.finished.mean()) and trunc > 0.9  # one token never reaches the EOS
    assert df[(df.metric == "pass@k") & (df.kind == "all")].value.max() == 0.0


def test_stop_ids_from_the_generation_config_and_stop_strings(scripted, tmp_path):
    from probes.runner import run

    f = _eval(tmp_path)
    plain = run([str(scripted)], eval=f, out=tmp_path / "plain", samples=2, verifier="exact", **QUIET)
    assert plain[(plain.metric == "pass@k") & (plain.kind == "all")].value.min() == 1.0
    s = pd.read_parquet(tmp_path / "plain" / "samples.parquet")
    assert set(s.text) == {TEXT} and s.finished.all() and s.correct.all()

    stopped = run([str(scripted)], eval=f, out=tmp_path / "stop", samples=2, verifier="exact", stop=["->"], **QUIET)
    s = pd.read_parquet(tmp_path / "stop" / "samples.parquet")
    assert set(s.text) == {" A "} and s.finished.all() and not s.correct.any()
    assert stopped[(stopped.metric == "truncated_rate") & (stopped.kind == "all")].value.iloc[0] == 0.0

    tok = build_tokenizer()
    colon = tok(":", add_special_tokens=False)["input_ids"][0]
    eos = tok.eos_token_id
    (scripted / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, colon]}))
    try:
        run([str(scripted)], eval=f, out=tmp_path / "gen", samples=2, verifier="exact", **QUIET)
    finally:
        (scripted / "generation_config.json").unlink()
    s = pd.read_parquet(tmp_path / "gen" / "samples.parquet")
    assert set(s.text) == {" A -> B -> D answer"} and s.finished.all()


def test_chat_template_prompts_keep_the_decision_points(scripted, tmp_path):
    """With --chat-template the prompt is the user turn; the fork is still read at its token."""
    import torch

    from hooks.encode import encode_problems
    from hooks.load import load
    from probes.runner import plan_run

    d = tmp_path / "chat"
    import shutil

    shutil.copytree(scripted, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>{{ '\\n' }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    f = _eval(tmp_path)
    plan = plan_run([str(d)], eval=f, verifier="exact", chat_template=True)
    e = plan.encoded[0]
    model = load(d)
    templated = model.tokenizer.chat_prompt(PROMPT)
    assert templated.endswith("<|assistant|>\n") and PROMPT in templated
    (ref,), _ = encode_problems(model.tokenizer, [Problem(templated, TEXT, "D", read_jsonl(f)[0].decision_points)])
    assert e.ids == ref.ids and e.forks[0].pos == ref.forks[0].pos
    assert model.tokenizer.tok.decode([e.ids[e.forks[0].pos]]).strip() == "B"
    assert e.problem.prompt == PROMPT  # the verifier sees the problem as written
    with torch.no_grad():
        logits = model.module(input_ids=torch.tensor([e.ids])).logits[0, e.forks[0].pos - 1]
    cap_logits, _ = model.capture(torch.tensor([e.ids]), torch.ones(1, len(e.ids), dtype=torch.bool),
                                  torch.tensor([[e.forks[0].pos - 1]]), torch.tensor([[e.forks[0].pos - 1]]))
    torch.testing.assert_close(cap_logits[0, 0], logits, atol=1e-5, rtol=0)


def test_math_verifier_reads_latex_and_fractions():
    from analysis.verifiers import make_verifier

    v = make_verifier("math")

    def p(answer):
        return Problem("q", " c", answer, [])

    assert v(p("1/2"), "so the answer is $\\frac{1}{2}$")
    assert v(p("0.5"), "hence \\boxed{\\frac{1}{2}}")
    assert v(p("7"), "3 + 4 = 7")
    assert not v(p("7"), "the answer is 8")
    assert not v(p("7"), "")
    assert not v(p("7"), "}}{{\\frac")  # garbage is a wrong answer, never an error


def _scripted_args(scripted, tmp_path, *extra):
    return ["run", "--checkpoints", str(scripted), "--eval", str(_eval(tmp_path)), "--verifier", "exact",
            "--out", str(tmp_path / "res"), *extra]


@pytest.mark.parametrize("extra, needle", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be a whole number ≥ 1"),
    (["--stop", ""], "--stop strings must be non-empty"),
    (["--chat-template"], "the tokenizer has no chat template"),
    (["--max-new-tokens", "5000"], "lower --max-new-tokens"),
])
def test_generation_mistakes_are_one_line(scripted, tmp_path, capsys, extra, needle):
    code, err = run_cli(_scripted_args(scripted, tmp_path, *extra), capsys)
    one_line_exit_2(code, err, needle)
    assert not (tmp_path / "res").exists()


def test_chat_template_on_a_native_checkpoint_and_math_without_the_package(tiny_run, tmp_path, capsys, monkeypatch):
    ck = str(tiny_run / "checkpoints" / "sft-step000020")
    code, err = run_cli(["run", "--checkpoints", ck, "--chat-template", "--out", str(tmp_path / "r")], capsys)
    one_line_exit_2(code, err, "--chat-template needs a Hugging Face tokenizer")
    import sys

    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if it were not installed
    code, err = run_cli(["run", "--checkpoints", ck, "--verifier", "math", "--out", str(tmp_path / "r")], capsys)
    one_line_exit_2(code, err, "--verifier math needs the math-verify package")
    assert not (tmp_path / "r").exists()


def test_hf_default_budget_is_the_generation_config_or_512_cut_to_the_context(scripted, tmp_path):
    from probes.runner import plan_run

    f = _eval(tmp_path)
    plan = plan_run([str(scripted)], eval=f, verifier="exact")
    longest = max(e.prompt_len for e in plan.encoded)
    assert plan.max_new_tokens == 64 - longest  # 512 does not fit the tiny GPT-2's 64 positions
    (scripted / "generation_config.json").write_text(json.dumps({"max_new_tokens": 12}))
    try:
        assert plan_run([str(scripted)], eval=f, verifier="exact").max_new_tokens == 12
    finally:
        (scripted / "generation_config.json").unlink()
    assert plan_run([str(scripted)], eval=f, verifier="exact", max_new_tokens=7).max_new_tokens == 7
    assert np.isfinite(plan.max_new_tokens)
