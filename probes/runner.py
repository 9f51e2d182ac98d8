"""``probes run``: measure every checkpoint on one annotated eval set, into one tidy table.

Everything that can be checked is checked before anything is written (checkpoints, eval set,
verifier, strategies, devices, context lengths), so a mistake is one line and leaves ``--out`` as
it was. Then :class:`probes.results_dir.ResultsDir` holds the directory's contract: each
finished checkpoint's rows are written atomically with the identity they were measured under, a
rerun reuses only what matches, and a run killed at any moment and started again ends with the
table of an uninterrupted one.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from analysis.measure import fork_rows, sample_outcomes, sample_rows, seed_for, teacher_forced
from analysis.table import to_frame
from hooks.load import load
from hooks.record import CheckpointRecord
from probes.results_dir import ResultsDir, iter_labels, load_results  # noqa: F401  (load_results: public API)
from training.errors import UsageError
from probes.run_plan import (  # noqa: F401  (DEFAULT_*, eval_from_meta, plan_run: public through this module too)
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_SAMPLES,
    DEFAULT_STRATEGY,
    RunPlan,
    eval_from_meta,
    plan_run,
    skipped_text,
)

def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("fork-probes", "torch", "transformer-lens", "nnsight", "transformers", "numpy", "pandas", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def run(
    checkpoints: Sequence[str | Path] | str,
    out: str | Path | None = None,
    eval: str | Path | None = None,
    samples: int | None = None,
    strategies: Sequence[str] | str | None = None,
    device: str | None = None,
    force: bool = False,
    progress: bool = True,
    k: Sequence[int] | None = None,
    dtype: str | None = None,
    verifier: str | None = None,
    answer_prefix: str = "answer",
    seed: int = 0,
    batch_size: int = 64,
    n_boot: int = 1000,
    probes: bool = True,
    extra_columns: dict[str, Any] | None = None,
    max_new_tokens: int | None = None,
    stop: Sequence[str] | str | None = None,
    chat_template: bool = False,
    forcing: int = 0,
    reference: str | Path | None = None,
    tuned_lens: bool = True,
    patching: bool = False,
    executor: str = "local",
    address: str | None = None,
    resources: str | dict[str, float] | None = None,
    workers: int = 0,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Measure checkpoints (native or Hugging Face directories, paths or globs) on an eval set.

    Returns the tidy table (also saved under ``out``, with every sample in ``samples.parquet``).
    ``extra_columns`` are constant columns added to every row (sweeps use it for task,
    prevalence, policy, seed). ``force`` measures finished checkpoints again, and lets a
    directory measured under other settings be replaced. ``max_new_tokens`` (default: a native
    task's own bound, else the model's generation config, else 512), ``stop`` strings and
    ``chat_template`` (each prompt becomes the user turn of the tokenizer's chat template) shape
    the sampling. ``forcing`` (m ≥ 2) adds branch forcing at each first fork: m continuations
    per branch (``analysis.forcing``). ``reference`` is the model ``ref_mix`` and ``patching``
    compare with (default: the series' base checkpoint). ``tuned_lens`` (native checkpoints, or
    any with a task generator) fits per-layer translators per checkpoint, cached under
    ``out/tuned_lens``; ``patching`` patches the reference's residual into each checkpoint at
    its forks, layer by layer (``analysis.patching``). ``executor="ray"`` measures the
    checkpoints as parallel Ray tasks (``address``, ``resources`` and ``workers`` as for
    ``probes sweep``), each writing its own part; the table is written once at the end, the same
    as a serial run's.
    """
    settings = dict(checkpoints=checkpoints, out=out, eval=eval, samples=samples, strategies=strategies,
                    device=device, k=k, dtype=dtype, verifier=verifier, answer_prefix=answer_prefix, seed=seed,
                    n_boot=n_boot, probes=probes, extra_columns=extra_columns, max_new_tokens=max_new_tokens,
                    stop=stop, chat_template=chat_template, forcing=forcing, reference=reference,
                    tuned_lens=tuned_lens, patching=patching)
    if executor not in ("local", "ray"):
        raise UsageError(f"unknown executor {executor!r}; use local or ray")
    if executor == "local" and (address is not None or resources is not None):
        raise UsageError("--address and --resources go with --executor ray")
    plan = plan_run(**settings)
    results = ResultsDir.open(plan.out, plan.identity, force=force)
    total = sum(len(p.decision_points) for p in plan.problems)
    skipped = skipped_text(plan.report, total)
    if skipped:
        log(f"{plan.eval_path.name}: {skipped}")
    frames: dict[str, pd.DataFrame] = {}
    todo = []
    for rec, label in zip(plan.records, plan.labels):
        done = results.part_identity(label)
        if done is not None and not force:
            if done.get("identity") != rec.identity or done.get("settings") != results.settings_hash:
                raise UsageError(
                    f"{plan.out} already holds a measurement named {label} of another checkpoint "
                    f"({done.get('path')}; weights, config or meta.json differ from {rec.path}: replaced in place, "
                    "or another run's); pass --force to measure it again, or choose another --out")
            frames[label] = results.read_part(label)
            results.manifest["checkpoints"].setdefault(label, {**_checkpoint_info(rec), "meta": rec.meta})
            log(f"{label}: already measured, skipped (--force measures it again)")
            continue
        todo.append((rec, label))
    knobs = dict(seed=seed, batch_size=batch_size, n_boot=n_boot, probes=probes, extra_columns=extra_columns)
    if executor == "local":
        ref_model = None
        if todo and plan.reference is not None:
            ref_model = load(plan.reference, device=plan.device, dtype=plan.dtype, progress=progress)
        for rec, label in todo:
            df, info, seconds = _measure_and_write(plan, results, rec, label, ref_model, progress=progress, log=log, **knobs)
            frames[label] = df
            _record(results, rec, label, info, seconds)
            _write_table(results, frames, plan)
            log(summary_line(df, label, rec.step, plan.strategies[0], seconds) + (f"; {skipped}" if skipped else ""))
    elif todo:
        from probes.executors import make_executor

        results.prepare()  # the driver resets and writes the manifest once; the tasks write their own parts
        jobs = [({**settings, "out": str(plan.out)}, knobs, label) for _, label in todo]
        with make_executor(executor, workers=workers or max(1, min(os.cpu_count() or 1, 8)), address=address,
                           resources=resources, device=device) as ex:
            outs = ex.map(_measure_task, jobs, log=lambda *_: None, what="checkpoints", progress=progress)
        by_label = {rec_label: rec for rec, rec_label in todo}
        for label, info, seconds in outs:
            frames[label] = results.read_part(label)
            _record(results, by_label[label], label, info, seconds)
            log(summary_line(frames[label], label, by_label[label].step, plan.strategies[0], seconds))
    return _write_table(results, frames, plan)


def _record(results: ResultsDir, rec: CheckpointRecord, label: str, info: dict[str, Any], seconds: float) -> None:
    results.manifest["checkpoints"][label] = {**info, "meta": rec.meta}
    results.manifest["timings"][label] = round(seconds, 2)


def _measure_and_write(plan: RunPlan, results: ResultsDir, rec: CheckpointRecord, label: str, ref_model: Any, *,
                       seed: int, batch_size: int, n_boot: int, probes: bool, extra_columns: dict[str, Any] | None,
                       progress: bool, log: Callable[[str], None]) -> tuple[pd.DataFrame, dict[str, Any], float]:
    """Measure one checkpoint and write its part (rows and samples) atomically; then its caches."""
    t0 = time.perf_counter()
    pending: list[Callable[[], Any]] = []
    model = load(rec, device=plan.device, dtype=plan.dtype, progress=progress)
    where = {"checkpoint": label, "phase": rec.phase, "step": rec.step, "format": rec.format, **(extra_columns or {})}
    rows, samples_df = measure_checkpoint(model, plan.encoded, plan.verifier, plan.strategies, plan.samples,
                                          plan.ks, seed, label, where, batch_size, n_boot, probes, progress,
                                          max_new_tokens=plan.max_new_tokens, stop=plan.stop,
                                          forcing=plan.forcing, reference=ref_model,
                                          tuned_lens_dir=plan.out / "tuned_lens" / label if plan.tuned_lens else None,
                                          eval_problems=plan.problems, patching=plan.patching, log=log,
                                          probe_train=plan.probe_train, after_write=pending)
    df = to_frame(rows)
    info = _checkpoint_info(rec)
    results.write_part(label, df, info, samples_df)
    for save in pending:  # caches beside the results, only for a measurement that finished
        save()
    return df, info, time.perf_counter() - t0


def _measure_task(job: tuple[dict[str, Any], dict[str, Any], str]) -> tuple[str, dict[str, Any], float]:
    """One checkpoint as an executor task (Ray): plan the run again in the worker (the same inputs
    give the same plan), measure that checkpoint and write its own part; the driver writes the table."""
    settings, knobs, label = job
    plan = plan_run(**settings)
    rec = plan.records[plan.labels.index(label)]
    results = ResultsDir.attach(plan.out, plan.identity)
    ref_model = load(plan.reference, device=plan.device, dtype=plan.dtype) if plan.reference is not None else None
    _, info, seconds = _measure_and_write(plan, results, rec, label, ref_model, progress=False, log=lambda *_: None, **knobs)
    return label, info, seconds


def _checkpoint_info(rec: CheckpointRecord) -> dict[str, Any]:
    return {"identity": rec.identity, "path": str(rec.path.resolve()), "format": rec.format, "phase": rec.phase,
            "step": rec.step}


def measure_checkpoint(model, encoded, verify, strategies, n, ks, seed, label, where, batch_size=64,
                       n_boot=1000, probes=True, progress=True, max_new_tokens=None,
                       stop=(), forcing=0, reference=None, tuned_lens_dir=None, eval_problems=None, patching=False,
                       log=lambda *_: None, probe_train=None,
                       after_write: list | None = None) -> tuple[list[dict], pd.DataFrame]:
    """All rows of one checkpoint (fork metrics, logit lens, probes, then sampled metrics), and
    its samples (one row per strategy x problem x sample). What is to be saved beside the results
    (a fitted tuned lens) is appended to ``after_write``, to run once the rows are written."""
    after_write = [] if after_write is None else after_write
    from tqdm.auto import tqdm

    bar = tqdm(total=2 + len(strategies) + bool(forcing), desc=label, leave=False, disable=not progress)
    rng = np.random.default_rng(seed_for(seed, label, "bootstrap"))
    cap = teacher_forced(model, encoded, batch_size=batch_size)
    bar.update(1)
    rows = fork_rows(cap, where, rng, n_boot=n_boot)
    if probes and len(cap.problem):
        from probes.linear import probe_rows

        rows += probe_rows(model, cap, encoded, probe_train, where, np.random.default_rng(seed_for(seed, label, "probes")),
                           n_boot=n_boot)
    if tuned_lens_dir is not None and len(cap.problem):
        from analysis.tuned_lens import tuned_lens_rows
        from analysis.tuned_lens_fit import tuned_lens_for

        lens = tuned_lens_for(model, tuned_lens_dir, seed=seed, exclude=eval_problems, log=log, save=False)
        after_write.append(lambda: lens.save(tuned_lens_dir / model.name))
        rows += tuned_lens_rows(model, lens, cap, encoded, where, np.random.default_rng(seed_for(seed, label, "tuned_lens")),
                                n_boot=n_boot)
    if patching and reference is not None and reference.record.identity != model.record.identity and len(cap.problem):
        from analysis.patching import patch_rows

        rows += patch_rows(model, reference, encoded, where, np.random.default_rng(seed_for(seed, label, "patching")),
                           n_boot=n_boot, batch_size=batch_size, log=log)
    bar.update(1)
    samples = []
    for strategy in strategies:
        outcome = sample_outcomes(model, encoded, verify, strategy, n, seed_for(seed, strategy, "sample"),
                                  max_new_tokens=max_new_tokens, stop_strings=stop, reference=reference)
        rows += sample_rows(outcome, strategy, where, rng, ks=ks, n_boot=n_boot)
        samples.append(pd.DataFrame(outcome.records).assign(strategy=strategy))
        bar.update(1)
    if forcing:
        from analysis.forcing import forcing_outcomes, forcing_rows
        from analysis.measure import native_budget

        budget = max_new_tokens or native_budget(encoded, getattr(model, "n_ctx", None))
        forced = forcing_outcomes(model, encoded, verify, forcing, seed_for(seed, strategies[0], "forcing"),
                                  strategies[0], budget, stop)
        rows += forcing_rows(forced, cap, encoded, strategies[0], ks, where, n_boot=n_boot)
        bar.update(1)
    bar.close()
    return rows, samples_frame(samples, where)


SAMPLE_COLUMNS = ("checkpoint", "phase", "step", "strategy", "problem", "sample", "kind", "text", "finished",
                  "correct", "fork_reached", "fork_branch", "fork_valid", "n_tokens")


def samples_frame(frames: list[pd.DataFrame], where: dict[str, Any]) -> pd.DataFrame:
    """Samples in ``SAMPLE_COLUMNS`` order (extra columns, a sweep's, after them)."""
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SAMPLE_COLUMNS)
    for key, value in where.items():
        if key != "format":
            df[key] = value
    df["fork_valid"] = df["fork_valid"].astype("boolean")
    return df[list(SAMPLE_COLUMNS) + [c for c in df.columns if c not in SAMPLE_COLUMNS]]


def _value(df: pd.DataFrame, metric: str, kind: str = "all", k: int | None = None, strategy: str | None = None) -> float:
    sel = (df["metric"] == metric) & (df["kind"] == kind)
    if k is not None:
        sel &= df["k"] == k
    if strategy is not None:
        sel &= df["strategy"] == strategy
    vals = df.loc[sel, "value"]
    return float(vals.iloc[0]) if len(vals) else float("nan")


def summary_line(df: pd.DataFrame, label: str, step: int, strategy: str, seconds: float) -> str:
    ks = sorted(int(x) for x in df.loc[df["metric"] == "pass@k", "k"].dropna().unique())
    big = 16 if 16 in ks else (ks[-1] if ks else 1)
    return (
        f"{label}: step {step}, pass@1 {_value(df, 'pass@k', k=1, strategy=strategy):.3f}, "
        f"pass@{big} {_value(df, 'pass@k', k=big, strategy=strategy):.3f}, "
        f"entropy_fork {_value(df, 'entropy_fork', 'indecipherable'):.3f} nats (indecipherable), "
        f"{_value(df, 'entropy_fork'):.3f} (all) [{seconds:.1f}s]"
    )


def _write_table(results: ResultsDir, frames: dict[str, pd.DataFrame], plan: RunPlan) -> pd.DataFrame:
    total = sum(len(p.decision_points) for p in plan.problems)
    extra = {
        "eval": {"path": str(plan.eval_path.resolve()), "sha256": plan.identity["eval_sha256"],
                 "decision_points": total, **plan.report.to_dict()},
        "seeds": {"run": plan.identity["seed"], "bootstrap/probes/sampling": "crc32 of (seed, checkpoint or strategy)"},
        "versions": versions(),
        "command": " ".join(sys.argv),
    }
    first_exp = next((r.experiment for r in plan.records if r.experiment), None)
    if first_exp:
        extra["config"] = first_exp
    return results.write_table(frames, extra)
