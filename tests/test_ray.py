"""``probes sweep --executor ray``: the local sweep's table from Ray tasks, through a dead worker and a resume.

One local Ray instance (2 CPUs, no dashboard, its temp and log directories under pytest's) serves
the module; the sweep finds it already connected and leaves it running, and the module's fixture
shuts it down. The bad-input cases run through ``probes.cli.main`` as ``tests/test_bad_input.py``
does: one line on stderr, exit 2, nothing written. The tests that need Ray are skipped where the
``ray`` extra is not installed; the missing-extra case simulates that itself.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.test_bad_input import _snapshot, one_line_exit_2, run_cli
from training.errors import UsageError

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason='needs the ray extra: pip install -e ".[ray]"')
if HAVE_RAY:  # imported here, not first inside a test: Ray's log handler keeps the stderr it finds (capsys's, closed later)
    import ray  # noqa: F401
QUIET = {"progress": False, "log": lambda *_: None}


@pytest.fixture
def quiet_ray_env(monkeypatch):
    """No auth token written to ~/.ray, no usage stats, no RAY_ADDRESS from the caller's shell."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


# ----------------------------------------------------------------------------- bad input (first: no Ray running yet)


def _no_write(argv_for, needle, capsys, tmp_path, max_seconds=None):
    before = _snapshot(tmp_path)
    t0 = time.perf_counter()
    code, err = run_cli(argv_for(tmp_path), capsys)
    took = time.perf_counter() - t0
    one_line_exit_2(code, err, needle)
    assert _snapshot(tmp_path) == before, "a refused sweep wrote something"
    assert not (tmp_path / "sw").exists()
    if max_seconds is not None:
        assert took < max_seconds, f"took {took:.1f}s"
    return err


def test_unknown_executor(capsys, tmp_path):
    _no_write(lambda t: ["sweep", "--quick", "--executor", "dask", "--out", str(t / "sw")], "unknown executor 'dask'",
              capsys, tmp_path)
    _no_write(lambda t: ["sweep", "--quick", "--resources", "cpu=1", "--out", str(t / "sw")], "are for --executor ray",
              capsys, tmp_path)


def test_ray_not_installed(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as without the extra
    _no_write(lambda t: ["sweep", "--quick", "--executor", "ray", "--out", str(t / "sw")], 'pip install -e ".[ray]"',
              capsys, tmp_path)


@needs_ray
def test_unreachable_address_fails_fast(capsys, tmp_path, quiet_ray_env):
    _no_write(lambda t: ["sweep", "--quick", "--executor", "ray", "--address", "127.0.0.1:1", "--out", str(t / "sw")],
              "cannot reach a Ray cluster at --address 127.0.0.1:1", capsys, tmp_path, max_seconds=10)
    _no_write(lambda t: ["sweep", "--quick", "--executor", "ray", "--address", "nowhere", "--out", str(t / "sw")],
              "--address takes HOST:PORT", capsys, tmp_path)


@needs_ray
def test_address_that_is_not_ray_fails_in_seconds(capsys, tmp_path, quiet_ray_env):
    """Something listens but never answers as Ray would: Ray's connection timeouts, shortened, give up."""
    import ray

    if ray.is_initialized():
        pytest.skip("this process is already connected to Ray")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        _no_write(lambda t: ["sweep", "--quick", "--executor", "ray", "--address", f"127.0.0.1:{port}",
                             "--out", str(t / "sw")], "cannot connect to a Ray cluster at --address", capsys, tmp_path, max_seconds=45)
    assert not ray.is_initialized()


# ----------------------------------------------------------------------------- a local Ray instance


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray
    import ray.cloudpickle

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_ADDRESS", raising=False)
        temp = tmp_path_factory.mktemp("ray")
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(temp), log_to_driver=False)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests
        try:
            yield temp
        finally:
            ray.shutdown()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def local_quick(quick_sweep):
    """The local quick sweep (tests/conftest.py), the table a Ray sweep must equal."""
    return quick_sweep


def _flaky_base_job(marker: str, attempts: str, *args):
    """The real base-model job, but its first attempt in the whole sweep kills the worker process."""
    from probes import grid

    with open(attempts, "a") as f:
        f.write(f"{os.getpid()}\n")
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)  # the worker dies at once (before its slow imports); Ray retries the task in a new one
    return grid._base_job(*args)


@pytest.fixture(scope="module")
def ray_quick(ray_cluster, local_quick, tmp_path_factory):
    """The quick grid on Ray, the worker of one base model's task killed once."""
    import functools

    from probes import grid

    work = tmp_path_factory.mktemp("ray_sweep")
    marker, attempts = work / "killed-once", work / "attempts"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grid, "_base_job", functools.partial(_flaky_base_job, str(marker), str(attempts)))
        lines: list[str] = []
        t0 = time.perf_counter()
        df = grid.sweep(out=work / "sweep", quick=True, executor="ray", progress=False, log=lines.append)
        seconds = time.perf_counter() - t0
    return work / "sweep", df, lines, marker, attempts, seconds


@needs_ray
def test_ray_sweep_equals_local_sweep_through_a_dead_worker(ray_quick, local_quick):
    out, df, lines, marker, attempts, seconds = ray_quick
    _, local = local_quick
    pd.testing.assert_frame_equal(local, df)  # same seed, same numbers, `run` column included
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), df)
    assert marker.is_file(), "no worker was killed"
    pids = attempts.read_text().split()
    assert len(pids) == 2 + 1, pids  # 2 base models, one of them run twice: Ray retried the dead worker's task
    assert marker.read_text() in pids and len(set(pids)) >= 2  # the retry ran in another process
    measured = [ln for ln in lines if "pass@1 " in ln]
    assert len(measured) == 10 and all("pass@16 " in ln for ln in measured), lines
    assert {ln.split(":")[0] for ln in measured} == {f"{t}/seed0/{c}" for t in ("graph", "modes")
                                                    for c in ("base", "p0.00-canonical", "p0.00-balanced",
                                                              "p1.00-canonical", "p1.00-balanced")}
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["executor"] == "ray" and manifest["task_options"]["num_cpus"] == 1
    assert manifest["task_options"]["num_gpus"] == 0  # a CPU machine
    print(f"ray quick sweep: {seconds:.1f}s")


@needs_ray
def test_ray_sweep_killed_midway_finishes_only_the_missing_cell(ray_quick, local_quick, tmp_path):
    from probes.grid import sweep

    out, *_ = ray_quick
    work = tmp_path / "sweep"
    shutil.copytree(out, work)
    cell = work / "graph" / "seed0" / "p1.00-canonical"
    shutil.rmtree(cell / "results")
    final = sorted((cell / "checkpoints").glob("sft-step*"))[-1]
    shutil.rmtree(final)  # its training never reached the last step
    (work / "results.parquet").unlink()
    finished = [*work.glob("*/seed0/*/results/checkpoints/*.parquet"), *work.glob("*/seed0/*/checkpoints/*/model.safetensors")]
    others = {p: p.stat().st_mtime_ns for p in finished if cell not in p.parents}
    assert len(others) == 9 + 18  # the other 9 results parts; the weights of 7 cells (2 each) and 2 bases (2 each)
    lines: list[str] = []
    again = sweep(out=work, quick=True, executor="ray", progress=False, log=lines.append)
    pd.testing.assert_frame_equal(local_quick[1], again)
    assert final.is_dir() and list((cell / "results" / "checkpoints").glob("*.parquet"))
    changed = [str(p.relative_to(work)) for p, t in others.items() if p.stat().st_mtime_ns != t]
    assert not changed, f"finished work was redone: {changed[:5]}"


@needs_ray
def test_resources_no_node_has(ray_cluster, capsys, tmp_path):
    sw = ["sweep", "--quick", "--executor", "ray"]
    _no_write(lambda t: [*sw, "--resources", "gpu=1", "--out", str(t / "sw")], "--resources cpu=1,gpu=1: no node",
              capsys, tmp_path, max_seconds=10)
    _no_write(lambda t: [*sw, "--device", "cuda", "--out", str(t / "sw")], "gpu=0.25 (the default for --device cuda)",
              capsys, tmp_path)
    _no_write(lambda t: [*sw, "--resources", "cpu=3", "--out", str(t / "sw")], "no node", capsys, tmp_path)
    _no_write(lambda t: [*sw, "--resources", "gpu", "--out", str(t / "sw")], "NAME=AMOUNT", capsys, tmp_path)
    _no_write(lambda t: [*sw, "--resources", "cpu=-1", "--out", str(t / "sw")], "≥ 0", capsys, tmp_path)
    import ray

    assert ray.is_initialized()  # a refused sweep leaves the connection it found


def _square(x: int) -> int:
    if x < 0:
        raise UsageError(f"negative input {x}")
    return x * x


@needs_ray
def test_map_independent_jobs_either_executor(ray_cluster):
    """What ``probes run --executor ray`` will use: independent jobs, results in order, the job's own errors."""
    from probes.executors import Job, LocalExecutor, RayExecutor

    items = [3, 1, 4, 1, 5, 9, 2, 6]
    ray_ex = RayExecutor()
    assert ray_ex.map(_square, items, log=lambda *_: None) == LocalExecutor(1).map(_square, items, log=lambda *_: None)
    with pytest.raises(UsageError, match="negative input -2"):
        ray_ex.map(_square, [1, -2], log=lambda *_: None)
    a = Job(_square, (3,), name="a")
    b = Job(_square, (), after=(a,), name="b")  # _square(9)
    assert ray_ex.run([b, a], log=lambda *_: None) == [81, 9]
    with pytest.raises(ValueError, match="not in the list"):
        ray_ex.run([b], log=lambda *_: None)


def test_probes_run_on_ray_equals_a_serial_run(ray_cluster, tiny_run, tmp_path):
    """`probes run --executor ray`: checkpoints as parallel tasks, each writing its own part, the
    table written once at the end — the same table, rows and samples, as one after another."""
    from probes.runner import run

    ckpts = [str(tiny_run / "checkpoints" / n) for n in ("sft-step000000", "sft-step000003", "sft-step000020")]
    kw = dict(samples=2, progress=False, log=lambda *_: None, n_boot=50)
    serial = run(ckpts, out=tmp_path / "serial", **kw)
    parallel = run(ckpts, out=tmp_path / "ray", executor="ray", **kw)
    pd.testing.assert_frame_equal(serial, parallel)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "serial" / "samples.parquet"),
                                  pd.read_parquet(tmp_path / "ray" / "samples.parquet"))
    again = run(ckpts, out=tmp_path / "ray", executor="ray", **kw)  # everything done: nothing submitted
    pd.testing.assert_frame_equal(serial, again)
