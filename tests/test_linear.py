"""Candidate-conditioned linear probes: planted signal vs noise, chance and control, grouped folds,
the model's own readout at the last layer, per-kind rows, and an end-to-end run on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import log_softmax

import probes.branch_probe as branch_probe
import probes.linear as linear
from analysis.table import METRICS
from probes.linear import (
    MIN_ITEMS,
    BranchProbeResult,
    ForkSet,
    control_labels_for,
    fit_branch_probe,
    fork_set,
    grouped_folds,
    probe_forks,
    probe_rows,
    read_forks,
    readout,
)
from training.errors import UsageError
from training.schema import KINDS

D = 16


def planted(seed: int, n: int = 600, n_branches=(2, 3), layer: int = 1, kinds=KINDS, strength: float = 4.0) -> ForkSet:
    """3 layers; at ``layer`` the labelled branch's feature 0 is ``strength`` and every other branch's 0,
    at the other layers feature 0 is noise; features 1.. are noise everywhere. One fork per problem."""
    rng = np.random.default_rng(seed)
    b = rng.choice(n_branches, n)
    B = max(n_branches)
    mask = np.arange(B)[None, :] < b[:, None]
    y = (rng.random(n) * b).astype(int)
    normed = rng.normal(size=(n, 3, D))
    wsel = rng.normal(size=(n, B, D))
    wsel[:, :, 0] = 0.0
    wsel[np.arange(n), y, 0] = 1.0
    normed[:, layer, 0] = strength
    kind = np.array(kinds, dtype=object)[rng.integers(0, len(kinds), n)]
    labels = {"valid": y, "taken": y, "demonstrated": y}
    return ForkSet(normed, wsel, None, mask, np.arange(n), kind, labels)


def _by(results, target="valid", kind="all"):
    return {r.layer: r for r in results if r.target == target and r.kind == kind}


# ----------------------------------------------------------------- planted signal, chance, controls


@pytest.mark.parametrize("branches", [(2,), (3,), (2, 3)])
def test_planted_signal_found_at_its_layer_only(branches):
    train, test = planted(0, n_branches=branches), planted(1, n_branches=branches)
    res = probe_forks(test, train, rng=np.random.default_rng(2), targets=("valid",), n_boot=50)
    assert all(isinstance(r, BranchProbeResult) for r in res)
    by = _by(res)
    assert sorted(by) == [0, 1, 2]
    chance = float(np.mean(1.0 / test.n_branches))
    assert all(r.chance == pytest.approx(chance) and r.n_items == test.n_items for r in by.values())
    assert by[1].accuracy > 0.97
    for layer in (0, 2):
        assert abs(by[layer].accuracy - chance) < 0.08
    for r in by.values():
        assert abs(r.control_accuracy - chance) < 0.08
        assert r.selectivity == pytest.approx(r.accuracy - r.control_accuracy)
        assert r.acc_ci[0] <= r.accuracy <= r.acc_ci[1] and r.sel_ci[0] <= r.selectivity <= r.sel_ci[1]
    assert by[1].selectivity > 0.4 and abs(by[0].selectivity) < 0.1


def test_planted_signal_found_by_cross_validation_without_a_split():
    test = planted(3, n=400)
    res = probe_forks(test, None, rng=np.random.default_rng(0), targets=("valid",), n_boot=20)
    by = _by(res)
    assert by[1].accuracy > 0.95 and abs(by[0].accuracy - by[0].chance) < 0.1
    assert all("cross-validation" in r.note for r in res)


def test_shuffled_labels_give_chance():
    train, test = planted(4), planted(5)
    rng = np.random.default_rng(6)
    for fs in (train, test):  # a label that no longer follows the planted feature
        y = fs.labels["valid"]
        for b in (2, 3):
            idx = np.flatnonzero(fs.n_branches == b)
            fs.labels["valid"][idx] = y[idx][rng.permutation(idx.size)]
    by = _by(probe_forks(test, train, rng=rng, targets=("valid",), n_boot=20))
    for r in by.values():
        assert abs(r.accuracy - r.chance) < 0.08


def test_chance_is_the_mean_of_one_over_b_by_hand():
    # 3 forks of 2 branches and 1 of 3, all decipherable, plus 2 indecipherable forks of 3
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]], bool)
    kind = np.array(["decipherable"] * 4 + ["indecipherable"] * 2, dtype=object)
    n = 6
    rng = np.random.default_rng(0)
    fs = ForkSet(rng.normal(size=(n, 2, 4)), rng.normal(size=(n, 3, 4)), None, mask, np.arange(n), kind,
                 {"valid": np.zeros(n, int)})
    many = ForkSet(*(np.concatenate([a] * 5) for a in (fs.normed, fs.wsel)), None, np.concatenate([mask] * 5),
                   np.arange(5 * n), np.concatenate([kind] * 5), {"valid": np.zeros(5 * n, int)})
    res = probe_forks(fs, many, rng=rng, targets=("valid",), n_boot=10)
    chance = {r.kind: r.chance for r in res}
    assert chance["decipherable"] == pytest.approx((3 * 1 / 2 + 1 / 3) / 4)
    assert chance["indecipherable"] == pytest.approx(1 / 3)
    assert chance["all"] == pytest.approx((3 / 2 + 3 * 1 / 3) / 6)


def test_rows_per_kind_and_all_pools_the_kinds():
    train, test = planted(7, n=900), planted(8, n=450)
    res = probe_forks(test, train, rng=np.random.default_rng(0), n_boot=20)
    assert [r.target for r in res] == sorted((r.target for r in res), key=linear.TARGETS.index)
    for target in linear.TARGETS:
        kinds = [r.kind for r in res if r.target == target and r.layer == 0]
        assert kinds == list(KINDS) + ["all"]
        for layer in range(3):
            rows = {r.kind: r for r in res if r.target == target and r.layer == layer}
            pooled = sum(rows[k].accuracy * rows[k].n_items for k in KINDS) / rows["all"].n_items
            assert rows["all"].n_items == sum(rows[k].n_items for k in KINDS) == test.n_items
            assert rows["all"].accuracy == pytest.approx(pooled)
            assert rows["all"].n_train == sum(rows[k].n_train for k in KINDS) == train.n_items


def test_a_kind_with_too_few_training_forks_is_nan_with_a_note():
    train = planted(9, n=300, kinds=("decipherable",))
    extra = planted(10, n=MIN_ITEMS - 1, kinds=("indecipherable",))
    both = ForkSet(*(np.concatenate([a, b]) for a, b in ((train.normed, extra.normed), (train.wsel, extra.wsel))), None,
                   np.concatenate([train.mask, extra.mask]), np.arange(train.n_items + extra.n_items),
                   np.concatenate([train.kind, extra.kind]),
                   {t: np.concatenate([train.labels[t], extra.labels[t]]) for t in ("valid",)})
    test = planted(11, n=200, kinds=("decipherable", "indecipherable"))
    res = probe_forks(test, both, rng=np.random.default_rng(0), targets=("valid",), n_boot=10)
    ind = [r for r in res if r.kind == "indecipherable"]
    assert ind and all(math.isnan(r.accuracy) and "too few" in r.note for r in ind)
    dec = _by(res, kind="decipherable")
    assert dec[1].accuracy > 0.95
    assert _by(res)[1].n_items == dec[1].n_items  # `all` pools only what was measured


# ----------------------------------------------------------------- the fit


def test_fit_is_the_conditional_logit_optimum():
    rng = np.random.default_rng(0)
    n, B = 400, 3
    x = rng.normal(size=(n, B, D))
    mask = np.ones((n, B), bool)
    mask[::3, 2] = False
    s = np.where(mask, x @ rng.normal(size=D), -np.inf)
    y = np.array([rng.choice(B, p=np.exp(log_softmax(r))) for r in s])
    l2 = 1e-2
    probe = fit_branch_probe(x, mask, y, l2=l2)
    xs = x / probe.scale

    def f(w):
        lp = log_softmax(np.where(mask, xs @ w, -np.inf), axis=1)
        p = np.where(mask, np.exp(lp), 0.0)
        p[np.arange(n), y] -= 1.0
        return -lp[np.arange(n), y].mean() + 0.5 * l2 * w @ w, np.einsum("nbd,nb->d", xs, p) / n + l2 * w

    ref = minimize(f, np.zeros(D), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000})
    np.testing.assert_allclose(probe.w, ref.x, atol=1e-5)
    # features scaled to unit within-fork spread
    dev = np.where(mask[..., None], xs - (xs * mask[..., None]).sum(1, keepdims=True) / mask.sum(1)[:, None, None], 0)
    np.testing.assert_allclose(np.sqrt((dev**2).sum((0, 1)) / mask.sum()), 1.0)


def test_batched_fits_equal_single_fits():
    rng = np.random.default_rng(1)
    n, B = 200, 2
    x = rng.normal(size=(2, n, B, 6))
    mask = np.ones((n, B), bool)
    Y = np.stack([rng.integers(0, B, n), (x[1, :, :, 0]).argmax(1), np.where(np.arange(n) % 3 == 0, -1, 1)])
    W, _ = branch_probe._solve(torch.from_numpy(x), mask, Y, 1e-3)
    for g in range(2):
        for t in range(3):
            Wg, _ = branch_probe._solve(torch.from_numpy(x[g : g + 1]), mask, Y[t : t + 1], 1e-3)
            torch.testing.assert_close(W[g, t], Wg[0, 0], rtol=0, atol=1e-12)


def test_last_layer_probe_reproduces_the_models_argmax():
    """A hand-built model: logits = normed(h) . W_U[:, t] at the last layer, labels drawn from its own
    softmax. With enough forks the probe predicts the model's argmax on every held-out fork with a
    clear top branch, so its accuracy equals the model's own argmax accuracy."""
    rng = np.random.default_rng(0)

    def forks(n, margin):
        B = 3
        h = rng.normal(size=(n, 8))
        wsel = rng.normal(size=(n, B, 8))
        logits = np.einsum("nd,nbd->nb", h, wsel)
        top2 = np.sort(logits, axis=1)[:, -2:]
        keep = top2[:, 1] - top2[:, 0] > margin
        h, wsel, logits = h[keep], wsel[keep], logits[keep]
        m = len(h)
        y = np.array([rng.choice(B, p=np.exp(log_softmax(1.5 * r))) for r in logits])
        normed = np.stack([rng.normal(size=(m, 8)), h], axis=1)  # layer 0 noise, layer 1 the model's readout
        fs = ForkSet(normed, wsel, None, np.ones((m, B), bool), np.arange(m), np.array(["decipherable"] * m, object),
                     {"valid": y, "taken": logits.argmax(1)})
        return fs, logits

    train, _ = forks(6000, 0.0)
    test, logits = forks(2000, 0.5)
    model_pred = logits.argmax(1)
    np.testing.assert_array_equal(test.lens_scores(1).argmax(1), model_pred)  # w = 1 is the model
    probe = fit_branch_probe(train.features(1), train.mask, train.labels["valid"])
    np.testing.assert_array_equal(probe.predict(test.features(1), test.mask), model_pred)
    by = _by(probe_forks(test, train, rng=np.random.default_rng(1), targets=("valid", "taken"), n_boot=10), "valid")
    assert by[1].accuracy == pytest.approx(float(np.mean(model_pred == test.labels["valid"])))
    assert 0.6 < by[1].accuracy < 0.95 and abs(by[0].accuracy - 1 / 3) < 0.05
    taken = _by(probe_forks(test, train, rng=np.random.default_rng(1), targets=("taken",), n_boot=10), "taken")
    assert taken[1].accuracy == 1.0


# ----------------------------------------------------------------- splits and controls


def test_control_labels_are_a_permutation_within_each_stratum():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
    strata = np.array(["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"])
    out = control_labels_for(labels, strata, np.random.default_rng(0))
    for s in ("a", "b"):
        assert sorted(out[strata == s]) == sorted(labels[strata == s])
    assert any(not np.array_equal(control_labels_for(labels, strata, np.random.default_rng(i)), labels) for i in range(5))


def test_control_keeps_each_kind_and_branch_count():
    fs = planted(12, n=300)
    ctrl = linear._controls(fs, ["valid"], np.random.default_rng(0))["valid"]
    for k in KINDS:
        for b in (2, 3):
            sel = (fs.kind == k) & (fs.n_branches == b)
            assert sorted(ctrl[sel]) == sorted(fs.labels["valid"][sel])
            assert (ctrl[sel] < b).all()


def test_grouped_folds_never_split_a_problem():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 23, 150)
    labels = rng.integers(0, 3, 150)
    folds = grouped_folds(labels, groups, 5, seed=3)
    assert len(folds) == 5
    assert sorted(np.concatenate([te for _, te in folds])) == list(range(150))  # every item tested once
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        assert set(tr) | set(te) == set(range(150))


def test_cross_validation_folds_keep_problems_whole(monkeypatch):
    """Spy on the split helper: without a probe split, every fold keeps a problem's forks together."""
    seen = []

    def spy(labels, groups, n_splits, seed):
        folds = grouped_folds(labels, groups, n_splits, seed)
        seen.append((groups, folds))
        return folds

    monkeypatch.setattr(linear, "grouped_folds", spy)
    fs = planted(13, n=300)
    fs.problem = np.repeat(np.arange(100), 3)  # three forks per problem
    probe_forks(fs, None, rng=np.random.default_rng(0), targets=("valid",), n_boot=5)
    assert len(seen) == len(KINDS)
    for g, folds in seen:
        for tr, te in folds:
            assert not set(g[tr]) & set(g[te])


def test_deterministic_by_seed():
    train, test = planted(14), planted(15)
    a = probe_forks(test, train, rng=np.random.default_rng(11), n_boot=50)
    b = probe_forks(test, train, rng=np.random.default_rng(11), n_boot=50)
    assert a == b
    c = probe_forks(test, None, rng=np.random.default_rng(11), n_boot=50)
    assert c == probe_forks(test, None, rng=np.random.default_rng(11), n_boot=50)


def test_errors():
    fs = planted(16, n=60)
    rng = np.random.default_rng(0)
    with pytest.raises(UsageError, match="unknown probe target"):
        probe_forks(fs, fs, rng=rng, targets=("rank",))
    with pytest.raises(UsageError, match="at least 2 splits"):
        probe_forks(fs, None, rng=rng, n_splits=1)
    with pytest.raises(UsageError, match="penalty"):
        probe_forks(fs, fs, rng=rng, l2=0.0)
    with pytest.raises(UsageError, match="one entry per decision point"):
        ForkSet(fs.normed, fs.wsel, None, fs.mask, fs.problem[:-1], fs.kind, {})
    with pytest.raises(UsageError, match="index one of the fork's branches"):
        ForkSet(fs.normed, fs.wsel, None, fs.mask, fs.problem, fs.kind, {"valid": np.full(fs.n_items, 2)})
    other = ForkSet(fs.normed[:, :2], fs.wsel, None, fs.mask, fs.problem, fs.kind, fs.labels)
    with pytest.raises(UsageError, match="same checkpoint"):
        probe_forks(fs, other, rng=rng)
    with pytest.raises(UsageError, match="neither"):
        readout(object())


# ----------------------------------------------------------------- the split maker


def test_probe_split_is_disjoint_deterministic_and_its_own_stream():
    from training.config import DataConfig
    from training.synth import make_eval, make_probe_split
    from training.tasks import get_task

    task = get_task({"name": "graph"})
    ev = make_eval(task, DataConfig(n_eval=30), 0, set())
    keys = {task.key(p) for p in ev}
    split = make_probe_split(task, 20, seed=0, exclude=keys)
    assert [set(p.kinds) for p in split] == [{k} for k in KINDS for _ in range(20)]
    assert split[0].prompt != ev[0].prompt  # not the eval stream (same seed, same first kind)
    assert not keys & {task.key(p) for p in split}
    assert len({task.key(p) for p in split}) == len(split)
    assert [p.prompt for p in split] == [p.prompt for p in make_probe_split(task, 20, seed=0, exclude=keys)]
    assert split[0].prompt != make_probe_split(task, 20, seed=1)[0].prompt
    assert len(make_probe_split(task, {"decipherable": 5}, seed=0)) == 5
    with pytest.raises(UsageError, match="unknown decision-point kind"):
        make_probe_split(task, {"odd": 3})
    with pytest.raises(UsageError, match="whole number"):
        make_probe_split(task, -1)


# ----------------------------------------------------------------- a real (tiny) model


@pytest.fixture(scope="module")
def tiny(tiny_run):
    from analysis.measure import teacher_forced
    from hooks.encode import encode_problems
    from hooks.load import load
    from training.schema import read_jsonl
    from training.synth import make_probe_split
    from training.tasks import get_task

    model = load(tiny_run / "checkpoints" / "sft-step000020")
    problems = read_jsonl(tiny_run / "data" / "eval.jsonl")
    enc, _ = encode_problems(model.tokenizer, problems)
    task = get_task(model.task_config)
    split = make_probe_split(task, 60, seed=0, exclude={task.key(p) for p in problems})
    train, _ = encode_problems(model.tokenizer, split)
    return model, enc, teacher_forced(model, enc), train


def test_readout_reproduces_the_logit_lens(tiny):
    model, enc, cap, _ = tiny
    norm, W, b = readout(model)
    h = torch.from_numpy(cap.resid[:5])
    torch.testing.assert_close(norm(h) @ W + (0 if b is None else b), model.lens(h), rtol=1e-5, atol=1e-5)
    fs = fork_set(model, cap, enc)  # checks w = 1 against model.lens at every layer
    last = fs.lens_scores(fs.n_layers - 1)
    masked = np.where(cap.branch_mask, cap.mass, -1.0)
    np.testing.assert_array_equal(last.argmax(1), masked.argmax(1))  # the last layer is the model's output
    assert fs.n_features == model.d_model + (b is not None and bool((b != 0).any()))


def test_read_forks_equals_teacher_forced(tiny):
    model, enc, cap, _ = tiny
    got = read_forks(model, enc, batch_size=5)
    np.testing.assert_array_equal(got.problem, cap.problem)
    assert got.kind == cap.kind
    np.testing.assert_allclose(got.resid, cap.resid, atol=1e-5)
    np.testing.assert_allclose(got.mass, cap.mass, atol=1e-6)
    np.testing.assert_array_equal(got.branch_mask, cap.branch_mask)
    np.testing.assert_array_equal(got.valid_mask, cap.valid_mask)


def test_fork_set_refuses_a_capture_of_other_problems(tiny):
    model, enc, cap, _ = tiny
    with pytest.raises(UsageError, match="do not line up"):
        fork_set(model, cap, enc[1:])


def test_probe_rows_end_to_end(tiny):
    model, enc, cap, train = tiny
    where = {"checkpoint": "sft-step000020", "phase": "sft", "step": 20, "format": "native"}
    rows = probe_rows(model, cap, enc, train, where, np.random.default_rng(0), n_boot=100)
    assert rows and all(r["metric"] in METRICS and r["checkpoint"] == "sft-step000020" for r in rows)
    names = {r["metric"] for r in rows}
    assert names == {f"probe_{m}_{t}" for m in ("acc", "selectivity", "chance") for t in linear.TARGETS}
    kinds_present = set(cap.kind)
    for r in rows:
        assert r["strategy"] == "" and r["n"] > 0 and r["note"].startswith("fit on")
        if r["metric"].startswith("probe_chance"):
            assert r["layer"] is None and 0 < r["value"] <= 0.5
        else:
            assert r["layer"] in range(model.n_layers + 1)
            lo, hi = (0, 1) if r["metric"].startswith("probe_acc") else (-1, 1)
            assert lo <= r["value"] <= hi and r["ci_low"] <= r["value"] <= r["ci_high"]
    acc_kinds = {r["kind"] for r in rows if r["metric"] == "probe_acc_taken"}
    assert acc_kinds == kinds_present | {"all"}
    assert "multi-valid" not in {r["kind"] for r in rows if r["metric"] == "probe_acc_valid"}
    per = {(r["metric"], r["kind"], r["layer"]): r["value"] for r in rows}
    for (m, kind, layer), v in per.items():
        if m.startswith("probe_selectivity"):
            assert v <= per[(m.replace("selectivity", "acc"), kind, layer)] + 1e-12  # control accuracy >= 0
    again = probe_rows(model, cap, enc, train, where, np.random.default_rng(0), n_boot=100)
    assert again == rows  # same seed, same rows
    cv = probe_rows(model, cap, enc, None, where, np.random.default_rng(0), n_boot=20)
    assert cv and all("cross-validation on the eval forks" in r["note"] for r in cv)


def test_rows_feed_the_figure_and_the_report(tiny):
    """The table probe_rows makes draws the probe figure, and the report's probe sentence states its numbers."""
    from analysis.figures import probe_heatmap
    from analysis.report import key_numbers
    from analysis.report_mechanism import _probe_sentence
    from analysis.table import to_frame

    model, enc, cap, train = tiny
    rows = []
    for ck, step in (("sft-step000000", 0), ("sft-step000020", 20)):
        where = {"checkpoint": ck, "phase": "sft", "step": step, "format": "native"}
        rows += probe_rows(model, cap, enc, train, where, np.random.default_rng(step), n_boot=50)
    df = to_frame(rows)
    fig = probe_heatmap(df)
    assert {ax.get_label() for ax in fig.axes if "|" in ax.get_label()} >= {"probe_acc_valid|all", "probe_acc_taken|all"}
    kn = key_numbers(df)
    text = _probe_sentence(kn)
    final = df[df["checkpoint"] == "sft-step000020"]
    for kind in ("decipherable", "indecipherable"):
        acc = final[(final["metric"] == "probe_acc_valid") & (final["kind"] == kind)]
        if acc.empty:
            assert kn["probe_valid"][kind] is None
            continue
        best = acc.sort_values(["value", "layer"], ascending=[False, True]).iloc[0]
        chance = final[(final["metric"] == "probe_chance_valid") & (final["kind"] == kind)]["value"].iloc[0]
        got = kn["probe_valid"][kind]
        assert (got["layer"], got["accuracy"], got["chance"]) == (int(best["layer"]), best["value"], chance)
        assert (f"at {kind} forks its best layer is {int(best['layer'])}, accuracy {best['value']:.3f} "
                f"[{best['ci_low']:.3f}, {best['ci_high']:.3f}] vs chance {chance:.3f}") in text


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hugging_face_readout_and_cross_validation_fallback(tmp_path, arch):
    """LayerNorm (GPT-2) and RMSNorm (Llama) checkpoints: final norm + lm_head rows reproduce the lens,
    and without a probe split the probes are cross-validated on the eval forks and say so."""
    from analysis.measure import teacher_forced
    from hooks.encode import encode_problems
    from hooks.hf import HFCheckpoint
    from tests.hf_fixtures import build_hf_checkpoint
    from training.schema import DecisionPoint, Problem

    model = HFCheckpoint(build_hf_checkpoint(tmp_path / arch, arch, seed=2))
    norm, W, b = readout(model)
    h = torch.randn(4, 3, model.d_model, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(norm(h) @ W + (0 if b is None else b), model.lens(h), rtol=1e-5, atol=1e-5)
    problems = []
    for i in range(24):
        take = "BC"[i % 2]
        c = f" A -> {take} -> D answer: D"
        problems.append(Problem(prompt="Q: go from A to D. A:", completion=c, answer="D", decision_points=[
            DecisionPoint(c.index(take), ["B", "C"], [take], "decipherable", take)]))
    enc, _ = encode_problems(model.tokenizer, problems)
    assert len(enc) == 24 and all(len(p.forks) == 1 for p in enc)
    cap = teacher_forced(model, enc)
    where = {"checkpoint": arch, "phase": "sft", "step": 0, "format": "hf"}
    rows = probe_rows(model, cap, enc, None, where, np.random.default_rng(0), n_boot=20)
    assert {r["kind"] for r in rows} == {"decipherable", "all"}
    assert all("cross-validation on the eval forks" in r["note"] for r in rows)
    chance = [r["value"] for r in rows if r["metric"] == "probe_chance_valid"]
    assert chance == [0.5, 0.5]
    assert all(0 <= r["value"] <= 1 for r in rows if r["metric"].startswith("probe_acc"))


def test_grouped_folds_when_no_class_can_be_stratified():
    """Few forks per problem and classes rarer than the folds (a small own-data eval set): grouped
    folds still exist, and still never split a problem."""
    labels = np.array([2, 3, 2, 4, 3, 2, 4, 3])
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    folds = grouped_folds(labels, groups, 5, seed=0)
    assert len(folds) == 4
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
