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
from hooks.encode import EncodedProblem
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


def _pad(rows: Sequence[Sequence[int]], fill: int) -> Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


@torch.inference_mode()
def teacher_forced(model: Instrumented, problems: Sequence[EncodedProblem], batch_size: int = 64) -> ForkCapture:
    """One forward pass per batch on the gold prefix; reads only decision and completion positions."""
    max_b = max((len(f.branch_ids) for p in problems for f in p.forks), default=2)
    acc: dict[str, list] = {k: [] for k in ("problem", "kind", "entropy", "mass", "bmask", "vmask", "lmass", "lkl", "resid", "oent", "okind")}
    for start in range(0, len(problems), batch_size):
        batch = [p for p in problems[start : start + batch_size]]
        ids = _pad([p.ids for p in batch], model.tokenizer.pad_id)
        attn = _pad([[1] * len(p.ids) for p in batch], 0).bool()
        # logits at every completion prediction position (prompt_len-1 .. len-2), residuals at forks
        logit_pos = [list(range(p.prompt_len - 1, len(p.ids) - 1)) for p in batch]
        fork_read = [[f.pos - 1 for f in p.forks] or [0] for p in batch]
        logits, resid = model.capture(ids, attn, _pad(fork_read, 0), _pad(logit_pos, 0))
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


def fork_rows(cap: ForkCapture, where: dict[str, Any], rng: np.random.Generator, n_boot: int = 1000) -> list[dict]:
    """entropy_fork / entropy_other, branch mass, and the logit lens per layer, per kind."""
    rows: list[dict] = []

    def add(metric: str, values: np.ndarray, kind: str, layer: int | None = None) -> None:
        values = values[~np.isnan(values)]
        if not len(values):
            return
        est = bootstrap_mean_ci(values, rng, n_boot=n_boot)
        rows.append(row(metric=metric, value=est.value, ci_low=est.low, ci_high=est.high, n=len(values),
                        kind=kind, layer=layer, **where))

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
        for layer in range(cap.lens_mass.shape[1]):
            add("lens_mass_valid", lvalid[sel, layer], kind, layer)
            add("lens_mass_top_branch", ltop[sel, layer], kind, layer)
            add("lens_kl_final", cap.lens_kl[sel, layer], kind, layer)
    for kind, sel in _by_kind(cap.other_kind):
        add("entropy_other", cap.other_entropy[sel], kind)
    return rows


def probe_labels(cap: ForkCapture) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Classes for the probes: a branch's rank in its fork's fixed (token-id) order.

    ``taken`` = the branch this checkpoint puts most mass on (every fork); ``valid`` = the one
    right branch (forks with exactly one valid branch). Returns (item selector, labels).
    """
    masked = np.where(cap.branch_mask, cap.mass, -1.0)
    taken = masked.argmax(axis=1)
    single = cap.valid_mask.sum(axis=1) == 1
    valid = cap.valid_mask.argmax(axis=1)
    return {"taken": (np.ones(len(taken), dtype=bool), taken), "valid": (single, valid)}


@dataclass
class SampleOutcome:
    """Per problem: n, correct count, first-fork valid count, distinct valid branches covered."""

    kind: list[str]
    n: int
    correct: np.ndarray
    fork_valid: np.ndarray
    coverage: np.ndarray
    has_fork: np.ndarray


def sample_outcomes(
    model: Instrumented,
    problems: Sequence[EncodedProblem],
    verifier: Verifier,
    strategy: str,
    n: int,
    seed: int,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
) -> SampleOutcome:
    """n samples per problem through the KV-cached sampler, verified, with the first fork read.

    ``batch_size`` rows per sampler chunk: 256 on CPU (as fast as 2048 there, with a lower memory
    peak), 4096 on CUDA.
    """
    if batch_size is None:
        batch_size = 4096 if model.device.type == "cuda" else 256
    from hooks.sampler import NonFiniteLogits, sample

    tok = model.tokenizer
    gen = torch.Generator(device="cpu").manual_seed(seed)
    correct = np.zeros(len(problems), dtype=int)
    fork_valid = np.zeros(len(problems), dtype=int)
    coverage = np.zeros(len(problems), dtype=int)
    has_fork = np.array([p.first_fork is not None for p in problems])
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(problems):
        by_len.setdefault(p.prompt_len, []).append(i)
    stepper = model.stepper()
    n_ctx = getattr(model, "n_ctx", None)
    for plen in sorted(by_len):
        idx = by_len[plen]
        gold_new = max(len(problems[i].ids) - problems[i].prompt_len for i in idx)
        budget = max_new_tokens or gold_new + 2
        if n_ctx:
            budget = max(1, min(budget, n_ctx - plen))
        prompts = torch.tensor([problems[i].ids[:plen] for i in idx], dtype=torch.long)
        try:
            out = sample(stepper, prompts, n, budget, tok.eos_id, tok.pad_id, strategy, gen, batch_size=batch_size).cpu()
        except NonFiniteLogits as e:
            raise UsageError(f"{model.path}: {e}; no number is reported for it") from None
        for row_i, i in enumerate(idx):
            p = problems[i]
            gold = p.ids[plen:]
            fork = p.first_fork
            j = fork.pos - plen if fork else None
            seen_valid: set[int] = set()
            for s in out[row_i].tolist():
                text, finished = tok.decode_completion(s)
                if finished and verifier(p.problem, text):
                    correct[i] += 1
                if fork is not None and j < len(s) and s[:j] == gold[:j] and s[j] in fork.branch_ids:
                    b = fork.branch_ids.index(s[j])
                    if fork.valid[b]:
                        fork_valid[i] += 1
                        seen_valid.add(b)
            coverage[i] = len(seen_valid)
    return SampleOutcome([p.kind for p in problems], n, correct, fork_valid, coverage, has_fork)


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
    return rows
