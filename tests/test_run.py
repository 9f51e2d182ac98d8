"""probes run: values against references, resume after a kill, and bad input refused cleanly."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from analysis.measure import teacher_forced
from hooks.encode import encode_problems
from hooks.load import load
from training.schema import read_jsonl

QUIET = dict(progress=False, log=lambda *_: None, n_boot=200)


def test_table_has_every_metric_per_kind(tiny_results):
    _, df = tiny_results
    assert set(df.columns) >= {"checkpoint", "phase", "step", "metric", "kind", "layer", "k", "strategy", "value",
                               "ci_low", "ci_high", "n", "format"}
    final = df[df.checkpoint == "sft-step000020"]
    for metric in ["entropy_fork", "entropy_other", "mass_valid", "mass_top_branch", "lens_mass_valid",
                   "lens_mass_top_branch", "lens_kl_final", "pass@k", "fork_valid_rate", "branch_coverage"]:
        assert set(final[final.metric == metric].kind) == {"indecipherable", "decipherable", "multi-valid", "all"}, metric
    assert set(final[final.metric == "pass@k"].k.dropna()) == {1, 2, 4, 8}
    assert set(final[final.metric == "lens_kl_final"].layer.dropna()) == {0, 1, 2}  # 2 blocks: 3 lens layers
    assert {"probe_acc_taken", "probe_selectivity_taken", "probe_acc_valid"} <= set(final.metric)
    top = final[final.metric == "mass_top_branch"].value
    assert ((top >= 1 / 3 - 1e-6) & (top <= 1 + 1e-6)).all()
    pk = final[(final.metric == "pass@k") & (final.kind == "all")].sort_values("k")
    assert (np.diff(pk.value.to_numpy()) >= -1e-12).all()  # pass@k never falls with k
    assert ((pk.ci_low <= pk.value + 1e-12) & (pk.value <= pk.ci_high + 1e-12)).all()


def test_entropy_and_branch_mass_match_references(tiny_run):
    path = tiny_run / "checkpoints" / "sft-step000020"
    model = load(path)
    problems = read_jsonl(tiny_run / "data" / "eval.jsonl")[:6]
    encoded, _ = encode_problems(model.tokenizer, problems)
    cap = teacher_forced(model, encoded, batch_size=4)
    with torch.no_grad():
        for i, e in enumerate(encoded):
            logits = model.module(torch.tensor([e.ids]))[0, e.forks[0].pos - 1]
            p = torch.softmax(logits.double(), -1).numpy()
            assert cap.entropy[i] == pytest.approx(scipy_entropy(p), abs=1e-5)
            np.testing.assert_allclose(cap.mass[i, : len(e.forks[0].branch_ids)], p[e.forks[0].branch_ids], atol=1e-6)


def test_logit_lens_last_layer_is_the_model_output(tiny_run):
    path = tiny_run / "checkpoints" / "sft-step000020"
    model = load(path)
    problems = read_jsonl(tiny_run / "data" / "eval.jsonl")[:8]
    encoded, _ = encode_problems(model.tokenizer, problems)
    ids = torch.tensor([e.ids for e in encoded if len(e.ids) == len(encoded[0].ids)])
    pos = torch.full((ids.shape[0], 1), encoded[0].forks[0].pos - 1)
    logits, resid = model.capture(ids, torch.ones_like(ids, dtype=torch.bool), pos, pos)
    lens = model.lens(resid[:, 0])  # [batch, layer, vocab]
    torch.testing.assert_close(lens[:, -1], logits[:, 0], atol=1e-5, rtol=0)
    with torch.no_grad():
        ref = model.module(ids)[:, pos[0, 0]]
    torch.testing.assert_close(lens[:, -1], ref, atol=1e-5, rtol=0)
    assert resid.shape[2] == model.n_layers + 1


def test_rerun_skips_finished_and_kill_resume_gives_same_table(tiny_run, tmp_path, monkeypatch):
    import probes.runner as run_mod

    ckpts = [str(tiny_run / "checkpoints" / "sft-step00000[03]"), str(tiny_run / "checkpoints" / "sft-step000020")]
    full = run_mod.run(ckpts, out=tmp_path / "full", samples=4, **QUIET)

    real = run_mod.measure_checkpoint
    calls = {"n": 0}

    def dies_on_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while measuring the second checkpoint
        return real(*a, **kw)

    monkeypatch.setattr(run_mod, "measure_checkpoint", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_mod.run(ckpts, out=tmp_path / "cut", samples=4, **QUIET)
    assert len(list((tmp_path / "cut" / "checkpoints").glob("*.parquet"))) == 1
    assert not list((tmp_path / "cut").glob(".*tmp"))
    monkeypatch.setattr(run_mod, "measure_checkpoint", real)
    resumed = run_mod.run(ckpts, out=tmp_path / "cut", samples=4, **QUIET)
    pd.testing.assert_frame_equal(full, resumed)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "full" / "results.parquet"),
                                  pd.read_parquet(tmp_path / "cut" / "results.parquet"))
    # a rerun measures nothing again
    monkeypatch.setattr(run_mod, "measure_checkpoint", lambda *a, **k: pytest.fail("measured twice"))
    again = run_mod.run(ckpts, out=tmp_path / "cut", samples=4, **QUIET)
    pd.testing.assert_frame_equal(full, again)
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert set(manifest["checkpoints"]) == {"sft-step000000", "sft-step000003", "sft-step000020"}
    assert "torch" in manifest["versions"] and manifest["identity"]["samples"] == 4


def test_same_seed_same_numbers(tiny_run, tmp_path):
    from probes.runner import run

    a = run([str(tiny_run / "checkpoints" / "sft-step000020")], out=tmp_path / "a", samples=4, **QUIET)
    b = run([str(tiny_run / "checkpoints" / "sft-step000020")], out=tmp_path / "b", samples=4, **QUIET)
    pd.testing.assert_frame_equal(a, b)


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _cli(*args):
    """The CLI edge in-process (what these tests check is its message and exit code, not a Python start)."""
    import contextlib
    import io

    from probes.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
    return _Result(code, out.getvalue(), err.getvalue())


def _one_line_exit_2(r, needle):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_run_input(tiny_run, tmp_path, tiny_results):
    ck = str(tiny_run / "checkpoints" / "sft-step000020")
    _one_line_exit_2(_cli("run", "--checkpoints", str(tmp_path / "nothing-*")), "no checkpoint directory matches")
    _one_line_exit_2(_cli("run", "--checkpoints", ck, "--samples", "4", "--k", "8"), "k=8 is not in 1..n=4")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{}")
    _one_line_exit_2(_cli("run", "--checkpoints", str(tmp_path / "junk")), "neither a fork-probes checkpoint")
    # a checkpoint from another task (another tokenizer here: more node labels)
    other = tmp_path / "other"
    shutil.copytree(ck, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["tokenizer"]["vocab"].append("n999")
    cfg["task"]["n_labels"] = 51
    (other / "config.json").write_text(json.dumps(cfg))
    _one_line_exit_2(_cli("run", "--checkpoints", ck, str(other)), "another tokenizer")
    # an eval file whose annotation points past the completion
    bad = tmp_path / "bad.jsonl"
    line = json.loads((tiny_run / "data" / "eval.jsonl").read_text().splitlines()[0])
    line["decision_points"][0]["char"] = 999
    bad.write_text(json.dumps(line) + "\n")
    _one_line_exit_2(_cli("run", "--checkpoints", ck, "--eval", str(bad), "--out", str(tmp_path / "r")), "bad.jsonl:1")
    # an existing --out with another run's results: refused, nothing overwritten
    out, _ = tiny_results
    before = (out / "results.parquet").read_bytes()
    _one_line_exit_2(_cli("run", "--checkpoints", ck, "--samples", "4", "--out", str(out)), "measured with other settings (samples 8 -> 4")
    assert (out / "results.parquet").read_bytes() == before
    _one_line_exit_2(_cli("run", "--checkpoints", ck, "--strategy", "hot:3"), "strategy")


def test_cli_strategies_after_one_flag_or_repeated(tiny_run, tmp_path):
    from probes.api import load_results

    ck = str(tiny_run / "checkpoints" / "sft-step000020")
    for name, flags in (("one", ["--strategy", "temperature:1", "greedy"]),
                        ("repeated", ["--strategy", "temperature:1", "--strategy", "greedy"])):
        r = _cli("run", "--checkpoints", ck, "--samples", "2", "--out", str(tmp_path / name), "--quiet", *flags)
        assert r.returncode == 0, r.stderr
        assert set(load_results(tmp_path / name)["strategy"]) - {""} == {"temperature:1", "greedy"}
