"""Figures: each one draws the table's numbers (checked against the table), labels its axes, and
make_figures saves what the table supports and explains what it skips."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection, PolyCollection, QuadMesh
from matplotlib.colors import to_rgb
from matplotlib.container import ErrorbarContainer
from scipy import stats

from analysis import figures as F
from tests.helpers_tables import (
    DEFAULT_STRATEGY,
    DIVERSITY_STRATEGY,
    expected_shrinkage,
    synthetic_results,
    synthetic_sweep,
)
from training.errors import UsageError

N_CKPT, N_LAYERS = 5, 3


@pytest.fixture(scope="module")
def run_df() -> pd.DataFrame:
    return synthetic_results(n_checkpoints=N_CKPT, n_layers=N_LAYERS)


@pytest.fixture(scope="module")
def sweep_df() -> pd.DataFrame:
    return synthetic_sweep(tasks=("arith", "maze"), prevalences=(0.0, 0.5, 1.0), seeds=(0, 1, 2))


def _labelled_lines(ax):
    return [l for l in ax.get_lines() if not l.get_label().startswith("_")]


def _value(df, ck, metric, **match):
    sub = df[(df["checkpoint"] == ck) & (df["metric"] == metric)]
    for c, v in match.items():
        sub = sub[sub[c] == v]
    assert len(sub) == 1
    return float(sub["value"].iloc[0])


# ----------------------------------------------------------------- checkpoint conventions


def test_order_base_and_colours():
    df = synthetic_results(n_checkpoints=4, with_pretrain=True)
    order = F.checkpoint_order(df)
    assert order == ["pretrain-step020000", "sft-step000000", "sft-step000050", "sft-step000200", "sft-step000800"]
    assert F.base_checkpoint(df) == "sft-step000000"
    colors = F.checkpoint_colors(df)
    assert colors["sft-step000000"] == (0.0, 0.0, 0.0)
    assert len({colors[c] for c in order}) == len(order)  # all distinct
    # no sft step 0: the last pretrain checkpoint is the base
    no_sft0 = df[df["checkpoint"] != "sft-step000000"]
    assert F.base_checkpoint(no_sft0) == "pretrain-step020000"
    assert F.checkpoint_label(no_sft0, "sft-step000200") == "SFT step 200"


def test_default_strategy_prefers_plain_temperature():
    df = synthetic_results(n_checkpoints=2, strategies=(DIVERSITY_STRATEGY, DEFAULT_STRATEGY))
    assert F.default_strategy(df) == DEFAULT_STRATEGY


def test_mixed_runs_are_refused(run_df):
    twice = pd.concat([run_df, run_df], ignore_index=True)
    with pytest.raises(UsageError, match="filter it to one run"):
        F.coverage_curves(twice)


# ----------------------------------------------------------------- per-run figures


def test_coverage_curves_draw_the_table(run_df):
    fig = F.coverage_curves(run_df)
    ax = fig.axes[0]
    lines = _labelled_lines(ax)
    order = F.checkpoint_order(run_df)
    assert [l.get_label() for l in lines] == ["base", "SFT step 50", "SFT step 200", "SFT step 800", "SFT step 3200"]
    for line, ck in zip(lines, order):
        expect = [_value(run_df, ck, "pass@k", k=k, strategy=DEFAULT_STRATEGY) for k in (1, 2, 4, 8, 16, 32)]
        np.testing.assert_allclose(line.get_ydata(), expect)
        np.testing.assert_array_equal(line.get_xdata(), [1, 2, 4, 8, 16, 32])
    base = lines[0]
    assert to_rgb(base.get_color()) == (0.0, 0.0, 0.0)
    assert base.get_linewidth() > max(l.get_linewidth() for l in lines[1:])
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == N_CKPT  # CI bands
    assert "k" in ax.get_xlabel() and "pass@k" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()][0] == "base"


def test_dynamics_panels_and_values(run_df):
    fig = F.dynamics(run_df)
    axes = fig.axes
    assert len(axes) == 3
    steps = [0, 50, 200, 800, 3200]
    order = F.checkpoint_order(run_df)
    p1, p16 = _labelled_lines(axes[0])
    assert (p1.get_label(), p16.get_label()) == ("pass@1", "pass@16")
    np.testing.assert_array_equal(p1.get_xdata(), steps)
    np.testing.assert_allclose(p16.get_ydata(), [_value(run_df, c, "pass@k", k=16) for c in order])
    ent = {l.get_label(): l for l in _labelled_lines(axes[1])}
    assert set(ent) == {"indecipherable", "decipherable", "multi-valid", "ordinary positions"}
    np.testing.assert_allclose(ent["decipherable"].get_ydata(), [_value(run_df, c, "entropy_fork", kind="decipherable") for c in order])
    np.testing.assert_allclose(ent["ordinary positions"].get_ydata(), [_value(run_df, c, "entropy_other") for c in order])
    top = {l.get_label(): l for l in _labelled_lines(axes[2])}
    np.testing.assert_allclose(top["indecipherable"].get_ydata(), [_value(run_df, c, "mass_top_branch", kind="indecipherable") for c in order])
    assert "nats" in axes[1].get_ylabel() and "probability" in axes[2].get_ylabel()
    assert "SFT step" in axes[2].get_xlabel() and axes[2].get_xscale() == "symlog"


def test_dynamics_uses_largest_k_without_16_and_refuses_one_checkpoint():
    fig = F.dynamics(synthetic_results(n_checkpoints=3, ks=(1, 2, 4, 8)))
    assert [l.get_label() for l in _labelled_lines(fig.axes[0])] == ["pass@1", "pass@8"]
    with pytest.raises(UsageError, match="at least one SFT checkpoint"):
        F.dynamics(synthetic_results(n_checkpoints=1))


def test_lens_heatmap_cells_equal_table(run_df):
    fig = F.lens_heatmap(run_df, metric="lens_mass_top_branch", kind="indecipherable")
    ax = fig.axes[0]
    mesh = [c for c in ax.collections if isinstance(c, QuadMesh)][0]
    arr = np.asarray(mesh.get_array()).reshape(N_LAYERS + 1, N_CKPT)
    order = F.checkpoint_order(run_df)
    for layer in range(N_LAYERS + 1):
        for j, ck in enumerate(order):
            assert arr[layer, j] == pytest.approx(_value(run_df, ck, "lens_mass_top_branch", kind="indecipherable", layer=layer))
    assert len(ax.texts) == (N_LAYERS + 1) * N_CKPT  # every cell annotated
    assert ax.texts[0].get_text() == f"{arr[0, 0]:.2f}"
    assert "layer" in ax.get_ylabel() and "checkpoint" in ax.get_xlabel()
    assert "probability" in fig.axes[1].get_ylabel()  # the colorbar
    with pytest.raises(UsageError, match="kind"):
        F.lens_heatmap(run_df, kind="no-such-kind")


def _with_kind_probes(df: pd.DataFrame) -> pd.DataFrame:
    """The table with candidate-conditioned probe rows per kind (valid: no multi-valid forks) and chance."""
    from analysis.table import row, to_frame

    info = df[["checkpoint", "phase", "step"]].drop_duplicates()
    layers = sorted({int(x) for x in df.loc[df["metric"] == "probe_acc_taken", "layer"].dropna()})
    rows = []
    for j, (ck, phase, step) in enumerate(info.itertuples(index=False)):
        where = dict(checkpoint=ck, phase=phase, step=int(step))
        for t, target in enumerate(("valid", "taken")):
            for i, kind in enumerate(("indecipherable", "decipherable", "multi-valid", "all")):
                if target == "valid" and kind == "multi-valid":
                    continue
                chance = 0.4 + 0.013 * i + 0.004 * t
                rows.append(row(**where, metric=f"probe_chance_{target}", value=chance, kind=kind, n=60))
                for layer in layers:
                    acc = min(1.0, chance + 0.05 * layer * j + 0.01 * i)
                    rows.append(row(**where, metric=f"probe_acc_{target}", value=acc, kind=kind, layer=layer, n=60))
                    rows.append(row(**where, metric=f"probe_selectivity_{target}", value=acc - chance - 0.02 * t,
                                    kind=kind, layer=layer, n=60))
    rest = df[~df["metric"].str.startswith("probe_")]
    return pd.concat([rest, to_frame(rows)], ignore_index=True)


def _panels(fig):
    return {ax.get_label(): ax for ax in fig.axes if "|" in ax.get_label()}


def test_probe_heatmap_panels_equal_the_table(run_df):
    df = _with_kind_probes(run_df)
    fig = F.probe_heatmap(df)
    panels = _panels(fig)
    want = {f"probe_{m}_{t}|{k}" for t in ("valid", "taken") for m in ("acc", "selectivity")
            for k in ("indecipherable", "decipherable", "multi-valid", "all") if not (t == "valid" and k == "multi-valid")}
    assert set(panels) == want
    assert len(fig.axes) == 16 + 4  # 4 rows x 4 kinds, a colorbar per row
    order = F.checkpoint_order(df)
    for label, ax in panels.items():
        metric, kind = label.split("|")
        mesh = [c for c in ax.collections if isinstance(c, QuadMesh)][0]
        arr = np.asarray(mesh.get_array()).reshape(N_LAYERS + 1, N_CKPT)
        for layer in range(N_LAYERS + 1):
            for j, ck in enumerate(order):
                assert arr[layer, j] == pytest.approx(_value(df, ck, metric, kind=kind, layer=layer))
        if "_acc_" in metric:  # white = chance: the colour scale is centred on the table's chance
            chance = _value(df, order[0], metric.replace("_acc_", "_chance_"), kind=kind)
            assert mesh.norm.vcenter == pytest.approx(chance)
            assert f"chance {chance:.2f}" in ax.get_title()
            assert to_rgb(mesh.cmap(mesh.norm(chance))) == pytest.approx((0.97, 0.97, 0.97), abs=0.01)  # white
        else:
            assert mesh.norm(0.0) == pytest.approx(0.5)
    notes = [t.get_text() for ax in fig.axes for t in ax.texts if "no single valid branch" in t.get_text()]
    assert len(notes) == 2  # valid accuracy and selectivity at multi-valid forks


def test_probe_heatmap_older_tables_and_missing_probes(run_df):
    # only pooled ("all") rows and no chance: those panels drawn, centred on 0.5, the rest say why
    fig = F.probe_heatmap(run_df)
    panels = _panels(fig)
    assert set(panels) == {f"probe_{m}_{t}|all" for t in ("valid", "taken") for m in ("acc", "selectivity")}
    order = F.checkpoint_order(run_df)
    mesh = [c for c in panels["probe_acc_valid|all"].collections if isinstance(c, QuadMesh)][0]
    arr = np.asarray(mesh.get_array()).reshape(N_LAYERS + 1, N_CKPT)
    assert arr[2, -1] == pytest.approx(_value(run_df, order[-1], "probe_acc_valid", layer=2))
    assert mesh.norm.vcenter == 0.5 and "chance not in table" in panels["probe_acc_valid|all"].get_title()
    # a probe the table lacks leaves a labelled empty panel
    fig = F.probe_heatmap(run_df[run_df["metric"] != "probe_acc_valid"])
    assert any("not in the table" in t.get_text() for ax in fig.axes for t in ax.texts)
    with pytest.raises(UsageError, match="probe"):
        F.probe_heatmap(run_df[~run_df["metric"].str.startswith("probe_")])


def test_entropy_vs_coverage_points_and_correlations():
    df = synthetic_results(n_checkpoints=6).copy()
    rng = np.random.default_rng(1)
    ent = df["metric"] == "entropy_fork"
    df.loc[ent, "value"] += rng.normal(0, 0.08, ent.sum())  # break the perfect line
    fig = F.entropy_vs_coverage(df, kind="indecipherable")
    ax = fig.axes[0]
    pts = [c for c in ax.collections if isinstance(c, PathCollection)][0].get_offsets()
    order = F.checkpoint_order(df)
    x = np.array([_value(df, c, "entropy_fork", kind="indecipherable") for c in order])
    y = np.array([_value(df, c, "pass@k", k=16) - _value(df, c, "pass@k", k=1) for c in order])
    np.testing.assert_allclose(np.asarray(pts), np.c_[x, y])
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    r, rho = stats.pearsonr(x, y)[0], stats.spearmanr(x, y)[0]
    assert f"r = {r:.2f}" in legend and f"ρ = {rho:.2f}" in legend
    assert "nats" in ax.get_xlabel() and "pass@16" in ax.get_ylabel()


# ----------------------------------------------------------------- sweep figures


def test_sweep_shrinkage_matches_loop_reference(sweep_df):
    got = F.sweep_shrinkage(sweep_df)
    ref = expected_shrinkage(sweep_df, "maze", "canonical", DEFAULT_STRATEGY)
    g = got[(got["task"] == "maze") & (got["policy"] == "canonical") & (got["strategy"] == DEFAULT_STRATEGY)]
    for prev, pairs in ref.items():
        cell = g[g["prevalence"] == prev].sort_values("seed")
        np.testing.assert_allclose(cell["shrinkage"], [a for a, _ in pairs], atol=1e-12)
        np.testing.assert_allclose(cell["pass1_gain"], [b for _, b in pairs], atol=1e-12)
    assert (got["final_step"] == 400).all()


def test_shrinkage_vs_prevalence_lines_and_rho(sweep_df):
    fig = F.shrinkage_vs_prevalence(sweep_df)
    assert len(fig.axes) == 4  # 2 rows x 2 tasks
    top_left = fig.axes[0]
    bars = [c for c in top_left.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 3  # canonical at both strategies, balanced at the default (headline_lines)
    ref = expected_shrinkage(sweep_df, "arith", "canonical", DEFAULT_STRATEGY)
    line = bars[0].lines[0]
    np.testing.assert_allclose(line.get_xdata(), sorted(ref))
    np.testing.assert_allclose(line.get_ydata(), [np.mean([a for a, _ in ref[p]]) for p in sorted(ref)], atol=1e-12)
    gain_line = [c for c in fig.axes[2].containers if isinstance(c, ErrorbarContainer)][0].lines[0]
    np.testing.assert_allclose(gain_line.get_ydata(), [np.mean([b for _, b in ref[p]]) for p in sorted(ref)], atol=1e-12)
    xs = [p for p in sorted(ref) for _ in ref[p]]
    ys = [a for p in sorted(ref) for a, _ in ref[p]]
    rho = stats.spearmanr(xs, ys)[0]
    assert [t.get_text() for t in top_left.texts] == [f"ρ = {rho:.2f} (canonical, {DEFAULT_STRATEGY})"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]  # one legend for every panel
    assert legend == [f"canonical, {DEFAULT_STRATEGY}", f"canonical, {DIVERSITY_STRATEGY}", f"balanced, {DEFAULT_STRATEGY}"]
    assert "shrinkage" in top_left.get_ylabel() and "prevalence" in fig.axes[2].get_xlabel()
    everything = F.shrinkage_vs_prevalence(sweep_df, lines=[("balanced", DIVERSITY_STRATEGY)])
    assert [t.get_text() for t in everything.legends[0].get_texts()] == [f"balanced, {DIVERSITY_STRATEGY}"]
    with pytest.raises(UsageError, match="no cells for paired, greedy"):
        F.shrinkage_vs_prevalence(sweep_df, lines=[("paired", "greedy")])


def test_sweep_coverage_curves(sweep_df):
    fig = F.sweep_coverage(sweep_df, task="arith", prevalence=1.0)
    ax = fig.axes[0]
    lines = _labelled_lines(ax)
    assert [l.get_label() for l in lines] == ["base", "SFT canonical", f"SFT canonical + {DIVERSITY_STRATEGY}", "SFT balanced"]
    p = sweep_df[(sweep_df["metric"] == "pass@k") & (sweep_df["task"] == "arith") & (sweep_df["strategy"] == DEFAULT_STRATEGY)]
    base = p[p["step"] == 0].groupby(["seed", "k"])["value"].mean().groupby("k").mean()
    np.testing.assert_allclose(lines[0].get_ydata(), base.to_numpy())
    fin = p[(p["step"] == 400) & (p["policy"] == "canonical") & (p["prevalence"] == 1.0)].groupby("k")["value"].mean()
    np.testing.assert_allclose(lines[1].get_ydata(), fin.to_numpy())
    both = F.sweep_coverage(sweep_df)  # every task, one panel each, the same curves per panel
    assert [ax.get_title() for ax in both.axes] == ["task arith, fork prevalence 1", "task maze, fork prevalence 1"]
    np.testing.assert_allclose(_labelled_lines(both.axes[0])[1].get_ydata(), fin.to_numpy())
    maze = sweep_df[(sweep_df["metric"] == "pass@k") & (sweep_df["task"] == "maze") & (sweep_df["strategy"] == DEFAULT_STRATEGY)]
    maze_base = maze[maze["step"] == 0].groupby(["seed", "k"])["value"].mean().groupby("k").mean()
    np.testing.assert_allclose(_labelled_lines(both.axes[1])[0].get_ydata(), maze_base.to_numpy())
    with pytest.raises(UsageError, match="task 'nope'"):
        F.sweep_coverage(sweep_df, task="nope")
    with pytest.raises(UsageError, match="sweep table"):
        F.sweep_coverage(synthetic_results(n_checkpoints=2))


# ----------------------------------------------------------------- make_figures


def _check_files(files):
    for f in files:
        data = f.read_bytes()
        assert len(data) > 1000
        assert data[:4] == b"%PDF" if f.suffix == ".pdf" else data[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_figures_writes_everything_a_run_supports(run_df, tmp_path):
    rc_before = dict(matplotlib.rcParams)
    files, skipped = F.make_figures(run_df, tmp_path)
    assert {f.name for f in files} == {f"{n}.{e}" for n in F.FIGURES[:6] for e in ("pdf", "png")}
    _check_files(files)
    # the synthetic table has no tuned-lens, forcing or patching rows: those figures say so
    assert sorted(s.split(":")[0] for s in skipped) == ["skipped branch_value", "skipped lens_kl", "skipped patching",
                                                       "skipped shrinkage_vs_prevalence", "skipped sweep_coverage"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files
    assert dict(matplotlib.rcParams) == rc_before  # style did not leak


def test_make_figures_one_checkpoint_and_missing_metrics(tmp_path):
    files, skipped = F.make_figures(synthetic_results(n_checkpoints=1), tmp_path / "one", formats=("png",))
    assert any(s.startswith("skipped dynamics:") and "SFT checkpoint" in s for s in skipped)
    assert any(s.startswith("skipped entropy_vs_coverage:") and "two checkpoints" in s for s in skipped)
    assert {f.stem for f in files} == {"coverage_curves", "lens_mass_top_branch", "lens_mass_valid", "probes"}
    _check_files(files)

    files, skipped = F.make_figures(synthetic_results(n_checkpoints=3, lens=False, probes=False), tmp_path / "bare", formats=("png",))
    names = {f.stem for f in files}
    assert names == {"coverage_curves", "dynamics", "entropy_vs_coverage"}
    for fig in ("lens_mass_top_branch", "lens_mass_valid", "probes"):
        assert any(s.startswith(f"skipped {fig}:") for s in skipped)

    only_pass = synthetic_results(n_checkpoints=3)
    only_pass = only_pass[only_pass["metric"] == "pass@k"]
    files, skipped = F.make_figures(only_pass, tmp_path / "pass", formats=("png",))
    assert {f.stem for f in files} == {"coverage_curves", "dynamics"}
    assert any(s.startswith("skipped entropy_vs_coverage:") and "entropy_fork" in s for s in skipped)


def test_make_figures_sweep_and_bad_input(sweep_df, tmp_path):
    files, skipped = F.make_figures(sweep_df, tmp_path, formats=("png",))
    assert {f.stem for f in files} == {"shrinkage_vs_prevalence", "sweep_coverage"}
    assert len(skipped) == 9 and all("sweep table" in s for s in skipped)
    with pytest.raises(UsageError, match="formats"):
        F.make_figures(sweep_df, tmp_path, formats=("jpeg",))
    with pytest.raises(UsageError, match="missing column"):
        F.make_figures(pd.DataFrame({"value": [1.0]}), tmp_path)
