"""Entropy, branch mass, KL and the logit lens against scipy, hand-computed cases and a real model."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

import analysis.metrics
import hooks.distributions
import hooks.strategies
from analysis.metrics import (
    branch_mass,
    entropy,
    kl,
    logit_lens,
    mass_branches,
    mass_top_branch,
    mass_valid,
    renormalised,
)
from training.errors import UsageError


def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ---------------------------------------------------------------- entropy and KL


def test_entropy_matches_scipy():
    logits = _logits(3, 5, 11)
    got = entropy(logits)
    probs = scipy.special.softmax(logits.numpy(), axis=-1)
    want = scipy.stats.entropy(probs, axis=-1)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def test_entropy_limits_and_stability():
    v = 7
    assert entropy(torch.zeros(v, dtype=torch.float64)).item() == pytest.approx(np.log(v))
    one_hot = torch.full((v,), -1e4)
    one_hot[2] = 1e4
    assert entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    # huge logits do not overflow; masked (-inf) logits count as probability 0, not NaN
    assert entropy(torch.tensor([1e30, 1e30])).item() == pytest.approx(np.log(2), rel=1e-6)
    masked = torch.tensor([0.0, 0.0, float("-inf")])
    assert entropy(masked).item() == pytest.approx(np.log(2), rel=1e-6)
    assert entropy(torch.zeros(4, dtype=torch.bfloat16)).dtype == torch.float32


def test_one_entropy_everywhere():
    assert entropy is hooks.distributions.entropy
    assert hooks.strategies.entropy is hooks.distributions.entropy
    assert "entropy" in analysis.metrics.__all__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distributions_entropy_matches_scipy_on_random_logits(dtype):
    logits = _logits(6, 4, 50, seed=7).to(dtype)
    got = hooks.distributions.entropy(logits)
    want = scipy.stats.entropy(scipy.special.softmax(logits.double().numpy(), axis=-1), axis=-1)
    assert got.shape == (6, 4) and got.dtype == dtype
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-10 if dtype == torch.float64 else 1e-5, atol=1e-6)


def test_entropy_of_a_one_hot_row_with_minus_inf_elsewhere_is_zero():
    row = torch.full((2, 9), float("-inf"))
    row[0, 3] = 0.0
    row[1, 0] = 12.5
    got = entropy(row)
    assert torch.equal(got, torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_entropy_of_half_precision_logits_is_finite_float32(dtype):
    logits = _logits(5, 200, seed=8, scale=8.0)
    logits[0, 100:] = float("-inf")  # masked tokens, as top-p and min-p leave them
    half = logits.to(dtype)
    got = entropy(half)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    want = scipy.stats.entropy(scipy.special.softmax(half.double().numpy(), axis=-1), axis=-1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_kl_matches_scipy_and_broadcasts():
    p, q = _logits(4, 9, seed=1), _logits(4, 9, seed=2)
    got = kl(p, q)
    want = scipy.stats.entropy(scipy.special.softmax(p.numpy(), -1), scipy.special.softmax(q.numpy(), -1), axis=-1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    assert torch.allclose(kl(p, p), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    # final [batch, 1, vocab] against lens [batch, layer, vocab]
    lens = _logits(4, 3, 9, seed=3)
    got = kl(p[:, None, :], lens)
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got[:, 1].numpy(), kl(p, lens[:, 1]).numpy(), rtol=1e-12)


def test_kl_with_masked_tokens():
    p = torch.tensor([[0.0, float("-inf"), 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0, np.log(3.0)]], dtype=torch.float64)
    pp = np.array([0.5, 0.0, 0.5])
    qq = np.array([1.0, 1.0, 3.0]) / 5
    assert kl(p, q).item() == pytest.approx(scipy.stats.entropy(pp, qq), rel=1e-12)


# ---------------------------------------------------------------- branch mass


def test_branch_mass_hand_computed():
    # row 0: probs [.1 .2 .3 .4] over vocab 4, branches tokens 3, 1 (and a padded slot)
    # row 1: probs [.25]*4, three branches 0, 2, 3
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    logits = probs.log() + 5.0  # a constant shift must not matter
    ids = torch.tensor([[3, 1, -1], [0, 2, 3]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    mass = branch_mass(logits, ids, mask)
    torch.testing.assert_close(mass, torch.tensor([[0.4, 0.2, 0.0], [0.25, 0.25, 0.25]], dtype=torch.float64))
    share = renormalised(mass, mask)
    torch.testing.assert_close(share, torch.tensor([[2 / 3, 1 / 3, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64))
    torch.testing.assert_close(mass_top_branch(mass, mask), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    valid = torch.tensor([[False, True, False], [True, False, True]])
    torch.testing.assert_close(mass_valid(mass, valid), torch.tensor([0.2, 0.5], dtype=torch.float64))
    torch.testing.assert_close(mass_branches(mass, mask), torch.tensor([0.6, 0.75], dtype=torch.float64))


def test_mass_top_branch_even_and_collapsed():
    for b in (2, 3, 4):
        logits = torch.zeros(1, 10)
        ids = torch.arange(b)[None]
        mask = torch.ones(1, b, dtype=torch.bool)
        assert mass_top_branch(branch_mass(logits, ids, mask), mask).item() == pytest.approx(1 / b)
        logits[0, 1] = 50.0
        assert mass_top_branch(branch_mass(logits, ids, mask), mask).item() == pytest.approx(1.0)


def test_branch_mass_per_layer_matches_per_layer_calls():
    lens = _logits(3, 4, 12, seed=4)  # [batch, layer, vocab]
    ids = torch.tensor([[1, 5, 0], [2, 3, 7], [11, 0, 0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, False]])
    valid = torch.tensor([[True, False, False], [False, True, True], [True, False, False]])
    mass = branch_mass(lens, ids, mask)
    assert mass.shape == (3, 4, 3)
    for layer in range(4):
        one = branch_mass(lens[:, layer], ids, mask)
        torch.testing.assert_close(mass[:, layer], one)
        torch.testing.assert_close(mass_top_branch(mass, mask)[:, layer], mass_top_branch(one, mask))
        torch.testing.assert_close(mass_valid(mass, valid)[:, layer], mass_valid(one, valid))
    probs = torch.softmax(lens, -1)
    assert mass[2, 1, 0].item() == pytest.approx(probs[2, 1, 11].item())


def test_branch_mass_errors():
    logits = torch.zeros(2, 5)
    mask = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(UsageError, match="outside the vocabulary"):
        branch_mass(logits, torch.tensor([[0, 5], [1, 2]]), mask)
    with pytest.raises(UsageError, match="same token"):
        branch_mass(logits, torch.tensor([[0, 1], [2, 2]]), mask)
    with pytest.raises(UsageError, match="max_branches"):
        branch_mass(logits, torch.tensor([[0, 1]]), mask[:1])


# ---------------------------------------------------------------- logit lens


def test_logit_lens_hand_built():
    # d_model 2, vocab 3, two layers; identity norm and a given unembedding
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    resid = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [batch 1, layer 2, d_model 2]
    got = logit_lens(resid, lambda x: x, lambda x: x @ w)
    torch.testing.assert_close(got, torch.tensor([[[1.0, 2.0, 3.0], [8.0, 10.0, 12.0]]]))
    # with an unweighted LayerNorm the statistics are per vector: [1, 0] -> [1, -1], [0, 2] -> [-1, 1]
    ln = torch.nn.LayerNorm(2, elementwise_affine=False, eps=0.0)
    got = logit_lens(resid, ln, lambda x: x @ w)
    torch.testing.assert_close(got, torch.tensor([[[-3.0, -3.0, -3.0], [3.0, 3.0, 3.0]]]))
    with pytest.raises(UsageError, match=r"\[batch, layer, d_model\]"):
        logit_lens(resid[0], ln, lambda x: x @ w)


@pytest.fixture(scope="module")
def bridge():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        d_model=64, d_head=16, n_layers=2, n_heads=4, d_mlp=256, d_vocab=30, n_ctx=16,
        act_fn="gelu", normalization_type="LN", seed=0,
    )  # fmt: skip
    b = TransformerBridge.boot_native(cfg)
    b.eval()
    return b


def _capture(bridge, x):
    last = f"blocks.{bridge.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_pre") or n == last)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(bridge.cfg.n_layers)] + [last]
    resid = torch.stack([cache[n] for n in names], dim=2)  # [batch, pos, layer, d_model]
    return logits, cache, resid


def test_logit_lens_on_bridge_reproduces_model_logits(bridge):
    x = torch.randint(0, 30, (3, 10), generator=torch.Generator().manual_seed(0))
    logits, _, resid = _capture(bridge, x)
    b, p, layers, d = resid.shape
    model = bridge.original_model
    with torch.no_grad():
        lens = logit_lens(resid.reshape(b * p, layers, d), model.ln_out, model.head).reshape(b, p, layers, -1)
        torch.testing.assert_close(lens[:, :, -1], logits, atol=1e-5, rtol=0)
        # layer 0 by hand: LayerNorm on each vector, then the unembedding's weight and bias
        ln, head = model.ln_out._original_component, model.head._original_component
        r = resid[:, :, 0]
        normed = (r - r.mean(-1, keepdim=True)) / torch.sqrt(r.var(-1, unbiased=False, keepdim=True) + ln.eps)
        by_hand = (normed * ln.weight + ln.bias) @ head.weight.T + head.bias
        torch.testing.assert_close(lens[:, :, 0], by_hand, atol=1e-5, rtol=0)
    # KL(final || last layer) is zero
    assert kl(logits, lens[:, :, -1]).abs().max().item() < 1e-5


def test_logit_lens_matches_transformer_lens(bridge):
    """TransformerLens 4.3 has cache.accumulated_resid(apply_ln=True) and cache.logit_lens on bridges."""
    x = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(1))
    _, cache, resid = _capture(bridge, x)
    b, p, layers, d = resid.shape
    model = bridge.original_model
    with torch.no_grad():
        ours = logit_lens(resid.reshape(b * p, layers, d), model.ln_out, model.head).reshape(b, p, layers, -1)
        theirs = cache.logit_lens(positions=None, return_type="logits").values  # [layer, batch, pos, vocab]
        torch.testing.assert_close(ours.permute(2, 0, 1, 3), theirs, atol=1e-5, rtol=0)
        stack = cache.accumulated_resid(apply_ln=True)  # [layer, batch, pos, d_model]
        via_stack = stack @ bridge.W_U + bridge.b_U
        torch.testing.assert_close(ours.permute(2, 0, 1, 3), via_stack, atol=1e-5, rtol=0)
