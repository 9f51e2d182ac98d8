"""pass@k against the exact binomial formula, and bootstrap intervals over problems."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from analysis.passk import (
    Estimate,
    bootstrap_mean_ci,
    ks_for,
    pass_at_k,
    pass_at_k_array,
    pass_at_k_with_ci,
)
from training.errors import UsageError


def exact(n: int, c: int, k: int) -> Fraction:
    """1 - C(n-c, k) / C(n, k) in exact rationals (math.comb(a, k) is 0 when k > a)."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_matches_exact_formula_for_every_small_case():
    for n in range(1, 21):
        for k in range(1, n + 1):
            cs = np.arange(n + 1)
            arr = pass_at_k_array(n, cs, k)
            for c in range(n + 1):
                want = float(exact(n, c, k))
                assert pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12, abs=1e-15)
                assert arr[c] == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("k", [1, 2, 7, 16, 64, 150, 200])
def test_matches_fractions_for_large_n(k):
    n = 200
    cs = np.array([0, 1, 2, 5, 50, 100, 199, 200])
    arr = pass_at_k_array(n, cs, k)
    for c, got in zip(cs, arr):
        want = float(exact(n, int(c), k))
        assert pass_at_k(n, int(c), k) == pytest.approx(want, rel=1e-11, abs=1e-300)
        assert got == pytest.approx(want, rel=1e-11, abs=1e-300)


def test_small_values_keep_relative_precision():
    # pass@1 with 1 correct out of 10^6 is exactly 1e-6; a naive 1 - prod loses digits here
    assert pass_at_k(10**6, 1, 1) == pytest.approx(1e-6, rel=1e-12)
    assert pass_at_k_array(10**6, np.array([1]), 1)[0] == pytest.approx(1e-6, rel=1e-12)


def test_edge_cases():
    assert pass_at_k(32, 0, 8) == 0.0
    assert pass_at_k(32, 32, 8) == 1.0
    assert pass_at_k(32, 1, 32) == 1.0  # k = n: any correct sample is drawn
    assert pass_at_k(32, 0, 32) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    np.testing.assert_array_equal(pass_at_k_array(5, np.array([], dtype=int), 2), np.array([]))


@pytest.mark.parametrize(
    "n,c,k,match",
    [
        (32, 3, 40, r"k=40 > n=32 samples: ask for k ≤ n or draw more samples \(--samples\)"),
        (32, 3, 0, "k=0 < 1"),
        (32, -1, 4, "between 0 and n"),
        (32, 33, 4, "between 0 and n"),
        (0, 0, 1, "at least one sample"),
    ],
)
def test_errors(n, c, k, match):
    with pytest.raises(UsageError, match=match):
        pass_at_k(n, c, k)
    with pytest.raises(UsageError, match=match):
        pass_at_k_array(n, np.array([c]), k)


def test_ks_for():
    assert ks_for(1) == [1]
    assert ks_for(32) == [1, 2, 4, 8, 16, 32]
    assert ks_for(20) == [1, 2, 4, 8, 16, 20]
    assert ks_for(3) == [1, 2, 3]
    with pytest.raises(UsageError):
        ks_for(0)


def test_bootstrap_matches_a_loop_reference_and_is_seeded():
    values = np.random.default_rng(1).random(37)
    got = bootstrap_mean_ci(values, np.random.default_rng(5), n_boot=500)
    # reference: the same index draws, one resample at a time, percentiles by hand
    idx = np.random.default_rng(5).integers(0, values.size, size=(500, values.size))
    means = np.array([values[row].mean() for row in idx])
    assert isinstance(got, Estimate)
    assert got.value == pytest.approx(values.mean())
    assert got.low == pytest.approx(np.quantile(means, 0.025))
    assert got.high == pytest.approx(np.quantile(means, 0.975))
    again = bootstrap_mean_ci(values, np.random.default_rng(5), n_boot=500)
    assert again == got
    other = bootstrap_mean_ci(values, np.random.default_rng(6), n_boot=500)
    assert other != got


def test_bootstrap_single_value_and_errors():
    assert bootstrap_mean_ci(np.array([0.25]), np.random.default_rng(0)) == (0.25, 0.25, 0.25)
    with pytest.raises(UsageError, match="at least one problem"):
        bootstrap_mean_ci(np.array([]), np.random.default_rng(0))
    with pytest.raises(UsageError, match="level"):
        bootstrap_mean_ci(np.ones(3), np.random.default_rng(0), level=95)


def test_pass_at_k_interval_contains_estimate_and_shrinks_with_problems():
    rng = np.random.default_rng(0)
    n, k = 32, 4

    def draw(problems):
        p = rng.random(problems) * 0.3  # per-problem success rates
        return rng.binomial(n, p)

    small, big = draw(25), draw(400)
    est_small = pass_at_k_with_ci(small, n, k, rng=np.random.default_rng(1))
    est_big = pass_at_k_with_ci(big, n, k, rng=np.random.default_rng(1))
    for est, c in ((est_small, small), (est_big, big)):
        assert est.value == pytest.approx(np.mean([float(exact(n, int(ci), k)) for ci in c]), rel=1e-12)
        assert est.low <= est.value <= est.high
        assert est.low < est.high
    assert est_big.high - est_big.low < est_small.high - est_small.low
    # same seed, same interval
    assert pass_at_k_with_ci(small, n, k, rng=np.random.default_rng(1)) == est_small


def test_pass_at_k_interval_errors():
    with pytest.raises(UsageError, match="k=40 > n=32"):
        pass_at_k_with_ci(np.array([1, 2]), 32, 40, rng=np.random.default_rng(0))
