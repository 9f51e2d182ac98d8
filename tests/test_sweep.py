"""probes sweep --quick end to end: a combined table with the grid's columns, and its figures."""

import pandas as pd
import pytest

from training.errors import UsageError


def test_quick_sweep_table(quick_sweep):
    out, df = quick_sweep
    assert {"task", "prevalence", "policy", "seed", "strategy"} <= set(df.columns)
    from training.tasks import task_names

    assert set(df.task) == {"graph", "modes"} & set(task_names())
    cells = df[df.prevalence.notna()].groupby(["task", "prevalence", "policy", "seed"]).size()
    assert len(cells) == len(set(df.task)) * 2 * 2  # prevalence {0, 1} x {canonical, balanced} x 1 seed
    assert set(df.strategy.dropna()) - {""} == {"temperature:1", "fork_stratified:0.3,4,0.9"}
    base = df[df.prevalence.isna()]
    assert (base.step == 0).all() and (base.phase == "sft").all()
    assert pd.read_parquet(out / "results.parquet").shape == df.shape


def test_quick_sweep_figures_and_resume(quick_sweep, tmp_path):
    from probes.api import figures, sweep

    out, df = quick_sweep
    files, skipped, report = figures(out, out=tmp_path / "fig", formats=["png"], log=lambda *_: None)
    names = {f.stem for f in files}
    assert {"shrinkage_vs_prevalence", "sweep_coverage"} <= names
    text = report.read_text()
    for task in set(df.task):  # a table per task: a row per policy x strategy, ρ the last column
        block = text.split(f"**{task}**", 1)[1].split("**", 1)[0]
        assert "| policy | strategy | prevalence 0 | prevalence 1 | Spearman ρ |" in block
        assert "| canonical | `temperature:1` |" in block
    # a second call finds every cell done and rebuilds the same table
    again = sweep(out=out, quick=True, workers=1, progress=False, log=lambda *_: None)
    pd.testing.assert_frame_equal(df, again)


def test_bad_sweep_input(tmp_path):
    from probes.api import sweep

    with pytest.raises(UsageError, match="workers"):
        sweep(out=tmp_path, quick=True, workers=-1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"prevalence": [0, 2]}')
    with pytest.raises(UsageError, match="prevalence"):
        sweep(config=str(bad), out=tmp_path / "o")
    bad.write_text('{"grid": 1}')
    with pytest.raises(UsageError, match="unknown sweep config key"):
        sweep(config=str(bad), out=tmp_path / "o")


def test_quick_sweep_resumes_from_a_kill_to_the_same_table(quick_sweep, tmp_path):
    """A sweep killed part-way (a cell's SFT unfinished and unmeasured, a checkpoint half-saved,
    a table half-written) and started again ends with the uninterrupted table."""
    import shutil

    from probes.api import sweep

    out, df = quick_sweep
    work = tmp_path / "sweep"
    shutil.copytree(out, work)
    cell = sorted(p for p in (work / "graph" / "seed0").iterdir() if p.name.startswith("p1.00"))[0]
    shutil.rmtree(cell / "results")
    final = sorted((cell / "checkpoints").glob("sft-step*"))[-1]
    shutil.rmtree(final)  # the cell's training never reached its last step
    (cell / "checkpoints" / f".{final.name}.killed").mkdir()
    (work / ".results.parquet.x.tmp").write_bytes(b"half")
    (work / "results.parquet").unlink()
    again = sweep(out=work, quick=True, workers=1, progress=False, log=lambda *_: None)
    pd.testing.assert_frame_equal(df.drop(columns="run"), again.drop(columns="run"))
    assert list(df["run"]) == list(again["run"])
    assert not [p for p in (cell / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not list(work.glob(".*.tmp"))
