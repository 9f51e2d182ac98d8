"""Linear probes for branch identity, one per layer, on the residual at the decision point.

A probe's accuracy alone says little: a 64-dim residual and 200 items make overfitting easy,
and an imbalanced label makes high accuracy cheap. So every layer reports, on the same folds,
the probe's accuracy, a control task's accuracy (the labels permuted within decision-point
kind: same label distribution, no link to the residual) and the majority-class baseline;
selectivity = accuracy - control accuracy. Folds are grouped by problem, so no problem's
decision points sit on both sides of a split.

The probe is an L2 logistic regression on standardised features (scaler fitted on the training
fold), fitted with lbfgs and no search over C, because it runs for every checkpoint x layer x
target.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from training.errors import UsageError

__all__ = ["MIN_ITEMS", "ProbeResult", "control_labels_for", "grouped_folds", "probe_layers"]

MIN_ITEMS = 10
"""Below this many items a probe accuracy means nothing; results are NaN with ``n_items`` set."""

MAX_ITER = 500

Array = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class ProbeResult:
    """One layer's probe, control task and majority baseline, pooled over the test folds.

    ``note`` is empty for an ordinary fit and otherwise says why the numbers are degenerate
    (``"single class"``, ``"too few items"``, ``"one problem"``) or that some fit did not converge.
    """

    layer: int
    accuracy: float
    control_accuracy: float
    selectivity: float
    majority: float
    n_items: int
    n_classes: int
    n_splits: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _numpy(x: Array) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def control_labels_for(labels: Array, strata: Array, rng: np.random.Generator) -> np.ndarray:
    """The control task's labels: ``labels`` shuffled within each stratum (decision-point kind).

    Keeps each kind's label distribution, so a probe that reads only the kind scores the same on
    both tasks; what it reads beyond that shows up as selectivity.
    """
    y = _numpy(labels).reshape(-1)
    s = _numpy(strata).reshape(-1)
    if y.shape != s.shape:
        raise UsageError(f"labels ({y.size}) and strata ({s.size}) must have one entry per item")
    out = y.copy()
    for value in np.unique(s):
        idx = np.flatnonzero(s == value)
        out[idx] = y[idx[rng.permutation(idx.size)]]
    return out


def grouped_folds(
    labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs, stratified by label, that never split one problem across them.

    ``n_splits`` is cut to the number of problems; the caller guarantees at least two.
    """
    n_splits = min(int(n_splits), int(np.unique(groups).size))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "the least populated class has fewer members than n_splits": expected for rare branches
        warnings.simplefilter("ignore", UserWarning)
        folds = list(splitter.split(np.zeros((labels.size, 1)), labels, groups))
    return [(tr, te) for tr, te in folds if te.size and tr.size]


def _majority_class(y: np.ndarray) -> Any:
    values, counts = np.unique(y, return_counts=True)
    return values[int(np.argmax(counts))]  # ties go to the smallest label


def _fit_predict(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, C: float) -> tuple[np.ndarray, bool]:
    """Predictions for the test fold, and whether the fit converged."""
    if np.unique(y_tr).size < 2:  # a training fold that saw one class can only predict it
        return np.full(x_te.shape[0], y_tr[0]), True
    model = Pipeline(
        [
            ("scale", StandardScaler()),
            ("logreg", LogisticRegression(C=C, solver="lbfgs", max_iter=MAX_ITER)),
        ]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x_tr, y_tr)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model.predict(x_te), converged


def probe_layers(
    resid: Float[Array, "items layer d_model"],
    labels: Int[Array, "items"],
    groups: Int[Array, "items"],
    control_labels: Int[Array, "items"],
    *,
    rng: np.random.Generator,
    n_splits: int = 5,
    C: float = 1.0,
) -> list[ProbeResult]:
    """Probe every layer for ``labels``, with the control task and majority baseline on the same folds.

    ``groups`` are problem ids (folds split by problem); ``control_labels`` usually come from
    :func:`control_labels_for`. Accuracy is pooled over test folds (correct / items). One seed is
    drawn from ``rng`` for the fold shuffle, so the same rng state gives the same results.
    """
    x = _numpy(resid)
    y = _numpy(labels).reshape(-1)
    g = _numpy(groups).reshape(-1)
    yc = _numpy(control_labels).reshape(-1)
    if x.ndim != 3:
        raise UsageError(f"resid must be [items, layer, d_model], got shape {tuple(x.shape)}")
    n_items, n_layers = x.shape[0], x.shape[1]
    if not (y.size == g.size == yc.size == n_items):
        raise UsageError(
            f"resid has {n_items} items but labels/groups/control_labels have {y.size}/{g.size}/{yc.size}: "
            "pass one entry per decision point"
        )
    if int(n_splits) < 2:
        raise UsageError(f"n_splits={n_splits}: cross-validation needs at least 2 splits")
    seed = int(rng.integers(0, 2**31 - 1))
    n_classes = int(np.unique(y).size)

    def constant(acc: float, ctrl: float, maj: float, splits: int, note: str) -> list[ProbeResult]:
        sel = acc - ctrl
        return [
            ProbeResult(layer, acc, ctrl, sel, maj, n_items, n_classes, splits, note) for layer in range(n_layers)
        ]

    if n_items < MIN_ITEMS:
        return constant(math.nan, math.nan, math.nan, 0, "too few items")
    if n_classes == 1:
        return constant(1.0, 1.0, 1.0, 0, "single class")
    if np.unique(g).size < 2:
        return constant(math.nan, math.nan, math.nan, 0, "one problem")

    folds = grouped_folds(y, g, n_splits, seed)
    tested = sum(te.size for _, te in folds)
    majority_hits = sum(int(np.sum(y[te] == _majority_class(y[tr]))) for tr, te in folds)
    x = x.astype(np.float64, copy=False)
    majority = majority_hits / tested
    # Each fit is tiny (~200 x 64): multi-threaded BLAS only adds thread hand-offs, ~20x slower on
    # a busy 2-core machine. The limit is scoped to this call and restored on exit.
    with threadpool_limits(limits=1, user_api="blas"):
        results = [
            _probe_one_layer(layer, x[:, layer, :], y, yc, folds, tested, majority, n_classes, C)
            for layer in range(n_layers)
        ]
    return results


def _probe_one_layer(
    layer: int,
    xl: np.ndarray,
    y: np.ndarray,
    yc: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    tested: int,
    majority: float,
    n_classes: int,
    C: float,
) -> ProbeResult:
    hits = control_hits = 0
    converged = True
    for tr, te in folds:
        pred, ok = _fit_predict(xl[tr], y[tr], xl[te], C)
        hits += int(np.sum(pred == y[te]))
        pred_c, ok_c = _fit_predict(xl[tr], yc[tr], xl[te], C)
        control_hits += int(np.sum(pred_c == yc[te]))
        converged = converged and ok and ok_c
    acc, ctrl = hits / tested, control_hits / tested
    note = "" if converged else f"lbfgs did not converge in {MAX_ITER} iterations"
    return ProbeResult(layer, acc, ctrl, acc - ctrl, majority, y.size, n_classes, len(folds), note)
