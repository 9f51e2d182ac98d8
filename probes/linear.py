"""Linear probes for branch identity: what the residual stream at a fork knows about its branches.

**Candidate-conditioned probes.** A fork's branches are scored one by one from the residual ``h``
at the decision position (one probe per lens layer) and the unembedding vector of each branch's
first token ``t``. The features are the model's own readout taken apart,

    phi(h, t) = norm(h) * W_U[:, t]      (elementwise, d_model features)
                (+ the unembedding bias b_t as one more feature where the model has one),

scored ``s(b) = w . phi(h, t_b)`` and read as ``argmax_b s(b)``. ``w = 1`` reproduces the logit
lens restricted to the branches, so at the last layer the probe can do at least what the model
does; a learned ``w`` reweights the residual's directions. The label is *which candidate*, never a
branch's rank (node labels are random per problem, so a rank means nothing across problems).

**Fit.** A conditional logit (softmax over each fork's candidates, mean negative log-likelihood)
with an L2 penalty ``(L2 / 2) |w|^2`` on features scaled to unit within-fork spread (scales from
the training forks; only differences between a fork's candidates enter a conditional logit). The
objective is strictly convex, so its optimum is unique; it is found by full-batch L-BFGS in float64
from ``w = 0`` (deterministic: no seed enters the fit). One probe per target x kind x layer: a
probe told the fork's kind is the strongest linear reader of the residual, which is the fair test
before saying a kind's branch is *not* decodable; ``all`` pools those probes' test predictions.

**Targets.** ``valid``: the one right branch (forks with exactly one valid branch); ``taken``: the
branch this checkpoint puts most mass on; ``demonstrated``: the data's annotated ``taken`` branch
(the demonstration's choice), on forks that have one.

**Data.** Probes are fit on the forks of a probe-training split drawn from the task's generator
(:func:`training.synth.make_probe_split`, 500 problems per kind by default, disjoint from the eval
set), teacher-forced through the checkpoint at their decision positions only (:func:`read_forks`),
and tested on the eval set's forks. Without a split (a Hugging Face model on its own data) they
are cross-validated on the eval forks, in folds grouped by problem, and every row's ``note`` says so.

**Controls.** Chance is ``1/b`` per fork, averaged over the tested forks. The control task keeps
the features and replaces the labels with labels shuffled within kind and branch count (the
canonical-order index of another fork's target: the same label distribution, no link to this
fork's residual), fit and tested the same way; selectivity = accuracy - control accuracy. A label
whose canonical-order index is skewed (the canonical demonstration takes the smaller node label; a
fine-tuned model that learned that rule takes it at other forks too) is partly reachable from token
identity alone, so the control scores above chance there and selectivity discounts it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from training.errors import UsageError

from probes.branch_probe import L2, BranchProbe, _fit_predict, fit_branch_probe  # noqa: F401  (re-exported)
from probes.fork_features import ForkReads, ForkSet, fork_labels, fork_set, read_forks, readout  # noqa: F401
from training.schema import KINDS

__all__ = [
    "L2",
    "MIN_ITEMS",
    "TARGETS",
    "BranchProbe",
    "BranchProbeResult",
    "ForkSet",
    "control_labels_for",
    "fit_branch_probe",
    "fork_set",
    "grouped_folds",
    "probe_forks",
    "probe_rows",
    "readout",
    "read_forks",
    "ForkReads",
]

TARGETS = ("valid", "taken", "demonstrated")
"""What a probe reads, in the order rows are written."""

MIN_ITEMS = 10
"""Fewer probe-split forks of a kind than this to fit on (cross-validating: fewer eval forks of
the kind): no number (the result is NaN with its note, and no row is written)."""

N_BOOT = 1000
"""Bootstrap resamples (over problems) for the accuracy and selectivity intervals."""

Array = np.ndarray | torch.Tensor


def _numpy(x: Array) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------- splits and labels


def control_labels_for(labels: Array, strata: Array, rng: np.random.Generator) -> np.ndarray:
    """The control task's labels: ``labels`` shuffled within each stratum.

    Keeps each stratum's label distribution, so a probe that reads only the stratum (or the
    label distribution) scores the same on both tasks; what it reads beyond that is selectivity.
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
        try:
            folds = list(splitter.split(np.zeros((labels.size, 1)), labels, groups))
        except ValueError:  # every class has fewer members than n_splits: stratifying is impossible
            from sklearn.model_selection import GroupKFold

            folds = list(GroupKFold(n_splits=n_splits).split(np.zeros((labels.size, 1)), labels, groups))
    return [(tr, te) for tr, te in folds if te.size and tr.size]


# --------------------------------------------------------------------------- the model's readout

@dataclass(frozen=True)
class BranchProbeResult:
    """One target x kind x layer: accuracy on the tested forks, the control task's, chance.

    ``note`` says how the probe was fit (probe split or cross-validation on the eval forks) and,
    where the numbers are NaN, why.
    """

    target: str
    kind: str
    layer: int
    accuracy: float
    control_accuracy: float
    selectivity: float
    chance: float
    n_items: int
    n_train: int
    acc_ci: tuple[float, float] = (math.nan, math.nan)
    sel_ci: tuple[float, float] = (math.nan, math.nan)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _strata(fs: ForkSet, idx: np.ndarray) -> np.ndarray:
    return np.array([f"{k}|{b}" for k, b in zip(fs.kind[idx], fs.n_branches[idx])], dtype=object)


def _controls(fs: ForkSet, targets: Sequence[str], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per target, the control task's labels: shuffled within kind x branch count (-1 stays -1)."""
    out = {}
    for t in targets:
        y = fs.labels[t]
        lab = np.flatnonzero(y >= 0)
        c = np.full(fs.n_items, -1, dtype=np.int64)
        c[lab] = control_labels_for(y[lab], _strata(fs, lab), rng)
        out[t] = c
    return out


def _label_rows(fs: ForkSet, idx: np.ndarray, targets: Sequence[str], ctrl: dict[str, np.ndarray]) -> np.ndarray:
    """``[2 * targets, items]``: each target's labels, then its control labels."""
    return np.stack([row for t in targets for row in (fs.labels[t][idx], ctrl[t][idx])])


def _boot(hits: np.ndarray, ctrl: np.ndarray, groups: np.ndarray, rng: np.random.Generator, n_boot: int):
    """95% percentile intervals (over problems) for accuracy and selectivity, per layer: [layer, 2] each."""
    uniq, inv = np.unique(groups, return_inverse=True)
    P = uniq.size
    count = np.bincount(inv, minlength=P).astype(float)
    h = np.stack([np.bincount(inv, weights=hl, minlength=P) for hl in hits])  # [layer, P]
    c = np.stack([np.bincount(inv, weights=cl, minlength=P) for cl in ctrl])
    draw = rng.integers(0, P, size=(n_boot, P))
    flat = (np.arange(n_boot)[:, None] * P + draw).reshape(-1)
    w = np.bincount(flat, minlength=n_boot * P).reshape(n_boot, P).astype(float)  # resample counts per problem
    n = w @ count
    acc = (w @ h.T) / n[:, None]  # [boot, layer]
    sel = acc - (w @ c.T) / n[:, None]

    def q(a: np.ndarray) -> np.ndarray:
        return np.stack([np.quantile(a, 0.025, axis=0), np.quantile(a, 0.975, axis=0)], axis=1)

    return q(acc), q(sel)


def probe_forks(
    test: ForkSet,
    train: ForkSet | None,
    *,
    rng: np.random.Generator,
    targets: Sequence[str] = TARGETS,
    l2: float = L2,
    n_splits: int = 5,
    n_boot: int = N_BOOT,
) -> list[BranchProbeResult]:
    """Probe every layer for every target, per kind and ``all``, with control task and chance.

    With ``train``, one probe per target x kind x layer is fit on ``train``'s forks of that kind and
    tested on ``test``'s; without, ``test``'s forks of each kind are cross-validated in ``n_splits``
    folds grouped by problem. ``all`` pools the per-kind probes' test predictions. Intervals are a
    bootstrap over tested problems. ``rng`` draws the control labels (train's, then test's), the
    fold seed and the bootstrap, so the same rng state gives the same results. Results come per
    target (``TARGETS`` order), kinds in ``KINDS`` order then ``all``, layers ascending.
    """
    if train is not None and (train.n_layers != test.n_layers or train.n_features != test.n_features):
        raise UsageError(f"the training forks have {train.n_layers} layers x {train.n_features} features but the tested "
                         f"forks {test.n_layers} x {test.n_features}: read both with the same checkpoint")
    if int(n_splits) < 2:
        raise UsageError(f"n_splits={n_splits}: cross-validation needs at least 2 splits")
    if l2 <= 0:
        raise UsageError(f"l2={l2}: the penalty must be > 0 (a separable target has no finite optimum without it)")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise UsageError(f"unknown probe target {unknown[0]!r}; known: {', '.join(TARGETS)}")
    targets = [t for t in TARGETS if t in targets and t in test.labels and (train is None or t in train.labels)]
    if not targets:
        return []
    L = test.n_layers
    ctrl_tr = _controls(train, targets, rng) if train is not None else None
    ctrl_te = _controls(test, targets, rng)
    fold_seed = int(rng.integers(0, 2**31 - 1))
    # per target: (kind, tested item indices, hits [L, n], control hits [L, n], n_train, note)
    found: dict[str, list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None, int, str]]] = {t: [] for t in targets}
    for kind in KINDS:
        te = np.flatnonzero((test.kind == kind) & np.any([test.labels[t] >= 0 for t in targets], axis=0))
        if te.size == 0:
            continue
        Y_te = _label_rows(test, te, targets, ctrl_te)
        if train is not None:
            tr = np.flatnonzero(train.kind == kind)
            Y_tr = _label_rows(train, tr, targets, ctrl_tr) if tr.size else np.zeros((2 * len(targets), 0), np.int64)
            n_tr = (Y_tr[0::2] >= 0).sum(axis=1)
            enough = n_tr >= MIN_ITEMS
            pred = None
            if enough.any():
                pred = _fit_predict(train.all_features(tr), train.mask[tr], Y_tr, test.all_features(te), test.mask[te], l2)
            notes = [f"fit on {n} probe-split forks" if ok else f"too few probe-split forks of this kind ({n} < {MIN_ITEMS})"
                     for n, ok in zip(n_tr, enough)]
        else:
            pred, n_tr, enough, notes = _cross_validate(test, te, Y_te, l2, n_splits, fold_seed, len(targets))
        for j, t in enumerate(targets):
            lab = Y_te[2 * j] >= 0
            if not lab.any():
                continue
            if pred is None or not enough[j]:
                found[t].append((kind, te[lab], None, None, int(n_tr[j]), notes[j]))
                continue
            hits = (pred[:, 2 * j] == Y_te[2 * j])[:, lab].astype(float)
            ctrl = (pred[:, 2 * j + 1] == Y_te[2 * j + 1])[:, lab].astype(float)
            found[t].append((kind, te[lab], hits, ctrl, int(n_tr[j]), notes[j]))
    out: list[BranchProbeResult] = []
    for t in targets:
        done = [f for f in found[t] if f[2] is not None]
        for kind, idx, hits, ctrl, n_train, note in found[t]:
            out += _results(t, kind, test, idx, hits, ctrl, n_train, note, rng, n_boot, L)
        if done:
            idx = np.concatenate([f[1] for f in done])
            hits = np.concatenate([f[2] for f in done], axis=1)
            ctrl = np.concatenate([f[3] for f in done], axis=1)
            note = "; ".join(dict.fromkeys(f[5] for f in done))
            out += _results(t, "all", test, idx, hits, ctrl, sum(f[4] for f in done), note, rng, n_boot, L)
    return out


def _cross_validate(test: ForkSet, te: np.ndarray, Y_te: np.ndarray, l2: float, n_splits: int, seed: int, n_targets: int):
    """Grouped K-fold predictions for one kind's forks: (pred [L, T, n] or None, n_train, enough, notes)."""
    groups = test.problem[te]
    n_lab = (Y_te[0::2] >= 0).sum(axis=1)
    if np.unique(groups).size < 2:
        return None, np.zeros(n_targets, int), np.zeros(n_targets, bool), ["one problem: no grouped split exists"] * n_targets
    folds = grouped_folds(test.n_branches[te], groups, n_splits, seed)
    pred = np.zeros((test.n_layers, Y_te.shape[0], te.size), dtype=np.int64)
    x = test.all_features(te)
    m = test.mask[te]
    for a, b in folds:
        pred[:, :, b] = _fit_predict(x[:, a], m[a], Y_te[:, a], x[:, b], m[b], l2)
    n_train = n_lab * (len(folds) - 1) // max(len(folds), 1)
    enough = n_lab >= MIN_ITEMS
    notes = [f"no probe-training split: {len(folds)}-fold cross-validation on the eval forks, grouped by problem" if ok
             else f"too few forks of this kind to cross-validate ({n} < {MIN_ITEMS})" for n, ok in zip(n_lab, enough)]
    return pred, n_train, enough, notes


def _results(target, kind, test, idx, hits, ctrl, n_train, note, rng, n_boot, L) -> list[BranchProbeResult]:
    n = int(idx.size)
    chance = float(np.mean(1.0 / test.n_branches[idx]))
    if hits is None:
        return [BranchProbeResult(target, kind, l, math.nan, math.nan, math.nan, chance, n, n_train, note=note) for l in range(L)]
    acc_ci, sel_ci = _boot(hits, ctrl, test.problem[idx], rng, n_boot)
    res = []
    for l in range(L):
        acc, c = float(hits[l].mean()), float(ctrl[l].mean())
        res.append(BranchProbeResult(target, kind, l, acc, c, acc - c, chance, n, n_train,
                                     (float(acc_ci[l, 0]), float(acc_ci[l, 1])), (float(sel_ci[l, 0]), float(sel_ci[l, 1])), note))
    return res


# --------------------------------------------------------------------------- the one entry point


def probe_rows(
    model: Any,
    cap_eval: Any,
    encoded_eval: Sequence[Any],
    train: Sequence[Any] | None,
    where: dict[str, Any],
    rng: np.random.Generator,
    *,
    l2: float = L2,
    n_splits: int = 5,
    n_boot: int = N_BOOT,
    batch_size: int = 128,
) -> list[dict[str, Any]]:
    """The probe rows of one checkpoint, ready for the results table.

    Inputs:

    - ``model``: the loaded checkpoint (``hooks.load.load``; native or Hugging Face).
    - ``cap_eval``: ``analysis.measure.teacher_forced(model, encoded_eval)``, the capture the runner
      already makes; ``encoded_eval``: the encoded eval problems it was captured from, same list.
    - ``train``: the encoded probe-training problems, made once per run and shared by every
      checkpoint: ``hooks.encode.encode_problems(model.tokenizer, training.synth.make_probe_split(
      training.tasks.get_task(task_config), seed=run_seed, exclude={task.key(p) for p in eval_problems}))[0]``
      (500 problems per kind by default). None where there is no task generator (Hugging Face models
      on their own data): the probes are then cross-validated on the eval forks, grouped by problem.
    - ``where``: the row columns (checkpoint, phase, step, format, sweep columns ...).
    - ``rng``: draws the control labels, the fold seed and the bootstrap (the fits draw nothing), so
      the same rng state gives the same rows.

    The training problems are teacher-forced here, at their decision positions only
    (:func:`read_forks`, ``batch_size`` problems per pass). Rows, per target in ``TARGETS`` and per
    kind (each decision-point kind the eval set has for that target, then ``all``):
    ``probe_acc_<target>`` and ``probe_selectivity_<target>`` per layer (0 = before block 0 ...
    n_layers = after the last), with 95% bootstrap intervals over problems, and one
    ``probe_chance_<target>`` (layer NA). ``n`` is the number of tested forks, ``strategy`` is empty,
    and every row carries an extra ``note`` column saying how the probe was fit ("fit on N
    probe-split forks" or the cross-validation fallback). A result that cannot be computed (too few
    forks of a kind) is left out.
    """
    from analysis.table import row

    test = fork_set(model, cap_eval, encoded_eval)
    fit_on = None
    if train is not None:
        train = list(train)
        if not any(p.forks for p in train):
            raise UsageError("the probe-training problems hold no decision point; make them with training.synth.make_probe_split")
        fit_on = fork_set(model, read_forks(model, train, batch_size=batch_size), train, check=False)
    results = probe_forks(test, fit_on, rng=rng, l2=l2, n_splits=n_splits, n_boot=n_boot)
    rows: list[dict[str, Any]] = []
    chance_done: set[tuple[str, str]] = set()
    for r in results:
        if not math.isfinite(r.accuracy):
            continue
        if (r.target, r.kind) not in chance_done:
            chance_done.add((r.target, r.kind))
            rows.append(row(metric=f"probe_chance_{r.target}", value=r.chance, n=r.n_items, kind=r.kind, note=r.note, **where))
        rows.append(row(metric=f"probe_acc_{r.target}", value=r.accuracy, ci_low=r.acc_ci[0], ci_high=r.acc_ci[1],
                        n=r.n_items, kind=r.kind, layer=r.layer, note=r.note, **where))
        rows.append(row(metric=f"probe_selectivity_{r.target}", value=r.selectivity, ci_low=r.sel_ci[0],
                        ci_high=r.sel_ci[1], n=r.n_items, kind=r.kind, layer=r.layer, note=r.note, **where))
    return rows


# --------------------------------------------------------------------------- legacy
