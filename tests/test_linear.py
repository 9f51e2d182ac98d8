"""Linear probes: planted signal vs noise, control task, majority baseline, grouped splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import probes.linear as linear
from probes.linear import MIN_ITEMS, ProbeResult, control_labels_for, grouped_folds, probe_layers
from training.errors import UsageError

N_PROBLEMS, PER_PROBLEM, D = 40, 5, 64


def planted(seed: int, n_classes: int = 2):
    """Items x 3 layers x 64 dims: layer 1 carries the label (class-dependent mean shift), 0 and 2 are noise."""
    rng = np.random.default_rng(seed)
    n = N_PROBLEMS * PER_PROBLEM
    labels = rng.integers(0, n_classes, n)
    groups = np.repeat(np.arange(N_PROBLEMS), PER_PROBLEM)
    kinds = rng.integers(0, 3, n)
    resid = rng.normal(size=(n, 3, D))
    if n_classes == 2:
        resid[:, 1, 0] += 4.0 * (2 * labels - 1)
    else:
        resid[:, 1, :n_classes] += 6.0 * np.eye(n_classes)[labels]
    return resid, labels, groups, kinds


@pytest.mark.parametrize("n_classes", [2, 3])
def test_planted_signal_found_at_its_layer_only(n_classes):
    resid, labels, groups, kinds = planted(0, n_classes)
    rng = np.random.default_rng(1)
    control = control_labels_for(labels, kinds, rng)
    res = probe_layers(resid, labels, groups, control, rng=rng)
    chance = 1 / n_classes
    assert [r.layer for r in res] == [0, 1, 2]
    assert all(isinstance(r, ProbeResult) and r.n_items == 200 and r.n_classes == n_classes for r in res)
    assert all(r.n_splits == 5 and r.note == "" for r in res)
    assert res[1].accuracy > 0.95
    for r in (res[0], res[2]):
        assert abs(r.accuracy - chance) < 0.15
    for r in res:
        assert abs(r.control_accuracy - chance) < 0.15
        assert r.selectivity == pytest.approx(r.accuracy - r.control_accuracy)
    assert res[1].selectivity > 0.3
    assert abs(res[0].selectivity) < 0.2


def test_shuffled_labels_give_chance():
    resid, labels, groups, kinds = planted(2)
    rng = np.random.default_rng(3)
    shuffled = rng.permutation(labels)
    res = probe_layers(resid, shuffled, groups, control_labels_for(shuffled, kinds, rng), rng=rng)
    assert abs(res[1].accuracy - 0.5) < 0.15


def test_accepts_torch_tensors_and_matches_numpy():
    resid, labels, groups, kinds = planted(4)
    control = control_labels_for(labels, kinds, np.random.default_rng(0))
    a = probe_layers(resid, labels, groups, control, rng=np.random.default_rng(7))
    b = probe_layers(
        torch.from_numpy(resid).float(), torch.from_numpy(labels), torch.from_numpy(groups),
        torch.from_numpy(control), rng=np.random.default_rng(7),
    )  # fmt: skip
    assert [r.accuracy for r in a] == pytest.approx([r.accuracy for r in b], abs=0.02)


def test_deterministic_by_seed():
    resid, labels, groups, kinds = planted(5)
    control = control_labels_for(labels, kinds, np.random.default_rng(0))
    a = probe_layers(resid, labels, groups, control, rng=np.random.default_rng(11))
    b = probe_layers(resid, labels, groups, control, rng=np.random.default_rng(11))
    assert a == b
    c1 = control_labels_for(labels, kinds, np.random.default_rng(3))
    c2 = control_labels_for(labels, kinds, np.random.default_rng(3))
    np.testing.assert_array_equal(c1, c2)


def test_control_labels_are_a_permutation_within_each_stratum():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
    strata = np.array(["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"])
    out = control_labels_for(labels, strata, np.random.default_rng(0))
    for s in ("a", "b"):
        assert sorted(out[strata == s]) == sorted(labels[strata == s])
    # across seeds the labels do move
    moved = any(
        not np.array_equal(control_labels_for(labels, strata, np.random.default_rng(i)), labels) for i in range(5)
    )
    assert moved


def test_grouped_folds_never_split_a_problem():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 23, 150)
    labels = rng.integers(0, 3, 150)
    folds = grouped_folds(labels, groups, 5, seed=3)
    assert len(folds) == 5
    seen = np.concatenate([te for _, te in folds])
    assert sorted(seen) == list(range(150))  # every item is tested exactly once
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        assert set(tr) | set(te) == set(range(150))


def test_probe_layers_uses_grouped_folds(monkeypatch):
    """Spy on the split helper: probe_layers tests on folds that keep problems whole."""
    seen = []

    def spy(labels, groups, n_splits, seed):
        folds = grouped_folds(labels, groups, n_splits, seed)
        seen.append((groups, folds))
        return folds

    monkeypatch.setattr(linear, "grouped_folds", spy)
    resid, labels, groups, kinds = planted(6)
    probe_layers(resid, labels, groups, control_labels_for(labels, kinds, np.random.default_rng(0)), rng=np.random.default_rng(0))
    assert len(seen) == 1
    g, folds = seen[0]
    for tr, te in folds:
        assert not set(g[tr]) & set(g[te])


def test_majority_baseline_hand_computed(monkeypatch):
    # 12 items, 6 problems of 2; fixed folds so the baseline can be worked out by hand
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    groups = np.repeat(np.arange(6), 2)
    folds = [
        (np.arange(4, 12), np.arange(0, 4)),  # train: 3 zeros, 5 ones -> predicts 1; test 0,0,0,0 -> 0 right
        (np.r_[0:4, 8:12], np.arange(4, 8)),  # train: 4 zeros, 4 ones -> tie goes to 0; test 0,0,0,1 -> 3 right
        (np.arange(0, 8), np.arange(8, 12)),  # train: 7 zeros, 1 one -> predicts 0; test 1,1,1,1 -> 0 right
    ]
    monkeypatch.setattr(linear, "grouped_folds", lambda *a, **k: folds)
    resid = np.random.default_rng(0).normal(size=(12, 2, 4))
    res = probe_layers(resid, labels, groups, labels, rng=np.random.default_rng(0))
    assert res[0].majority == pytest.approx(3 / 12)
    assert res[0].n_splits == 3


def test_majority_baseline_imbalanced_real_folds():
    # 16 zeros and 4 ones: every training fold's majority is 0, so the baseline is 16/20
    labels = np.array([0] * 16 + [1] * 4)
    groups = np.arange(20)
    resid = np.random.default_rng(0).normal(size=(20, 1, 8))
    res = probe_layers(resid, labels, groups, labels, rng=np.random.default_rng(0))
    assert res[0].majority == pytest.approx(0.8)


def test_degenerate_cases():
    rng = np.random.default_rng(0)
    resid = rng.normal(size=(30, 2, 8))
    groups = np.repeat(np.arange(10), 3)
    # a single class: trivially perfect, nothing to select
    ones = np.ones(30, dtype=int)
    res = probe_layers(resid, ones, groups, ones, rng=rng)
    assert all(r.accuracy == 1.0 and r.majority == 1.0 and r.selectivity == 0.0 for r in res)
    assert all(r.note == "single class" and r.n_classes == 1 for r in res)
    # too few items: NaN, with the count so the caller can say why
    few = MIN_ITEMS - 1
    res = probe_layers(resid[:few], np.arange(few) % 2, groups[:few], np.arange(few) % 2, rng=rng)
    assert all(math.isnan(r.accuracy) and math.isnan(r.selectivity) and r.n_items == few for r in res)
    assert res[0].note == "too few items"
    # fewer problems than splits: the splits shrink to the number of problems
    labels = np.arange(30) % 2
    three = np.repeat(np.arange(3), 10)
    res = probe_layers(resid, labels, three, labels, rng=rng, n_splits=5)
    assert all(r.n_splits == 3 and not math.isnan(r.accuracy) for r in res)
    # one problem: no grouped split exists
    res = probe_layers(resid, labels, np.zeros(30, dtype=int), labels, rng=rng)
    assert all(math.isnan(r.accuracy) and r.note == "one problem" for r in res)


def test_errors():
    rng = np.random.default_rng(0)
    resid = rng.normal(size=(20, 2, 4))
    y = np.arange(20) % 2
    with pytest.raises(UsageError, match="one entry per decision point"):
        probe_layers(resid, y[:19], np.arange(20), y, rng=rng)
    with pytest.raises(UsageError, match=r"\[items, layer, d_model\]"):
        probe_layers(resid[:, 0], y, np.arange(20), y, rng=rng)
    with pytest.raises(UsageError, match="at least 2 splits"):
        probe_layers(resid, y, np.arange(20), y, rng=rng, n_splits=1)
