"""The public Python API: what the CLI verbs call, usable from a notebook as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from training.config import ExperimentConfig, load_config


def train(
    config: str | ExperimentConfig | None = None,
    out: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    device: str | None = None,
    progress: bool = True,
    log=print,
    base: str | Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Synthesise data, pretrain the base model and SFT it, writing checkpoints under ``out``.

    ``config`` is an :class:`ExperimentConfig`, a JSON file or an embedded config name; ``out``
    defaults to ``runs/<config name>``. With ``base`` (a checkpoint directory) pretraining is
    skipped and that model is fine-tuned, on the base run's eval set. Resumes whatever a previous
    call left, if it was started with the same config; ``force`` starts a run with another config over.
    """
    from training.train import train as _train

    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, list(overrides or []))
    if isinstance(config, ExperimentConfig) and overrides:
        raise ValueError("give overrides with a config name or file, not with an ExperimentConfig")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    return _train(cfg, out or Path("runs") / cfg.name, device=device, progress=progress, log=log, base_from=base,
                  force=force)


def run(checkpoints, out=None, **kwargs):
    """Measure checkpoints on an annotated eval set; see :func:`probes.runner.run`."""
    from probes.runner import run as _run

    return _run(checkpoints, out=out, **kwargs)


def load_results(results_dir):
    """Read a results directory's tidy table back (see :func:`probes.results_dir.load_results`)."""
    from probes.results_dir import load_results as _load

    return _load(results_dir)


def figures(results: str | Path, out: str | Path | None = None, formats: Sequence[str] = ("pdf", "png"), log=print):
    """Paper figures and ``report.md`` from a results directory alone (no model needed).

    Returns (figure files, skipped messages, report path).
    """
    from analysis.figures import make_figures
    from analysis.report import write_report
    from training.io import read_json_object
    from training.errors import UsageError

    results = Path(results)
    formats = [f.strip().lower() for f in formats if f.strip()]
    bad = [f for f in formats if f not in ("pdf", "png", "svg")]
    if bad or not formats:
        raise UsageError(f"unknown figure format {bad[0] if bad else '(none)'!r}; use pdf, png or svg (comma-separated)")
    df = load_results(results)
    out_dir = Path(out) if out else (results if results.is_dir() else results.parent) / "figures"
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; give a directory for the figures")
    manifest_path = (results if results.is_dir() else results.parent) / "manifest.json"
    manifest = None
    if manifest_path.is_file():  # read before any figure is drawn: a bad manifest leaves nothing half-written
        manifest = read_json_object(manifest_path, "a results manifest", "fix or delete it to draw the figures")
    files, skipped = make_figures(df, out_dir, formats=formats)
    report = write_report(df, out_dir, manifest=manifest, figure_files=files, skipped=skipped)
    for msg in skipped:
        log(msg)
    log(f"{len(files)} figure files and {report} written")
    return files, skipped, report


DEMO_FORCING = 16
"""Continuations per branch the demo forces at each first fork (branch value, forced pass@k)."""


def demo(out: str | Path = "runs/demo", device: str | None = None, progress: bool = True,
         overrides: Sequence[str] | None = None, log=print):
    """The embedded default end to end: data, base pretraining, SFT with checkpoints, ``probes
    run`` on every SFT checkpoint (step 0 is the base model) with the tuned lens, branch forcing
    and activation patching against the base, figures and the report."""
    import time

    t0 = time.perf_counter()
    out = Path(out)
    cfg = load_config(None, list(overrides or []))
    train(cfg, out=out, device=device, progress=progress, log=log)
    t1 = time.perf_counter()
    df = run([str(out / "checkpoints" / "sft-step*")], out=out / "results", device=device, progress=progress,
             samples=cfg.eval.samples, strategies=[cfg.eval.strategy], seed=cfg.eval.seed, forcing=DEMO_FORCING,
             patching=True, log=log)
    t2 = time.perf_counter()
    files, skipped, report = figures(out / "results", log=log)
    t3 = time.perf_counter()
    log(f"demo finished in {t3 - t0:.0f}s (data and training {t1 - t0:.0f}s, probes run {t2 - t1:.0f}s, "
        f"figures {t3 - t2:.0f}s); the report is {report}")
    return df, report


def sweep(config=None, out="runs/sweep", task=None, workers=0, quick=False, device=None, progress=True, log=print):
    """Fork-prevalence x policy x seed grid; see :func:`probes.grid.sweep`."""
    from probes.grid import sweep as _sweep

    return _sweep(config=config, out=out, task=task, workers=workers, quick=quick, device=device,
                  progress=progress, log=log)


def interpolate(base: str | Path, sft: str | Path, alphas: Sequence[float] = (0.5,), out: str | Path | None = None,
                log=print) -> list[Path]:
    """Weight interpolation (WiSE-FT): checkpoints θ = (1−α)·θ_base + α·θ_SFT, one per α, written
    to ``out`` (default: beside ``sft``) as ``interp-a0.50`` etc.; see :mod:`training.interpolate`."""
    from training.interpolate import interpolate as _interpolate

    return _interpolate(base, sft, alphas, out=out, log=log)


def find_forks(model, problems, out=None, **kwargs):
    """Fork discovery: the decision points of unannotated ``problems`` (a JSONL path or a list),
    found with ``model`` (a checkpoint directory, native or Hugging Face, or a loaded model) as the
    reference, confirmed by the outcomes of forced alternatives and classified into the kinds.

    Returns ``(annotated problems, candidate table)`` (``.summary`` holds the printed summary);
    with ``out`` writes the annotated JSONL and ``.candidates.parquet`` beside it. Keyword
    arguments (``verifier``, ``samples``, ``p``, ``entropy_quantile`` or ``entropy``, ``tau``,
    ``max_new_tokens``, ``device``, ``seed``, ...): see :func:`analysis.forks.find_forks`.
    """
    from analysis.forks import find_forks as _find

    return _find(model, problems, out=out, **kwargs)


def fork_lens(checkpoint: str | Path, problem=0, eval: str | Path | None = None, device: str | None = None):
    """The logit lens at one problem's first decision point, as a tidy DataFrame.

    One row per layer x branch: ``layer`` (0 = before block 0, last = after the last block),
    ``branch``, ``valid``, ``mass`` (raw probability of the branch's first token) and ``share``
    (renormalised over the fork's branches). ``problem`` is an index into the eval set or a
    ``training.schema.Problem``.
    """
    import pandas as pd
    import torch

    from analysis.metrics import branch_mass, renormalised
    from hooks.encode import encode_problems
    from hooks.load import load
    from hooks.record import read_record
    from training.errors import UsageError
    from training.schema import Problem, read_jsonl
    from training.train import pick_device

    record = read_record(checkpoint)
    if isinstance(problem, Problem):
        problems = [problem]
    else:
        if eval is None:
            from probes.runner import eval_from_meta

            eval = eval_from_meta([record])
        problems = read_jsonl(eval)
        if not isinstance(problem, int) or not 0 <= problem < len(problems):
            raise UsageError(f"problem index {problem!r} is not in 0..{len(problems) - 1}")
        problems = [problems[problem]]
    model = load(record, device=pick_device(device))
    encoded, report = encode_problems(model.tokenizer, problems)
    if not encoded or not encoded[0].forks:
        raise UsageError(f"that problem has no decision point this tokenizer can read ({report.to_dict()})")
    e = encoded[0]
    fork = e.forks[0]
    ids = torch.tensor([e.ids])
    pos = torch.tensor([[fork.pos - 1]])
    _, resid = model.capture(ids, torch.ones_like(ids, dtype=torch.bool), pos, pos)
    lens = model.lens(resid[:, 0]).float()  # [1, layer, vocab]: final norm + unembedding per layer
    bids = torch.tensor([fork.branch_ids])
    mask = torch.ones_like(bids, dtype=torch.bool)
    mass = branch_mass(lens, bids.to(lens.device), mask.to(lens.device))[0].cpu()
    share = renormalised(mass[None], mask)[0]
    rows = [
        {"layer": layer, "branch": b, "valid": v, "mass": float(mass[layer, j]), "share": float(share[layer, j])}
        for layer in range(mass.shape[0])
        for j, (b, v) in enumerate(zip(fork.branches, fork.valid))
    ]
    return pd.DataFrame(rows)
