"""pass@k with the unbiased estimator, and bootstrap intervals over problems.

pass@k is the chance that at least one of k samples, drawn without replacement from a
problem's n samples of which c are correct, is correct: 1 - C(n-c, k) / C(n, k). The binomial
coefficients overflow for the n used in practice, so the ratio is computed as the product
prod_{i=n-c+1}^{n} (1 - k/i), in log space (log1p / expm1) so that small pass@k values keep
their relative precision. Intervals are percentile bootstraps that resample problems, the unit
the claim generalises over.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from training.errors import UsageError

__all__ = [
    "Estimate",
    "bootstrap_mean_ci",
    "ks_for",
    "pass_at_k",
    "pass_at_k_array",
    "pass_at_k_with_ci",
]

_BOOT_CHUNK_ELEMENTS = 1 << 22
"""Resample at most this many indices at once, so many problems do not blow up memory."""


class Estimate(NamedTuple):
    """A mean and its bootstrap interval; unpacks as ``(value, low, high)``."""

    value: float
    low: float
    high: float


def _check_nk(n: int, k: int) -> None:
    if n < 1:
        raise UsageError(f"n={n} samples per problem: pass@k needs at least one sample (--samples)")
    if k < 1:
        raise UsageError(f"k={k} < 1: pass@k needs k ≥ 1")
    if k > n:
        raise UsageError(f"k={k} > n={n} samples: ask for k ≤ n or draw more samples (--samples)")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with c correct out of n samples."""
    n, c, k = int(n), int(c), int(k)
    _check_nk(n, k)
    if not 0 <= c <= n:
        raise UsageError(f"c={c} correct out of n={n} samples: c must lie between 0 and n")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    log_miss = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return -math.expm1(log_miss)


def pass_at_k_array(n: int, c_array: np.ndarray, k: int) -> np.ndarray:
    """pass@k for many problems that share n: one value per entry of ``c_array``.

    Uses suffix sums of log1p(-k/i), so it costs O(n + problems) whatever the counts.
    """
    n, k = int(n), int(k)
    _check_nk(n, k)
    c = np.asarray(c_array)
    if c.size and not np.issubdtype(c.dtype, np.integer):
        if not np.all(np.equal(np.mod(c, 1), 0)):
            raise UsageError("correct counts must be whole numbers of samples")
    c = c.astype(np.int64)
    if c.size and (c.min() < 0 or c.max() > n):
        bad = int(c[(c < 0) | (c > n)].flat[0])
        raise UsageError(f"c={bad} correct out of n={n} samples: c must lie between 0 and n")
    # suffix[j] = sum_{i=j}^{n} log1p(-k/i) for j = k+1 .. n+1 (suffix[n+1] = 0); the product for
    # count c starts at i = n - c + 1, which is > k exactly when n - c >= k.
    i = np.arange(k + 1, n + 1, dtype=np.float64)
    terms = np.log1p(-k / i)
    suffix = np.concatenate([np.cumsum(terms[::-1])[::-1], [0.0]])  # index j - (k + 1)
    start = n - c + 1
    out = np.ones(c.shape, dtype=np.float64)
    ok = start > k
    out[ok] = -np.expm1(suffix[start[ok] - (k + 1)])
    return out


def ks_for(n: int) -> list[int]:
    """The k values reported for n samples: powers of two up to n, plus n itself."""
    n = int(n)
    if n < 1:
        raise UsageError(f"n={n} samples per problem: pass@k needs at least one sample (--samples)")
    ks = [1 << p for p in range(n.bit_length()) if (1 << p) <= n]
    if ks[-1] != n:
        ks.append(n)
    return ks


def bootstrap_mean_ci(
    values: np.ndarray,
    rng: np.random.Generator,
    n_boot: int = 1000,
    level: float = 0.95,
) -> Estimate:
    """Mean of ``values`` and a percentile bootstrap interval, resampling entries with replacement.

    All resamples are drawn as one index matrix (in chunks for very long inputs), so the cost is
    a gather and a row mean. The same rng state gives the same interval.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    m = x.size
    if m == 0:
        raise UsageError("no values to average: the interval needs at least one problem")
    if not 0.0 < level < 1.0:
        raise UsageError(f"level={level}: the interval level must lie strictly between 0 and 1, e.g. 0.95")
    if int(n_boot) < 1:
        raise UsageError(f"n_boot={n_boot}: the bootstrap needs at least one resample, e.g. 1000")
    n_boot = int(n_boot)
    mean = float(x.mean())
    rows = max(1, _BOOT_CHUNK_ELEMENTS // m)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, m, size=(stop - start, m))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return Estimate(mean, float(lo), float(hi))


def pass_at_k_with_ci(
    c: np.ndarray,
    n: int,
    k: int,
    *,
    rng: np.random.Generator,
    n_boot: int = 1000,
    level: float = 0.95,
) -> Estimate:
    """Mean pass@k over problems (c = correct count per problem, n samples each) and its interval.

    The interval resamples problems, not samples: it says how much the number would move on
    another draw of problems of the same kind.
    """
    per_problem = pass_at_k_array(n, np.asarray(c).reshape(-1), k)
    return bootstrap_mean_ci(per_problem, rng, n_boot=n_boot, level=level)
