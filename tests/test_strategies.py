"""Decoding strategies: parsing, exact distributions on hand-built logits, branch stratification."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import stats

from hooks.sampler import sample
import hooks.strategies as strategies
from hooks.strategies import (
    VALID_FORMS,
    ForkStratified,
    ForkTemperature,
    Greedy,
    MinP,
    Param,
    RowState,
    Strategy,
    Temperature,
    TopP,
    entropy,
    parse_strategy,
    register_strategy,
    registered_strategies,
    sample_from_probs,
    strategy_names,
    unregister_strategy,
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


@pytest.mark.parametrize(
    "spec, canonical",
    [
        ("temperature:1.0", "temperature:1"),
        ("fork_stratified:0.3", "fork_stratified:0.3,4,0.9"),
        ("fork_temp:2,0.3", "fork_temp:2,0.3,1"),
        ("fork_stratified", "fork_stratified:0.5,4,0.9"),
        ("  GREEDY ", "greedy"),
        ("Top_P: 1.0", "top_p:1"),
        ("min_p:1e-3", "min_p:0.001"),
        ("fork_stratified:0,2,1", "fork_stratified:0,2,1"),
    ],
)
def test_canonical_strings_are_unchanged(spec, canonical):
    assert str(parse_strategy(spec)) == canonical


@pytest.mark.parametrize(
    "spec, phrase",
    [
        ("temperature:0", "T must be > 0 (use 'greedy' for argmax)"),
        ("nucleus:0.9", "unknown strategy name 'nucleus'"),
        ("top_p:1.5", "P must be in (0, 1]"),
        ("fork_temp:2,-1", "entropy threshold H must be >= 0 nats"),
        ("fork_temp:0,0.5", "T_hi must be > 0"),
        ("fork_temp:2,0.5,0", "T_base must be > 0"),
        ("fork_stratified:0.5,1", "M (most branches) must be >= 2"),
        ("fork_stratified:0.5,2.5", "M must be an integer"),
        ("temperature:abc", "T must be a number"),
        ("temperature:inf", "T must be finite"),
        ("temperature", "expected parameters T"),
        ("greedy:1", "expected parameters (none)"),
        ("fork_stratified:", "expected parameters H[,M[,P]]"),
    ],
)
def test_error_messages_keep_their_phrases(spec, phrase):
    with pytest.raises(UsageError) as info:
        parse_strategy(spec)
    message = str(info.value)
    assert phrase in message and "valid forms" in message and "\n" not in message


# ----------------------------------------------------------------------------- registry
SIX = ["greedy", "temperature", "top_p", "min_p", "fork_temp", "fork_stratified", "ref_mix"]
"""Every registered strategy (seven since ref_mix; the name stayed)."""


def test_registry_lists_exactly_the_registered_strategies():
    assert strategy_names() == SIX
    classes = registered_strategies()
    assert list(classes) == SIX
    assert [c.__name__ for c in classes.values()] == ["Greedy", "Temperature", "TopP", "MinP", "ForkTemperature",
                                                      "ForkStratified", "RefMix"]
    assert [c.name for c in classes.values() if c.needs_reference] == ["ref_mix"]


@pytest.mark.parametrize("name", SIX)
def test_every_registered_strategy_round_trips_its_example(name):
    cls = registered_strategies()[name]
    assert cls.description and "\n" not in cls.description
    strategy = parse_strategy(cls.example)
    assert type(strategy) is cls and strategy.name == name
    assert parse_strategy(str(strategy)) == strategy
    assert str(parse_strategy(str(strategy))) == str(strategy)


def test_valid_forms_is_generated_from_the_registry():
    forms = strategies.VALID_FORMS
    assert forms == VALID_FORMS  # the imported copy: all built-in strategies were registered by then
    assert forms == ", ".join(cls.form() for cls in registered_strategies().values())
    for name in strategy_names():
        assert name in forms
    assert "fork_stratified[:H[,M[,P]]]" in forms and "fork_temp:T_hi,H[,T_base]" in forms
    assert "temperature:T (T>0)" in forms and "integer M>=2 default 4" in forms


@dataclass(frozen=True, repr=False)
class _Mix(Strategy):
    """A throw-away strategy shaped like the planned reference-guided ones (never registered for good)."""

    lam: float
    tau: float = 0.5
    name = "test_mix"
    params = (Param("L", field="lam", ge=0, le=1, what="mixture weight L"), Param("tau", default=0.5, ge=0, unit="nats"))
    description = "test only: a mixture weight in [0, 1] and a threshold in nats"
    example = "test_mix:0.25"
    needs_reference = True

    def probs(self, logits):
        return torch.softmax(logits.float(), dim=-1)


@pytest.fixture
def mix():
    register_strategy(_Mix)
    try:
        yield _Mix
    finally:
        unregister_strategy("test_mix")


def test_registering_a_strategy_makes_it_parseable_and_listed(mix):
    assert strategy_names() == SIX + ["test_mix"]
    assert parse_strategy(" TEST_MIX:0.25 ") == _Mix(0.25, 0.5)
    assert str(parse_strategy("test_mix:1,0")) == "test_mix:1,0"
    assert parse_strategy(str(parse_strategy(mix.example))) == parse_strategy(mix.example)
    form = "test_mix:L[,tau] (0<=L<=1, tau>=0 nats default 0.5, needs a reference model)"
    assert form in strategies.VALID_FORMS
    with pytest.raises(UsageError) as info:
        parse_strategy("nucleus:0.9")
    assert "unknown strategy name" in str(info.value) and form in str(info.value)
    with pytest.raises(UsageError, match=r"mixture weight L must be in \[0, 1\], got 1\.5"):
        parse_strategy("test_mix:1.5")
    with pytest.raises(UsageError, match="tau must be >= 0 nats, got -1"):
        parse_strategy("test_mix:0.5,-1")


def test_unregistering_removes_it_again(mix):
    unregister_strategy("test_mix")
    try:
        assert strategy_names() == SIX and "test_mix" not in strategies.VALID_FORMS
        with pytest.raises(UsageError, match="unknown strategy name 'test_mix'"):
            parse_strategy("test_mix:0.25")
    finally:
        register_strategy(_Mix)  # the fixture removes it


def test_registration_checks_the_declarations():
    with pytest.raises(TypeError, match="already registered"):

        @register_strategy
        @dataclass(frozen=True, repr=False)
        class Again(Temperature):
            pass

    with pytest.raises(TypeError, match="must match the dataclass fields"):

        @register_strategy
        @dataclass(frozen=True, repr=False)
        class Mismatch(Strategy):
            t: float
            name = "test_mismatch"
            params = (Param("X"),)
            description = "test only"
            example = "test_mismatch:1"

    with pytest.raises(TypeError, match="declares default"):

        @register_strategy
        @dataclass(frozen=True, repr=False)
        class WrongDefault(Strategy):
            t: float = 1.0
            name = "test_wrong_default"
            params = (Param("T", default=2.0),)
            description = "test only"
            example = "test_wrong_default"

    with pytest.raises(TypeError, match="description"):

        @register_strategy
        @dataclass(frozen=True, repr=False)
        class NoDescription(Strategy):
            name = "test_no_description"
            example = "test_no_description"

    assert strategy_names() == SIX


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
        self.steps = getattr(self, "steps", 0) + 1
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



# ----------------------------------------------------------------------------- ref_mix


def _ref_pair():
    g = torch.Generator().manual_seed(3)
    model = torch.randn(4, 9, generator=g) * 2
    ref = model.clone()
    ref[1] = torch.randn(9, generator=g)  # rows 1 and 3 diverge
    ref[3, 0] += 6.0
    return model, ref


def test_ref_mix_is_its_definition_on_hand_built_logits():
    s = parse_strategy("ref_mix:0.3,0.05")
    model, ref = _ref_pair()
    p, q = torch.softmax(model.double(), -1), torch.softmax(ref.double(), -1)
    kl = (p * (p.log() - q.log())).sum(-1)
    want = torch.where((kl >= 0.05)[:, None], 0.7 * p + 0.3 * q, p)
    torch.testing.assert_close(s.probs_with(model, ref).double(), want, atol=1e-6, rtol=0)
    assert bool((kl[[0, 2]] == 0).all()) and bool((kl[[1, 3]] > 0.05).all())
    torch.testing.assert_close(s.divergence(model, ref).double(), kl, atol=1e-6, rtol=0)
    assert str(s) == "ref_mix:0.3,0.05" and parse_strategy(str(s)) == s


def test_ref_mix_where_the_models_agree_is_exactly_the_model():
    from hooks.strategies import RowState

    s = parse_strategy("ref_mix:0.9,0.0")  # tau 0: every row with any divergence mixes ...
    model, _ = _ref_pair()
    u = torch.rand(4, generator=torch.Generator().manual_seed(0))
    state = RowState.fresh(4)
    state.uniforms, state.reference_logits = u, model.clone()  # ... but the reference IS the model
    ids = s(model, state, torch.Generator())
    plain = parse_strategy("temperature:1")(model, RowState(sample_index=torch.arange(4), uniforms=u), torch.Generator())
    assert torch.equal(ids, plain)


def test_ref_mix_needs_a_reference_and_one_vocabulary():
    from hooks.sampler import sample
    from hooks.strategies import RowState

    s = parse_strategy("ref_mix:0.5,0.1")
    model, ref = _ref_pair()
    with pytest.raises(UsageError, match="needs a reference model"):
        s(model, RowState.fresh(4), torch.Generator())
    with pytest.raises(UsageError, match="one vocabulary"):
        s.probs_with(model, ref[:, :5])
    with pytest.raises(UsageError, match="needs a reference model"):
        sample(ScriptedStepper(lambda t, rows: torch.zeros(rows, 5)), torch.zeros(1, 2, dtype=torch.long), n=2,
               max_new_tokens=2, eos_id=0, pad_id=0, strategy=s, generator=torch.Generator())
    for bad in ("ref_mix:1.5,0.1", "ref_mix:0.5,-1", "ref_mix:0.5"):
        with pytest.raises(UsageError):
            parse_strategy(bad)


def test_ref_mix_in_the_sampler_runs_both_models_in_lockstep():
    """Two scripted models: the model always says token 1, the reference always token 2. With
    L = 1 and tau 0 every diverged row samples the reference, so every token is 2."""
    from hooks.sampler import generate

    def always(tok):
        def fn(t, rows):
            logits = torch.full((rows, 5), -30.0)
            logits[:, tok] = 30.0
            return logits

        return fn

    model, ref = ScriptedStepper(always(1)), ScriptedStepper(always(2))
    out = generate(model, torch.zeros(2, 3, dtype=torch.long), n=3, max_new_tokens=4, stop_ids=4, pad_id=0,
                   strategy="ref_mix:1,0", generator=torch.Generator().manual_seed(0), reference=ref)
    assert (out.tokens == 2).all() and model.steps == ref.steps == 3
    out = generate(model, torch.zeros(2, 3, dtype=torch.long), n=3, max_new_tokens=4, stop_ids=4, pad_id=0,
                   strategy="ref_mix:0,0", generator=torch.Generator().manual_seed(0), reference=ref)
    assert (out.tokens == 1).all()  # L = 0: the model alone
