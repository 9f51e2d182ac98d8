"""Decoding strategies: parsing, exact distributions on hand-built logits, branch stratification."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from hooks.sampler import sample
from hooks.strategies import (
    ForkStratified,
    ForkTemperature,
    Greedy,
    MinP,
    RowState,
    Temperature,
    TopP,
    entropy,
    parse_strategy,
    sample_from_probs,
)
from training.errors import UsageError


def _logits(*probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is each given probability row (zeros -> -inf)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "spec, expected, canonical",
    [
        ("greedy", Greedy(), "greedy"),
        ("temperature:1", Temperature(1.0), "temperature:1"),
        (" temperature: 0.70 ", Temperature(0.7), "temperature:0.7"),
        ("top_p:0.9", TopP(0.9), "top_p:0.9"),
        ("min_p:0.05", MinP(0.05), "min_p:0.05"),
        ("fork_temp:2,0.5", ForkTemperature(2.0, 0.5, 1.0), "fork_temp:2,0.5,1"),
        ("fork_temp:1.5,1,0.7", ForkTemperature(1.5, 1.0, 0.7), "fork_temp:1.5,1,0.7"),
        ("fork_stratified", ForkStratified(0.5, 4, 0.9), "fork_stratified:0.5,4,0.9"),
        ("fork_stratified:0.3", ForkStratified(0.3, 4, 0.9), "fork_stratified:0.3,4,0.9"),
        ("fork_stratified:1,3,0.8", ForkStratified(1.0, 3, 0.8), "fork_stratified:1,3,0.8"),
    ],
)
def test_parse_and_canonical_spec(spec, expected, canonical):
    strategy = parse_strategy(spec)
    assert strategy == expected
    assert str(strategy) == canonical
    assert parse_strategy(str(strategy)) == strategy
    assert parse_strategy(strategy) is strategy


@pytest.mark.parametrize(
    "spec",
    [
        "", "nucleus:0.9", "temperature", "temperature:", "temperature:0", "temperature:-1",
        "temperature:abc", "temperature:nan", "temperature:1,2", "top_p:0", "top_p:1.5", "min_p:-0.1",
        "fork_temp:2", "fork_temp:0,0.5", "fork_temp:2,-1", "fork_temp:2,0.5,0", "fork_temp:2,,1",
        "fork_stratified:0.5,1,0.9", "fork_stratified:0.5,2.5,0.9", "fork_stratified:0.5,4,0",
        "fork_stratified:a", "fork_stratified:0.5,4,0.9,1", "greedy:1",
    ],
)
def test_bad_specs_raise_usage_error_naming_valid_forms(spec):
    with pytest.raises(UsageError) as info:
        parse_strategy(spec)
    message = str(info.value)
    assert "\n" not in message and "valid forms" in message and "fork_stratified[:H" in message


def test_non_string_spec_raises():
    with pytest.raises(UsageError, match="valid forms"):
        parse_strategy(0.7)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- distributions
def test_temperature_probs_match_formula():
    raw = np.array([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 3.0, 1.0, -2.0]], dtype=np.float32)
    for t in (0.5, 1.0, 2.5):
        got = Temperature(t).probs(torch.from_numpy(raw)).numpy()
        np.testing.assert_allclose(got, _np_softmax(raw / t), atol=1e-6)


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    ids = Greedy()(logits, RowState.fresh(2), torch.Generator())
    assert ids.tolist() == [1, 0]
    assert torch.equal(Greedy().probs(logits), torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0]]))


def test_top_p_keeps_exactly_the_nucleus():
    logits = _logits([0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5])
    # 0.7: {0.5, 0.3} (0.5 alone < 0.7); renormalised to 0.625 / 0.375
    torch.testing.assert_close(TopP(0.7).probs(logits), torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 0.375, 0.625]]))
    # 0.85: 0.5 + 0.3 = 0.8 < 0.85, so the 0.15 token joins
    torch.testing.assert_close(TopP(0.85).probs(logits)[0], torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    # 0.4: the top token alone
    torch.testing.assert_close(TopP(0.4).probs(logits)[0], torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(TopP(1.0).probs(logits), torch.softmax(logits, -1))


def test_top_p_ties_broken_by_lower_id():
    logits = _logits([0.1, 0.3, 0.3, 0.3])
    torch.testing.assert_close(TopP(0.5).probs(logits)[0], torch.tensor([0, 0.5, 0.5, 0]))


def test_min_p_threshold():
    logits = _logits([0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25])
    # threshold 0.5 * 0.5 = 0.25: keeps 0.5 and 0.3; uniform row keeps everything
    torch.testing.assert_close(MinP(0.5).probs(logits), torch.tensor([[0.625, 0.375, 0, 0], [0.25] * 4]))
    # threshold 0.2 * 0.5 = 0.1: keeps 0.5, 0.3, 0.15
    torch.testing.assert_close(MinP(0.2).probs(logits)[0], torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)


def test_entropy_in_nats():
    p = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    expected = -(p[p > 0] * np.log(p[p > 0])).sum()
    assert entropy(_logits(list(p))).item() == pytest.approx(expected, abs=1e-6)


def test_fork_temp_only_flattens_high_entropy_rows():
    low = [0.97, 0.01, 0.01, 0.01]  # H ~ 0.17 nats
    high = [0.4, 0.3, 0.2, 0.1]  # H ~ 1.28 nats
    logits = _logits(low, high)
    h = entropy(logits)
    assert h[0] < 0.5 < h[1]
    strategy = ForkTemperature(t_hi=3.0, h=0.5)
    probs = strategy.probs(logits)
    assert torch.equal(probs[0], Temperature(1.0).probs(logits)[0])  # untouched
    torch.testing.assert_close(probs[1], torch.softmax(logits[1] / 3.0, -1))
    assert strategy.temperatures(logits).tolist() == [1.0, 3.0]
    base = ForkTemperature(t_hi=3.0, h=0.5, t_base=0.5).probs(logits)
    torch.testing.assert_close(base[0], torch.softmax(logits[0] / 0.5, -1))
    # threshold exactly at a row's entropy counts as high (>=)
    at = ForkTemperature(t_hi=2.0, h=float(h[1])).temperatures(logits)
    assert at.tolist() == [1.0, 2.0]


def test_fork_stratified_branch_sets():
    s = ForkStratified(h=0.5, m=4, p=0.9)
    rows = [
        [0.4, 0.35, 0.2, 0.05, 0.0],  # mass 0.4, 0.75, 0.95 -> 3 branches
        [0.9, 0.05, 0.03, 0.02, 0.0],  # 0.9 alone reaches P, but at least 2
        [0.2, 0.2, 0.2, 0.2, 0.2],  # 5 needed, capped at M=4
        [0.1, 0.3, 0.3, 0.3, 0.0],  # ties ordered by id: 1, 2, 3
    ]
    logits = _logits(*rows)
    order, b = s.branches(logits)
    assert b.tolist() == [3, 2, 4, 3]
    assert order[0, :3].tolist() == [0, 1, 2]
    assert order[3, :3].tolist() == [1, 2, 3]
    assert ForkStratified(h=0.5, m=2, p=0.9).branches(logits)[1].tolist() == [2, 2, 2, 2]
    torch.testing.assert_close(s.probs(logits), torch.softmax(logits, -1))


def test_sample_from_probs_never_draws_zero_mass_and_matches_probs():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).expand(40_000, -1)
    ids = sample_from_probs(probs, torch.Generator().manual_seed(0))
    counts = np.bincount(ids.numpy(), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    assert stats.chisquare(counts[[1, 3, 4]], np.array([0.5, 0.3, 0.2]) * 40_000).pvalue > 1e-3


# ----------------------------------------------------------------------------- stratified sampling
class ScriptedStepper:
    """Stepper whose logits are a function of (step t, row index in the chunk)."""

    def __init__(self, logits_fn):
        self.logits_fn = logits_fn

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def prefill(self, input_ids, max_new_tokens=1, repeats=1):
        self.t, self.rows = 0, input_ids.shape[0] * repeats
        return self.logits_fn(0, self.rows)

    def step(self, next_ids):
        self.t += 1
        return self.logits_fn(self.t, self.rows)


FORK = [0.4, 0.35, 0.2, 0.05, 0.0, 0.0]  # entropy ~1.2 nats, 3 top branches at P=0.9
SURE = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # entropy 0: token 5


def _run(logits_fn, problems, n, steps, batch_size=1024, seed=0):
    return sample(ScriptedStepper(logits_fn), torch.zeros(problems, 3, dtype=torch.long), n=n,
                  max_new_tokens=steps, eos_id=99, pad_id=98, strategy="fork_stratified",
                  generator=torch.Generator().manual_seed(seed), batch_size=batch_size)


@pytest.mark.parametrize("batch_size", [1024, 10])  # 10 < n: a problem's samples span chunks
def test_fork_stratified_spreads_samples_over_branches(batch_size):
    n = 32
    out = _run(lambda t, rows: _logits(*[FORK if t == 0 else SURE] * rows), problems=2, n=n,
               steps=3, batch_size=batch_size)
    j = torch.arange(n)
    for problem in range(2):
        assert torch.equal(out[problem, :, 0], j % 3)  # sample j takes branch j mod b
        counts = torch.bincount(out[problem, :, 0], minlength=3).tolist()
        assert sorted(counts) == [10, 11, 11]  # floor(32/3) or ceil(32/3) each
        assert (out[problem, :, 1:] == 5).all()


def test_fork_stratified_forks_at_each_samples_own_first_high_entropy_position():
    n = 12

    def logits_fn(t, rows):  # even samples meet the fork at step 0, odd ones at step 1
        j = torch.arange(rows) % n
        first = torch.where(j % 2 == 0, 0, 1)
        return torch.stack([_logits(FORK if t == first[r] else SURE)[0] for r in range(rows)])

    out = _run(logits_fn, problems=1, n=n, steps=3)[0]
    for j in range(n):
        first = 0 if j % 2 == 0 else 1
        assert out[j, first].item() == j % 3
        assert all(out[j, t].item() == 5 for t in range(3) if t != first)


def test_fork_stratified_samples_at_temperature_one_after_the_fork():
    n = 6000
    out = _run(lambda t, rows: _logits(*[FORK] * rows), problems=1, n=n, steps=2)[0]
    assert torch.equal(out[:, 0], torch.arange(n) % 3)  # step 0: the fork, stratified
    counts = np.bincount(out[:, 1].numpy(), minlength=6)  # step 1: plain temperature 1
    assert counts[4:].sum() == 0
    assert stats.chisquare(counts[:4], np.array(FORK[:4]) * n).pvalue > 1e-3
    # and not the stratified pattern again
    assert not torch.equal(out[:, 1], torch.arange(n) % 3)


def test_fork_stratified_low_entropy_everywhere_is_temperature_one():
    logits = _logits(*[[0.9, 0.05, 0.05]] * 4)  # H ~ 0.39 < 0.5
    s, t1 = ForkStratified(), Temperature(1.0)
    a = s(logits, RowState.fresh(4), torch.Generator().manual_seed(3))
    b = t1(logits, RowState.fresh(4), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert math.isclose(entropy(logits)[0].item(), -(0.9 * math.log(0.9) + 0.1 * math.log(0.05)), abs_tol=1e-6)
