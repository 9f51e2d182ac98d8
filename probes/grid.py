"""``probes sweep``: fork prevalence x demonstration policy x seed, one SFT run per grid cell.

One base model per task and seed is pretrained once and shared by every cell (and its eval set
with it); each cell fine-tunes it and its final checkpoint is measured with the default and the
diversity-encouraging strategies. Cells are independent, so ``workers`` processes run them side
by side; every step resumes (training from checkpoints, measurement from finished tables), so an
interrupted sweep picks up with the cells it has.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from training.errors import UsageError
from training.io import atomic_write, remove_temporaries, write_json


@dataclass
class SweepConfig:
    tasks: list[str] = field(default_factory=lambda: ["graph", "modes"])
    prevalence: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    policy: list[str] = field(default_factory=lambda: ["canonical", "balanced"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    strategies: list[str] = field(default_factory=lambda: ["temperature:1.0"])
    samples: int = 32
    overrides: list[str] = field(default_factory=list)
    """Config overrides applied to every task's embedded config (e.g. a shorter SFT)."""


def load_sweep_config(path: str | None, quick: bool) -> SweepConfig:
    if path:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"no sweep config file {path!r}; give a JSON file like training/configs/sweep.json")
        text = p.read_text(encoding="utf-8")
    else:
        text = resources.files("training.configs").joinpath("sweep-quick.json" if quick else "sweep.json").read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"sweep config {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"sweep config {path}: expected a JSON object like training/configs/sweep.json")
    known = set(SweepConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UsageError(f"unknown sweep config key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    for key, kind in _LIST_KEYS.items():
        if key in raw and (not isinstance(raw[key], list) or not all(_is(kind, v) for v in raw[key])):
            raise UsageError(f"sweep config key {key!r} takes a list of {kind}s (e.g. {json.dumps(getattr(SweepConfig(), key))}), "
                             f"got {json.dumps(raw[key])}")
    if "samples" in raw and (not _is("whole number", raw["samples"]) or raw["samples"] < 1):
        raise UsageError(f"sweep config key 'samples' takes a whole number ≥ 1, got {raw.get('samples')!r}")
    cfg = SweepConfig(**raw)
    for p in cfg.prevalence:
        if not 0.0 <= p <= 1.0:
            raise UsageError(f"sweep prevalence values must be in [0, 1], got {p!r}")
    for pol in cfg.policy:
        if pol not in ("canonical", "balanced", "paired"):
            raise UsageError(f"sweep policy {pol!r} is not canonical, balanced or paired")
    if not cfg.tasks or not cfg.seeds or not cfg.prevalence or not cfg.policy or not cfg.strategies:
        raise UsageError("a sweep needs at least one task, seed, prevalence, policy and strategy")
    from hooks.strategies import parse_strategy

    cfg.strategies = [str(parse_strategy(x)) for x in cfg.strategies]  # refused here, before any training
    return cfg


_LIST_KEYS = {"tasks": "string", "prevalence": "number", "policy": "string", "seeds": "whole number",
              "strategies": "string", "overrides": "string"}


def _is(kind: str, v: Any) -> bool:
    if kind == "string":
        return isinstance(v, str)
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, int) and not isinstance(v, bool)


def _cell_name(prevalence: float, policy: str) -> str:
    return f"p{prevalence:.2f}-{policy}"


def _task_config(task: str, seed: int, overrides: list[str], extra: list[str]):
    from training.config import load_config

    return load_config(task, [f"seed={seed}", *overrides, *extra])


def _base_job(args: tuple) -> str:
    task, seed, overrides, root, device, threads = args
    _threads(threads)
    from training.train import train

    cfg = _task_config(task, seed, overrides, ["sft.steps=0", "sft.n_log_checkpoints=0"])
    out = Path(root) / task / f"seed{seed}" / "base"
    train(cfg, out, device=device, progress=False, log=lambda *_: None)
    return str(out / "checkpoints" / "sft-step000000")


def _cell_job(args: tuple) -> str:
    task, seed, prevalence, policy, overrides, root, base, device, threads = args
    _threads(threads)
    from training.train import train

    cfg = _task_config(task, seed, overrides, [f"data.prevalence={prevalence}", f"data.policy={policy}"])
    out = Path(root) / task / f"seed{seed}" / _cell_name(prevalence, policy)
    train(cfg, out, device=device, progress=False, log=lambda *_: None, base_from=base)
    final = max((out / "checkpoints").glob("sft-step*"), key=lambda p: p.name)
    return str(final)


def _measure_job(args: tuple) -> str:
    checkpoint, out, eval_file, strategies, samples, columns, device, threads = args
    _threads(threads)
    from probes.runner import run

    run([checkpoint], out=out, eval=eval_file, strategies=strategies, samples=samples, device=device,
        progress=False, log=lambda *_: None, extra_columns=columns)
    return out


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _map(fn: Callable, jobs: list, workers: int, log: Callable[[str], None], what: str, progress: bool = False) -> list:
    """``fn`` over ``jobs`` in order (a spawn process pool when workers > 1), a line per finished job."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), desc=what, leave=False, disable=not progress)
    out = []

    def done(r: Any) -> None:
        out.append(r)
        bar.update(1)
        log(f"{what}: {len(out)}/{len(jobs)} done ({time.perf_counter() - t0:.0f}s)")

    try:
        if workers <= 1 or len(jobs) <= 1:
            for j in jobs:
                done(fn(j))
            return out
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for r in pool.map(fn, jobs):
                done(r)
        return out
    finally:
        bar.close()


def sweep(
    config: str | None = None,
    out: str | Path = "runs/sweep",
    task: str | None = None,
    workers: int = 0,
    quick: bool = False,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Run the grid and write one combined table (``task, prevalence, policy, seed`` columns added)."""
    from training.tasks import task_names

    cfg = load_sweep_config(config, quick)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UsageError(f"--workers must be a whole number ≥ 0 (0 = one per CPU core), got {workers!r}")
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    tasks = [task] if task else cfg.tasks
    for t in tasks:
        if t not in task_names():
            raise UsageError(f"unknown task {t!r}; known: {', '.join(task_names())}")
    threads = 1
    t0 = time.perf_counter()
    for t in tasks:  # fail fast on a bad override before any process starts or anything is written
        _task_config(t, cfg.seeds[0], cfg.overrides, [])
    root = Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write to --out {root}: {e.strerror}") from None
    remove_temporaries(root)  # what a kill during a table write leaves

    base_jobs = [(t, s, cfg.overrides, str(root), device, threads) for t in tasks for s in cfg.seeds]
    bases = dict(zip([(t, s) for t, s, *_ in base_jobs], _map(_base_job, base_jobs, workers, log, "base models", progress)))
    cell_jobs = [
        (t, s, p, pol, cfg.overrides, str(root), bases[(t, s)], device, threads)
        for t in tasks for s in cfg.seeds for p in cfg.prevalence for pol in cfg.policy
    ]
    finals = _map(_cell_job, cell_jobs, workers, log, "SFT cells", progress)

    from training.checkpoint import read_checkpoint

    measure = []
    for (t, s), base in bases.items():
        _, meta, _ = read_checkpoint(base)
        eval_file = str((Path(base) / meta["data_dir"] / meta["eval_file"]).resolve())
        cols = {"task": t, "prevalence": math.nan, "policy": "", "seed": s}
        measure.append((base, str(Path(base).parent.parent / "results"), eval_file, cfg.strategies, cfg.samples, cols, device, threads))
        for job, final in zip(cell_jobs, finals):
            if job[0] == t and job[1] == s:
                cols = {"task": t, "prevalence": float(job[2]), "policy": job[3], "seed": s}
                measure.append((final, str(Path(final).parent.parent / "results"), eval_file, cfg.strategies, cfg.samples, cols, device, threads))
    result_dirs = _map(_measure_job, measure, workers, log, "measured", progress)

    frames = [pd.read_parquet(Path(d) / "results.parquet") for d in result_dirs]
    df = pd.concat(frames, ignore_index=True)
    df["run"] = [str(Path(d).parent.relative_to(root)) for d, f in zip(result_dirs, frames) for _ in range(len(f))]
    atomic_write(root / "results.parquet", lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(root / "results.csv", lambda tmp: df.to_csv(tmp, index=False))
    from probes.runner import versions

    write_json(root / "manifest.json", {
        "sweep": cfg.__dict__, "tasks": tasks, "workers": workers,
        "timings": {"total_seconds": round(time.perf_counter() - t0, 1)}, "versions": versions(),
        "config": _task_config(tasks[0], cfg.seeds[0], cfg.overrides, []).to_dict(),
    })
    log(f"sweep finished in {time.perf_counter() - t0:.0f}s: {len(cell_jobs)} cells, table {root / 'results.parquet'}")
    return df
