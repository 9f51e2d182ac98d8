"""Data synthesis: the diverse pretraining corpus, the fork-heavy SFT corpus, the held-out eval set.

Each corpus is a JSONL file in the annotated schema plus one manifest (config, seed, counts, realised
fork prevalence per kind, file hashes). The manifest hash is what checkpoints record, so a
checkpoint always says which data made it. Existing data with the same recipe is reused.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from training.config import DataConfig, ExperimentConfig
from training.errors import UsageError
from training.io import atomic_write, read_json_object, sha256_file, sha256_json, write_json
from training.schema import KINDS, Problem, write_jsonl
from training.tasks import get_task
from training.tasks.base import Task

# Independent streams per corpus, so changing one corpus's size never changes another's problems.
_STREAM = {"pretrain": 1, "sft": 2, "eval": 3, "probe": 4}


def _rng(seed: int, corpus: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM[corpus]])


def split_counts(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding, so counts sum to ``total`` and follow ``shares``."""
    norm = sum(shares.values())
    raw = {k: total * v / norm for k, v in shares.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def sft_mix(data: DataConfig) -> dict[str, float]:
    rest = 1.0 - data.decipherable_share
    return {
        "decipherable": data.decipherable_share,
        "multi-valid": rest * data.prevalence,
        "indecipherable": rest * (1.0 - data.prevalence),
    }


def make_pretrain(task: Task, n: int, seed: int) -> list[Problem]:
    rng = _rng(seed, "pretrain")
    return [task.pretrain_example(rng) for _ in range(n)]


def make_sft(task: Task, data: DataConfig, seed: int) -> list[Problem]:
    """Correct demonstrations; the kind mix is the fork-prevalence knob, the policy is the
    demonstration at multi-valid forks."""
    rng = _rng(seed, "sft")
    counts = split_counts(data.n_sft, sft_mix(data))
    out: list[Problem] = []
    for kind in KINDS:
        made: list[Problem] = []
        while len(made) < counts[kind]:
            if kind != "multi-valid":
                made.append(task.problem(kind, rng))
            elif data.policy == "paired":  # every valid demonstration of one problem, differing only at the fork
                state = rng.bit_generator.state
                first = task.problem(kind, rng, demo=0)
                after = rng.bit_generator.state
                made.append(first)
                for demo in range(1, len(first.decision_points[0].valid)):
                    rng.bit_generator.state = state
                    made.append(task.problem(kind, rng, demo=demo))
                rng.bit_generator.state = after
            else:  # balanced cycles through the valid branches, so each is shown equally often
                made.append(task.problem(kind, rng, demo=len(made) if data.policy == "balanced" else 0))
        out += made[: counts[kind]]
    out = [out[i] for i in rng.permutation(len(out))]
    return out[: data.n_sft]


def make_eval(task: Task, data: DataConfig, seed: int, exclude: set[str]) -> list[Problem]:
    """Held-out problems of every kind, none sharing a graph with the training corpora."""
    rng = _rng(seed, "eval")
    counts = split_counts(data.n_eval, data.eval_mix)
    out = []
    for kind in KINDS:
        made = 0
        tries = 0
        while made < counts[kind]:
            p = task.problem(kind, rng)
            tries += 1
            if task.key(p) in exclude:
                if tries > 100 * counts[kind] + 1000:
                    raise UsageError("cannot find eval problems disjoint from training; make the task larger")
                continue
            out.append(p)
            made += 1
    return out


PROBE_SPLIT_PER_KIND = 500
"""Default size of the probe-training split: problems per decision-point kind (one fork each on
the graph task: 1,500 forks, 1,000 with a single valid branch). A candidate-conditioned probe has
d_model (+ 1) weights per kind x layer. On the default run's final checkpoint the held-out accuracy
averaged over kind x layer x target cells was .62 / .65 / .65 / .66 at 250 / 500 / 1,000 / 2,000
per kind, while teacher-forcing the split is most of the probe step's time (~2 s at 500 per kind
on one CPU thread)."""


def make_probe_split(
    task: Task, counts: int | dict[str, int] = PROBE_SPLIT_PER_KIND, seed: int = 0, exclude: set[str] | None = None
) -> list[Problem]:
    """Problems for fitting linear probes: ``counts`` per kind (an int: that many of every kind),
    drawn like the eval set (the canonical demonstration, ``demo=0``) from a stream of their own,
    so neither the pretrain, SFT nor eval corpus changes with it, and none whose ``task.key`` is in
    ``exclude`` (pass the eval set's keys, and the training corpora's where they are at hand).

    Kinds come in ``training.schema.KINDS`` order; the same (task, counts, seed, exclude) gives the
    same problems.
    """
    if isinstance(counts, bool) or not isinstance(counts, (int, dict)):
        raise UsageError(f"probe split counts must be a whole number or a dict kind -> number, got {counts!r}")
    per_kind = {k: counts for k in KINDS} if isinstance(counts, int) else dict(counts)
    unknown = sorted(set(per_kind) - set(KINDS))
    if unknown:
        raise UsageError(f"unknown decision-point kind {unknown[0]!r} in the probe split counts; known: {', '.join(KINDS)}")
    bad = [(k, v) for k, v in per_kind.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise UsageError(f"probe split count for {bad[0][0]} must be a whole number >= 0, got {bad[0][1]!r}")
    exclude = set(exclude or ())
    rng = _rng(seed, "probe")
    out: list[Problem] = []
    seen: set[str] = set()
    for kind in KINDS:
        want = per_kind.get(kind, 0)
        made = tries = 0
        while made < want:
            p = task.problem(kind, rng)
            tries += 1
            key = task.key(p)
            if key in exclude or key in seen:
                if tries > 100 * want + 1000:
                    raise UsageError("cannot find probe-training problems disjoint from the eval set; make the task larger")
                continue
            seen.add(key)
            out.append(p)
            made += 1
    return out


def prevalence(problems: list[Problem]) -> dict[str, float]:
    """Fork prevalence: the share of examples with at least one decision point of each kind."""
    c: Counter[str] = Counter()
    for p in problems:
        c.update(p.kinds)
    n = max(len(problems), 1)
    return {k: c[k] / n for k in KINDS}


def data_recipe(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"format": 2, "seed": cfg.seed, "task": cfg.task, "data": dataclasses.asdict(cfg.data)}


def build_data(cfg: ExperimentConfig, out_dir: str | Path, log=print, eval_from: str | Path | None = None) -> dict[str, Any]:
    """Write ``pretrain.jsonl``, ``sft.jsonl``, ``eval.jsonl`` and ``manifest.json``; reuse if done.

    With ``eval_from`` (an SFT run on a shared base model) only the SFT corpus is made: the eval set
    is the base run's, checked to share no problem with this SFT corpus and copied into this run's
    data directory (so every checkpoint's eval set lies inside its own run), and no pretraining
    corpus is written.
    """
    out_dir = Path(out_dir)
    recipe = data_recipe(cfg)
    if eval_from is not None:
        recipe["eval_from"] = sha256_file(eval_from)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file():
        old = read_json_object(manifest_path, "a data manifest", f"delete {out_dir} to make the data again")
        if not isinstance(old.get("files"), dict):
            raise UsageError(f"{manifest_path} is not a fork-probes data manifest; delete {out_dir} to make the data again")
        if old.get("recipe") == recipe and all((out_dir / f).is_file() for f in old["files"]):
            if eval_from is not None:
                _copy_eval(Path(eval_from), out_dir / "eval.jsonl")
            return old
        raise UsageError(
            f"{out_dir} holds data made with another recipe; use another --out or delete {out_dir}"
        )
    t0 = time.perf_counter()
    task = get_task(cfg.task)
    sft = make_sft(task, cfg.data, cfg.seed)
    if eval_from is None:
        pre = make_pretrain(task, cfg.data.n_pretrain, cfg.seed)
        seen = {task.key(p) for p in pre} | {task.key(p) for p in sft}
        ev = make_eval(task, cfg.data, cfg.seed, seen)
        corpora = (("pretrain", pre), ("sft", sft), ("eval", ev))
        eval_path = out_dir / "eval.jsonl"
    else:
        from training.schema import read_jsonl

        source = Path(eval_from).resolve()
        eval_keys = {task.key(p) for p in read_jsonl(source)}
        if any(task.key(p) in eval_keys for p in sft):
            raise UsageError(f"the SFT corpus shares problems with {source}; use another seed")
        corpora = (("sft", sft),)
        eval_path = _copy_eval(source, out_dir / "eval.jsonl")
    files = {}
    for name, problems in corpora:
        path = write_jsonl(out_dir / f"{name}.jsonl", problems)
        files[path.name] = {
            "count": len(problems),
            "sha256": sha256_file(path),
            "prevalence": prevalence(problems),
        }
    manifest = {"recipe": recipe, "files": files, "sft_mix": sft_mix(cfg.data),
                "eval": {"path": "eval.jsonl", "sha256": sha256_file(eval_path),
                         **({"copied_from": str(Path(eval_from).resolve())} if eval_from else {})}}
    manifest["hash"] = sha256_json(manifest)
    write_json(manifest_path, manifest)
    counts = ", ".join(f"{f['count']} {name[: -len('.jsonl')]}" for name, f in files.items())
    log(f"data: {counts} problems -> {out_dir} ({time.perf_counter() - t0:.0f}s)")
    return manifest


def _copy_eval(source: Path, dest: Path) -> Path:
    """A byte-identical copy of a shared eval set (same sha256, so tables from both runs join)."""
    if not dest.is_file() or sha256_file(dest) != sha256_file(source):
        data = source.read_bytes()
        atomic_write(dest, lambda tmp: tmp.write_bytes(data))
    return dest
