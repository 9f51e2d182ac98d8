"""``probes sweep``: fork prevalence x demonstration policy x seed, one SFT run per grid cell.

One base model per task and seed is pretrained once and shared by every cell (and its eval set
with it); each cell fine-tunes it and its final checkpoint is measured with the default and the
diversity-encouraging strategies. Cells are independent, so ``workers`` processes run them side
by side, or Ray tasks on a cluster (``executor="ray"``, see ``probes.executors``); every step
resumes (training from checkpoints, measurement from finished tables), so an interrupted sweep
picks up with the cells it has, and a retried task finds its own finished work.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from probes.executors import Executor, Job, make_executor
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
    alphas: list[float] = field(default_factory=list)
    """Weight interpolation (WiSE-FT) of each cell's final checkpoint towards its base: one
    interpolated checkpoint per alpha (0 = the base, 1 = the SFT model), measured like the cell."""
    eval_size: int = 0
    """When > 0, also measure every base and final checkpoint (default strategy only) on a larger
    held-out set of this many problems, into ``results-eval<N>.parquet`` (is a ρ a noise floor?)."""


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
    for key, low in (("samples", 1), ("eval_size", 0)):
        if key in raw and (not _is("whole number", raw[key]) or raw[key] < low):
            raise UsageError(f"sweep config key {key!r} takes a whole number ≥ {low}, got {raw.get(key)!r}")
    cfg = SweepConfig(**raw)
    for p in cfg.prevalence:
        if not 0.0 <= p <= 1.0:
            raise UsageError(f"sweep prevalence values must be in [0, 1], got {p!r}")
    for pol in cfg.policy:
        if pol not in ("canonical", "balanced", "paired"):
            raise UsageError(f"sweep policy {pol!r} is not canonical, balanced or paired")
    for a in cfg.alphas:
        if not 0.0 <= a <= 1.0:
            raise UsageError(f"sweep alphas must lie in [0, 1] (0 = the base, 1 = the SFT model), got {a!r}")
    if not cfg.tasks or not cfg.seeds or not cfg.prevalence or not cfg.policy or not cfg.strategies:
        raise UsageError("a sweep needs at least one task, seed, prevalence, policy and strategy")
    from hooks.strategies import parse_strategy

    cfg.strategies = [str(parse_strategy(x)) for x in cfg.strategies]  # refused here, before any training
    return cfg


_LIST_KEYS = {"tasks": "string", "prevalence": "number", "policy": "string", "seeds": "whole number",
              "strategies": "string", "overrides": "string", "alphas": "number"}


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


def _base_job(task: str, seed: int, overrides: list[str], root: str, device: str | None, threads: int) -> str:
    _threads(threads)
    from training.train import train

    cfg = _task_config(task, seed, overrides, ["sft.steps=0", "sft.n_log_checkpoints=0"])
    out = Path(root) / task / f"seed{seed}" / "base"
    train(cfg, out, device=device, progress=False, log=lambda *_: None)
    return str(out / "checkpoints" / "sft-step000000")


def _cell_job(task: str, seed: int, prevalence: float, policy: str, overrides: list[str], root: str,
              device: str | None, threads: int, base: str) -> str:
    _threads(threads)
    from training.train import train

    cfg = _task_config(task, seed, overrides, [f"data.prevalence={prevalence}", f"data.policy={policy}"])
    out = Path(root) / task / f"seed{seed}" / _cell_name(prevalence, policy)
    train(cfg, out, device=device, progress=False, log=lambda *_: None, base_from=base)
    final = max((out / "checkpoints").glob("sft-step*"), key=lambda p: p.name)
    return str(final)


def _measure_job(strategies: list[str], samples: int, columns: dict[str, Any], device: str | None, threads: int,
                 results: str, checkpoint: str, base: str, eval_file: str | None = None, instruments: bool = True) -> str:
    """Measure one trained checkpoint on its base's eval set (or ``eval_file``), into RUN/<results>.

    The base is the reference of any strategy that compares with one (``ref_mix``).
    """
    _threads(threads)
    from hooks.strategies import parse_strategy
    from probes.runner import run
    from training.checkpoint import read_checkpoint

    if eval_file is None:
        _, meta, _ = read_checkpoint(base)
        eval_file = str((Path(base) / meta["data_dir"] / meta["eval_file"]).resolve())
    run_dir = Path(checkpoint).parent.parent
    out = str(run_dir / results)
    reference = base if any(parse_strategy(x).needs_reference for x in strategies) else None
    run([checkpoint], out=out, eval=eval_file, strategies=strategies, samples=samples, device=device,
        progress=False, log=lambda *_: None, extra_columns=columns, reference=reference, probes=instruments,
        tuned_lens=instruments)
    return out


def _interp_job(alpha: float, threads: int, final: str, base: str) -> str:
    """The cell's final checkpoint interpolated towards its base (beside it, in the cell's run)."""
    _threads(threads)
    from training.interpolate import interpolate

    (path,) = interpolate(base, final, [alpha], log=lambda *_: None)
    return str(path)


def _large_eval_job(n: int, seed: int, base: str) -> str:
    """A held-out set of n problems for the base's task: another stream than the run's own eval
    set, disjoint from the base's training corpora and from that eval set (cells' SFT corpora are
    checked against it when each is measured)."""
    from dataclasses import replace

    from training.checkpoint import read_checkpoint
    from training.config import ExperimentConfig
    from training.schema import read_jsonl, write_jsonl
    from training.synth import make_eval
    from training.tasks import get_task

    cfg, meta, _ = read_checkpoint(base)
    task = get_task(cfg["task"])
    data_dir = (Path(base) / meta["data_dir"]).resolve()
    dest = data_dir / f"eval-{n}.jsonl"
    if dest.is_file():
        return str(dest)
    seen = {task.key(p) for name in ("pretrain.jsonl", "sft.jsonl", "eval.jsonl") if (data_dir / name).is_file()
            for p in read_jsonl(data_dir / name)}
    data = replace(ExperimentConfig.from_dict(cfg["experiment"]).data, n_eval=n)
    problems = make_eval(task, data, seed + 1_000_003, seen)
    write_jsonl(dest, problems)  # atomic: whole or absent
    return str(dest)


def _check_disjoint(cell_checkpoint: str, eval_file: str) -> None:
    from training.schema import read_jsonl
    from training.tasks import get_task
    from training.checkpoint import read_checkpoint

    cfg, meta, _ = read_checkpoint(cell_checkpoint)
    task = get_task(cfg["task"])
    sft = (Path(cell_checkpoint) / meta["data_dir"] / "sft.jsonl").resolve()
    keys = {task.key(p) for p in read_jsonl(eval_file)}
    if sft.is_file() and any(task.key(p) in keys for p in read_jsonl(sft)):
        raise UsageError(f"{eval_file} shares problems with {sft}; it cannot serve as held-out data for that cell")


def _large_measure_job(strategies: list[str], samples: int, columns: dict[str, Any], device: str | None, threads: int,
                       results: str, checkpoint: str, base: str, eval_file: str) -> str:
    _check_disjoint(checkpoint, eval_file)  # pass@k only: the probes and lenses do not need a larger set
    return _measure_job(strategies, samples, columns, device, threads, results, checkpoint, base, eval_file,
                        instruments=False)


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _pass_line(results_dir: str, strategy: str) -> str:
    """pass@1 and pass@16 (over every problem) of one measured checkpoint, under the first strategy."""
    try:
        df = pd.read_parquet(Path(results_dir) / "results.parquet", columns=["metric", "kind", "k", "strategy", "value"])
    except (OSError, ValueError):
        return "no table"
    rows = df[(df.metric == "pass@k") & (df.kind == "all") & (df.strategy == strategy)]

    def at(k: int) -> str:
        v = rows.loc[rows.k == k, "value"]
        return f"{float(v.iloc[0]):.3f}" if len(v) and pd.notna(v.iloc[0]) else "n/a"

    return f"pass@1 {at(1)}, pass@16 {at(16)} ({strategy})"


def sweep(
    config: str | None = None,
    out: str | Path = "runs/sweep",
    task: str | None = None,
    workers: int = 0,
    quick: bool = False,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    executor: "str | Executor" = "local",
    address: str | None = None,
    resources: str | dict[str, float] | None = None,
) -> pd.DataFrame:
    """Run the grid and write one combined table (``task, prevalence, policy, seed`` columns added).

    ``executor``: ``"local"`` (``workers`` processes, 0 = one per core up to 8) or ``"ray"``: every
    base model, cell and measurement a Ray task, a cell depending on its own base and a
    measurement on its training, so cells start as soon as their base is done. With Ray,
    ``address`` names a running cluster (``HOST:PORT`` or ``auto``; None starts a local instance of
    ``workers`` CPUs, or uses the one this process is connected to) and ``resources`` what each task
    reserves (``"cpu=1,gpu=0.25"``; defaults 1 CPU and, for cuda, a quarter of a GPU). Both give the
    same table, and both resume: every task returns at once for what is already on disk.
    """
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
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out {root} is a file; give a directory for the sweep")
    with make_executor(executor, workers=workers, address=address, resources=resources, device=device) as ex:
        try:  # connected and checked (Ray: the address answers, some node has the resources): now write
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot write to --out {root}: {e.strerror}") from None
        remove_temporaries(root)  # what a kill during a table write leaves
        if hasattr(ex, "summary"):
            log(ex.summary())
        home = str(root.resolve())  # tasks may run in another working directory (Ray workers)
        jobs, measured, measured_large = _grid_jobs(cfg, tasks, home, device, threads)
        first = cfg.strategies[0]

        done = [0]

        def report(job: Job, result: Any) -> str | None:  # a line per measured cell: its pass@1 and pass@16
            if job.stage != "measured":
                return None if job.stage != "measured (large eval)" else f"{job.name}: {_pass_line(result, first)}"
            done[0] += 1
            return f"{job.name}: {_pass_line(result, first)} [{done[0]}/{len(measured)} measured, {time.perf_counter() - t0:.0f}s]"

        results = ex.run(jobs, log=log, progress=progress, desc="sweep", report=report)
        result_dirs = [results[i] for i in measured]
        large_dirs = [results[i] for i in measured_large]
        how = ex.describe()

    df = _combine(result_dirs, home)
    atomic_write(root / "results.parquet", lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(root / "results.csv", lambda tmp: df.to_csv(tmp, index=False))
    if large_dirs:
        big = _combine(large_dirs, home)
        atomic_write(root / f"results-eval{cfg.eval_size}.parquet", lambda tmp: big.to_parquet(tmp, index=False))
    write_json(root / "manifest.json", {
        "sweep": cfg.__dict__, "tasks": tasks, "workers": workers, **how,
        "timings": {"this_invocation_seconds": round(time.perf_counter() - t0, 1)}, "versions": _versions(result_dirs),
        "config": _task_config(tasks[0], cfg.seeds[0], cfg.overrides, []).to_dict(),
    })
    n_cells = len(tasks) * len(cfg.seeds) * len(cfg.prevalence) * len(cfg.policy)
    log(f"sweep finished in {time.perf_counter() - t0:.0f}s: {n_cells} cells, table {root / 'results.parquet'}")
    return df


def _combine(result_dirs: list[str], home: str) -> pd.DataFrame:
    """The measured runs' tables as one, with the run each row came from (``run``)."""
    frames = [pd.read_parquet(Path(d) / "results.parquet") for d in result_dirs]
    df = pd.concat(frames, ignore_index=True)
    df["run"] = [str(Path(d).parent.relative_to(home)) + ("" if Path(d).name == "results" else f"/{Path(d).name}")
                 for d, f in zip(result_dirs, frames) for _ in range(len(f))]
    return df


def _versions(result_dirs: list[str]) -> dict[str, str]:
    """The package versions the measurements ran with (on Ray: a worker's, not this driver's), as
    their results manifest records them; importing ``probes.runner`` here would cost the driver
    seconds of imports it otherwise never needs."""
    try:
        found = json.loads((Path(result_dirs[0]) / "manifest.json").read_text(encoding="utf-8")).get("versions")
    except (OSError, ValueError, IndexError):
        found = None
    if isinstance(found, dict):
        return found
    from probes.runner import versions

    return versions()


def _grid_jobs(cfg: SweepConfig, tasks: list[str], root: str, device: str | None, threads: int
               ) -> tuple[list[Job], list[int], list[int]]:
    """Every job of the grid and the indices of the measurements (the table's, and the large eval
    set's), in table order.

    A cell's job needs its base's; an interpolation needs its cell and base; a measurement needs
    the job that made its checkpoint and the base (whose eval set it measures on, and which is
    the reference of ref_mix).
    """
    bases: dict[tuple[str, int], Job] = {}
    cells: dict[tuple[str, int], list[tuple[float, str, Job]]] = {}
    for t in tasks:
        for s in cfg.seeds:
            bases[(t, s)] = Job(_base_job, (t, s, cfg.overrides, root, device, threads),
                                stage="base models", name=f"{t}/seed{s}/base")
            cells[(t, s)] = [
                (p, pol, Job(_cell_job, (t, s, p, pol, cfg.overrides, root, device, threads), after=(bases[(t, s)],),
                             stage="SFT cells", name=f"{t}/seed{s}/{_cell_name(p, pol)}"))
                for p in cfg.prevalence for pol in cfg.policy
            ]
    measures, interps, large = [], [], []

    def measure(columns: dict[str, Any], made: Job, base: Job, name: str, results: str = "results") -> Job:
        return Job(_measure_job, (cfg.strategies, cfg.samples, columns, device, threads, results),
                   after=(made, base), stage="measured", name=name)

    for (t, s), base in bases.items():
        cols = {"task": t, "prevalence": math.nan, "policy": "", "seed": s}
        measures.append(measure(cols, base, base, base.name))
        for p, pol, cell in cells[(t, s)]:
            cols = {"task": t, "prevalence": float(p), "policy": pol, "seed": s}
            measures.append(measure(cols, cell, base, cell.name))
            for a in cfg.alphas:
                interp = Job(_interp_job, (float(a), threads), after=(cell, base), stage="interpolated",
                             name=f"{cell.name}/interp-a{a:.2f}")
                interps.append(interp)
                measures.append(measure({**cols, "alpha": float(a)}, interp, base, interp.name, f"results-interp-a{a:.2f}"))
        if cfg.eval_size:
            big = Job(_large_eval_job, (cfg.eval_size, s), after=(base,), stage="eval sets", name=f"{t}/seed{s}/eval-{cfg.eval_size}")
            interps.append(big)
            args = (cfg.strategies[:1], cfg.samples)
            results = f"results-eval{cfg.eval_size}"
            large.append(Job(_large_measure_job, (*args, {"task": t, "prevalence": math.nan, "policy": "", "seed": s},
                                                  device, threads, results), after=(base, base, big),
                             stage="measured (large eval)", name=f"{base.name} on eval-{cfg.eval_size}"))
            for p, pol, cell in cells[(t, s)]:
                large.append(Job(_large_measure_job, (*args, {"task": t, "prevalence": float(p), "policy": pol, "seed": s},
                                                      device, threads, results), after=(cell, base, big),
                                 stage="measured (large eval)", name=f"{cell.name} on eval-{cfg.eval_size}"))
    jobs = [*bases.values(), *(c for cs in cells.values() for *_, c in cs), *interps, *measures, *large]
    first = len(jobs) - len(measures) - len(large)
    return jobs, list(range(first, first + len(measures))), list(range(first + len(measures), len(jobs)))
