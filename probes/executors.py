"""Executors: where a list of jobs runs, locally or on a Ray cluster, with the same results.

A :class:`Job` is a module-level function, its arguments, and the jobs it needs first
(``after``): it is called as ``fn(*args, *results_of_after)``. Two verbs serve every caller:

* ``map(fn, items)``: independent jobs, ``[fn(x) for x in items]`` in order (what ``probes run``
  needs for its checkpoints: each job measures one and writes its own part; the caller writes
  the combined table once, at the end);
* ``run(jobs)``: a dependency graph (what ``probes sweep`` needs: base models, the SFT cells fine-tuned
  from them, the measurement of each), results in the order of ``jobs``.

:class:`LocalExecutor` is in-process for one worker and a spawn process pool otherwise; it runs
a graph level by level (every base, then every cell, then every measurement). :class:`RayExecutor`
submits every job at once as a Ray task whose dependencies are the ``ObjectRef`` s of the jobs
it needs, so a cell starts as soon as its own base is done; a task whose worker dies is retried
(``max_retries``). Ray is imported only here and only when a RayExecutor is made.

Every job must be safe to run again: the sweep's jobs resume from disk (a finished stage returns
at once), which is what makes Ray's retries and a killed sweep started again end with the same
table.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from training.errors import UsageError

EXECUTORS = ("local", "ray")
RAY_INSTALL = 'pip install -e ".[ray]"'
DEFAULT_GPU_FRACTION = 0.25
"""GPU share of one task on a GPU node: the tiny models are launch-bound, four share a GPU well."""
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True, eq=False)
class Job:
    """``fn(*args, *[result of j for j in after])``; ``fn`` must be importable (a module-level function)."""

    fn: Callable[..., Any]
    args: tuple = ()
    after: tuple["Job", ...] = ()
    stage: str = "jobs"
    name: str = ""


Report = Callable[[Job, Any], "str | None"]
"""Called in the driver as each job finishes; returns the line to log (None: the default line)."""


def levels(jobs: Sequence[Job]) -> list[list[int]]:
    """Indices of ``jobs`` grouped by depth in the graph (0: needs nothing), each in list order."""
    index = {id(j): i for i, j in enumerate(jobs)}
    depth: dict[int, int] = {}

    def d(i: int, seen: tuple = ()) -> int:
        if i in depth:
            return depth[i]
        if i in seen:
            raise ValueError("the jobs' dependencies form a cycle")
        deps = []
        for a in jobs[i].after:
            if id(a) not in index:
                raise ValueError(f"job {jobs[i].name or i} needs a job that is not in the list")
            deps.append(d(index[id(a)], seen + (i,)))
        depth[i] = 1 + max(deps) if deps else 0
        return depth[i]

    for i in range(len(jobs)):
        d(i)
    out: list[list[int]] = [[] for _ in range(1 + max(depth.values(), default=-1))]
    for i in range(len(jobs)):
        out[depth[i]].append(i)
    return out


def _call(fn: Callable[..., Any], args: tuple, *deps: Any) -> Any:
    return fn(*args, *deps)


class _Progress:
    """One tqdm bar for the whole list, and one log line per finished job."""

    def __init__(self, jobs: Sequence[Job], log: Callable[[str], None], progress: bool, desc: str,
                 report: Report | None):
        from tqdm.auto import tqdm

        self.log, self.report = log, report
        self.t0 = time.perf_counter()
        self.totals: dict[str, int] = {}
        for j in jobs:
            self.totals[j.stage] = self.totals.get(j.stage, 0) + 1
        self.counts = dict.fromkeys(self.totals, 0)
        self.bar = tqdm(total=len(jobs), desc=desc, leave=False, disable=not progress)

    def done(self, job: Job, result: Any) -> None:
        self.counts[job.stage] += 1
        self.bar.update(1)
        line = self.report(job, result) if self.report else None
        self.log(line if line is not None else self.line(job))

    def line(self, job: Job) -> str:
        return f"{job.stage}: {self.counts[job.stage]}/{self.totals[job.stage]} done ({self.elapsed():.0f}s)"

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def close(self) -> None:
        self.bar.close()


class Executor:
    """The interface: ``map`` independent jobs, ``run`` a graph; ``describe()`` for the manifest."""

    name = "executor"

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], log: Callable[[str], None] = print,
            what: str = "jobs", progress: bool = False, report: Report | None = None) -> list:
        jobs = [Job(fn, (x,), stage=what, name=f"{what} {i}") for i, x in enumerate(items)]
        return self.run(jobs, log=log, progress=progress, desc=what, report=report)

    def run(self, jobs: Sequence[Job], log: Callable[[str], None] = print, progress: bool = False,
            desc: str = "jobs", report: Report | None = None) -> list:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name}

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalExecutor(Executor):
    """In this process for one worker, else a spawn process pool of ``workers`` (one pool per ``run``)."""

    name = "local"

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "workers": self.workers}

    def run(self, jobs, log=print, progress=False, desc="jobs", report=None) -> list:
        jobs = list(jobs)
        order = levels(jobs)
        results: list[Any] = [None] * len(jobs)
        index = {id(j): i for i, j in enumerate(jobs)}
        bar = _Progress(jobs, log, progress, desc, report)

        def deps(i: int) -> tuple:
            return tuple(results[index[id(a)]] for a in jobs[i].after)

        try:
            if self.workers <= 1 or len(jobs) <= 1:
                for level in order:
                    for i in level:
                        results[i] = _call(jobs[i].fn, jobs[i].args, *deps(i))
                        bar.done(jobs[i], results[i])
                return results
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn")) as pool:
                for level in order:  # a level starts when the one before it is finished
                    pending = {pool.submit(_call, jobs[i].fn, jobs[i].args, *deps(i)): i for i in level}
                    try:
                        while pending:
                            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                            for fut in sorted(finished, key=pending.get):
                                i = pending.pop(fut)
                                results[i] = fut.result()
                                bar.done(jobs[i], results[i])
                    except BaseException:
                        for fut in pending:
                            fut.cancel()
                        raise
            return results
        finally:
            bar.close()


# ----------------------------------------------------------------------------- Ray
def import_ray():
    """``ray``, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed; {RAY_INSTALL}") from None
    return ray


def parse_resources(resources: str | dict[str, float] | None) -> dict[str, float]:
    """``"cpu=1,gpu=0.25,memory=2e9,accel=1"`` (or a dict) as ``{name: amount}``; names lower-cased
    for ``cpu``, ``gpu`` and ``memory`` (bytes), any other name a custom Ray resource."""
    if resources is None or resources == "":
        return {}
    if isinstance(resources, dict):
        items = list(resources.items())
    elif isinstance(resources, str):
        items = []
        for part in resources.split(","):
            name, eq, value = part.partition("=")
            if not eq or not name.strip():
                raise UsageError(f"--resources takes NAME=AMOUNT pairs separated by commas (e.g. cpu=1,gpu=0.25), "
                                 f"got {resources!r}")
            items.append((name.strip(), value.strip()))
    else:
        raise UsageError(f"--resources takes a string like 'cpu=1,gpu=0.25' or a dict, got {resources!r}")
    out: dict[str, float] = {}
    for name, value in items:
        key = name.lower() if str(name).lower() in ("cpu", "gpu", "memory") else str(name)
        try:
            amount = float(value)
        except (TypeError, ValueError):
            amount = math.nan
        if isinstance(value, bool) or not math.isfinite(amount) or amount < 0:
            raise UsageError(f"--resources {name}={value}: the amount must be a number ≥ 0")
        if key == "gpu" and amount > 1 and amount != int(amount):
            raise UsageError(f"--resources gpu={value}: a task takes a fraction of one GPU or whole GPUs")
        out[key] = amount
    return out


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of an explicit address (``HOST:PORT`` or ``ray://HOST:PORT``); None for ``auto``/``local``."""
    if address in ("auto", "local"):
        return None
    text = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--address takes HOST:PORT (the head node's, 6379 by default; 'ray start --head' prints it) "
                         f"or auto, got {address!r}")
    return host, int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, with one line, when nothing listens at an explicit address."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise UsageError(f"cannot reach a Ray cluster at --address {address} ({why}); start one with "
                         "'ray start --head' and pass the address it prints (or --address auto on its head node)") from None


# Ray's own defaults wait minutes for a head that never answers (20 tries of about 40 s); these
# options of Ray's shorten one try to ~7 s. Ray's core reads them when it is imported, so they act
# in a fresh process only: the probe below.
SHORT_CONNECT = {"RAY_gcs_server_port_wait_time_s": "1", "RAY_py_gcs_connect_timeout_s": "3",
                 "RAY_gcs_rpc_server_connect_timeout_s": "2"}
PROBE_TIMEOUT_S = 45.0
_PROBE = ("import sys, ray\n"
          "ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False, logging_level='ERROR')\n"
          "ray.shutdown()\n")


def probe_cluster(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Connect to ``address`` from a short-lived process with short timeouts; one line if that fails.

    The connection itself (``ray.init(address=...)``) would otherwise hang for minutes, printing
    Ray's retries, on an address where something listens that is not a Ray head.
    """
    import subprocess
    import sys

    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in SHORT_CONNECT.items()}}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, address], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UsageError(f"the Ray cluster at --address {address} did not answer within {timeout:.0f}s; "
                         "is it a Ray head's address ('ray status' on the head prints it)?") from None
    if proc.returncode != 0:
        errors = [ln.strip() for ln in proc.stderr.splitlines()
                  if ln[:1].isalpha() and ln.split(":", 1)[0].endswith(("Error", "Exception")) and ": " in ln]
        why = errors[-1][:200] if errors else f"exit code {proc.returncode}"
        hint = ("start one with 'ray start --head', or give its HOST:PORT" if address == "auto"
                else "is it a Ray head's address ('ray status' on the head prints it)?")
        raise UsageError(f"cannot connect to a Ray cluster at --address {address} ({why}); {hint}")


class RayExecutor(Executor):
    """Every job a Ray task; a job's dependencies are passed as the ObjectRefs of their tasks.

    ``address``: a running cluster (``HOST:PORT``, ``auto``), checked to answer within seconds;
    None starts a local Ray instance of ``num_cpus`` CPUs, shut down by ``close``. A process
    already connected to Ray (``ray.init`` called by the user) keeps that connection, open.
    ``resources`` per task: ``cpu`` (default 1), ``gpu`` (default 0.25 where ``device`` is cuda,
    or is unset and the cluster has GPUs; else 0), ``memory`` (bytes), any custom resource; they
    are checked against the cluster's nodes before anything is submitted, since Ray would
    otherwise wait forever for a node that has them.
    """

    name = "ray"

    def __init__(self, address: str | None = None, resources: str | dict[str, float] | None = None,
                 device: str | None = None, num_cpus: int | None = None, max_retries: int = 3,
                 init_kwargs: dict[str, Any] | None = None):
        self.ray = ray = import_ray()
        wanted = parse_resources(resources)  # a typo is refused before any connection
        if device is not None and str(device).startswith("cuda:"):
            raise UsageError(f"--device {device} with --executor ray: Ray gives each task its GPU; use --device cuda")
        if address is not None and not isinstance(address, str):
            raise UsageError(f"--address takes HOST:PORT or auto, got {address!r}")
        self.address = address
        self.max_retries = int(max_retries)
        self._owned = False
        if address is not None:
            check_reachable(address)
        if not ray.is_initialized():  # else: the connection this process already has is used, and left open
            kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, **(init_kwargs or {})}
            if address is None:
                kwargs.setdefault("num_cpus", num_cpus)
            self._connect(address, kwargs)
            self._owned = True
        try:
            self.options = self._task_options(wanted, device)
        except BaseException:
            self.close()
            raise

    def _connect(self, address: str | None, kwargs: dict[str, Any]) -> None:
        if address not in (None, "local"):
            probe_cluster(address)
        try:
            self.ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"--address {address}" if address else "a local Ray instance"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UsageError(f"cannot connect to {where}: {first}") from None

    def _task_options(self, wanted: dict[str, float], device: str | None) -> dict[str, Any]:
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        cluster_gpus = sum(n.get("GPU", 0.0) for n in nodes)
        cuda = device is not None and str(device).startswith("cuda")
        gpu_default = DEFAULT_GPU_FRACTION if (cuda or (device is None and cluster_gpus > 0)) else 0.0
        need = {"CPU": wanted.get("cpu", 1.0), "GPU": wanted.get("gpu", gpu_default)}
        if "memory" in wanted:
            need["memory"] = wanted["memory"]
        need.update({k: v for k, v in wanted.items() if k not in ("cpu", "gpu", "memory")})
        if cuda and need["GPU"] == 0:
            raise UsageError(f"--device {device} with --resources gpu=0: Ray hides the GPUs from a task that "
                             "reserves none; give gpu=0.25 (or more)")
        asked = {k: v for k, v in need.items() if v > 0}
        if not any(all(node.get(k, 0.0) >= v for k, v in asked.items()) for node in nodes):
            shown = ",".join(f"{k.lower() if k in ('CPU', 'GPU') else k}={v:g}" for k, v in asked.items())
            have = self.ray.cluster_resources()
            total = ", ".join(f"{k} {have[k]:g}" for k in ("CPU", "GPU") if k in have) or "nothing"
            origin = " (the default for --device cuda)" if cuda and "gpu" not in wanted else ""
            raise UsageError(f"--resources {shown}{origin}: no node of the Ray cluster has that much "
                             f"({len(nodes)} node(s), {total} in all); ask for less, or add a node that has it")
        opts: dict[str, Any] = {"num_cpus": need["CPU"], "num_gpus": need["GPU"], "max_retries": self.max_retries,
                                "retry_exceptions": False}
        if "memory" in need:
            opts["memory"] = need["memory"]
        custom = {k: v for k, v in need.items() if k not in ("CPU", "GPU", "memory")}
        if custom:
            opts["resources"] = custom
        return opts

    def summary(self) -> str:
        """One line for the log: where the tasks run and what each reserves."""
        have = self.ray.cluster_resources()
        nodes = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        each = ", ".join(f"{k.removeprefix('num_')} {v:g}" for k, v in self.options.items()
                         if k in ("num_cpus", "num_gpus", "memory"))
        where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
        return (f"ray: {where}, {nodes} node(s), CPU {have.get('CPU', 0):g}, GPU {have.get('GPU', 0):g}; "
                f"each task reserves {each}, retried {self.max_retries}x if its worker dies")

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "address": self.address,
                "task_options": {k: v for k, v in self.options.items() if k != "retry_exceptions"}}

    def run(self, jobs, log=print, progress=False, desc="jobs", report=None) -> list:
        ray = self.ray
        jobs = list(jobs)
        order = [i for level in levels(jobs) for i in level]
        index = {id(j): i for i, j in enumerate(jobs)}
        remote = ray.remote(_call).options(**self.options)
        refs: list[Any] = [None] * len(jobs)
        for i in order:  # submitted in topological order; Ray starts each once its inputs exist
            refs[i] = remote.remote(jobs[i].fn, jobs[i].args, *(refs[index[id(a)]] for a in jobs[i].after))
        where = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(jobs)
        pending = list(refs)
        bar = _Progress(jobs, log, progress, desc, report)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    i = where[ref]
                    results[i] = self._get(ref)
                    bar.done(jobs[i], results[i])
            return results
        except BaseException:
            for ref in pending:
                try:
                    ray.cancel(ref)
                except Exception:  # already finished or gone
                    pass
            raise
        finally:
            bar.close()

    def _get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, UsageError):  # the job's own one-line message, not Ray's traceback
                raise UsageError(str(cause)) from None
            raise

    def close(self) -> None:
        if self._owned and self.ray.is_initialized():
            self.ray.shutdown()
        self._owned = False


def make_executor(executor: str | Executor, workers: int = 1, address: str | None = None,
                  resources: str | dict[str, float] | None = None, device: str | None = None) -> Executor:
    """An executor by name (``local``, ``ray``), or the one given; address/resources are Ray's only."""
    if isinstance(executor, Executor):
        return executor
    if executor not in EXECUTORS:
        raise UsageError(f"unknown executor {executor!r}; use {' or '.join(EXECUTORS)}")
    if executor == "local":
        if address is not None or resources not in (None, "", {}):
            raise UsageError("--address and --resources are for --executor ray; the local executor takes --workers")
        return LocalExecutor(workers)
    return RayExecutor(address=address, resources=resources, device=device, num_cpus=workers)
