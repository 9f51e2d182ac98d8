"""``probes run``: measure every checkpoint on one annotated eval set, into one tidy table.

Each finished checkpoint's rows are written atomically to ``RESULTS/checkpoints/<label>.parquet``
as soon as it is done, then the combined ``results.parquet``/``results.csv`` and
``manifest.json`` are rewritten atomically; a rerun skips finished checkpoints (unless
``force``), so a run killed at any moment and started again ends with the same table.
"""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from analysis.measure import fork_rows, probe_labels, sample_outcomes, sample_rows, seed_for, teacher_forced
from analysis.passk import ks_for
from analysis.table import row, to_frame
from hooks.encode import encode_problems
from hooks.load import describe, load, resolve_checkpoints
from training.errors import UsageError
from training.io import atomic_write, read_json, sha256_file, write_json
from training.schema import read_jsonl

DEFAULT_SAMPLES = 32
DEFAULT_STRATEGY = "temperature:1.0"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("fork-probes", "torch", "transformer-lens", "nnsight", "transformers", "numpy", "pandas", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _labels(paths: list[Path]) -> list[str]:
    """Checkpoint labels: the directory name, or run__name where two runs share a name."""
    names = [p.name for p in paths]

    def run_dir(p: Path) -> Path:
        return p.parent.parent if p.parent.name == "checkpoints" else p.parent

    return [f"{run_dir(p).name}__{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def _default_out(paths: list[Path]) -> Path:
    first = paths[0].resolve()
    if first.parent.name == "checkpoints":
        return first.parent.parent / "results"
    return first.parent / "results"


def _eval_from_meta(paths: list[Path], infos: list[dict]) -> Path:
    found: dict[str, Path] = {}
    for p, info in zip(paths, infos):
        meta = info["meta"]
        if "eval_file" not in meta:
            continue
        f = (p / meta.get("data_dir", ".") / meta["eval_file"]).resolve()
        found.setdefault(meta.get("eval_sha256") or str(f), f)
    if not found:
        raise UsageError("the checkpoints record no eval set; pass --eval FILE.jsonl")
    if len(found) > 1:
        raise UsageError("the checkpoints record different eval sets (they come from different runs); pass --eval FILE.jsonl")
    f = next(iter(found.values()))
    if not f.is_file():
        raise UsageError(f"the checkpoints' eval set {f} is missing; pass --eval FILE.jsonl")
    return f


def _verifier(spec: str | None, answer_prefix: str, infos: list[dict]):
    if spec is not None:
        from analysis.verifiers import make_verifier

        return make_verifier(spec, answer_prefix=answer_prefix), spec
    tasks = [i["task"] for i in infos if i["task"]]
    if not tasks:
        from analysis.verifiers import make_verifier

        return make_verifier("exact", answer_prefix=answer_prefix), "exact"
    from training.tasks import get_task

    task = get_task(tasks[0])
    return task.verify, f"task:{task.name}"


def _check_same(paths: list[Path], infos: list[dict]) -> None:
    first = infos[0]
    for p, info in zip(paths[1:], infos[1:]):
        if info["tokenizer"] != first["tokenizer"]:
            raise UsageError(
                f"{p} uses another tokenizer than {paths[0]}: measure checkpoints that share a tokenizer together"
            )
        if info["task"] and first["task"] and info["task"] != first["task"]:
            raise UsageError(
                f"{p} was trained on another task ({info['task'].get('name')}, {info['task']}) than {paths[0]}: "
                "measure one task's checkpoints at a time"
            )


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
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Measure checkpoints (native or Hugging Face directories, paths or globs) on an eval set.

    Returns the tidy table (also saved under ``out``). ``extra_columns`` are constant columns
    added to every row (sweeps use it for task, prevalence, policy, seed).
    """
    from hooks.strategies import parse_strategy
    from training.train import pick_device

    paths = resolve_checkpoints(checkpoints if not isinstance(checkpoints, (str, Path)) else [checkpoints])
    infos = [describe(p) for p in paths]
    _check_same(paths, infos)
    n = DEFAULT_SAMPLES if samples is None else samples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"--samples must be a whole number ≥ 1, got {samples!r}")
    strategies = [strategies] if isinstance(strategies, str) else list(strategies or [DEFAULT_STRATEGY])
    strategies = [str(parse_strategy(s)) for s in strategies]
    ks = sorted(set(k)) if k else ks_for(n)
    bad = [x for x in ks if x > n or x < 1]
    if bad:
        raise UsageError(f"k={bad[0]} is not in 1..n={n} samples: ask for k ≤ n or draw more samples (--samples)")
    dev = pick_device(device)
    eval_path = Path(eval) if eval else _eval_from_meta(paths, infos)
    problems = read_jsonl(eval_path)
    if not problems:
        raise UsageError(f"{eval_path} holds no problems")
    eval_sha = sha256_file(eval_path)
    task = next((i["task"] for i in infos if i["task"]), None)
    if task:
        other = {p.extra.get("task") for p in problems} - {None, task.get("name")}
        if other:
            raise UsageError(f"{eval_path} holds {sorted(other)[0]!r} problems but the checkpoints were trained on {task.get('name')!r}")
    verify, verifier_name = _verifier(verifier, answer_prefix, infos)

    out = Path(out) if out else _default_out(paths)
    identity = {
        "eval_sha256": eval_sha,
        "samples": n,
        "strategies": strategies,
        "k": ks,
        "seed": seed,
        "verifier": verifier_name,
        "tokenizer": infos[0]["tokenizer"],
    }
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        old = read_json(manifest_path)
        if old.get("identity") != identity:
            diff = [key for key in identity if old.get("identity", {}).get(key) != identity[key]]
            raise UsageError(
                f"{out} holds another run's results ({', '.join(diff)} differ); choose another --out or delete it"
            )
        manifest = old
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not a results directory; choose another --out")
    else:
        manifest = {"identity": identity, "checkpoints": {}, "timings": {}}
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror}") from None

    labels = _labels(paths)
    frames: dict[str, pd.DataFrame] = {}
    encoded = None
    report = None
    for path, label, info in zip(paths, labels, infos):
        part = out / "checkpoints" / f"{label}.parquet"
        if part.is_file() and not force:
            frames[label] = pd.read_parquet(part)
            log(f"{label}: already measured, skipped (--force measures it again)")
            continue
        t0 = time.perf_counter()
        model = load(path, device=dev, dtype=dtype)
        if encoded is None:
            encoded, report = encode_problems(model.tokenizer, problems)
            if not encoded:
                raise UsageError(f"no problem of {eval_path} could be encoded with {path}'s tokenizer")
            longest = max(len(p.ids) for p in encoded)
            if getattr(model, "n_ctx", None) and longest > model.n_ctx:
                raise UsageError(f"{eval_path} has sequences of {longest} tokens, longer than the model's context {model.n_ctx}")
        where = {"checkpoint": label, "phase": model.phase, "step": model.step, "format": model.format,
                 **(extra_columns or {})}
        rows = measure_checkpoint(model, encoded, verify, strategies, n, ks, seed, label, where, batch_size,
                                  n_boot, probes, progress)
        df = to_frame(rows)
        atomic_write(part, lambda tmp: df.to_parquet(tmp, index=False))
        frames[label] = df
        seconds = time.perf_counter() - t0
        manifest["checkpoints"][label] = {"path": str(path.resolve()), "format": model.format, "phase": model.phase,
                                          "step": model.step, "meta": info["meta"]}
        manifest["timings"][label] = round(seconds, 2)
        _write_table(out, frames, manifest, paths, infos, eval_path, report, labels)
        log(summary_line(df, label, model.step, strategies[0], seconds))
        del model
    return _write_table(out, frames, manifest, paths, infos, eval_path, report, labels)


def measure_checkpoint(model, encoded, verify, strategies, n, ks, seed, label, where, batch_size=64,
                       n_boot=1000, probes=True, progress=True) -> list[dict]:
    """All rows of one checkpoint: fork metrics, logit lens, probes, then sampled metrics."""
    from tqdm.auto import tqdm

    bar = tqdm(total=2 + len(strategies), desc=label, leave=False, disable=not progress)
    rng = np.random.default_rng(seed_for(seed, label, "bootstrap"))
    cap = teacher_forced(model, encoded, batch_size=batch_size)
    bar.update(1)
    rows = fork_rows(cap, where, rng, n_boot=n_boot)
    if probes and len(cap.problem):
        rows += probe_rows(cap, where, np.random.default_rng(seed_for(seed, label, "probes")))
    bar.update(1)
    for strategy in strategies:
        outcome = sample_outcomes(model, encoded, verify, strategy, n, seed_for(seed, strategy, "sample"))
        rows += sample_rows(outcome, strategy, where, rng, ks=ks, n_boot=n_boot)
        bar.update(1)
    bar.close()
    return rows


def probe_rows(cap, where: dict[str, Any], rng: np.random.Generator) -> list[dict]:
    """Linear probes per layer for the taken and the valid branch, with control task and majority."""
    from probes.linear import control_labels_for, probe_layers

    rows = []
    kinds = np.asarray(cap.kind)
    for target, (sel, labels) in probe_labels(cap).items():
        if sel.sum() < 2:
            continue
        y = labels[sel]
        control = control_labels_for(y, kinds[sel], rng)
        results = probe_layers(cap.resid[sel], y, cap.problem[sel], control, rng=rng)
        for r in results:
            if np.isnan(r.accuracy):
                continue
            rows.append(row(metric=f"probe_acc_{target}", value=r.accuracy, n=r.n_items, kind="all", layer=r.layer, **where))
            rows.append(row(metric=f"probe_selectivity_{target}", value=r.selectivity, n=r.n_items, kind="all", layer=r.layer, **where))
            rows.append(row(metric=f"probe_majority_{target}", value=r.majority, n=r.n_items, kind="all", layer=r.layer, **where))
    return rows


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


def _write_table(out: Path, frames: dict[str, pd.DataFrame], manifest: dict, paths, infos, eval_path, report, labels) -> pd.DataFrame:
    order = [lab for lab in labels if lab in frames] + sorted(set(frames) - set(labels))
    old_parts = sorted(p.stem for p in (out / "checkpoints").glob("*.parquet"))
    for stem in old_parts:  # results of checkpoints measured by an earlier call stay in the table
        if stem not in frames:
            frames[stem] = pd.read_parquet(out / "checkpoints" / f"{stem}.parquet")
            order.append(stem)
    df = pd.concat([frames[lab] for lab in order], ignore_index=True) if frames else to_frame([])
    df = df.sort_values(["phase", "step", "checkpoint"], key=lambda s: s.map({"pretrain": 0, "sft": 1}).fillna(2) if s.name == "phase" else s, kind="stable").reset_index(drop=True)
    atomic_write(out / "results.parquet", lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(out / "results.csv", lambda tmp: df.to_csv(tmp, index=False))
    manifest["eval"] = {"path": str(Path(eval_path).resolve()), "sha256": manifest["identity"]["eval_sha256"],
                        **(report.to_dict() if report is not None else manifest.get("eval", {}))}
    first_exp = next((i.get("experiment") for i in infos if i.get("experiment")), None)
    if first_exp:
        manifest["config"] = first_exp
    manifest["seeds"] = {"run": manifest["identity"]["seed"], "bootstrap/probes/sampling": "crc32 of (seed, checkpoint or strategy)"}
    manifest["versions"] = versions()
    manifest["command"] = " ".join(sys.argv)
    write_json(out / "manifest.json", manifest)
    return df


def load_results(results_dir: str | Path) -> pd.DataFrame:
    """The tidy table of a results directory, with the same dtypes ``run`` returned."""
    d = Path(results_dir)
    f = d / "results.parquet" if d.is_dir() else d
    if not f.is_file():
        raise UsageError(f"no results.parquet in {d}; run 'probes run --checkpoints ... --out {d}' first")
    return to_frame(pd.read_parquet(f).to_dict("records"))
