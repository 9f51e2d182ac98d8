"""Activation patching: the hooks replace exactly the position asked, at the layer asked, on both
checkpoint kinds, and the patching ratios take their known values on hand-built models.

References never go through the hooks under test: plain torch forward pre-hooks on the module
under the bridge (native) or on the Hugging Face module (nnsight), and hybrid modules assembled
from two models' weights.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hooks.encode import encode_problems
from hooks.native import NativeCheckpoint
from training.checkpoint import save_checkpoint
from training.config import ModelConfig
from training.errors import UsageError
from training.model import bridge_config_dict, build_native
from training.tasks import get_task
from training.tokenizer import WordTokenizer

ATOL = 1e-5
TASK = {"name": "graph"}


def _model_cfg(d_model: int = 32, vocab: int | None = None, seed: int = 0) -> dict:
    tok = get_task(TASK).tokenizer()
    return bridge_config_dict(ModelConfig(n_layers=2, d_model=d_model, n_heads=2, d_mlp=64), vocab or len(tok), 64, seed)


def _save(path, module, cfg, tokenizer=None):
    tok = tokenizer or get_task(TASK).tokenizer()
    return save_checkpoint(path, module, {"model": cfg, "tokenizer": tok.to_dict(), "task": TASK}, {})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base; ``sft`` = base with every block's weights moved (embeddings, final norm and unembedding
    shared); ``other`` = independent weights everywhere (its own final norm and unembedding)."""
    root = tmp_path_factory.mktemp("patching") / "checkpoints"
    cfg = _model_cfg()
    base = build_native(cfg, embed_init_std=1.0)
    sft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if name.startswith("layers."):
                p.add_(torch.randn(p.shape, generator=g) * 0.5 * (p.std() if p.numel() > 1 else 1.0))
    other = build_native({**cfg, "seed": 1}, embed_init_std=1.0)
    return {
        "base": NativeCheckpoint(_save(root / "sft-step000000", base, cfg)),
        "sft": NativeCheckpoint(_save(root / "sft-step000010", sft, cfg)),
        "other": NativeCheckpoint(_save(root / "sft-step000020", other, cfg)),
    }


def _batch(vocab: int, seed: int = 0, b: int = 3, s: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    pos = torch.tensor([3, 7, 11])[:b]
    every = torch.arange(s)[None].expand(b, -1)
    return ids, mask, pos, every


def _pre_hook_logits(module, block, ids, pos, rep):
    """Plain-torch reference: replace the block's (or final norm's) input at [row, pos[row]]."""
    rows = torch.arange(ids.shape[0])

    def pre(mod, args, kwargs):
        x = args[0].clone()
        x[rows, pos] = rep.to(x.dtype)
        return (x,) + tuple(args[1:]), kwargs

    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            return module(ids)
    finally:
        h.remove()


def test_hook_replaces_exactly_that_position(models):
    ck = models["sft"]
    ids, mask, pos, every = _batch(ck.module.cfg.d_vocab)
    rows = torch.arange(3)
    plain = ck.capture(ids, mask, pos[:, None], every)[0]
    rep = torch.randn(3, ck.d_model, generator=torch.Generator().manual_seed(1)) * 3
    for layer in range(ck.n_layers + 1):
        out = ck.patched_logits(ids, mask, pos, layer, rep, every)
        block = ck.module.layers[layer] if layer < ck.n_layers else ck.module.ln_out
        ref = _pre_hook_logits(ck.module, block, ids, pos, rep)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        for r in range(3):  # causal: every position before the patched one is bit-identical
            p = int(pos[r])
            assert torch.equal(out[r, :p], plain[r, :p])
            assert not torch.allclose(out[r, p], plain[r, p], atol=1e-3)
        if layer == ck.n_layers:  # after the last block: only that position changes, to lens(rep)
            for r in range(3):
                p = int(pos[r])
                keep = [q for q in range(ids.shape[1]) if q != p]
                assert torch.equal(out[r, keep], plain[r, keep])
            torch.testing.assert_close(out[rows, pos], ck.lens(rep), atol=ATOL, rtol=0)


def test_own_residual_changes_nothing(models):
    ck = models["sft"]
    ids, mask, pos, every = _batch(ck.module.cfg.d_vocab, seed=2)
    logits, resid = ck.capture(ids, mask, every, every)  # residuals at every position
    rows = torch.arange(3)
    for layer in range(ck.n_layers + 1):
        out = ck.patched_logits(ids, mask, pos, layer, resid[rows, pos, layer], every)
        assert torch.equal(out, logits)
    # every position at layer 0 (and at all layers at once) with its own residual: the model itself
    assert torch.equal(ck.patched_logits(ids, mask, every, 0, resid[:, :, 0], every), logits)
    assert torch.equal(ck.patched_logits(ids, mask, every, list(range(ck.n_layers + 1)), resid, every), logits)


def _hybrid(lower: NativeCheckpoint, upper: NativeCheckpoint, layer: int):
    """A plain module: ``lower``'s embeddings and blocks < layer, ``upper``'s blocks >= layer and final norm/unembedding."""
    h = copy.deepcopy(upper.module)
    src = lower.module.state_dict()
    state = h.state_dict()
    for k in state:
        block = int(k.split(".")[1]) if k.startswith("layers.") else None
        if k.startswith(("tok_embed.", "pos.")) or (block is not None and block < layer):
            state[k] = src[k]
    h.load_state_dict(state)
    return h.eval()


def test_patching_every_position_equals_the_hybrid_model(models):
    """The SFT run with the base's layer-l residual at every position is the base up to block l,
    then the SFT's blocks l.. and its own final norm and unembedding: exactly that hybrid."""
    base, sft = models["base"], models["other"]
    ids, mask, _, every = _batch(base.module.cfg.d_vocab, seed=3)
    _, resid_base = base.capture(ids, mask, every, every)
    for layer in range(base.n_layers + 1):
        out = sft.patched_logits(ids, mask, every, layer, resid_base[:, :, layer], every)
        with torch.no_grad():
            ref = _hybrid(base, sft, layer)(ids)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_patching_the_final_stream(models):
    """At l = n_layers the patched logits are the checkpoint's own final norm and unembedding on the
    base's stream; they equal the base's logits only where those are shared."""
    base = models["base"]
    ids, mask, pos, _ = _batch(base.module.cfg.d_vocab, seed=4)
    base_logits, resid_base = base.capture(ids, mask, pos[:, None], pos[:, None])
    n = base.n_layers
    for name in ("sft", "other"):
        ck = models[name]
        out = ck.patched_logits(ids, mask, pos, n, resid_base[:, 0, n], pos[:, None])
        torch.testing.assert_close(out[:, 0], ck.lens(resid_base[:, 0, n]), atol=ATOL, rtol=0)
        every_layer = ck.patched_logits(ids, mask, pos, list(range(n + 1)), resid_base[:, 0], pos[:, None])
        torch.testing.assert_close(every_layer, out, atol=ATOL, rtol=0)  # the last layer decides
    shared = models["sft"].patched_logits(ids, mask, pos, n, resid_base[:, 0, n], pos[:, None])
    torch.testing.assert_close(shared, base_logits, atol=ATOL, rtol=0)  # same final norm + unembedding
    own = models["other"].patched_logits(ids, mask, pos, n, resid_base[:, 0, n], pos[:, None])
    assert not torch.allclose(own, base_logits, atol=1e-2)


@pytest.fixture(scope="module")
def encoded(models):
    task = get_task(TASK)
    rng = np.random.default_rng(0)
    problems = [task.problem(k, rng) for k in ("indecipherable", "decipherable", "multi-valid") for _ in range(8)]
    enc, _ = encode_problems(models["base"].tokenizer, problems)
    assert sum(len(e.forks) for e in enc) == 24
    return enc


def test_patch_rows_take_their_known_values(models, encoded):
    """sft shares base's embeddings and final norm/unembedding: at layer 0 both residuals are the
    same (nothing is recovered or induced), after the last block everything is (1 exactly)."""
    from analysis.patching import patch_capture, patch_rows

    base, sft = models["base"], models["sft"]
    cap = patch_capture(sft, base, encoded, batch_size=5)
    assert cap.defined().sum() >= 12, "the hand-built SFT should move most forks' shares"
    ok = cap.defined()
    rec, ind = cap.recovered(), cap.induced()
    n = sft.n_layers
    np.testing.assert_allclose(rec[ok, 0], 0.0, atol=1e-4)
    np.testing.assert_allclose(ind[ok, 0], 0.0, atol=1e-4)
    np.testing.assert_allclose(rec[ok, n], 1.0, atol=1e-4)
    np.testing.assert_allclose(ind[ok, n], 1.0, atol=1e-4)
    assert np.isnan(rec[~ok]).all() and np.isnan(ind[~ok]).all()
    # the same numbers from per-problem forwards (no batching, no padding)
    one = patch_capture(sft, base, encoded[:3], batch_size=1)
    sel = np.isin(cap.problem, one.problem)
    np.testing.assert_allclose(cap.share_model_patched[sel], one.share_model_patched, atol=1e-5)

    where = {"checkpoint": "sft-step000010", "phase": "sft", "step": 10}
    notes: list[str] = []
    rows = patch_rows(sft, base, encoded, where, np.random.default_rng(0), n_boot=50, log=notes.append)
    kinds = {"indecipherable", "decipherable", "multi-valid", "all"}
    for metric in ("patch_recovered_share", "patch_induced_share"):
        got = [r for r in rows if r["metric"] == metric and r["kind"] == "all"]
        assert sorted(r["layer"] for r in got) == list(range(n + 1))
        assert {r["kind"] for r in rows if r["metric"] == metric} <= kinds
        last = next(r for r in got if r["layer"] == n)
        assert last["value"] == pytest.approx(1.0, abs=1e-4) and last["n"] == int(ok.sum())
    assert (notes == []) == bool(ok.all())
    again = patch_rows(sft, base, encoded, where, np.random.default_rng(0), n_boot=50)
    assert again == rows  # deterministic


def test_patching_a_model_with_itself_is_undefined(models, encoded):
    from analysis.patching import patch_capture, patch_rows

    ck = models["sft"]
    cap = patch_capture(ck, ck, encoded[:6])
    np.testing.assert_allclose(cap.share_model_patched, np.broadcast_to(cap.share_model[:, None], cap.share_model_patched.shape), atol=1e-6)  # changes nothing
    assert not cap.defined().any() and "no patching value" in cap.undefined_text()
    notes: list[str] = []
    assert patch_rows(ck, ck, encoded[:6], {"checkpoint": "x", "phase": "sft", "step": 0},
                      np.random.default_rng(0), n_boot=10, log=notes.append) == []
    assert len(notes) == 1 and "\n" not in notes[0]


def test_reference_of_another_shape_or_tokenizer_is_refused(models, encoded, tmp_path):
    from analysis.patching import patch_rows

    wide_cfg = _model_cfg(d_model=48)
    wide = NativeCheckpoint(_save(tmp_path / "a" / "sft-step000000", build_native(wide_cfg), wide_cfg))
    words = get_task(TASK).tokenizer().vocab
    other_tok = WordTokenizer(list(reversed(words)))
    cfg = _model_cfg(vocab=len(other_tok))
    retok = NativeCheckpoint(_save(tmp_path / "b" / "sft-step000000", build_native(cfg), cfg, other_tok))
    where = {"checkpoint": "x", "phase": "sft", "step": 0}
    for ref, needle in ((wide, "shape"), (retok, "tokenizer")):
        with pytest.raises(UsageError) as e:
            patch_rows(models["sft"], ref, encoded, where, np.random.default_rng(0))
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_patch_arguments_are_refused(models):
    ck = models["sft"]
    ids, mask, pos, every = _batch(ck.module.cfg.d_vocab)
    rep = torch.zeros(3, ck.d_model)
    for layers, r, p in (
        (ck.n_layers + 1, rep, pos),
        ([0, 0], torch.zeros(3, 2, ck.d_model), pos),
        (0, torch.zeros(3, ck.d_model + 1), pos),
        (0, rep, pos + 100),
    ):
        with pytest.raises(UsageError) as e:
            ck.patched_logits(ids, mask, p, layers, r, every)
        assert "\n" not in str(e.value)


def test_hf_nnsight_patch_equals_a_torch_pre_hook(tmp_path):
    from hooks.hf import HFCheckpoint
    from tests.hf_fixtures import build_hf_checkpoint

    ck = HFCheckpoint(build_hf_checkpoint(tmp_path / "gpt2", "gpt2", seed=1))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(ck.tokenizer), (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[2, 7:] = False  # right padding, as hooks.encode batches
    pos = torch.tensor([2, 5, 4])
    lp = torch.tensor([[2, 5, 8], [5, 6, 7], [4, 5, 6]])
    rows = torch.arange(3)[:, None]
    m = mask.long()
    position_ids = (m.cumsum(-1) - 1).clamp(min=0)
    reps = torch.randn(3, ck.n_layers + 1, ck.d_model, generator=g)
    plain = ck.capture(ids, mask, pos[:, None], lp)[0]

    def reference(layers):
        handles = []
        for layer in layers:
            block = ck.module.transformer.h[layer] if layer < ck.n_layers else ck.module.transformer.ln_f

            def pre(mod, args, kwargs, layer=layer):
                x = args[0].clone()
                x[torch.arange(3), pos] = reps[:, layer]
                return (x,) + tuple(args[1:]), kwargs

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            with torch.no_grad():
                return ck.module(input_ids=ids, attention_mask=m, position_ids=position_ids).logits[rows, lp]
        finally:
            for h in handles:
                h.remove()

    for layer in range(ck.n_layers + 1):
        out = ck.patched_logits(ids, mask, pos, layer, reps[:, layer], lp)
        torch.testing.assert_close(out, reference([layer]), atol=ATOL, rtol=0)
        assert not torch.allclose(out, plain, atol=1e-3)
    both = ck.patched_logits(ids, mask, pos, [ck.n_layers, 0], reps[:, [ck.n_layers, 0]], lp)  # any order
    torch.testing.assert_close(both, reference([0, ck.n_layers]), atol=ATOL, rtol=0)
    # the model's own residual changes nothing
    _, resid = ck.capture(ids, mask, pos[:, None], lp)
    torch.testing.assert_close(ck.patched_logits(ids, mask, pos, 1, resid[:, 0, 1], lp), plain, atol=ATOL, rtol=0)
