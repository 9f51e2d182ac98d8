"""Shared fixtures: a tiny trained run (20 pretraining + 20 SFT steps) every measuring test reuses."""

from __future__ import annotations

import pytest

TINY_OVERRIDES: list[str] = []


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from probes.api import train

    out = tmp_path_factory.mktemp("tiny_run")
    train("tiny", out=out, overrides=TINY_OVERRIDES, progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def tiny_results(tiny_run, tmp_path_factory):
    from probes.api import run

    out = tmp_path_factory.mktemp("tiny_results") / "results"
    df = run([str(tiny_run / "checkpoints" / "sft-*")], out=out, samples=8, progress=False, log=lambda *_: None, n_boot=200)
    return out, df


@pytest.fixture(scope="session")
def quick_sweep(tmp_path_factory):
    """The --quick grid swept once, locally and in-process (test_sweep and test_ray compare against it)."""
    from probes.api import sweep

    out = tmp_path_factory.mktemp("sweep")
    df = sweep(out=out, quick=True, workers=1, progress=False, log=lambda *_: None)
    return out, df
