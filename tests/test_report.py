"""The report: every number it states equals the table's, it links every figure, and it tolerates
missing metrics, a missing manifest and a single checkpoint."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.figures import FIGURES, make_figures
from analysis.report import COLLAPSE_FRACTION, key_numbers, write_report
from tests.helpers_tables import DEFAULT_STRATEGY, expected_shrinkage, synthetic_results, synthetic_sweep

BASE, FINAL = "sft-step000000", "sft-step003200"


@pytest.fixture(scope="module")
def run_df() -> pd.DataFrame:
    return synthetic_results(n_checkpoints=5, n_layers=4)


def _row(df, ck, metric, **match) -> pd.Series:
    sub = df[(df["checkpoint"] == ck) & (df["metric"] == metric)]
    for c, v in match.items():
        sub = sub[sub[c] == v]
    assert len(sub) == 1
    return sub.iloc[0]


def test_key_numbers_equal_the_table(run_df):
    kn = key_numbers(run_df)
    assert (kn["base"], kn["final"], kn["strategy"], kn["k"]) == (BASE, FINAL, DEFAULT_STRATEGY, 16)
    for k in (1, 16):
        for who, ck in (("base", BASE), ("final", FINAL)):
            r = _row(run_df, ck, "pass@k", k=k, strategy=DEFAULT_STRATEGY)
            got = kn["pass@k"][k][who]
            assert (got["value"], got["ci_low"], got["ci_high"]) == (r["value"], r["ci_low"], r["ci_high"])
    for kind in ("indecipherable", "decipherable", "multi-valid"):
        assert kn["entropy_fork"][kind]["final"]["value"] == _row(run_df, FINAL, "entropy_fork", kind=kind)["value"]
    assert kn["entropy_other"]["base"]["value"] == _row(run_df, BASE, "entropy_other")["value"]
    m = kn["mass_top_branch"]
    assert m["kind"] == "indecipherable"
    assert m["base"]["value"] == _row(run_df, BASE, "mass_top_branch", kind="indecipherable")["value"]


def test_collapse_layer_and_best_probe_layer(run_df):
    kn = key_numbers(run_df)
    def lens(ck):
        rows = run_df[(run_df["metric"] == "lens_mass_top_branch") & (run_df["checkpoint"] == ck) & (run_df["kind"] == "indecipherable")]
        return rows.sort_values("layer")["value"].to_list()

    rise = [f - b for f, b in zip(lens(FINAL), lens(BASE))]
    expect = next(i for i, v in enumerate(rise) if v >= COLLAPSE_FRACTION * rise[-1])  # hand loop
    c = kn["collapse_layer"]
    assert c["layer"] == expect and 0 < expect < len(rise) - 1  # the synthetic table collapses mid-stack
    assert c["last_rise"] == pytest.approx(rise[-1]) and c["value"] == pytest.approx(rise[expect])
    assert (c["base"], c["checkpoint"]) == (BASE, FINAL)
    sel = run_df[(run_df["metric"] == "probe_selectivity_taken") & (run_df["checkpoint"] == FINAL)]
    best = sel.loc[sel["value"].idxmax()]
    got = kn["probe_selectivity"]["probe_selectivity_taken"]["final"]
    assert (got["layer"], got["value"]) == (int(best["layer"]), best["value"])


def test_report_states_the_numbers_and_links_every_figure(run_df, tmp_path):
    files, skipped = make_figures(run_df, tmp_path, formats=("png",))
    manifest = {
        "config": {"n_samples": 32, "seed": 0},
        "versions": {"torch": "2.13.0", "transformer-lens": "4.3.0"},
        "timings": {"measure": 12.5},
        "checkpoints": ["runs/a/sft-step000000"],
    }
    path = write_report(run_df, tmp_path, manifest=manifest, figure_files=files, skipped=skipped)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    kn = key_numbers(run_df)
    p1 = kn["pass@k"][1]["final"]
    assert f"{p1['value']:.3f} [{p1['ci_low']:.3f}, {p1['ci_high']:.3f}]" in text
    assert f"{kn['pass@k'][16]['base']['value']:.3f}" in text
    assert f"{kn['entropy_fork']['indecipherable']['final']['value']:.3f}" in text
    assert f"layer {kn['collapse_layer']['layer']} of 4" in text and "90%" in text
    for stem in FIGURES[:6]:
        assert f"![{stem}]({stem}.png)" in text
        assert (tmp_path / f"{stem}.png").exists()
    for s in skipped:
        assert s in text
    assert "transformer-lens | 4.3.0" in text and '"n_samples": 32' in text and "12.5" in text
    assert not list(tmp_path.glob(".*.tmp"))
    # d(pass@1) and d(pass@16) stated with their signs
    d16 = kn["pass@k"][16]["final"]["value"] - kn["pass@k"][16]["base"]["value"]
    assert f"pass@16 by {d16:+.3f}" in text


def test_report_tolerates_one_checkpoint_missing_metrics_and_manifest(tmp_path):
    df = synthetic_results(n_checkpoints=1, lens=False, probes=False)
    path = write_report(df, tmp_path, manifest=None, figure_files=[], skipped=["skipped dynamics: one checkpoint"])
    text = path.read_text()
    assert "Only one checkpoint" in text and "not measured (no logit-lens rows, or no base checkpoint" in text
    assert "No manifest was given" in text and "skipped dynamics: one checkpoint" in text
    kn = key_numbers(df)
    assert kn["collapse_layer"] is None and kn["probe_selectivity"] == {}
    # partial manifest, and overwriting an existing report
    path = write_report(df, tmp_path, manifest={"versions": {"numpy": "2.0"}}, figure_files=[], skipped=[])
    assert "| numpy | 2.0 |" in path.read_text()


def test_sweep_report_numbers(tmp_path):
    df = synthetic_sweep(tasks=("arith",), prevalences=(0.0, 0.5, 1.0), seeds=(0, 1, 2))
    kn = key_numbers(df)
    assert kn["sweep"] and kn["k"] == 16
    ref = expected_shrinkage(df, "arith", "balanced", DEFAULT_STRATEGY)
    rows = {r["prevalence"]: r for r in kn["shrinkage"] if r["policy"] == "balanced" and r["strategy"] == DEFAULT_STRATEGY}
    for prev, pairs in ref.items():
        shr = [a for a, _ in pairs]
        assert rows[prev]["shrinkage_mean"] == pytest.approx(np.mean(shr), abs=1e-12)
        assert rows[prev]["shrinkage_std"] == pytest.approx(np.std(shr, ddof=1), abs=1e-12)
    xs = [p for p in sorted(ref) for _ in ref[p]]
    ys = [a for p in sorted(ref) for a, _ in ref[p]]
    rho = next(r["rho"] for r in kn["spearman"] if r["policy"] == "balanced" and r["strategy"] == DEFAULT_STRATEGY)
    assert rho == pytest.approx(stats.spearmanr(xs, ys)[0])
    text = write_report(df, tmp_path, manifest=None, figure_files=[], skipped=[]).read_text()
    assert f"{rows[1.0]['shrinkage_mean']:.3f} ± {rows[1.0]['shrinkage_std']:.3f}" in text
    row = next(ln for ln in text.splitlines() if ln.startswith(f"| balanced | `{DEFAULT_STRATEGY}` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{rows[0.0]['shrinkage_mean']:.3f} ± {rows[0.0]['shrinkage_std']:.3f}"  # prevalence 0 first
    assert cells[4] == f"{rows[1.0]['shrinkage_mean']:.3f} ± {rows[1.0]['shrinkage_std']:.3f}"
    assert re.fullmatch(rf"{rho:.2f} \(-?[0-9.]+\)", cells[-1]), cells[-1]
    assert "| policy | strategy | prevalence 0 | prevalence 0.5 | prevalence 1 | Spearman ρ |" in text


def test_collapse_layer_none_without_a_rise(tmp_path):
    df = synthetic_results(n_checkpoints=3)
    final = sorted(set(df["checkpoint"]))[-1]
    lens = df["metric"] == "lens_mass_top_branch"
    base_vals = df[lens & (df["checkpoint"] == BASE)].set_index(["kind", "layer"])["value"]
    flat = df.copy()
    for i in flat.index[lens & (flat["checkpoint"] == final)]:  # the final checkpoint's lens = the base's + 0.01
        flat.loc[i, "value"] = base_vals[(flat.loc[i, "kind"], flat.loc[i, "layer"])] + 0.01
    c = key_numbers(flat)["collapse_layer"]
    assert c["layer"] is None and c["last_rise"] == pytest.approx(0.01)
    assert "none: at indecipherable forks the last layer's share rose by only 0.01" in write_report(flat, tmp_path).read_text()


def test_spearman_is_undefined_below_half_a_problem():
    """Shrinkage that differs only by float round-off (pass@16 of .99995 against .99998) has no rank order."""
    from analysis.sweep_stats import sweep_spearman

    prev = [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    tiny = pd.DataFrame({"task": "modes", "policy": "balanced", "strategy": "temperature:1", "prevalence": prev,
                         "shrinkage": [1e-5, -2e-5, 3e-5, 0.0, 4e-5, 2e-5], "n_problems": 200})
    assert np.isnan(sweep_spearman(tiny)["rho"].iloc[0]) and np.isnan(sweep_spearman(tiny)["rho_seed_means"].iloc[0])
    real = tiny.assign(shrinkage=[0.0, 0.001, 0.002, 0.004, 0.05, 0.03])  # spans 10 problems of 200
    got = sweep_spearman(real).iloc[0]
    assert got["rho"] == pytest.approx(stats.spearmanr(prev, real["shrinkage"])[0])
    assert got["rho_seed_means"] == pytest.approx(1.0)
