"""The table's conventions: series order, base and final come from training.phases (as loading has
them), the report says which checkpoint is the base and why, the sweep base follows the same rule,
and the figure registry drives make_figures."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis import conventions as C
from analysis import figures as F
from analysis.figures import registry
from analysis.report import key_numbers, write_report
from analysis.sweep_stats import sweep_base_mask, sweep_shrinkage
from analysis.table import to_frame
from tests.helpers_tables import series_table, synthetic_results, synthetic_sweep
from training.errors import UsageError
from training.phases import base_position

EARLIEST_SENTENCE = (
    "no model before SFT (SFT step 0, a `base` or `pretrain` checkpoint) is in the table, "
    "so the earliest measured checkpoint stands in"
)


# ----------------------------------------------------------------- one run


def test_hugging_face_base_and_sft_in_the_right_order(tmp_path):
    """examples/own_data: a `base` directory (phase base) and an `sft` one; base comes first."""
    df = series_table([("sft", "sft", 200), ("base", "base", 0)], pass1=[0.69, 0.25], pass16=[0.75, 0.90], entropy=[0.56, 0.86])
    assert C.checkpoint_order(df) == ["base", "sft"]
    assert (C.base_checkpoint(df), C.base_reason(df), C.final_checkpoint(df)) == ("base", "base phase", "sft")
    assert (C.checkpoint_label(df, "base"), C.checkpoint_label(df, "sft")) == ("base", "SFT step 200")
    kn = key_numbers(df)
    assert (kn["base"], kn["final"], kn["base_reason"]) == ("base", "sft", "base phase")
    assert kn["pass@k"][1]["base"]["value"] == 0.25 and kn["pass@k"][1]["final"]["value"] == 0.69
    assert kn["entropy_fork"]["indecipherable"]["base"]["value"] == 0.86
    text = write_report(df, tmp_path).read_text()
    assert "Base: `base` (the model before SFT). Final: `sft`." in text
    assert "| measure | base `base` | final `sft` |" in text
    assert "| pass@1 (fraction of problems, 95% CI) | 0.250 [0.230, 0.270] | 0.690 [0.670, 0.710] |" in text
    assert "| pass@16 (fraction of problems, 95% CI) | 0.900 [0.880, 0.920] | 0.750 [0.730, 0.770] |" in text
    assert "| entropy at indecipherable forks (nats) | 0.860 | 0.560 |" in text
    assert "pass@1 changed by +0.440 and pass@16 by -0.150 (coverage shrank)" in text


def test_native_series_base_is_sft_step_0():
    names = [("sft-step000100", "sft", 100), ("sft-step000000", "sft", 0), ("pretrain-step002500", "pretrain", 2500)]
    df = series_table(names, pass1=[0.6, 0.4, 0.3], pass16=[0.7, 0.9, 0.8])
    assert C.checkpoint_order(df) == ["pretrain-step002500", "sft-step000000", "sft-step000100"]
    assert (C.base_checkpoint(df), C.base_reason(df)) == ("sft-step000000", "sft step 0")
    assert C.final_checkpoint(df) == "sft-step000100"
    assert C.checkpoint_label(df, "pretrain-step002500") == "pretrain step 2500"
    # the order is training.phases': pretrain < base < sft < anything else
    mixed = series_table([("rl", "rl", 5), ("b", "base", 0), ("s", "sft", 0), ("p", "pretrain", 9)], [0.1] * 4, [0.2] * 4)
    assert C.checkpoint_order(mixed) == ["p", "b", "s", "rl"]


def test_only_sft_steps_the_earliest_stands_in_and_the_report_says_so(tmp_path):
    df = series_table([("sft-step003000", "sft", 3000), ("sft-step000400", "sft", 400)], pass1=[0.7, 0.5], pass16=[0.8, 0.85])
    assert (C.base_checkpoint(df), C.base_reason(df), C.final_checkpoint(df)) == ("sft-step000400", "earliest", "sft-step003000")
    kn = key_numbers(df)
    assert kn["base_reason"] == "earliest" and kn["pass@k"][1]["base"]["value"] == 0.5
    text = write_report(df, tmp_path).read_text()
    assert f"Base: `sft-step000400` ({EARLIEST_SENTENCE}). Final: `sft-step003000`." in text
    assert "(the model before SFT)" not in text


def test_last_pretrain_is_the_base_without_sft_step_0():
    df = series_table([("pretrain-step001000", "pretrain", 1000), ("pretrain-step000500", "pretrain", 500), ("sft-step000050", "sft", 50)],
                      pass1=[0.3, 0.2, 0.5], pass16=[0.9, 0.8, 0.7])
    assert (C.base_checkpoint(df), C.base_reason(df)) == ("pretrain-step001000", "last pretrain")
    assert C.checkpoint_label(df, "pretrain-step000500") == "pretrain step 500"


# ----------------------------------------------------------------- sweeps


def _sweep_group(task: str, seed: int, checkpoints: list[tuple[str, str, int]], pass1: list[float], pass16: list[float]) -> pd.DataFrame:
    return series_table(checkpoints, pass1, pass16, sweep=dict(task=task, prevalence=1.0, policy="canonical", seed=seed))


def test_sweep_base_mask_follows_the_same_rule():
    groups = {
        ("a", 0): ([("pretrain-step001000", "pretrain", 1000), ("sft-step000000", "sft", 0), ("sft-step000100", "sft", 100)], [0.1, 0.2, 0.5], [0.9, 0.95, 0.7]),
        ("a", 1): ([("pretrain-step000500", "pretrain", 500), ("pretrain-step001000", "pretrain", 1000), ("sft-step000100", "sft", 100)], [0.1, 0.3, 0.5], [0.8, 0.9, 0.6]),
        ("b", 0): ([("base-a", "base", 0), ("base-b", "base", 10), ("sft-step000200", "sft", 200)], [0.2, 0.25, 0.6], [0.85, 0.88, 0.8]),
        ("b", 1): ([("sft-step000400", "sft", 400), ("sft-step003000", "sft", 3000)], [0.4, 0.7], [0.9, 0.75]),
    }
    df = pd.concat([_sweep_group(t, s, *g) for (t, s), g in groups.items()], ignore_index=True)
    p = df[df["metric"] == "pass@k"]
    mask = sweep_base_mask(p)
    expect = {("a", 0): ("sft", 0, "sft step 0"), ("a", 1): ("pretrain", 1000, "last pretrain"),
              ("b", 0): ("base", 10, "base phase"), ("b", 1): ("sft", 400, "earliest")}
    for (task, seed), (phase, step, reason) in expect.items():
        entries = [(ph, st) for _, ph, st in groups[(task, seed)][0]]
        i, why = base_position(entries)
        assert (entries[i], why) == ((phase, step), reason)  # the rule itself
        g = p[(p["task"] == task) & (p["seed"] == seed)]
        assert set(map(tuple, g.loc[mask[g.index], ["phase", "step"]].drop_duplicates().to_numpy())) == {(phase, step)}
    shrink = sweep_shrinkage(df).set_index(["task", "seed"])
    # the base's numbers on the base side; phases before SFT (the other pretrain / base rows) never count as SFT
    assert shrink.loc[("a", 1), ["base_pass1", "base_passk", "final_step"]].tolist() == [0.3, 0.9, 100]
    assert shrink.loc[("b", 0), ["base_pass1", "base_passk", "final_step"]].tolist() == [0.25, 0.88, 200]
    assert shrink.loc[("b", 1), ["base_passk", "final_passk", "final_step"]].tolist() == [0.9, 0.75, 3000]
    assert shrink.loc[("a", 0), "shrinkage"] == pytest.approx(0.95 - 0.7)


# ----------------------------------------------------------------- figure registry


def test_registry_scopes_captions_and_order():
    specs = registry.specs()
    assert all(s.scope in registry.SCOPES for s in specs) and set(registry.SCOPES) == {"run", "sweep"}
    assert all(isinstance(s.caption, str) and s.caption.strip() for s in specs)
    assert F.FIGURES == tuple(s.stem for s in specs) == registry.stems()
    assert F.FIGURES == ("coverage_curves", "dynamics", "lens_mass_top_branch", "lens_mass_valid", "probes",
                         "entropy_vs_coverage", "lens_kl", "branch_value", "patching", "shrinkage_vs_prevalence",
                         "sweep_coverage")
    by = {s.stem: s for s in specs}
    assert by["lens_mass_top_branch"].fn is by["lens_mass_valid"].fn is F.lens_heatmap  # one function, two stems
    assert [s.stem for s in specs if s.scope == "sweep"] == ["shrinkage_vs_prevalence", "sweep_coverage"]
    with pytest.raises(ValueError, match="scope"):
        registry.figure("x", scope="page", caption="c")


def test_report_captions_come_from_the_registry(tmp_path):
    df = synthetic_results(n_checkpoints=2, lens=False, probes=False)
    files = [tmp_path / f"{stem}.png" for stem in F.FIGURES]
    text = write_report(df, tmp_path, figure_files=files).read_text()
    for spec in registry.specs():
        assert f"### {spec.stem}\n\n{spec.caption}\n" in text


@pytest.fixture
def attempted(monkeypatch) -> list[str]:
    """Stems make_figures tries to draw; drawing itself is refused (fast, and nothing is written)."""
    seen: list[str] = []

    def draw(self, df):
        seen.append(self.stem)
        raise UsageError("not drawn in this test")

    monkeypatch.setattr(registry.FigureSpec, "draw", draw)
    return seen


def test_make_figures_draws_only_its_scope(attempted, tmp_path):
    run = synthetic_results(n_checkpoints=2, lens=False, probes=False)
    files, skipped = F.make_figures(run, tmp_path / "run", formats=("png",))
    assert files == [] and attempted == [s.stem for s in registry.specs() if s.scope == "run"]
    for stem in ("shrinkage_vs_prevalence", "sweep_coverage"):
        assert f"skipped {stem}: no sweep columns (task, prevalence, policy, seed) in the table" in skipped
    attempted.clear()
    files, skipped = F.make_figures(synthetic_sweep(tasks=("arith",), seeds=(0,)), tmp_path / "sweep", formats=("png",))
    assert files == [] and attempted == ["shrinkage_vs_prevalence", "sweep_coverage"]
    run_stems = [s.stem for s in registry.specs() if s.scope == "run"]
    assert [s.split(":")[0] for s in skipped if "this is a sweep table" in s] == [f"skipped {s}" for s in run_stems]


def test_make_figures_refuses_a_file_as_out_dir(attempted, tmp_path):
    df = synthetic_results(n_checkpoints=2, lens=False, probes=False)
    target = tmp_path / "figures"
    target.write_text("not a directory")
    for out in (target, target / "sub"):
        with pytest.raises(UsageError, match="which is a file|is a file, not a directory") as exc:
            F.make_figures(df, out)
        assert "\n" not in str(exc.value) and "out_dir" in str(exc.value)
    assert attempted == []  # nothing drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures"] and target.read_text() == "not a directory"


def test_table_helpers_refuse_what_they_cannot_read():
    with pytest.raises(UsageError, match="missing column"):
        C.require_columns(pd.DataFrame({"value": [1.0]}))
    with pytest.raises(UsageError, match="empty"):
        C.require_columns(to_frame([]))
    assert C.pick_k([1, 2, 4, 16, 32]) == 16 and C.pick_k([1, 2, 8]) == 8
