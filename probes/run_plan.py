"""The plan of a ``probes run``: every input checked and every default resolved, nothing written.

A run's checkpoints, eval set, verifier, strategies, devices, sampling budget, reference model
and identity (the settings that change its numbers) are settled here, so a mistake is one line
and leaves ``--out`` as it was; :mod:`probes.runner` then measures what the plan says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from analysis.passk import ks_for
from analysis.verifiers import Verifier, verifier_for
from hooks.encode import EncodedProblem, EncodeReport, encode_problems
from hooks.load import resolve_checkpoints
from hooks.record import CheckpointRecord
from probes.results_dir import iter_labels
from training.errors import UsageError
from training.io import sha256_file
from training.schema import Problem, check_problem_tasks, read_jsonl

DEFAULT_SAMPLES = 32
DEFAULT_STRATEGY = "temperature:1.0"


def default_out(records: list[CheckpointRecord]) -> Path:
    return records[0].run_dir / "results"


def eval_from_meta(records: list[CheckpointRecord]) -> Path:
    """The one eval set the checkpoints' meta.json files record (inside their run directories)."""
    found: dict[str, Path] = {}
    for rec in records:
        f = rec.eval_file()
        if f is not None:
            found.setdefault(rec.meta.get("eval_sha256") or str(f), f)
    if not found:
        raise UsageError("the checkpoints record no eval set; pass --eval FILE.jsonl")
    if len(found) > 1:
        raise UsageError("the checkpoints record different eval sets (they come from different runs); pass --eval FILE.jsonl")
    f = next(iter(found.values()))
    if not f.is_file():
        raise UsageError(f"the checkpoints' eval set {f} is missing (moved out of its run directory?); pass --eval FILE.jsonl")
    return f


def _check_same(records: list[CheckpointRecord]) -> None:
    first = records[0]
    for rec in records[1:]:
        if rec.tokenizer_fingerprint != first.tokenizer_fingerprint:
            raise UsageError(
                f"{rec.path} uses another tokenizer than {first.path}: measure checkpoints that share a tokenizer together"
            )
        if rec.task and first.task and rec.task != first.task:
            raise UsageError(
                f"{rec.path} was trained on another task ({rec.task.get('name')}, {rec.task}) than {first.path}: "
                "measure one task's checkpoints at a time"
            )


def skipped_text(report: EncodeReport, total: int) -> str:
    """'3 of 120 decision points skipped (inside a token: 3)', or '' when none were."""
    n = sum(report.skipped.values())
    if not n:
        return ""
    reasons = ", ".join(f"{why}: {c}" for why, c in sorted(report.skipped.items()))
    return f"{n} of {total} decision points skipped ({reasons})"


@dataclass
class RunPlan:
    """Everything a run needs, checked: nothing is written until a plan exists."""

    records: list[CheckpointRecord]
    labels: list[str]
    out: Path
    eval_path: Path
    problems: list[Problem]
    encoded: list[EncodedProblem]
    report: EncodeReport
    verifier: Verifier
    samples: int
    ks: list[int]
    strategies: list[str]
    device: Any
    dtype: str | None
    identity: dict[str, Any]
    max_new_tokens: int
    stop: list[str]
    forcing: int
    """Continuations per branch for branch forcing (0: off)."""
    reference: CheckpointRecord | None
    """The model ref_mix and patching compare with (the series' base, or --reference)."""
    tuned_lens: bool
    patching: bool
    probe_train: list[EncodedProblem] | None
    """Probe-training forks from the task's generator, disjoint from the eval set (None: cross-validate on eval)."""


DEFAULT_MAX_NEW_TOKENS = 512
"""Sampling budget for own data (Hugging Face checkpoints) when their generation config sets none."""


def _budget(records: list[CheckpointRecord], encoded: list[EncodedProblem], max_new_tokens: int | None) -> int:
    """New tokens per sample: --max-new-tokens; else a native task's own bound; else the model's
    generation_config max_new_tokens; else DEFAULT_MAX_NEW_TOKENS."""
    from analysis.measure import native_budget

    if max_new_tokens is not None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be a whole number ≥ 1, got {max_new_tokens!r}")
        return max_new_tokens
    if all(r.format == "native" for r in records):
        return native_budget(encoded, min(r.n_ctx for r in records))
    from hooks.hf import generation_config

    sizes = {generation_config(r.path).get("max_new_tokens") for r in records if r.format == "hf"}
    sizes = {x for x in sizes if isinstance(x, int) and not isinstance(x, bool) and x > 0}
    return max(sizes) if sizes else DEFAULT_MAX_NEW_TOKENS


def _check_stop(stop: Sequence[str] | str | None) -> list[str]:
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    for x in stop:
        if not isinstance(x, str) or not x:
            raise UsageError(f"--stop strings must be non-empty, got {x!r}")
    return stop


def _chat(problems: list[Problem], tokenizer: Any) -> list[Problem]:
    """Each prompt as the user turn of the tokenizer's chat template (completions untouched)."""
    from dataclasses import replace

    return [replace(p, prompt=tokenizer.chat_prompt(p.prompt)) for p in problems]


def _reference(records: list[CheckpointRecord], reference: str | Path | None,
               strategies: list[str], patching: bool = False) -> CheckpointRecord | None:
    """The reference model, when a strategy or patching needs one: --reference, else the series' base.

    Only a real model before SFT (SFT step 0, a ``base`` or ``pretrain`` checkpoint) serves as
    the default; an SFT checkpoint that is merely the earliest measured would make a wrong
    comparison, so without one the reference must be given.
    """
    from hooks.strategies import parse_strategy
    from hooks.record import read_record
    from training.phases import base_position

    needing = [s for s in strategies if parse_strategy(s).needs_reference] + (["--patching"] if patching else [])
    if not needing:
        return None
    if reference is not None:
        ref = read_record(reference)
    else:
        i, why = base_position([(r.phase, r.step) for r in records])
        if why == "earliest":
            raise UsageError(f"{needing[0]} needs a reference model and no base checkpoint (SFT step 0, a base or "
                             "pretrain checkpoint) is among the measured ones; pass --reference CHECKPOINT")
        ref = records[i]
    if ref.tokenizer_fingerprint != records[0].tokenizer_fingerprint:
        raise UsageError(f"the reference {ref.path} uses another tokenizer than {records[0].path}; "
                         "a reference must share the checkpoints' tokenizer and vocabulary")
    if patching:
        shape = ("n_layers", "d_model") if ref.format == "native" else ("num_hidden_layers", "hidden_size")
        for rec in records:
            mine = rec.config["model"] if rec.format == "native" else rec.config
            theirs = ref.config["model"] if ref.format == "native" else ref.config
            if rec.format != ref.format or any(mine.get(k) != theirs.get(k) for k in shape):
                raise UsageError(f"--patching: the reference {ref.path} has another shape than {rec.path} "
                                 "(layers, width or format differ); patch between checkpoints of one architecture")
    return ref


def plan_run(checkpoints, out=None, eval=None, samples=None, strategies=None, device=None, k=None, dtype=None,
             verifier=None, answer_prefix="answer", seed=0, n_boot=1000, probes=True, extra_columns=None,
             max_new_tokens=None, stop=None, chat_template=False, forcing=0, reference=None, tuned_lens=True,
             patching=False) -> RunPlan:
    """Validate every input of a run and resolve its defaults, writing nothing."""
    from hooks.strategies import parse_strategy
    from training.train import pick_device

    records = resolve_checkpoints(checkpoints if not isinstance(checkpoints, (str, Path)) else [checkpoints])
    _check_same(records)
    n = DEFAULT_SAMPLES if samples is None else samples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"--samples must be a whole number ≥ 1, got {samples!r}")
    strategies = [strategies] if isinstance(strategies, str) else list(strategies or [DEFAULT_STRATEGY])
    strategies = list(dict.fromkeys(str(parse_strategy(s)) for s in strategies))
    ks = sorted(set(k)) if k else ks_for(n)
    bad = [x for x in ks if isinstance(x, bool) or not isinstance(x, int) or x > n or x < 1]
    if bad:
        raise UsageError(f"k={bad[0]} is not in 1..n={n} samples: ask for k ≤ n or draw more samples (--samples)")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise UsageError(f"n_boot must be a whole number ≥ 1, got {n_boot!r}")
    dev = pick_device(device)
    if dtype is not None:
        from hooks.hf import parse_dtype

        parse_dtype(dtype)
        native = [r.path for r in records if r.format == "native"]
        if native and dtype != "float32":
            raise UsageError(f"--dtype {dtype} applies to Hugging Face checkpoints; native ones run in float32 ({native[0]})")
    eval_path = Path(eval) if eval else eval_from_meta(records)
    problems = read_jsonl(eval_path)
    if not problems:
        raise UsageError(f"{eval_path} holds no problems")
    task = next((r.task for r in records if r.task), None)
    check_problem_tasks(problems, task, str(eval_path), "the checkpoints were")
    verify = verifier_for(verifier, task, answer_prefix)
    stop = _check_stop(stop)
    if isinstance(forcing, bool) or not isinstance(forcing, int) or forcing < 0 or forcing == 1:
        raise UsageError(f"--forcing takes the continuations per branch, a whole number ≥ 2 (0: off), got {forcing!r}")
    tokenizer = records[0].tokenizer
    shown = _chat(problems, tokenizer) if chat_template else problems
    encoded, report = encode_problems(tokenizer, shown)
    for e in encoded:  # the verifier sees the problem as written, not its chat-formatted prompt
        e.problem = problems[e.index]
    if not encoded:
        raise UsageError(f"no problem of {eval_path} could be encoded with {records[0].path}'s tokenizer ({report.to_dict()})")
    total = sum(len(p.decision_points) for p in problems)
    if total and not any(e.forks for e in encoded):
        raise UsageError(f"every decision point of {eval_path} was skipped with {records[0].path}'s tokenizer "
                         f"({skipped_text(report, total)}); check the annotations' char offsets and branches")
    longest = max(len(e.ids) for e in encoded)
    for rec in records:
        if rec.n_ctx and longest > rec.n_ctx:
            raise UsageError(f"{eval_path} has sequences of {longest} tokens, longer than {rec.path}'s context {rec.n_ctx}")
    budget = _budget(records, encoded, max_new_tokens)
    longest_prompt = max(e.prompt_len for e in encoded)
    room = min([r.n_ctx - longest_prompt for r in records if r.format == "hf" and r.n_ctx] or [budget])
    if budget > room:
        if max_new_tokens is not None:
            raise UsageError(f"the longest prompt ({longest_prompt} tokens) + --max-new-tokens {budget} exceeds the "
                             f"context of {records[0].path} ({longest_prompt + room}); lower --max-new-tokens")
        budget = max(1, room)  # a default that does not fit is cut to the context left
    identity = {
        "eval_sha256": sha256_file(eval_path),
        "samples": n,
        "strategies": strategies,
        "k": ks,
        "seed": seed,
        "verifier": verify.spec,
        "answer_prefix": answer_prefix if verify.spec == "exact" else None,
        "tokenizer": records[0].tokenizer_fingerprint,
        "dtype": dtype or "float32",
        "device": dev.type,
        "n_boot": n_boot,
        "probes": bool(probes),
        "columns": dict(extra_columns or {}),
        "max_new_tokens": budget,
        "stop": stop,
        "chat_template": bool(chat_template),
        "forcing": forcing,
    }
    labels = iter_labels(records)
    clash = sorted({lab for lab in labels if labels.count(lab) > 1})
    if clash:
        raise UsageError(f"two checkpoints would both be labelled {clash[0]!r} (same run and directory names); "
                         "measure them into separate --out directories")
    ref = _reference(records, reference, strategies, patching)
    if ref is not None:
        identity["reference"] = ref.identity
    tuned_lens = bool(tuned_lens) and all(r.format == "native" or r.task for r in records)
    if tuned_lens:
        from analysis.tuned_lens import TunedLensSettings

        identity["tuned_lens"] = TunedLensSettings().to_dict()
    if patching:
        from analysis.patching import DEFAULT_MIN_SHIFT

        identity["patching"] = {"min_shift": DEFAULT_MIN_SHIFT}
    probe_train = None
    if probes:
        from probes.linear import L2
        from training.synth import PROBE_SPLIT_PER_KIND

        identity["probes"] = {"version": 2, "split_per_kind": PROBE_SPLIT_PER_KIND if task else 0, "l2": L2}
        if task and not chat_template and all(r.format == "native" for r in records):
            from training.synth import make_probe_split
            from training.tasks import get_task

            t = get_task(task)
            probe_train, _ = encode_problems(tokenizer, make_probe_split(t, seed=seed, exclude={t.key(p) for p in problems}))
    if forcing and not any(e.forks for e in encoded):
        raise UsageError(f"--forcing needs decision points, and no problem of {eval_path} has one the tokenizer can read")
    return RunPlan(records, labels, Path(out) if out else default_out(records), eval_path, problems,
                   encoded, report, verify, n, ks, strategies, dev, dtype, identity, budget, stop, forcing, ref,
                   tuned_lens, bool(patching), probe_train)

