"""Branch forcing: branch values and forced_pass@k against identities that must hold exactly."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.test_generation import PROMPT, TEXT, _eval

QUIET = dict(progress=False, log=lambda *_: None, n_boot=100)


def test_forcing_on_the_graph_task(tiny_run, tmp_path):
    from probes.runner import run

    df = run([str(tiny_run / "checkpoints" / "sft-step000020")], out=tmp_path / "res", samples=4, forcing=4, **QUIET)

    def values(metric, **match):
        sel = df[(df.metric == metric)]
        for col, v in match.items():
            sel = sel[sel[col] == v]
        return sel.set_index("kind")["value"]

    valid, invalid = values("branch_value_valid"), values("branch_value_invalid")
    forced1 = values("forced_pass@k", k=1)
    assert set(valid.index) == {"indecipherable", "decipherable", "multi-valid", "all"}
    # a path that leaves the source by a wrong arm can never reach the target: worth exactly 0
    assert (invalid == 0.0).all()
    # pass@1 of an even split over the valid branches is their mean value, problem by problem
    pd.testing.assert_series_equal(forced1.sort_index(), valid.sort_index(), check_names=False, atol=1e-12)
    forced = df[(df.metric == "forced_pass@k") & (df.kind == "all")].sort_values("k")
    assert list(forced.k) == [1, 2, 4] and forced.value.is_monotonic_increasing
    assert ((df[df.metric.str.startswith("branch_value")].value >= 0) & (df[df.metric.str.startswith("branch_value")].value <= 1)).all()


def test_forcing_on_a_model_that_writes_one_text(tmp_path):
    """The scripted GPT-2 continues its text after either forced branch, so both lead to answer D."""
    from probes.runner import run
    from tests.hf_fixtures import build_scripted_checkpoint

    ck = build_scripted_checkpoint(tmp_path / "sft", PROMPT + TEXT)
    df = run([str(ck)], eval=_eval(tmp_path), out=tmp_path / "res", samples=2, verifier="exact", forcing=3, **QUIET)
    for metric in ("branch_value_valid", "branch_value_preferred"):
        assert df[(df.metric == metric) & (df.kind == "all")].value.iloc[0] == 1.0
    assert (df[df.metric == "forced_pass@k"].value == 1.0).all()
    assert df[df.metric == "branch_value_invalid"].empty  # both branches are valid here


def test_forcing_needs_a_fork_and_m_of_two(tiny_run, tmp_path):
    from probes.runner import plan_run
    from training.errors import UsageError
    from training.schema import Problem, write_jsonl

    ck = str(tiny_run / "checkpoints" / "sft-step000020")
    with pytest.raises(UsageError, match="whole number ≥ 2"):
        plan_run([ck], forcing=1)
    f = tmp_path / "nofork.jsonl"
    from training.schema import read_jsonl

    p = read_jsonl(tiny_run / "data" / "eval.jsonl")[0]
    write_jsonl(f, [Problem(p.prompt, p.completion, p.answer, [], p.extra)])
    with pytest.raises(UsageError, match="--forcing needs decision points"):
        plan_run([ck], eval=f, forcing=4)
