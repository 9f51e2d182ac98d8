"""Activation patching between a reference model (the series' base) and a checkpoint, at the fork.

For each lens layer l (the residual before block l, or after the last block for l = n_layers),
the checkpoint is run with its residual at the decision position only (the position whose logits
choose the branch) replaced by the reference's residual at the same position on the same input,
and the reference is run with the checkpoint's (``Instrumented.patched_logits``). Read on the
checkpoint's top branch b* (its most probable branch at that fork), with s = b*'s share of the
branch mass:

- ``patch_recovered_share`` = (s_ckpt - s_ckpt<-ref) / (s_ckpt - s_ref): how much of the shift
  the reference's residual at layer l undoes (1: the reference's share restored, 0: no change);
- ``patch_induced_share`` = (s_ref<-ckpt - s_ref) / (s_ckpt - s_ref): how much of the shift the
  checkpoint's residual at layer l produces in the reference.

Both are undefined (left out, and counted with the reason) where |s_ckpt - s_ref| is below
``min_shift``: there is no shift to explain. Values are per fork, then averaged with the same
bootstrap and kinds as every other fork metric. Each fork of a problem is patched in its own
forward pass, so the only patched position a fork's logits see is its own.

At l = n_layers the patched logits are the *checkpoint's* final norm and unembedding applied to
the reference's stream, not the reference's logits (the two models share shapes, not weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from analysis.metrics import branch_mass, renormalised
from hooks.base import Instrumented
from hooks.distributions import unusable
from hooks.encode import EncodedProblem, pad_ids
from training.errors import UsageError

DEFAULT_MIN_SHIFT = 0.02
"""Smallest |s_ckpt - s_ref| (top-branch share) for which the patching ratios are defined."""

__all__ = ["PatchCapture", "check_reference", "patch_capture", "patch_rows", "DEFAULT_MIN_SHIFT"]


def _tokenizer_id(model: Instrumented) -> str:
    fp = getattr(model.tokenizer, "fingerprint", None)
    return fp() if callable(fp) else str(fp)


def check_reference(model: Instrumented, reference: Instrumented) -> None:
    """A reference must have the checkpoint's shape and tokenizer, or patching means nothing."""
    if (model.n_layers, model.d_model) != (reference.n_layers, reference.d_model):
        raise UsageError(f"reference {reference.path} has {reference.n_layers} layers x d_model {reference.d_model} but "
                         f"{model.path} has {model.n_layers} x {model.d_model}: patch between models of one shape")
    if _tokenizer_id(model) != _tokenizer_id(reference):
        raise UsageError(f"reference {reference.path} uses another tokenizer than {model.path}: "
                         "patch between models that share a tokenizer")


@dataclass
class PatchCapture:
    """Per decision point (items): the top-branch shares with and without patching, per layer."""

    problem: Int[np.ndarray, " items"]
    kind: list[str]
    top: Int[np.ndarray, " items"]
    """Index (into the fork's branches) of the checkpoint's most probable branch."""
    share_model: Float[np.ndarray, " items"]
    share_reference: Float[np.ndarray, " items"]
    share_model_patched: Float[np.ndarray, "items layer"]
    """The checkpoint run with the reference's residual at layer l."""
    share_reference_patched: Float[np.ndarray, "items layer"]
    """The reference run with the checkpoint's residual at layer l."""
    min_shift: float = DEFAULT_MIN_SHIFT
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def shift(self) -> np.ndarray:
        return self.share_model - self.share_reference

    def defined(self) -> np.ndarray:
        return np.isfinite(self.shift) & (np.abs(self.shift) >= self.min_shift)

    def recovered(self) -> Float[np.ndarray, "items layer"]:
        """(s_ckpt - s_patched) / (s_ckpt - s_ref) per fork and layer; NaN where undefined."""
        d = self.shift[:, None]
        out = (self.share_model[:, None] - self.share_model_patched) / np.where(d == 0, np.nan, d)
        return np.where(self.defined()[:, None], out, np.nan)

    def induced(self) -> Float[np.ndarray, "items layer"]:
        """(s_ref_patched - s_ref) / (s_ckpt - s_ref) per fork and layer; NaN where undefined."""
        d = self.shift[:, None]
        out = (self.share_reference_patched - self.share_reference[:, None]) / np.where(d == 0, np.nan, d)
        return np.where(self.defined()[:, None], out, np.nan)

    def undefined_text(self) -> str:
        """'12 of 200 decision points: checkpoint and reference within 0.02 ...', or '' when none."""
        n_bad = int((~self.defined()).sum())
        if not n_bad:
            return ""
        return (f"{n_bad} of {len(self.top)} decision points have no patching value: the checkpoint's and the "
                f"reference's top-branch shares differ by less than {self.min_shift}")


def _shares(logits: Float[Tensor, "items *layer vocab"], bids: Tensor, bmask: Tensor) -> Tensor:
    return renormalised(branch_mass(logits.float(), bids, bmask), bmask)


def _refuse(model: Instrumented, logits: Tensor, what: str) -> None:
    if bool(unusable(logits).any()):
        raise UsageError(f"{model.path}: non-finite logits in the {what} pass; no patching number is reported")


@torch.inference_mode()
def patch_capture(model: Instrumented, reference: Instrumented, encoded: Sequence[EncodedProblem],
                  batch_size: int = 64, min_shift: float = DEFAULT_MIN_SHIFT) -> PatchCapture:
    """Both directions of patching at every decision point of ``encoded``, every lens layer."""
    check_reference(model, reference)
    n = model.n_layers
    problems = [p for p in encoded if p.forks]
    max_b = max((len(f.branch_ids) for p in problems for f in p.forks), default=2)
    acc: dict[str, list] = {k: [] for k in ("problem", "kind", "top", "sm", "sr", "smp", "srp")}
    for start in range(0, len(problems), batch_size):
        batch = problems[start: start + batch_size]
        ids = pad_ids([p.ids for p in batch], model.tokenizer.pad_id)
        attn = pad_ids([[1] * len(p.ids) for p in batch], 0).bool()
        read = pad_ids([[f.pos - 1 for f in p.forks] for p in batch], 0)
        lm, rm = model.capture(ids, attn, read, read)
        lr, rr = reference.capture(ids, attn, read, read)
        _refuse(model, lm, "teacher-forced")
        _refuse(reference, lr, "teacher-forced")
        for j in range(max(len(p.forks) for p in batch)):
            sel = [i for i, p in enumerate(batch) if len(p.forks) > j]
            rows = torch.tensor(sel)
            forks = [batch[i].forks[j] for i in sel]
            bids = torch.zeros((len(sel), max_b), dtype=torch.long)
            bmask = torch.zeros((len(sel), max_b), dtype=torch.bool)
            for k, f in enumerate(forks):
                bids[k, : len(f.branch_ids)] = torch.tensor(f.branch_ids)
                bmask[k, : len(f.branch_ids)] = True
            pos = read[rows, j]
            sub_ids, sub_attn = ids[rows], attn[rows]
            share_m = _shares(lm[rows, j].cpu(), bids, bmask)  # [items, max_b]
            share_r = _shares(lr[rows, j].cpu(), bids, bmask)
            top = torch.where(bmask, share_m, torch.full_like(share_m, -1.0)).argmax(dim=-1)
            pick = torch.arange(len(sel))
            smp, srp = [], []
            for layer in range(n + 1):
                pm = model.patched_logits(sub_ids, sub_attn, pos, layer, rr[rows, j, layer], pos[:, None])[:, 0].cpu()
                pr = reference.patched_logits(sub_ids, sub_attn, pos, layer, rm[rows, j, layer], pos[:, None])[:, 0].cpu()
                _refuse(model, pm, f"patched (layer {layer})")
                _refuse(reference, pr, f"patched (layer {layer})")
                smp.append(_shares(pm, bids, bmask)[pick, top])
                srp.append(_shares(pr, bids, bmask)[pick, top])
            acc["problem"] += [batch[i].index for i in sel]
            acc["kind"] += [f.kind for f in forks]
            acc["top"].append(top)
            acc["sm"].append(share_m[pick, top])
            acc["sr"].append(share_r[pick, top])
            acc["smp"].append(torch.stack(smp, dim=1))
            acc["srp"].append(torch.stack(srp, dim=1))
    if not acc["top"]:
        z = np.zeros(0)
        return PatchCapture(np.zeros(0, int), [], np.zeros(0, int), z, z, np.zeros((0, n + 1)), np.zeros((0, n + 1)),
                            min_shift)
    # items come out grouped by fork index within each batch; order them as teacher_forced does
    problem = np.array(acc["problem"])
    order = np.lexsort((np.arange(len(problem)), problem))
    cap = PatchCapture(
        problem=problem,
        kind=acc["kind"],
        top=torch.cat(acc["top"]).numpy(),
        share_model=torch.cat(acc["sm"]).double().numpy(),
        share_reference=torch.cat(acc["sr"]).double().numpy(),
        share_model_patched=torch.cat(acc["smp"]).double().numpy(),
        share_reference_patched=torch.cat(acc["srp"]).double().numpy(),
        min_shift=float(min_shift),
    )
    cap.problem = cap.problem[order]
    cap.kind = [cap.kind[i] for i in order]
    for name in ("top", "share_model", "share_reference", "share_model_patched", "share_reference_patched"):
        setattr(cap, name, getattr(cap, name)[order])
    n_bad = int((~cap.defined()).sum())
    if n_bad:
        cap.skipped = {f"top-branch shares within {cap.min_shift}": n_bad}
    return cap


def patch_rows(model: Instrumented, reference: Instrumented, encoded: Sequence[EncodedProblem],
               where: dict[str, Any], rng: np.random.Generator, n_boot: int = 1000,
               min_shift: float = DEFAULT_MIN_SHIFT, batch_size: int = 64, cap: PatchCapture | None = None,
               log: Callable[[str], None] | None = None) -> list[dict]:
    """``patch_recovered_share`` and ``patch_induced_share`` per kind and layer (tidy-table rows).

    Forks where the checkpoint and the reference agree (|shift| < ``min_shift``) give no value;
    their count goes to ``log`` (and is on ``cap.skipped`` when a capture is passed in).
    """
    from analysis.measure import _by_kind, layer_rows

    if cap is None:
        cap = patch_capture(model, reference, encoded, batch_size=batch_size, min_shift=min_shift)
    rows: list[dict] = []
    if not len(cap.top):
        return rows
    if log is not None and cap.undefined_text():
        log(f"{where.get('checkpoint', model.name)}: patching against {reference.name}: {cap.undefined_text()}")
    metrics = {"patch_recovered_share": cap.recovered(), "patch_induced_share": cap.induced()}
    for kind, sel in _by_kind(cap.kind):
        rows += layer_rows(metrics, sel, kind, rng, n_boot, where)
    return rows
