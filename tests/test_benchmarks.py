"""Each benchmark script runs at a tiny size and ends with its `NAME: ratio R (target ...)` line.

No timing is asserted (timings belong to quiet machines); what is asserted are the values the
benchmarks check themselves: the hand-written TransformerLens scripts give the toolkit's numbers,
the plain samplers and modules compute the same function as the toolkit's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RATIO = re.compile(r"^(?P<name>\w+): ratio (?P<r>nan|[0-9.]+) \(target .+\)$")


def _bench(name: str, *args: str, timeout: int = 300) -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--threads", "1", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    m = RATIO.match(lines[-1])
    assert m and m["name"] == name, lines[-1]
    return lines


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_run):
    return tiny_run / "checkpoints" / "sft-step000020", tiny_run / "data" / "eval.jsonl"


def test_run_vs_naive_same_numbers(tiny_checkpoint):
    ck, ev = tiny_checkpoint
    lines = _bench("run_vs_naive", "--checkpoint", str(ck), "--eval", str(ev),
                   "--problems", "6", "--samples", "4", "--naive-problems", "2")
    same = next(ln for ln in lines if ln.startswith("same numbers"))
    assert same.endswith("-> OK"), same
    # per-fork differences are printed; both scripts agree with the toolkit far below atol
    diffs = [float(x) for x in re.findall(r"max \|diff\| ([0-9.e+-]+)", same)]
    assert len(diffs) == 3 and max(diffs) < 1e-4
    assert any(ln.startswith("  pass@4 ") for ln in lines)
    assert "numbers same" in lines[-1]


def test_sampler_vs_plain_same_function(tiny_checkpoint):
    ck, ev = tiny_checkpoint
    lines = _bench("sampler_vs_plain", "--checkpoint", str(ck), "--eval", str(ev),
                   "--problems", "4", "--samples", "4", "--repeats", "1")
    same = next(ln for ln in lines if ln.startswith("same function"))
    assert same.endswith("greedy tokens equal: True"), same
    assert float(re.search(r"diff\| ([0-9.e+-]+)", same)[1]) < 1e-4
    assert {ln.split()[0] for ln in lines if ln.split()[0] in ("task", "long")} == {"task", "long"}


def test_train_vs_plain_same_shape_and_losses():
    lines = _bench("train_vs_plain", "--steps", "3", "--warmup-steps", "1", "--repeats", "1",
                   "--examples", "200", "--batch", "8")
    model = next(ln for ln in lines if ln.startswith("model:"))
    counts = re.search(r"model: ([0-9,]+) parameters \(plain ([0-9,]+)\)", model)
    assert counts[1] == counts[2]
    assert float(re.search(r"logits diff\| ([0-9.e+-]+)", model)[1]) < 1e-4
    a, b = map(float, re.search(r"toolkit ([0-9.]+), plain ([0-9.]+)", next(ln for ln in lines if ln.startswith("last-run loss")))
               .groups())
    assert abs(a - b) < 1e-2  # same init, data, optimizer and schedule: the same training


def test_demo_wall_tiny_demo():
    lines = _bench("demo_wall", "--tiny", "--no-growth", "--problems", "6", "--samples", "4")
    assert any(ln.startswith("probes demo: wall") for ln in lines)
    assert any(ln.startswith("probes run, one checkpoint, 6 problems x 4 samples") for ln in lines)
    assert RATIO.match(lines[-1])["r"] != "nan"


@pytest.mark.slow  # six fresh processes: over a minute on 2 busy cores
def test_demo_wall_growth(tiny_checkpoint):
    ck, _ = tiny_checkpoint
    lines = _bench("demo_wall", "--skip-demo", "--checkpoint", str(ck), "--problems", "3", "--samples", "2",
                   "--growth-repeats", "1")
    rows = [ln.split() for ln in lines if re.match(r"^\s+\d+\s+[0-9.]+\s+\d+\s+\d+$", ln)]
    assert [int(r[0]) for r in rows] == [3, 6, 12, 2, 4, 8]
    assert "problems: time" in lines[-1] and "samples: time" in lines[-1]


def test_cuda_vs_cpu_compare_hand_built_tables():
    """The cross-device comparison (run on a GPU machine) on two tables with known differences."""
    import pandas as pd

    sys.path.insert(0, str(REPO / "benchmarks"))
    from cuda_vs_cpu import compare

    def table(entropy: float, pass1: float, probe: float) -> pd.DataFrame:
        base = dict(checkpoint="sft-step000010", kind="all", layer=pd.NA, k=pd.NA, strategy="", n=10)
        rows = [
            {**base, "metric": "entropy_fork", "value": entropy, "ci_low": float("nan"), "ci_high": float("nan")},
            {**base, "metric": "lens_kl_final", "layer": 1, "value": 0.25, "ci_low": float("nan"), "ci_high": float("nan")},
            {**base, "metric": "pass@k", "k": 1, "strategy": "temperature:1.0", "value": pass1,
             "ci_low": pass1 - 1.96 * 0.05, "ci_high": pass1 + 1.96 * 0.05},
            {**base, "metric": "probe_acc_valid", "layer": 2, "value": probe, "ci_low": float("nan"), "ci_high": float("nan")},
        ]
        return pd.DataFrame(rows)

    same = compare(table(1.0, 0.5, 0.8), table(1.0, 0.5, 0.8))
    assert same["forced_max_abs"] == 0 and same["sampled_max_z"] == 0 and same["sampled_identical"] == 1.0
    r = compare(table(1.0, 0.5, 0.8), table(1.0 + 3e-5, 0.6, 0.75))
    assert r["rows"] == 4 and r["rows_missing"] == 0
    assert abs(r["forced_max_abs"] - 3e-5) < 1e-12 and r["forced_metric_worst"] == "entropy_fork"
    assert abs(r["sampled_max_abs"] - 0.1) < 1e-12 and abs(r["sampled_max_z"] - 2.0) < 1e-9  # 0.1 / se 0.05
    assert abs(r["probe_max_abs"] - 0.05) < 1e-12
    extra = table(1.0, 0.5, 0.8).iloc[:3]
    assert compare(table(1.0, 0.5, 0.8), extra)["rows_missing"] == 1
