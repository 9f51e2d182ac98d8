"""``probes sweep`` on the local process pool against Ray on the same cores; and the default grid on N workers, on paper.

1. Measured: the ``--quick`` grid (both tasks, prevalence {0, 1} x {canonical, balanced}, one
   seed: 2 base models, 8 cells, 10 measurements = 20 tasks), from nothing, once with the local
   executor (``--workers`` spawn processes) and once on a local Ray instance of ``--workers``
   CPUs (``ray.init(num_cpus=...)``, no dashboard), each in a fresh process timed after its imports
   (the Ray instance's start is timed apart: a cluster is started once and serves many sweeps).
   Both tables are checked to be equal. Ray's overhead per task = (Ray wall - local wall) / tasks.
2. On paper: the default grid (``training/configs/sweep.json``) with the per-job times the
   arguments give (defaults: base model 400 s, cell 108 s, measurement 19 s: what the README's 56-minute
   ``--workers 2`` run of 2026-12-01 logged per job on one core),
   scheduled on N = 2, 4, 8, 16 workers both ways: the local executor's stages (every base, then
   every cell, then every measurement) and Ray's dependencies (a cell as soon as its own base is
   done, a measurement as soon as its training is), with the bound max(work / N, critical path).

R = Ray's sweep wall / the local pool's (cluster start excluded).  Target: R <= 1.25 on one
machine (Ray's gains come from more machines, not from these two cores).

    python benchmarks/sweep_executors.py [--workers 2] [--paper-only] [--base-s 400 --cell-s 108 --measure-s 19]
"""

from __future__ import annotations

import heapq
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

QUIET = {"progress": False, "log": lambda *_: None}


# ----------------------------------------------------------------------------- workers (fresh processes)
def worker_local(device: str, out: str, workers: int) -> dict:
    C.preimport()
    from probes.grid import sweep

    t = C.Timer("cpu")
    with t.run():
        sweep(out=out, quick=True, workers=workers, device=device, **QUIET)
    return {"seconds": t.seconds}


def worker_ray(device: str, out: str, workers: int, ray_temp: str) -> dict:
    C.preimport()
    import ray

    from probes.grid import sweep

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance: no token written to ~/.ray
    start = C.Timer("cpu")
    with start.run():
        ray.init(num_cpus=workers, include_dashboard=False, _temp_dir=ray_temp, log_to_driver=False)
    t = C.Timer("cpu")
    try:
        with t.run():
            sweep(out=out, quick=True, executor="ray", device=device, **QUIET)
    finally:
        ray.shutdown()
    return {"seconds": t.seconds, "start_seconds": start.seconds}


# ----------------------------------------------------------------------------- on paper
def grid_jobs(base_s: float, cell_s: float, measure_s: float) -> tuple[list[float], list[list[int]], list[int]]:
    """The default grid's jobs as the sweep builds them: durations, dependencies, and stage (0, 1, 2)."""
    from probes.grid import load_sweep_config

    cfg = load_sweep_config(None, quick=False)
    dur: list[float] = []
    deps: list[list[int]] = []
    stage: list[int] = []

    def add(seconds: float, after: list[int], level: int) -> int:
        dur.append(seconds)
        deps.append(after)
        stage.append(level)
        return len(dur) - 1

    bases = {(t, s): add(base_s, [], 0) for t in cfg.tasks for s in cfg.seeds}
    cells = {key: [add(cell_s, [b], 1) for _ in cfg.prevalence for _ in cfg.policy] for key, b in bases.items()}
    for key, b in bases.items():
        add(measure_s, [b], 2)
        for c in cells[key]:
            add(measure_s, [c], 2)
    return dur, deps, stage


def makespan(dur: list[float], deps: list[list[int]], n: int) -> float:
    """List scheduling on n workers: a free worker takes the first job (in submission order) whose inputs are done."""
    done: set[int] = set()
    pending = list(range(len(dur)))
    running: list[tuple[float, int]] = []
    t = 0.0
    while pending or running:
        for j in list(pending):
            if len(running) >= n:
                break
            if all(d in done for d in deps[j]):
                heapq.heappush(running, (t + dur[j], j))
                pending.remove(j)
        if not running:
            raise ValueError("a job depends on one that never runs")
        t, j = heapq.heappop(running)
        done.add(j)
        while running and running[0][0] <= t:
            done.add(heapq.heappop(running)[1])
    return t


def staged(deps: list[list[int]], stage: list[int]) -> list[list[int]]:
    """The local executor's barriers: a job waits for every job of the stage before its own."""
    by = {s: [j for j, x in enumerate(stage) if x == s] for s in set(stage)}
    return [by.get(stage[j] - 1, []) for j in range(len(stage))]


def critical_path(dur: list[float], deps: list[list[int]]) -> float:
    finish: list[float] = []
    for j in range(len(dur)):  # jobs are listed after what they need
        finish.append(dur[j] + max((finish[d] for d in deps[j]), default=0.0))
    return max(finish)


def paper(base_s: float, cell_s: float, measure_s: float, ns: list[int]) -> None:
    dur, deps, stage = grid_jobs(base_s, cell_s, measure_s)
    counts = [stage.count(s) for s in (0, 1, 2)]
    work = sum(dur)
    path = critical_path(dur, deps)
    print(f"default grid on paper: {counts[0]} base models x {base_s:g} s, {counts[1]} cells x {cell_s:g} s, "
          f"{counts[2]} measurements x {measure_s:g} s = {work / 60:.1f} min of one core; "
          f"critical path {path / 60:.2f} min")
    print(f"{'workers':>8}{'local, stages (min)':>21}{'ray, deps (min)':>17}{'bound (min)':>13}"
          f"{'ray speed-up':>14}{'efficiency':>12}")
    barrier = staged(deps, stage)
    for n in ns:
        loc, ray_ = makespan(dur, barrier, n), makespan(dur, deps, n)
        bound = max(work / n, path)
        print(f"{n:>8}{loc / 60:>21.1f}{ray_ / 60:>17.1f}{bound / 60:>13.1f}{work / ray_:>13.1f}x{work / ray_ / n:>12.0%}")
    print("(each worker a core of its own; the per-job times are the arguments: read them off a real sweep's log)")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="local pool processes and Ray CPUs (default 2)")
    p.add_argument("--paper-only", action="store_true", help="only the on-paper schedule of the default grid")
    p.add_argument("--base-s", type=float, default=400.0, help="one base model on one core, seconds (default 400)")
    p.add_argument("--cell-s", type=float, default=108.0, help="one SFT cell on one core, seconds (default 108)")
    p.add_argument("--measure-s", type=float, default=19.0, help="one measurement on one core, seconds (default 19)")
    p.add_argument("--paper-workers", type=int, nargs="+", default=[2, 4, 8, 16], help="N for the schedule (default 2 4 8 16)")
    args = p.parse_args(argv)
    if C.serve_worker(args, {"local": worker_local, "ray": worker_ray}):
        return 0
    threads = C.setup_threads(args.threads)
    device = C.device_of(args.device)
    print(C.machine_line(threads, device))
    if args.paper_only:
        paper(args.base_s, args.cell_s, args.measure_s, args.paper_workers)
        print(C.ratio_line("sweep_executors", float("nan"), "<= 1.25; --paper-only: nothing measured"))
        return 0
    if importlib.util.find_spec("ray") is None:
        print('ray is not installed (pip install -e ".[ray]"): only the local pool and the schedule on paper')
    from probes.grid import _grid_jobs, load_sweep_config

    cfg = load_sweep_config(None, quick=True)
    jobs, _ = _grid_jobs(cfg, cfg.tasks, "/nowhere", None, 1)
    n_tasks = len(jobs)
    tmp = Path(tempfile.mkdtemp(prefix="fp-sweep-"))  # short: Ray's socket paths live under it
    try:
        local_out, ray_out = tmp / "local", tmp / "ray"
        local = C.run_worker(__file__, "local", {"out": str(local_out), "workers": args.workers}, threads, str(device))
        print(f"quick grid ({n_tasks} tasks), local pool of {args.workers}: {local['seconds']:.1f} s")
        if importlib.util.find_spec("ray") is None:
            paper(args.base_s, args.cell_s, args.measure_s, args.paper_workers)
            print(C.ratio_line("sweep_executors", float("nan"), "<= 1.25; Ray not installed"))
            return 0
        ray = C.run_worker(__file__, "ray", {"out": str(ray_out), "workers": args.workers,
                                             "ray_temp": str(tmp / "ray-tmp")}, threads, str(device))
        print(f"quick grid ({n_tasks} tasks), Ray of {args.workers} CPUs: {ray['seconds']:.1f} s "
              f"(+ {ray['start_seconds']:.1f} s to start the Ray instance)")
        import pandas as pd

        a, b = pd.read_parquet(local_out / "results.parquet"), pd.read_parquet(ray_out / "results.parquet")
        try:
            pd.testing.assert_frame_equal(a, b)
            same = True
        except AssertionError:
            same = False
        per_task = (ray["seconds"] - local["seconds"]) / n_tasks
        with_start = (ray["seconds"] + ray["start_seconds"] - local["seconds"]) / n_tasks
        print(f"Ray overhead per task: {per_task:+.2f} s ({with_start:+.2f} s counting the instance's start); "
              f"same table: {'yes' if same else 'NO'}")
        paper(args.base_s, args.cell_s, args.measure_s, args.paper_workers)
        r = ray["seconds"] / local["seconds"]
        print(C.ratio_line("sweep_executors", r, f"<= 1.25; Ray {ray['seconds']:.0f} s vs local pool {local['seconds']:.0f} s "
                                                 f"on {args.workers} CPUs; same table {'yes' if same else 'NO'}"))
        return 0 if same else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
