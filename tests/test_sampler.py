"""KV-cached stepper and batched sampler, checked against full forwards without a cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources.native.model import NativeModel

from hooks.kv_native import NativeKVStepper
from hooks.sampler import Stepper, as_stepper, sample
from hooks.strategies import entropy, parse_strategy
from training.errors import UsageError

VOCAB = 54


def _cfg(**overrides) -> TransformerBridgeConfig:
    base = dict(
        d_model=64, d_head=16, n_layers=2, n_heads=4, d_mlp=128, d_vocab=VOCAB, n_ctx=48,
        act_fn="gelu", normalization_type="LN", seed=0,
    )
    base.update(overrides)
    return TransformerBridgeConfig(**base)


def _model(seed: int = 0, **overrides) -> NativeModel:
    """Tiny NativeModel with weights drawn from a seeded generator (logits of order 1)."""
    model = NativeModel(_cfg(**overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif name.startswith(("tok_embed", "pos")):
                p.copy_(noise)
            else:
                p.copy_(noise * p.shape[1] ** -0.5)
    return model.eval()


def _prompts(problems: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (problems, length), generator=torch.Generator().manual_seed(seed))


CONFIGS = {
    "ln-learned": {},
    "rms-rotary": dict(normalization_type="RMS", positional_embedding_type="rotary"),
    "gqa-rotary-gated": dict(
        normalization_type="RMS", positional_embedding_type="rotary", n_key_value_heads=2,
        gated_mlp=True, act_fn="silu",
    ),
    "attn-only-lnpre": dict(attn_only=True, normalization_type="LNPre"),
    "mqa-softcaps": dict(n_key_value_heads=1, attn_scores_soft_cap=4.0, output_logits_soft_cap=5.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stepper_equals_full_forward_at_every_step(name):
    model = _model(**CONFIGS[name])
    stepper = NativeKVStepper(model)
    g = torch.Generator().manual_seed(2)
    prompts, repeats = _prompts(3, 5), 2  # rows of one prompt share its prompt keys
    seqs = prompts.repeat_interleave(repeats, dim=0)
    logits = stepper.prefill(prompts, max_new_tokens=6, repeats=repeats)
    with torch.no_grad():
        for _ in range(5):
            torch.testing.assert_close(logits, model(seqs)[:, -1], atol=1e-5, rtol=0)
            next_ids = torch.randint(0, VOCAB, (seqs.shape[0],), generator=g)
            seqs = torch.cat([seqs, next_ids[:, None]], dim=1)
            logits = stepper.step(next_ids)
        torch.testing.assert_close(logits, model(seqs)[:, -1], atol=1e-5, rtol=0)


def test_stepper_on_bridge_equals_bridge_forward():
    bridge = TransformerBridge.boot_native(_cfg(n_layers=3, d_mlp=256))
    stepper = NativeKVStepper(bridge)
    seqs = _prompts(2, 9)
    logits = stepper.prefill(seqs[:, :6], max_new_tokens=4)
    with torch.no_grad():
        for t in range(6, 9):
            torch.testing.assert_close(logits, bridge(seqs[:, :t])[:, -1], atol=1e-5, rtol=0)
            logits = stepper.step(seqs[:, t])
        torch.testing.assert_close(logits, bridge(seqs)[:, -1], atol=1e-5, rtol=0)


def test_stepper_refuses_context_overflow_and_misuse():
    stepper = NativeKVStepper(_model())
    with pytest.raises(UsageError, match="n_ctx=48"):
        stepper.prefill(_prompts(1, 40), max_new_tokens=10)
    with pytest.raises(UsageError, match="prefill"):
        stepper.step(torch.zeros(1, dtype=torch.long))
    stepper.prefill(_prompts(1, 4), max_new_tokens=2)
    for _ in range(2):  # the cache holds max_new_tokens generated positions
        stepper.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(UsageError, match="full"):
        stepper.step(torch.zeros(1, dtype=torch.long))


def _greedy_reference(model, prompts, max_new, eos_id, pad_id):
    """Argmax of a full forward (no cache) each step; pad after EOS."""
    seqs, out = prompts.clone(), []
    done = torch.zeros(prompts.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_new):
            nxt = model(seqs)[:, -1].argmax(-1)
            out.append(torch.where(done, pad_id, nxt))
            done |= nxt == eos_id
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("spec", ["greedy", "temperature:1e-6"])
def test_low_temperature_equals_greedy_full_forward(spec):
    model = _model(n_layers=3)
    prompts = _prompts(4, 7)
    ref = _greedy_reference(model, prompts, max_new=5, eos_id=3, pad_id=99)
    out = sample(model, prompts, n=4, max_new_tokens=5, eos_id=3, pad_id=99, strategy=spec,
                 generator=torch.Generator().manual_seed(0), batch_size=8)
    assert out.shape == (4, 4, 5)
    for j in range(4):
        assert torch.equal(out[:, j], ref)


@pytest.mark.parametrize("spec", ["temperature:1", "temperature:0.6", "top_p:0.7", "min_p:0.3", "fork_temp:3,1"])
def test_first_token_frequencies_match_strategy_probs(spec):
    model = _model()
    prompts = _prompts(2, 6)
    strategy = parse_strategy(spec)
    n = 20_000
    out = sample(model, prompts, n=n, max_new_tokens=1, eos_id=0, pad_id=0, strategy=strategy,
                 generator=torch.Generator().manual_seed(5), batch_size=8192)
    with torch.no_grad():
        full = model(prompts)[:, -1]
    assert entropy(full).min() > 2.0  # a spread-out distribution, so the test has teeth
    expected = strategy.probs(full).numpy() * n
    for row in range(2):
        counts = np.bincount(out[row, :, 0].numpy(), minlength=VOCAB)
        assert counts[expected[row] == 0].sum() == 0  # excluded tokens are never drawn
        big = expected[row] >= 5  # lump the small bins so chi-square is valid
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(expected[row][big], expected[row][~big].sum()).astype(np.float64)
        keep = exp > 0
        exp = exp[keep] * obs.sum() / exp[keep].sum()
        assert stats.chisquare(obs[keep], exp).pvalue > 1e-3


def test_same_seed_same_samples_and_chunking():
    model = _model()
    prompts = _prompts(2, 5)
    kw = dict(n=5, max_new_tokens=3, eos_id=1, pad_id=0, strategy="temperature:1")
    a = sample(model, prompts, generator=torch.Generator().manual_seed(11), batch_size=10, **kw)
    b = sample(model, prompts, generator=torch.Generator().manual_seed(11), batch_size=10, **kw)
    c = sample(model, prompts, generator=torch.Generator().manual_seed(12), batch_size=10, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for batch_size in (2, 5, 100):  # n > batch_size splits a problem's samples over chunks
        d = sample(model, prompts, generator=torch.Generator().manual_seed(11), batch_size=batch_size, **kw)
        assert d.shape == (2, 5, 3) and d.dtype == torch.long
        assert int(d.min()) >= 0 and int(d.max()) < VOCAB


def test_samples_equal_inverse_cdf_of_full_forward_with_step_major_uniforms():
    """The draw order the module docstring promises: per chunk, rand((max_new_tokens, rows)),
    row r's token at step t from uniform [t, r] by inverse CDF of the full forward's softmax,
    early stop or not. A hand-written reference from full forwards gives the same tokens."""
    model = _model(seed=3)
    prompts = _prompts(3, 4, seed=5)
    n, new, eos, pad, batch = 4, 6, 2, 0, 8  # chunks of 2 problems x 4 samples, then 1 x 4
    got = sample(model, prompts, n, new, eos, pad, "temperature:1", torch.Generator().manual_seed(9), batch_size=batch)
    g = torch.Generator().manual_seed(9)
    want = torch.full((3, n, new), pad)
    for p0, p1 in ((0, 2), (2, 3)):
        rows = (p1 - p0) * n
        u = torch.rand((new, rows), generator=g)
        seqs = prompts[p0:p1].repeat_interleave(n, dim=0)
        done = torch.zeros(rows, dtype=torch.bool)
        with torch.no_grad():
            for t in range(new):
                probs = torch.softmax(model(seqs)[:, -1].double(), dim=-1)
                cdf = probs.cumsum(-1)
                ids = torch.searchsorted(cdf, ((1 - u[t]).double() * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
                ids = ids.clamp(max=VOCAB - 1)
                want[p0:p1].view(rows, new)[:, t] = torch.where(done, pad, ids)
                done |= ids == eos
                seqs = torch.cat([seqs, ids[:, None]], dim=1)
    assert torch.equal(got, want)


def test_a_chunk_that_stops_early_still_uses_up_its_uniforms():
    """Chunk 1 stops after 2 of 6 steps; chunk 2 still starts at uniform block 2 of the stream,
    so the samples do not depend on when a chunk stopped (nor on the device's sync habits)."""
    eos, pad, n, new, vocab = 0, 9, 4, 6, 8

    def logits_fn(t, rows):  # step 0: uniform over tokens 1..7; later steps: EOS for sure
        logits = torch.zeros(rows, vocab)
        logits[:, 0] = float("-inf") if t == 0 else 50.0
        return logits

    stepper = ScriptedStepper(logits_fn)
    got = sample(stepper, torch.zeros(2, 3, dtype=torch.long), n, new, eos, pad, "temperature:1",
                 torch.Generator().manual_seed(4), batch_size=n)
    assert stepper.steps == 2  # one step per chunk: everyone emits EOS at t = 1
    g = torch.Generator().manual_seed(4)
    for chunk in range(2):
        u = torch.rand((new, n), generator=g)[0]  # each chunk draws its whole (new, rows) block
        first = 1 + torch.floor((1 - u) * 7 - 1e-6).clamp(min=0).long()  # inverse CDF over tokens 1..7
        assert torch.equal(got[chunk, :, 0], first)
        assert torch.equal(got[chunk, :, 1], torch.full((n,), eos))
        assert torch.equal(got[chunk, :, 2:], torch.full((n, new - 2), pad))


def test_bridge_is_accepted():
    bridge = TransformerBridge.boot_native(_cfg())
    prompts = _prompts(2, 4)
    out = sample(bridge, prompts, n=2, max_new_tokens=3, eos_id=99, pad_id=0, strategy="greedy",
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], _greedy_reference(bridge.original_model, prompts, 3, 99, 0))


class ScriptedStepper:
    """Stepper whose logits are a function of (step t, row index in the chunk)."""

    def __init__(self, logits_fn):
        self.logits_fn = logits_fn
        self.steps = 0
        self.prefills: list[tuple[int, int]] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def prefill(self, input_ids, max_new_tokens=1, repeats=1):
        self.prefills.append((input_ids.shape[0], repeats))
        self.t, self.rows = 0, input_ids.shape[0] * repeats
        return self.logits_fn(0, self.rows)

    def step(self, next_ids):
        assert next_ids.shape == (self.rows,)
        self.steps += 1
        self.t += 1
        return self.logits_fn(self.t, self.rows)


def test_eos_pads_and_early_stop():
    eos, pad, n = 7, 50, 3

    def logits_fn(t, rows):  # sample j (= row % n) says token t+10 until EOS at step j
        j = torch.arange(rows) % n
        target = torch.where(j == t, eos, t + 10)
        return torch.nn.functional.one_hot(target, 20).float() * 30.0

    stepper = ScriptedStepper(logits_fn)
    assert isinstance(stepper, Stepper) and as_stepper(stepper) is stepper
    out = sample(stepper, torch.zeros(2, 4, dtype=torch.long), n=n, max_new_tokens=10, eos_id=eos,
                 pad_id=pad, strategy="temperature:1", generator=torch.Generator().manual_seed(0))
    expected = torch.full((n, 10), pad)
    for j in range(n):
        expected[j, :j] = torch.arange(j) + 10
        expected[j, j] = eos
    assert torch.equal(out, expected.expand(2, n, 10))
    assert stepper.steps == 2  # everyone had emitted EOS after token index 2
    assert stepper.prefills == [(2, 3)]  # one prefill per prompt, repeated n times


def test_native_stepper_satisfies_protocol():
    assert isinstance(NativeKVStepper(_model()), Stepper)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "n must be"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(batch_size=0), "batch_size"),
        (dict(prompt_ids=torch.zeros(5, dtype=torch.long)), "prompt_ids"),
        (dict(prompt_ids=torch.zeros(2, 3)), "integer"),
        (dict(strategy="nucleus:0.9"), "valid forms"),
        (dict(generator=0), "generator"),
        (dict(model=torch.nn.Linear(2, 2)), "cannot sample"),
        (dict(max_new_tokens=60), "n_ctx"),
    ],
)
def test_sample_usage_errors(kwargs, match):
    args = dict(model=_model(n_layers=1), prompt_ids=_prompts(2, 3), n=2, max_new_tokens=2, eos_id=0,
                pad_id=0, strategy="greedy", generator=torch.Generator().manual_seed(0))
    args.update(kwargs)
    with pytest.raises(UsageError, match=match):
        sample(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_with_cpu_generator():
    model = _model()
    prompts = _prompts(3, 6)
    cpu = sample(model, prompts, 4, 5, 99, 0, "greedy", torch.Generator().manual_seed(0))
    gpu = sample(model.cuda(), prompts, 4, 5, 99, 0, "greedy", torch.Generator().manual_seed(0))
    assert torch.equal(cpu, gpu) and gpu.device.type == "cpu"
    a = sample(model, prompts, 4, 5, 99, 0, "temperature:1", torch.Generator().manual_seed(3))
    b = sample(model, prompts, 4, 5, 99, 0, "temperature:1", torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with torch.no_grad():
        stepper = NativeKVStepper(model)
        torch.testing.assert_close(stepper.prefill(prompts.cuda()), model(prompts.cuda())[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_left_padded_prompts_equal_their_unpadded_forwards(name):
    """Prompts of lengths 3, 7 and 5 in one prefill: each row, at every step, gives the logits of
    a full forward over its own unpadded tokens (positions from its first real token)."""
    model = _model(**CONFIGS[name])
    lengths = [3, 7, 5]
    rows = [_prompts(1, n, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    padded = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, width - len(r):] = r
    stepper = NativeKVStepper(model)
    logits = stepper.prefill(padded, max_new_tokens=5, repeats=2, lengths=torch.tensor(lengths))
    seqs = [r.repeat(2, 1) for r in rows]  # rows of the cache: each prompt twice, adjacent
    g = torch.Generator().manual_seed(5)
    for step in range(5):
        with torch.no_grad():
            ref = torch.cat([model(s)[:, -1] for s in seqs])
        torch.testing.assert_close(logits, ref, atol=2e-5, rtol=0)
        nxt = torch.randint(0, VOCAB, (6,), generator=g)
        seqs = [torch.cat([s, nxt[2 * i: 2 * i + 2, None]], dim=1) for i, s in enumerate(seqs)]
        if step < 4:
            logits = stepper.step(nxt)


def test_generate_mixes_prompt_lengths_and_keeps_problem_order():
    """Greedy samples of a ragged batch equal each prompt sampled alone, in the caller's order."""
    from hooks.sampler import generate

    model = _model()
    rows = [_prompts(1, n, seed=20 + n)[0].tolist() for n in (6, 3, 9, 3)]
    g = torch.Generator().manual_seed(0)
    both = generate(model, rows, n=2, max_new_tokens=6, stop_ids=[7, 11], pad_id=0, strategy="greedy",
                    generator=g, batch_size=8)
    assert both.tokens.shape == (4, 2, 6) and both.finished.shape == (4, 2)
    for i, r in enumerate(rows):
        alone = generate(model, [r], n=2, max_new_tokens=6, stop_ids=[7, 11], pad_id=0, strategy="greedy",
                         generator=torch.Generator().manual_seed(0))
        assert torch.equal(both.tokens[i], alone.tokens[0]) and torch.equal(both.finished[i], alone.finished[0])
        for s, done in zip(both.tokens[i].tolist(), both.finished[i].tolist()):
            hit = [t for t, tok in enumerate(s) if tok in (7, 11)]
            assert done == bool(hit)  # finished exactly when a stop id came within the budget
            if hit:
                assert all(tok == 0 for tok in s[hit[0] + 1:])  # pad after the stop


def test_equal_length_prompts_give_the_samples_they_always_did():
    """A tensor of equal-length prompts takes the unpadded path: the same draws as before padding existed."""
    from hooks.sampler import generate

    model = _model()
    prompts = _prompts(5, 6)
    kw = dict(n=4, max_new_tokens=5, pad_id=0, strategy="temperature:1", batch_size=8)
    a = sample(model, prompts, eos_id=3, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(model, [p.tolist() for p in prompts], stop_ids=3, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b.tokens)
    assert torch.equal(b.finished, (a == 3).any(dim=-1))


def test_stop_check_marks_rows_finished_without_a_stop_id():
    from hooks.sampler import generate

    model = _model()
    seen = []

    def stop_after_four(tokens):  # a "stop string" that every sample reaches after 4 tokens
        seen.append(tokens.shape[1])
        return torch.full((tokens.shape[0],), tokens.shape[1] >= 4)

    out = generate(model, _prompts(2, 5), n=3, max_new_tokens=10, stop_ids=[VOCAB + 5], pad_id=0,
                   strategy="temperature:1", generator=torch.Generator().manual_seed(1), stop_check=stop_after_four,
                   check_every=2)
    assert out.finished.all() and seen == [2, 4]  # checked every 2 steps; the chunk stopped once all were done
    none = generate(model, _prompts(2, 5), n=3, max_new_tokens=3, stop_ids=[VOCAB + 5], pad_id=0,
                    strategy="temperature:1", generator=torch.Generator().manual_seed(1))
    assert not none.finished.any()  # ran out of budget: truncated
