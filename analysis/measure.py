"""Measurements of one checkpoint on an encoded eval set, as tidy-table rows.

Two passes: one teacher-forced forward per batch of problems (entropy, branch mass, logit lens
and the residuals the probes read, captured at the decision positions only), and batched
KV-cached sampling per strategy (pass@k, fork_valid_rate, branch_coverage).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from analysis.metrics import branch_mass, entropy, kl, mass_top_branch, mass_valid
from hooks.distributions import unusable
from analysis.passk import bootstrap_mean_ci, ks_for, pass_at_k_array
from analysis.table import KINDS, row
from hooks.base import Instrumented
from hooks.encode import EncodedProblem, pad_ids
from training.errors import UsageError
from training.schema import Problem

Verifier = Callable[[Problem, str], bool]


def seed_for(*parts: Any) -> int:
    """A stable seed from names (checkpoint, strategy, ...), so every stream is reproducible."""
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


@dataclass
class ForkCapture:
    """Per decision point (items), everything the fork metrics and probes need."""

    problem: Int[np.ndarray, " items"]
    kind: list[str]
    entropy: Float[np.ndarray, " items"]
    mass: Float[np.ndarray, "items max_branches"]
    """Raw branch mass (0 where a fork has fewer branches)."""
    branch_mask: Bool[np.ndarray, "items max_branches"]
    valid_mask: Bool[np.ndarray, "items max_branches"]
    lens_mass: Float[np.ndarray, "items layer max_branches"]
    lens_kl: Float[np.ndarray, "items layer"]
    resid: Float[np.ndarray, "items layer d_model"]
    other_entropy: Float[np.ndarray, " others"]
    other_kind: list[str]


def _refuse_non_finite(ok: bool, model: Instrumented, what: str) -> None:
    """NaN or Inf in what the model computed is an error naming the checkpoint, never a measurement."""
    if not ok:
        raise UsageError(f"{model.path}: non-finite {what} in the teacher-forced pass (an overflow in "
                         f"{getattr(model, 'dtype', 'float32')}, or damaged weights); no number is reported for it")


@torch.inference_mode()
def teacher_forced(model: Instrumented, problems: Sequence[EncodedProblem], batch_size: int = 64) -> ForkCapture:
    """One forward pass per batch on the gold prefix; reads only decision and completion positions."""
    max_b = max((len(f.branch_ids) for p in problems for f in p.forks), default=2)
    acc: dict[str, list] = {k: [] for k in ("problem", "kind", "entropy", "mass", "bmask", "vmask", "lmass", "lkl", "resid", "oent", "okind")}
    for start in range(0, len(problems), batch_size):
        batch = [p for p in problems[start : start + batch_size]]
        ids = pad_ids([p.ids for p in batch], model.tokenizer.pad_id)
        attn = pad_ids([[1] * len(p.ids) for p in batch], 0).bool()
        # logits at every completion prediction position (prompt_len-1 .. len-2), residuals at forks
        logit_pos = [list(range(p.prompt_len - 1, len(p.ids) - 1)) for p in batch]
        fork_read = [[f.pos - 1 for f in p.forks] or [0] for p in batch]
        logits, resid = model.capture(ids, attn, pad_ids(fork_read, 0), pad_ids(logit_pos, 0))
        logits = logits.float()
        _refuse_non_finite(not bool(unusable(logits).any()), model, "logits")
        _refuse_non_finite(bool(torch.isfinite(resid).all()), model, "residual stream")
        ent = entropy(logits).cpu()
        for i, p in enumerate(batch):
            fork_at = {f.pos - 1 for f in p.forks}
            for j, pos in enumerate(logit_pos[i]):
                if pos not in fork_at:
                    acc["oent"].append(float(ent[i, j]))
                    acc["okind"].append(p.kind)
            if not p.forks:
                continue
            f_logits = torch.stack([logits[i, logit_pos[i].index(f.pos - 1)] for f in p.forks])
            f_resid = resid[i, : len(p.forks)].float()
            bids = torch.zeros((len(p.forks), max_b), dtype=torch.long)
            bmask = torch.zeros((len(p.forks), max_b), dtype=torch.bool)
            vmask = torch.zeros_like(bmask)
            for j, f in enumerate(p.forks):
                nb = len(f.branch_ids)
                bids[j, :nb] = torch.tensor(f.branch_ids)
                bmask[j, :nb] = True
                vmask[j, :nb] = torch.tensor(f.valid)
            lens_logits = model.lens(f_resid.to(model.device)).float()  # [forks, layer, vocab]
            _refuse_non_finite(not bool(unusable(lens_logits).any()), model, "logit-lens logits")
            acc["mass"].append(branch_mass(f_logits, bids.to(f_logits.device), bmask.to(f_logits.device)).cpu())
            acc["lmass"].append(branch_mass(lens_logits, bids.to(lens_logits.device), bmask.to(lens_logits.device)).cpu())
            acc["lkl"].append(kl(f_logits[:, None, :], lens_logits).cpu())
            acc["entropy"].append(entropy(f_logits).cpu())
            acc["resid"].append(f_resid.cpu())
            acc["bmask"].append(bmask)
            acc["vmask"].append(vmask)
            acc["problem"] += [p.index] * len(p.forks)
            acc["kind"] += [f.kind for f in p.forks]
    if not acc["mass"]:
        empty = np.zeros((0,))
        return ForkCapture(np.zeros(0, int), [], empty, np.zeros((0, max_b)), np.zeros((0, max_b), bool),
                           np.zeros((0, max_b), bool), np.zeros((0, 1, max_b)), np.zeros((0, 1)), np.zeros((0, 1, 1)),
                           np.array(acc["oent"]), acc["okind"])
    return ForkCapture(
        problem=np.array(acc["problem"]),
        kind=acc["kind"],
        entropy=torch.cat(acc["entropy"]).numpy(),
        mass=torch.cat(acc["mass"]).numpy(),
        branch_mask=torch.cat(acc["bmask"]).numpy(),
        valid_mask=torch.cat(acc["vmask"]).numpy(),
        lens_mass=torch.cat(acc["lmass"]).numpy(),
        lens_kl=torch.cat(acc["lkl"]).numpy(),
        resid=torch.cat(acc["resid"]).numpy(),
        other_entropy=np.array(acc["oent"], dtype=float),
        other_kind=acc["okind"],
    )


def _by_kind(kinds: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    kinds = np.asarray(kinds)
    out = [(k, kinds == k) for k in KINDS if (kinds == k).any()]
    return out + [("all", np.ones(len(kinds), dtype=bool))] if len(kinds) else out


def estimate_row(metric: str, values: np.ndarray, rng: np.random.Generator, n_boot: int, where: dict[str, Any],
                 **cols: Any) -> dict | None:
    """The mean of ``values`` (NaN left out) with its bootstrap interval as one table row; None
    when no value is left. Every measurement's row is made here, so they all read alike."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    est = bootstrap_mean_ci(values, rng, n_boot=n_boot)
    return row(metric=metric, value=est.value, ci_low=est.low, ci_high=est.high, n=len(values), **cols, **where)


def layer_rows(metrics: dict[str, np.ndarray], sel: np.ndarray, kind: str, rng: np.random.Generator,
               n_boot: int, where: dict[str, Any]) -> list[dict]:
    """Per layer, one row per metric (in the dict's order) over the items ``sel`` picks from each
    [items, layer] array: the loop the logit lens, the tuned lens and patching share, so their
    bootstrap draws come in one order."""
    rows = []
    n_layers = next(iter(metrics.values())).shape[1]
    for layer in range(n_layers):
        for metric, values in metrics.items():
            r = estimate_row(metric, values[sel, layer], rng, n_boot, where, kind=kind, layer=layer)
            if r is not None:
                rows.append(r)
    return rows


def fork_rows(cap: ForkCapture, where: dict[str, Any], rng: np.random.Generator, n_boot: int = 1000) -> list[dict]:
    """entropy_fork / entropy_other, branch mass, and the logit lens per layer, per kind."""
    rows: list[dict] = []

    def add(metric: str, values: np.ndarray, kind: str) -> None:
        r = estimate_row(metric, values, rng, n_boot, where, kind=kind, layer=None)
        if r is not None:
            rows.append(r)

    mass = torch.from_numpy(cap.mass)
    bmask = torch.from_numpy(cap.branch_mask)
    vmask = torch.from_numpy(cap.valid_mask)
    lmass = torch.from_numpy(cap.lens_mass)
    top = mass_top_branch(mass, bmask).numpy() if len(mass) else np.zeros(0)
    valid = mass_valid(mass, vmask).numpy() if len(mass) else np.zeros(0)
    total = mass_valid(mass, bmask).numpy() if len(mass) else np.zeros(0)
    ltop = mass_top_branch(lmass, bmask).numpy() if len(mass) else np.zeros((0, 1))
    lvalid = mass_valid(lmass, vmask).numpy() if len(mass) else np.zeros((0, 1))
    for kind, sel in _by_kind(cap.kind):
        add("entropy_fork", cap.entropy[sel], kind)
        add("mass_valid", valid[sel], kind)
        add("mass_top_branch", top[sel], kind)
        add("mass_branches", total[sel], kind)
        rows += layer_rows({"lens_mass_valid": lvalid, "lens_mass_top_branch": ltop, "lens_kl_final": cap.lens_kl},
                           sel, kind, rng, n_boot, where)
    for kind, sel in _by_kind(cap.other_kind):
        add("entropy_other", cap.other_entropy[sel], kind)
    return rows


@dataclass
class SampleOutcome:
    """Per problem: n, correct count, first-fork valid count, distinct valid branches covered,
    samples that ran out of budget; and every sample, for ``samples.parquet``."""

    kind: list[str]
    n: int
    correct: np.ndarray
    fork_valid: np.ndarray
    coverage: np.ndarray
    has_fork: np.ndarray
    truncated: np.ndarray
    records: list[dict[str, Any]]
    fork_reached: np.ndarray | None = None
    """Per problem: samples that followed the gold completion up to its first fork (and went on)."""
    """One per problem x sample: problem, sample, kind, text, finished, correct, fork_reached, fork_branch, fork_valid, n_tokens."""


def native_budget(problems: Sequence[EncodedProblem], n_ctx: int | None) -> int:
    """New tokens a native task's samples may take: the longest gold completion (with its EOS) + 2,
    within the context left after the longest prompt."""
    budget = max(len(p.ids) - p.prompt_len for p in problems) + 2
    if n_ctx:
        budget = min(budget, n_ctx - max(p.prompt_len for p in problems))
    return max(1, budget)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    at = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return (text[: min(at)], True) if at else (text, False)


def _stop_string_check(tok: Any, stop_strings: Sequence[str]):
    """A sampler stop check: rows whose decoded new tokens contain a stop string."""
    def check(tokens: Tensor) -> Tensor:
        return torch.tensor([cut_at_stop(tok.decode_completion(row)[0], stop_strings)[1] for row in tokens.tolist()],
                            dtype=torch.bool)

    return check


def sample_outcomes(
    model: Instrumented,
    problems: Sequence[EncodedProblem],
    verifier: Verifier,
    strategy: str,
    n: int,
    seed: int,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    stop_strings: Sequence[str] = (),
    reference: Instrumented | None = None,
) -> SampleOutcome:
    """n samples per problem through the KV-cached sampler (every prompt length in one call),
    verified, with the first fork read.

    A sample is scored only when it finished — a stop id (the EOS, or any of the generation
    config's) or a stop string within ``max_new_tokens`` (default: :func:`native_budget`); one
    that ran out of budget counts as a failure and as truncated, so a reader sees when pass@k is
    capped by length. The text a verifier sees ends before the stop. ``batch_size`` rows per
    sampler chunk: 256 on CPU (as fast as 2048 there, with a lower memory peak), 4096 on CUDA.
    """
    if batch_size is None:
        batch_size = 4096 if model.device.type == "cuda" else 256
    from hooks.sampler import NonFiniteLogits, generate

    tok = model.tokenizer
    budget = max_new_tokens or native_budget(problems, getattr(model, "n_ctx", None))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    stop_check = _stop_string_check(tok, stop_strings) if stop_strings else None
    prompts = [p.ids[: p.prompt_len] for p in problems]
    try:
        out = generate(model.stepper(), prompts, n, budget, sorted(tok.stop_ids), tok.pad_id, strategy, gen,
                       batch_size=batch_size, stop_check=stop_check,
                       reference=reference.stepper() if reference is not None else None)
    except NonFiniteLogits as e:
        raise UsageError(f"{model.path}: {e}; no number is reported for it") from None
    P = len(problems)
    correct, fork_valid, coverage, truncated, reached = (np.zeros(P, dtype=int) for _ in range(5))
    has_fork = np.array([p.first_fork is not None for p in problems])
    records: list[dict[str, Any]] = []
    tokens, finished = out.tokens.tolist(), out.finished.tolist()
    for i, p in enumerate(problems):
        gold = p.ids[p.prompt_len:]
        fork = p.first_fork
        j = fork.pos - p.prompt_len if fork else None
        seen_valid: set[int] = set()
        for sample_j, (s, done) in enumerate(zip(tokens[i], finished[i])):
            text, _ = tok.decode_completion(s)
            text = cut_at_stop(text, stop_strings)[0] if stop_strings else text
            ok = bool(done) and verifier(p.problem, text)
            correct[i] += ok
            truncated[i] += not done
            branch, valid = "", None
            at_fork = fork is not None and j < len(s) and s[:j] == gold[:j]
            reached[i] += at_fork
            if at_fork and s[j] in fork.branch_ids:
                b = fork.branch_ids.index(s[j])
                branch, valid = fork.branches[b], bool(fork.valid[b])
                if fork.valid[b]:
                    fork_valid[i] += 1
                    seen_valid.add(b)
            n_tokens = next((t + 1 for t, x in enumerate(s) if x in tok.stop_ids), len(s))
            records.append({"problem": p.index, "sample": sample_j, "kind": p.kind, "text": text, "finished": bool(done),
                            "correct": ok, "fork_reached": bool(at_fork), "fork_branch": branch, "fork_valid": valid,
                            "n_tokens": n_tokens})
        coverage[i] = len(seen_valid)
    return SampleOutcome([p.kind for p in problems], n, correct, fork_valid, coverage, has_fork, truncated, records,
                         reached)


def sample_rows(out: SampleOutcome, strategy: str, where: dict[str, Any], rng: np.random.Generator,
                ks: Sequence[int] | None = None, n_boot: int = 1000) -> list[dict]:
    """pass@k with bootstrap intervals over problems, fork_valid_rate and branch_coverage, per kind."""
    rows = []
    ks = list(ks) if ks is not None else ks_for(out.n)
    for kind, sel in _by_kind(out.kind):
        if not sel.any():
            continue
        for k in ks:
            vals = pass_at_k_array(out.n, out.correct[sel], k)
            est = bootstrap_mean_ci(vals, rng, n_boot=n_boot)
            rows.append(row(metric="pass@k", value=est.value, ci_low=est.low, ci_high=est.high, n=int(sel.sum()),
                            kind=kind, k=k, strategy=strategy, **where))
        fsel = sel & out.has_fork
        if fsel.any():
            est = bootstrap_mean_ci(out.fork_valid[fsel] / out.n, rng, n_boot=n_boot)
            rows.append(row(metric="fork_valid_rate", value=est.value, ci_low=est.low, ci_high=est.high,
                            n=int(fsel.sum()), kind=kind, strategy=strategy, **where))
            est = bootstrap_mean_ci(out.coverage[fsel].astype(float), rng, n_boot=n_boot)
            rows.append(row(metric="branch_coverage", value=est.value, ci_low=est.low, ci_high=est.high,
                            n=int(fsel.sum()), kind=kind, strategy=strategy, **where))
    if out.fork_reached is not None:  # its own stream, so adding it moved no other interval
        rrng = np.random.default_rng(seed_for(where.get("checkpoint"), strategy, "fork_reached_rate"))
        for kind, sel in _by_kind(out.kind):
            fsel = sel & out.has_fork
            if fsel.any():
                est = bootstrap_mean_ci(out.fork_reached[fsel] / out.n, rrng, n_boot=n_boot)
                rows.append(row(metric="fork_reached_rate", value=est.value, ci_low=est.low, ci_high=est.high,
                                n=int(fsel.sum()), kind=kind, strategy=strategy, **where))
    # its own stream, so adding it moved no other interval
    trng = np.random.default_rng(seed_for(where.get("checkpoint"), strategy, "truncated_rate"))
    for kind, sel in _by_kind(out.kind):
        est = bootstrap_mean_ci(out.truncated[sel] / out.n, trng, n_boot=n_boot)
        rows.append(row(metric="truncated_rate", value=est.value, ci_low=est.low, ci_high=est.high,
                        n=int(sel.sum()), kind=kind, strategy=strategy, **where))
    return rows
