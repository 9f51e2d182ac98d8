"""Hugging Face checkpoints through nnsight: captures, lens, stepper, tokenizer and user errors.

References are independent of nnsight: the model's own ``output_hidden_states``, a plain torch
pre-hook on the final norm, unpadded single-row forwards and full re-forwards per sampled token.
"""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from hooks.encode import encode_problems
from tests.hf_fixtures import ARCHS, build_hf_checkpoint, build_tokenizer
from training.errors import UsageError
from training.schema import DecisionPoint, Problem

ATOL = 1e-5


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One loaded tiny checkpoint per architecture (Llama's tokenizer prepends a BOS)."""
    from hooks.hf import HFCheckpoint

    root = tmp_path_factory.mktemp("hf")
    return {a: HFCheckpoint(build_hf_checkpoint(root / f"{a}-base", a, seed=1)) for a in ARCHS}


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False  # right padding, as hooks.encode batches
    mask[2, 4:] = False
    resid_pos = torch.tensor([[0, 4], [2, 5], [1, 3]])
    logit_pos = torch.tensor([[0, 3, 8], [1, 2, 5], [0, 3, 3]])
    return ids, mask, resid_pos, logit_pos


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_equals_hidden_states_and_lens_equals_logits(ckpts, arch):
    ck = ckpts[arch]
    ids, mask, rp, lp = _batch(len(ck.tokenizer))
    logits, resid = ck.capture(ids, mask, rp, lp)
    assert resid.shape == (3, 2, ck.n_layers + 1, ck.d_model) and resid.dtype == torch.float32
    assert logits.shape == (3, 3, ck.module.config.vocab_size)

    m = mask.long()
    seen = {}
    hook = ck._arch.norm.register_forward_pre_hook(lambda mod, args: seen.setdefault("pre_norm", args[0]))
    with torch.no_grad():
        out = ck.module(input_ids=ids, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True)
    hook.remove()
    rows = torch.arange(3)[:, None]
    assert len(out.hidden_states) == ck.n_layers + 1
    for layer in range(ck.n_layers):  # hidden_states[l] is the input of block l
        torch.testing.assert_close(resid[:, :, layer], out.hidden_states[layer][rows, rp], atol=ATOL, rtol=0)
    # hidden_states[-1] is AFTER the final norm (GPT-2 always; Llama and NeoX in transformers 5), so
    # the stream after the last block is checked against the norm's own input, and through the norm.
    torch.testing.assert_close(resid[:, :, -1], seen["pre_norm"][rows, rp], atol=ATOL, rtol=0)
    with torch.no_grad():
        normed = ck._arch.norm(resid[:, :, -1])
    torch.testing.assert_close(normed, out.hidden_states[-1][rows, rp], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, out.logits[rows, lp], atol=ATOL, rtol=0)
    torch.testing.assert_close(ck.lens(resid[:, :, -1]), out.logits[rows, rp], atol=ATOL, rtol=0)

    # Padding never reaches the positions read: row 2 alone, unpadded, gives the same numbers.
    with torch.no_grad():
        alone = ck.module(input_ids=ids[2:3, :4], output_hidden_states=True)
    torch.testing.assert_close(resid[2, :, 0], alone.hidden_states[0][0, rp[2]], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[2], alone.logits[0, lp[2]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_stepper_equals_full_forward_each_step(ckpts, arch):
    ck = ckpts[arch]
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(3, len(ck.tokenizer), (2, 5), generator=g)
    stepper = ck.stepper(64)
    logits = stepper.prefill(prompts, max_new_tokens=5, repeats=3)
    seq = prompts.repeat_interleave(3, dim=0)
    for _ in range(5):
        with torch.no_grad():
            ref = ck.module(input_ids=seq).logits[:, -1]
        assert logits.dtype == torch.float32 and logits.shape == ref.shape
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
        nxt = torch.randint(3, len(ck.tokenizer), (6,), generator=g)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        logits = stepper.step(nxt)


def test_stepper_refuses_too_long_and_step_before_prefill(ckpts):
    ck = ckpts["gpt2"]
    st = ck.stepper(10)
    with pytest.raises(UsageError, match="prefill"):
        st.step(torch.tensor([3]))
    with pytest.raises(UsageError, match="exceeds 10"):
        st.prefill(torch.full((1, 8), 3), max_new_tokens=4)
    assert ck.stepper(10_000).max_len == ck.n_ctx  # never past the model's context


def test_sampler_drives_the_stepper(ckpts):
    from hooks.sampler import sample

    ck = ckpts["llama"]
    prompt = torch.tensor([ck.tokenizer.encode("Q: go from A to D. A:")])
    out = sample(ck.stepper(64), prompt, n=4, max_new_tokens=6, eos_id=ck.tokenizer.eos_id,
                 pad_id=ck.tokenizer.pad_id, strategy="temperature:1", generator=torch.Generator().manual_seed(0))
    again = sample(ck.stepper(64), prompt, n=4, max_new_tokens=6, eos_id=ck.tokenizer.eos_id,
                   pad_id=ck.tokenizer.pad_id, strategy="temperature:1", generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 4, 6) and torch.equal(out, again)


def _problem() -> Problem:
    c = " A -> B -> D answer: D"
    return Problem(
        prompt="Q: go from A to D. A:",
        completion=c,
        answer="D",
        decision_points=[
            DecisionPoint(c.index("B"), ["B", "C"], ["B", "C"], "multi-valid", "B"),
            DecisionPoint(c.index("answer: D") + 8, ["D", "B"], ["D"], "decipherable", "D"),
            DecisionPoint(c.index("nswer"), ["nswer", "x"], ["nswer"], "decipherable"),  # inside a token
        ],
    )


@pytest.mark.parametrize("bos", [False, True])
def test_tokenizer_offsets_map_decision_points(bos):
    from hooks.hf import HFTokenizer

    hf = build_tokenizer(bos=bos)
    tok = HFTokenizer(hf)
    p = _problem()
    (enc,), report = encode_problems(tok, [p])
    vocab = hf.convert_ids_to_tokens
    assert tok.bos_id == (hf.bos_token_id if bos else None)
    assert enc.ids[: int(bos)] == ([hf.bos_token_id] if bos else [])
    assert enc.ids[int(bos):-1] == hf(p.prompt + p.completion, add_special_tokens=False)["input_ids"]
    assert enc.ids[-1] == tok.eos_id
    assert vocab(enc.ids[enc.prompt_len - 1]) == ":" and vocab(enc.ids[enc.prompt_len]) == "ĠA"
    first, second = enc.forks
    assert vocab(enc.ids[first.pos]) == "ĠB" and first.kind == "multi-valid"
    assert vocab(first.branch_ids) == ["ĠB", "ĠC"] and first.valid == [True, True] and first.taken == 0
    assert enc.ids[second.pos] == enc.ids[-2] and vocab(enc.ids[second.pos]) == "ĠD"
    assert second.branch_ids == sorted(second.branch_ids) and set(vocab(second.branch_ids)) == {"ĠD", "ĠB"}
    assert second.branches[second.valid.index(True)] == "D" and second.branches[second.taken] == "D"
    assert report.skipped == {"inside a token": 1}

    text, finished = tok.decode_completion(enc.ids[enc.prompt_len:] + [tok.pad_id])
    assert (text, finished) == (p.completion, True)
    assert tok.decode_completion(tok.encode(" B ->")[int(bos):]) == (" B ->", False)
    assert tok.decode_completion([len(tok) + 5, tok.encode(" D")[-1]]) == (" D", False)  # padded rows dropped


def test_tokenizer_ids_fingerprint_and_pad_fallback():
    from hooks.hf import HFTokenizer

    plain, again, with_bos = HFTokenizer(build_tokenizer()), HFTokenizer(build_tokenizer()), HFTokenizer(build_tokenizer(bos=True))
    assert plain.fingerprint() == again.fingerprint() and plain.fingerprint().startswith("hf:")
    assert plain.fingerprint() != with_bos.fingerprint()
    no_pad = HFTokenizer(build_tokenizer(pad=False))
    assert no_pad.pad_id == no_pad.eos_id == plain.eos_id
    assert no_pad.fingerprint() != plain.fingerprint()


def test_load_dispatch_meta_phase_step_and_no_network(tmp_path, monkeypatch):
    from hooks.load import load
    from training.phases import phase_step

    def hf_phase_step(path, meta):
        return phase_step(path.name, meta, native=False)

    def refuse(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    d = build_hf_checkpoint(tmp_path / "checkpoint-400", "gpt_neox", meta={"phase": "sft", "step": 7, "seed": 3})
    ck = load(d)
    assert (ck.format, ck.name, ck.phase, ck.step, ck.meta["seed"]) == ("hf", "checkpoint-400", "sft", 7, 3)
    assert hf_phase_step(tmp_path / "checkpoint-400", {}) == ("sft", 400)
    assert hf_phase_step(tmp_path / "my-Base-model", {}) == ("base", 0)
    assert hf_phase_step(tmp_path / "base", {"step": 12}) == ("base", 12)
    assert hf_phase_step(tmp_path / "x-3", {"phase": "pretrain"}) == ("pretrain", 3)


def test_dtype_and_device_apply(tmp_path):
    from hooks.hf import HFCheckpoint

    d = build_hf_checkpoint(tmp_path / "sft", "llama")
    ck = HFCheckpoint(d, dtype="bfloat16")
    assert next(ck.module.parameters()).dtype == torch.bfloat16
    ids, mask, rp, lp = _batch(len(ck.tokenizer))
    logits, resid = ck.capture(ids, mask, rp, lp)
    assert logits.dtype == resid.dtype == torch.float32
    full = HFCheckpoint(d).capture(ids, mask, rp, lp)[0]
    assert (logits - full).abs().max() < 0.1 * full.abs().max()  # bfloat16 is close, not equal
    with pytest.raises(UsageError, match="unknown --dtype 'float8'"):
        HFCheckpoint(d, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            HFCheckpoint(d, device="cuda")


def test_user_errors_name_the_file_and_directory(tmp_path):
    from hooks.hf import HFCheckpoint
    from hooks.load import load

    good = build_hf_checkpoint(tmp_path / "good", "gpt2")

    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UsageError, match="neither a fork-probes checkpoint"):
        load(neither)

    no_tok = tmp_path / "no_tok"
    shutil.copytree(good, no_tok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / f).unlink()
    with pytest.raises(UsageError, match=f"no tokenizer file tokenizer.json in {no_tok}"):
        load(no_tok)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(good, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(UsageError, match=f"no weights file model.safetensors in {no_weights}"):
        load(no_weights)

    unknown = tmp_path / "unknown"
    shutil.copytree(good, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "opt"}))
    with pytest.raises(UsageError, match="model_type 'opt' is not supported.*gpt2, gpt_neox, llama") as e:
        HFCheckpoint(unknown)
    assert "\n" not in str(e.value)

    other_vocab = tmp_path / "other_vocab"
    build_hf_checkpoint(other_vocab, "gpt2", vocab_size=64)
    with pytest.raises(UsageError, match="different models"):
        HFCheckpoint(other_vocab)


def test_probes_run_end_to_end_on_hf_directories(tmp_path):
    """`probes.api.run` on a random base and a scripted 'sft' GPT-2 that always writes the gold answer."""
    from probes.api import run
    from tests.hf_fixtures import build_scripted_checkpoint
    from training.schema import write_jsonl

    prompt = "Q: go from A to D. A:"
    base = build_hf_checkpoint(tmp_path / "gpt2-base", "gpt2", seed=0)
    sft = build_scripted_checkpoint(tmp_path / "gpt2-sft-100", prompt + " A -> B -> D answer: D")
    problems = []
    for mid in "BCB":
        c = f" A -> {mid} -> D answer: D"
        problems.append(Problem(prompt, c, "D", [DecisionPoint(c.index(mid), ["B", "C"], ["B", "C"], "multi-valid", mid)]))
    write_jsonl(tmp_path / "eval.jsonl", problems)

    df = run(checkpoints=[base, sft], eval=tmp_path / "eval.jsonl", samples=4, verifier="exact",
             out=tmp_path / "results", progress=False, log=lambda s: None)
    assert set(df["checkpoint"]) == {"gpt2-base", "gpt2-sft-100"}
    assert (df["format"] == "hf").all()
    info = df.groupby("checkpoint")[["phase", "step"]].first().to_dict("index")
    assert info == {"gpt2-base": {"phase": "base", "step": 0}, "gpt2-sft-100": {"phase": "sft", "step": 100}}

    passk = df[(df["metric"] == "pass@k") & (df["kind"] == "all")]
    for ckpt, expected in (("gpt2-sft-100", 1.0), ("gpt2-base", 0.0)):
        rows = passk[passk["checkpoint"] == ckpt]
        assert sorted(rows["k"].astype(int)) == [1, 2, 4] and (rows["n"] == 3).all()
        assert (rows["value"] == expected).all()  # the scripted model always answers D; noise never does
    ent = df[(df["metric"] == "entropy_fork") & (df["kind"] == "all")].set_index("checkpoint")["value"]
    assert ent["gpt2-sft-100"] < 1e-3 and ent["gpt2-base"] > 5.0  # near log(vocab) for random init
    assert list(dict.fromkeys(df["checkpoint"])) == ["gpt2-base", "gpt2-sft-100"]  # the base first

    # the report names the base as the base, and puts the base's numbers in the base column
    from probes.api import figures

    _, _, report = figures(tmp_path / "results", formats=["png"], log=lambda s: None)
    text = report.read_text()
    assert "Base: `gpt2-base`" in text and "Final: `gpt2-sft-100`" in text
    pass1 = passk[passk["k"] == 1].set_index("checkpoint")["value"]
    row = next(line for line in text.splitlines() if line.startswith("| pass@1 "))
    assert row.split("|")[2].strip().startswith(f"{pass1['gpt2-base']:.3f}")
    assert row.split("|")[3].strip().startswith(f"{pass1['gpt2-sft-100']:.3f}")


@pytest.mark.parametrize("arch", ARCHS)
def test_stepper_left_padding_equals_each_unpadded_row(ckpts, arch):
    """Prompts of lengths 2, 6 and 4 prefilled together (left-padded): every row equals a plain
    forward over its own tokens, at the prompt and at each step."""
    ck = ckpts[arch]
    g = torch.Generator().manual_seed(8)
    lengths = [2, 6, 4]
    rows = [torch.randint(3, len(ck.tokenizer), (n,), generator=g) for n in lengths]
    padded = torch.full((3, 6), ck.tokenizer.pad_id)
    for i, r in enumerate(rows):
        padded[i, 6 - len(r):] = r
    stepper = ck.stepper(64)
    logits = stepper.prefill(padded, max_new_tokens=4, repeats=2, lengths=torch.tensor(lengths))
    seqs = [r.repeat(2, 1) for r in rows]
    for step in range(4):
        with torch.no_grad():
            ref = torch.cat([ck.module(input_ids=s).logits[:, -1] for s in seqs])
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
        nxt = torch.randint(3, len(ck.tokenizer), (6,), generator=g)
        seqs = [torch.cat([s, nxt[2 * i: 2 * i + 2, None]], dim=1) for i, s in enumerate(seqs)]
        if step < 3:
            logits = stepper.step(nxt)
