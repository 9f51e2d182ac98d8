"""CUDA gives the CPU's numbers: training, `probes run` on a native checkpoint, an HF capture.

Skipped where torch sees no CUDA device (the CI machine); run on a GPU machine with
``python -m pytest tests/test_cuda.py``. Each check is written against a second device name so
the same code runs CPU-against-CPU in ``test_checks_hold_cpu_against_cpu`` and cannot rot unseen.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def check_train_matches(tmp: Path, device: str) -> None:
    """The tiny config trained on ``device`` follows the CPU run's losses.

    Weights are not compared element by element: Adam divides by the gradient's own scale, so
    float noise in a near-zero gradient becomes a full learning-rate step of either sign.
    """
    from probes.api import train

    reports = [train("tiny", out=tmp / f"train-{i}", device=dev, progress=False, log=lambda *_: None)
               for i, dev in enumerate(("cpu", device))]
    for phase in ("pretrain", "sft"):
        a, b = (r[phase]["final_loss"] for r in reports)
        assert abs(a - b) <= 0.01 * a, f"{phase} loss {a:.4f} on cpu, {b:.4f} on {device}"


def check_run_matches(tiny_run: Path, tmp: Path, device: str) -> None:
    """`probes run` on ``device`` gives the CPU's table: forced values to 1e-4, samples statistically."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from cuda_vs_cpu import compare

    from probes.api import run

    ck = str(tiny_run / "checkpoints" / "sft-step000020")
    tables = [run([ck], out=tmp / f"run-{i}", samples=8, device=dev, progress=False, log=lambda *_: None, n_boot=200)
              for i, dev in enumerate(("cpu", device))]
    r = compare(*tables)
    assert r["rows_missing"] == 0 and r["rows"] == len(tables[0])
    assert r["forced_max_abs"] < 1e-4, r
    assert r["sampled_max_z"] < 4, r
    assert r["probe_max_abs"] <= 0.1, r


def check_hf_capture_matches(tmp: Path, device: str) -> None:
    """An HF checkpoint's capture and lens on ``device`` equal the CPU's."""
    from tests.hf_fixtures import build_hf_checkpoint

    from hooks.hf import HFCheckpoint

    d = build_hf_checkpoint(tmp / "hf", "llama")
    cpu, other = HFCheckpoint(d, device="cpu"), HFCheckpoint(d, device=device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(cpu.tokenizer), (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    rp, lp = torch.tensor([[0, 4], [2, 5], [1, 3]]), torch.tensor([[0, 3, 8], [1, 2, 5], [0, 3, 3]])
    (la, ra), (lb, rb) = cpu.capture(ids, mask, rp, lp), other.capture(ids, mask, rp, lp)
    torch.testing.assert_close(lb.cpu(), la, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rb.cpu(), ra, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(other.lens(rb).cpu(), cpu.lens(ra), atol=1e-4, rtol=1e-4)


@cuda
def test_train_on_cuda_matches_cpu(tmp_path):
    check_train_matches(tmp_path, "cuda")


@cuda
def test_probes_run_on_cuda_matches_cpu(tiny_run, tmp_path):
    check_run_matches(tiny_run, tmp_path, "cuda")


@cuda
def test_hf_capture_on_cuda_matches_cpu(tmp_path):
    check_hf_capture_matches(tmp_path, "cuda")


def test_checks_hold_cpu_against_cpu(tiny_run, tmp_path):
    """The checks above with the CPU as the second device."""
    check_train_matches(tmp_path, "cpu")
    check_run_matches(tiny_run, tmp_path, "cpu")
    check_hf_capture_matches(tmp_path, "cpu")
