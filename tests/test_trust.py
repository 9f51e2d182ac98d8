"""Numbers that are right or absent: no stale reuse, resume from any kill, no NaN as a finding, no remote code.

Each test is one of the ways the toolkit once gave a wrong or stale number without a word.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from training.errors import UsageError

QUIET = dict(progress=False, log=lambda *_: None, n_boot=100)


def _series(tiny_run: Path) -> list[str]:
    return [str(tiny_run / "checkpoints" / n) for n in ("sft-step000000", "sft-step000003", "sft-step000020")]


def test_probes_run_stays_callable_whatever_is_imported_first(tiny_results):
    import probes
    import probes.grid  # noqa: F401
    import probes.runner  # noqa: F401

    out, _ = tiny_results
    probes.load_results(out)
    assert callable(probes.run) and probes.run is probes.api.run
    assert callable(probes.sweep) and probes.sweep is probes.api.sweep
    # and in a fresh interpreter, in the order a notebook uses them
    code = ("import probes, probes.runner, probes.grid; probes.load_results(%r); "
            "assert probes.run.__module__ == 'probes.api' and probes.sweep.__module__ == 'probes.api'" % str(out))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _copy_run(tiny_run: Path, dest: Path) -> Path:
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("results"))
    return dest


def test_another_checkpoint_under_a_measured_name_is_refused(tiny_run, tmp_path):
    from probes.runner import run

    a = _copy_run(tiny_run, tmp_path / "runA")
    run([str(a / "checkpoints" / "sft-step000020")], out=tmp_path / "res", samples=2, **QUIET)
    # another run's checkpoint with the same directory name (other weights)
    b = _copy_run(tiny_run, tmp_path / "runB")
    shutil.copy(a / "checkpoints" / "sft-step000003" / "model.safetensors", b / "checkpoints" / "sft-step000020" / "model.safetensors")
    with pytest.raises(UsageError, match="already holds a measurement named sft-step000020 of another checkpoint"):
        run([str(b / "checkpoints" / "sft-step000020")], out=tmp_path / "res", samples=2, **QUIET)


def test_weights_replaced_in_place_are_measured_again_only_when_forced(tiny_run, tmp_path):
    from probes.runner import run

    a = _copy_run(tiny_run, tmp_path / "run")
    ck = a / "checkpoints" / "sft-step000020"
    first = run([str(ck)], out=tmp_path / "res", samples=2, **QUIET)
    shutil.copy(a / "checkpoints" / "sft-step000000" / "model.safetensors", ck / "model.safetensors")
    with pytest.raises(UsageError, match="replaced in place"):
        run([str(ck)], out=tmp_path / "res", samples=2, **QUIET)
    again = run([str(ck)], out=tmp_path / "res", samples=2, force=True, **QUIET)
    base = run([str(a / "checkpoints" / "sft-step000000")], out=tmp_path / "base", samples=2, **QUIET)

    def entropy(df):
        return float(df[(df.metric == "entropy_fork") & (df.kind == "all")].value.iloc[0])

    assert entropy(again) != entropy(first)
    assert entropy(again) == pytest.approx(entropy(base), abs=1e-6)  # the numbers of the weights now there


@pytest.mark.parametrize("change, diff", [(dict(samples=3), "samples 2 -> 3"), (dict(seed=1), "seed 0 -> 1"),
                                           (dict(strategies=["greedy"]), "strategies")])
def test_other_settings_are_never_reused(tiny_run, tmp_path, change, diff):
    from probes.runner import run

    ck = str(tiny_run / "checkpoints" / "sft-step000020")
    run([ck], out=tmp_path / "res", samples=2, **QUIET)
    before = (tmp_path / "res" / "results.parquet").read_bytes()
    settings = {"samples": 2, **change}
    with pytest.raises(UsageError, match=f"measured with other settings \\({diff}"):
        run([ck], out=tmp_path / "res", **settings, **QUIET)
    assert (tmp_path / "res" / "results.parquet").read_bytes() == before
    df = run([ck], out=tmp_path / "res", force=True, **settings, **QUIET)
    fresh = run([ck], out=tmp_path / "fresh", **settings, **QUIET)
    pd.testing.assert_frame_equal(df, fresh)


def test_killed_in_the_first_checkpoint_or_the_first_table_write_resumes(tiny_run, tmp_path, monkeypatch):
    import probes.runner as runner
    from probes.results_dir import ResultsDir

    full = runner.run(_series(tiny_run), out=tmp_path / "full", samples=2, **QUIET)
    real_measure, real_table = runner.measure_checkpoint, ResultsDir.write_table

    def killed(*a, **k):
        raise KeyboardInterrupt

    # 1. killed while measuring the first checkpoint: nothing was written
    monkeypatch.setattr(runner, "measure_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run(_series(tiny_run), out=tmp_path / "cut", samples=2, **QUIET)
    monkeypatch.setattr(runner, "measure_checkpoint", real_measure)
    # 2. killed during the first table write, after the first part; a kill also leaves temporaries
    monkeypatch.setattr(ResultsDir, "write_table", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run(_series(tiny_run), out=tmp_path / "cut", samples=2, **QUIET)
    monkeypatch.setattr(ResultsDir, "write_table", real_table)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").glob("*.parquet")] == ["sft-step000000.parquet"]
    (tmp_path / "cut" / ".results.parquet.x1.tmp").write_bytes(b"half")
    (tmp_path / "cut" / "checkpoints" / ".sft-step000003.parquet.x2.tmp").write_bytes(b"half")
    resumed = runner.run(_series(tiny_run), out=tmp_path / "cut", samples=2, **QUIET)
    pd.testing.assert_frame_equal(full, resumed)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "full" / "results.parquet"),
                                  pd.read_parquet(tmp_path / "cut" / "results.parquet"))
    assert not list((tmp_path / "cut").rglob("*.tmp"))
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert set(manifest["checkpoints"]) == {"sft-step000000", "sft-step000003", "sft-step000020"}


def test_a_diverged_training_is_an_error_naming_the_step(tmp_path):
    from training.checkpoint import list_checkpoints, non_finite, read_checkpoint
    from training.config import load_config
    from training.train import train

    cfg = load_config("tiny", ["pretrain.steps=4", "sft.steps=6", "sft.lr=1e30", "sft.warmup=0"])
    with pytest.raises(UsageError, match=r"sft step \d+: the loss is nan"):
        train(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    written = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert written  # the base and pretraining checkpoints are kept ...
    for _, _, p in written:  # ... and none of them holds a NaN
        assert non_finite(read_checkpoint(p)[2])[0] == 0


def test_force_after_an_sft_only_change_keeps_pretraining(tmp_path):
    from training.checkpoint import list_checkpoints, read_checkpoint
    from training.config import load_config
    from training.train import train

    quiet = dict(progress=False, log=lambda *_: None)
    train(load_config("tiny", ["pretrain.steps=4", "sft.steps=4"]), tmp_path / "run", **quiet)
    pre = read_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints", "pretrain")[-1][2])[2]
    changed = load_config("tiny", ["pretrain.steps=4", "sft.steps=4", "sft.lr=5e-4"])
    with pytest.raises(UsageError, match=r"sft.lr \(0.001 -> 0.0005\)"):
        train(changed, tmp_path / "run", **quiet)
    (tmp_path / "run" / "checkpoints" / ".sft-step000004.killed").mkdir()  # what a kill in a save leaves
    train(changed, tmp_path / "run", force=True, **quiet)
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    again = read_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints", "pretrain")[-1][2])[2]
    assert all(torch.equal(pre[k], again[k]) for k in pre)
    fresh = tmp_path / "fresh"
    train(changed, fresh, **quiet)
    a = read_checkpoint(tmp_path / "run" / "checkpoints" / "sft-step000004")[2]
    b = read_checkpoint(fresh / "checkpoints" / "sft-step000004")[2]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights a fresh run with the new config gets


def _evil_dir(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "evil"
    d.mkdir()
    marker = tmp_path / "pwned"
    (d / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                     "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    for mod in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (d / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    return d, marker


def test_a_directory_with_custom_code_never_runs_it_nor_asks(tmp_path):
    d, marker = _evil_dir(tmp_path)
    cmd = [sys.executable, "-m", "probes", "run", "--checkpoints", str(d), "--verifier", "exact", "--out", str(tmp_path / "r")]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "model_type 'evil' is not supported" in r.stderr and "gpt2" in r.stderr
    assert not marker.exists()

    # under a terminal that answers "y" to any question
    import pty

    leader, follower = pty.openpty()
    p = subprocess.Popen(cmd, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    seen, stop = [], threading.Event()

    def answer():
        while not stop.is_set():
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                return
            if not chunk:
                return
            seen.append(chunk.decode(errors="replace"))
            try:
                os.write(leader, b"y\n")
            except OSError:
                return

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        code = p.wait(timeout=120)
    finally:
        stop.set()
        time.sleep(0.1)
        os.close(leader)
    text = "".join(seen)
    assert code == 2, text
    assert "[y/N]" not in text and "custom code" not in text.lower()
    assert not marker.exists()


def test_quiet_hf_load_prints_no_progress_bar(tmp_path, capsys):
    from probes.cli import main
    from tests.hf_fixtures import build_hf_checkpoint
    from training.schema import DecisionPoint, Problem, write_jsonl

    d = build_hf_checkpoint(tmp_path / "gpt2-base", "gpt2")
    c = " A -> B -> D answer: D"
    write_jsonl(tmp_path / "eval.jsonl", [Problem("Q: go from A to D. A:", c, "D",
                                                   [DecisionPoint(c.index("B"), ["B", "C"], ["B", "C"], "multi-valid", "B")])])
    capsys.readouterr()
    code = main(["run", "--checkpoints", str(d), "--eval", str(tmp_path / "eval.jsonl"), "--verifier", "exact",
                 "--samples", "2", "--out", str(tmp_path / "r"), "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "Loading weights" not in out.err and "%|" not in out.err


def test_meta_eval_file_is_read_only_inside_the_run(tiny_run, tmp_path):
    from hooks.record import read_record

    run = _copy_run(tiny_run, tmp_path / "run")
    ck = run / "checkpoints" / "sft-step000020"
    assert read_record(ck).eval_file() == (run / "data" / "eval.jsonl").resolve()
    meta = json.loads((ck / "meta.json").read_text())
    (ck / "meta.json").write_text(json.dumps({**meta, "data_dir": "/etc", "eval_file": "passwd"}))
    with pytest.raises(UsageError, match="/etc/passwd, outside the run directory"):
        read_record(ck).eval_file()
