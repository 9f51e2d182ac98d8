"""Training: checkpoints load back as hooked models with the same logits; resume is exact."""

import json
import subprocess
import sys

import pytest
import torch

from hooks.load import load
from training.checkpoint import list_checkpoints, read_checkpoint, schedule
from training.config import load_config
from training.model import build_native
from training.errors import UsageError
from training.schema import read_jsonl
from training.tasks import get_task


def test_schedule_is_log_spaced_then_even():
    s = schedule(3000, 4, 4, include_zero=True)
    assert s[0] == 0 and s[-1] == 3000
    assert [750, 1500, 2250, 3000] == s[-4:]
    early = s[1:-4]
    assert len(early) == 4 and early[0] == 30
    ratios = [b / a for a, b in zip(early, early[1:])]
    assert max(ratios) / min(ratios) < 1.1  # geometric spacing


def test_checkpoints_written_with_format(tiny_run):
    cks = list_checkpoints(tiny_run / "checkpoints")
    names = [p.name for _, _, p in cks]
    assert names[0].startswith("pretrain-") and "sft-step000000" in names and names[-1] == "sft-step000020"
    cfg, meta, weights = read_checkpoint(cks[-1][2])
    assert meta["phase"] == "sft" and meta["step"] == 20 and meta["tokens_seen"] > 0
    assert set(cfg) >= {"model", "tokenizer", "task", "experiment"}
    assert (cks[-1][2] / "model.safetensors").is_file()
    # step 0 of SFT is the base model: identical weights to the last pretraining checkpoint
    _, _, base = read_checkpoint(tiny_run / "checkpoints" / "sft-step000000")
    _, _, pre = read_checkpoint(cks[0][2])
    assert all(torch.equal(base[k], pre[k]) for k in base)


def test_hooked_logits_equal_the_trained_module(tiny_run):
    path = tiny_run / "checkpoints" / "sft-step000020"
    cfg, _, weights = read_checkpoint(path)
    module = build_native(cfg["model"])
    module.load_state_dict(weights)
    hooked = load(path)
    ids = torch.randint(0, cfg["model"]["d_vocab"], (4, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = module(ids)
        out = hooked.bridge(ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_eval_is_disjoint_from_training(tiny_run):
    task = get_task({"name": "graph"})
    train_keys = {task.key(p) for name in ("pretrain", "sft") for p in read_jsonl(tiny_run / "data" / f"{name}.jsonl")}
    ev = read_jsonl(tiny_run / "data" / "eval.jsonl")
    assert {p.decision_points[0].kind for p in ev} == {"indecipherable", "decipherable", "multi-valid"}
    assert not any(task.key(p) in train_keys for p in ev)


def test_resume_gives_the_same_weights(tmp_path):
    from training.train import train

    cfg = load_config("tiny", ["pretrain.steps=6", "sft.steps=12", "sft.n_log_checkpoints=0", "sft.n_even_checkpoints=3"])
    quiet = dict(progress=False, log=lambda *_: None)
    train(cfg, tmp_path / "full", **quiet)
    train(cfg, tmp_path / "cut", stop_after={"sft": 5}, **quiet)  # interrupted after step 5: last checkpoint step 4
    assert list_checkpoints(tmp_path / "cut" / "checkpoints", "sft")[-1][1] == 4
    train(cfg, tmp_path / "cut", **quiet)
    _, _, a = read_checkpoint(tmp_path / "full" / "checkpoints" / "sft-step000012")
    _, _, b = read_checkpoint(tmp_path / "cut" / "checkpoints" / "sft-step000012")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_data(tmp_path):
    from training.synth import build_data

    cfg = load_config("tiny")
    m1 = build_data(cfg, tmp_path / "a", log=lambda *_: None)
    m2 = build_data(cfg, tmp_path / "b", log=lambda *_: None)
    assert m1["hash"] == m2["hash"]
    m3 = build_data(load_config("tiny", ["seed=1"]), tmp_path / "c", log=lambda *_: None)
    assert m3["files"]["eval.jsonl"]["sha256"] != m1["files"]["eval.jsonl"]["sha256"]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "probes", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "sft.stesp=3"], "did you mean sft.steps"),
        (["train", "model.d_model=-4"], "model.d_model must be ≥ 1"),
        (["train", "data.n_eval=-1"], "data.n_eval must be ≥ 1"),
        (["train", "data.prevalence=1.5"], "data.prevalence must be in [0, 1]"),
        (["train", "--config", "nope"], "no config file 'nope'"),
        (["train", "--out", "/proc/forbidden", "--config", "tiny"], "cannot write to --out"),
        (["train", "task.arms=[1]"], "task.arms"),
    ],
)
def test_bad_train_input_is_one_line_and_exit_2(args, needle):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def test_print_config_shows_the_embedded_default():
    r = _cli("train", "--print-config", "sft.steps=7")
    assert r.returncode == 0
    cfg = json.loads(r.stdout)
    assert cfg["sft"]["steps"] == 7 and cfg["task"]["name"] == "graph" and cfg["data"]["n_eval"] >= 200


def test_tokenizer_fast_encode_equals_the_located_one():
    from training.tokenizer import WordTokenizer

    tok = WordTokenizer(["a", "b", "->", "é"])
    for text in ["a b", "  a\tb\n->  ", "a\x1cb\u00a0é\u2028a", "", "   "]:
        assert tok.encode(text) == [t for t, _ in tok.encode_with_offsets(text)]
    with pytest.raises(UsageError, match="unknown token 'c' at character 4"):
        tok.encode("a b c")


def test_tokenized_corpus_by_hand():
    from training.corpus import tokenize_problems
    from training.schema import Problem
    from training.tokenizer import WordTokenizer

    tok = WordTokenizer(["a", "b", "c"])  # ids: <pad> 0, <eos> 1, a 2, b 3, c 4
    probs = [Problem("a b", " c", "c", []), Problem("a", " b c a", "b c a", [])]
    c = tokenize_problems(probs, tok, max_len=8)
    assert c.ids.tolist() == [[2, 3, 4, 1, 0], [2, 3, 4, 2, 1]]
    assert c.lengths.tolist() == [4, 5]
    # position t trains the prediction of token t+1: the completion tokens and the EOS
    assert c.loss_mask.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    with pytest.raises(UsageError, match="more than the model's context 4"):
        tokenize_problems(probs, tok, max_len=4)
