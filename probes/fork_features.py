"""The candidate-conditioned probes' inputs: each fork's branches as features of the residual.

``phi(h, t) = norm(h) * W_U[:, t]`` (plus the unembedding bias) for every lens layer and branch,
from the model's own final norm and unembedding (:func:`readout`), for the eval forks of a
teacher-forced capture (:func:`fork_set`) or for probe-training forks read at their decision
positions only (:func:`read_forks`). See :mod:`probes.linear` for the probes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hooks.encode import pad_ids
from training.errors import UsageError

Array = np.ndarray | torch.Tensor


def readout(model: Any) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor | None]:
    """``(final_norm, W_U, b_U)`` of an instrumented checkpoint: ``final_norm`` maps ``[..., d_model]``
    to the normed stream, ``W_U`` is ``[d_model, vocab]`` and ``b_U`` ``[vocab]`` (None where the
    unembedding has no bias), so that ``final_norm(h) @ W_U + b_U == model.lens(h)``.

    Native checkpoints: the TransformerLens bridge's ``ln_final`` and ``unembed`` (``W_U``, ``b_U``);
    Hugging Face ones: the architecture's final norm and ``lm_head``-like linear (``hooks.hf_arch``).
    Anything else is a UsageError. :func:`fork_set` checks the identity on the data it reads.
    """
    fmt = getattr(model, "format", None)
    if fmt == "native" and hasattr(model, "bridge"):
        un = model.bridge.unembed
        W = getattr(un, "W_U", None)
        b = getattr(un, "b_U", None)
        if not isinstance(W, Tensor):
            raise UsageError(f"{getattr(model, 'path', model)}: the bridge's unembedding has no W_U matrix; "
                             "the candidate-conditioned probes need it")
        return model.bridge.ln_final, W, b if isinstance(b, Tensor) else None
    if fmt == "hf" and hasattr(model, "_arch"):
        head = model._arch.unembed
        W = getattr(head, "weight", None)
        if not isinstance(W, Tensor) or W.dim() != 2:
            raise UsageError(f"{getattr(model, 'path', model)}: the unembedding {type(head).__name__} has no "
                             "[vocab, d_model] weight; the candidate-conditioned probes need a linear unembedding")
        b = getattr(head, "bias", None)
        return model._arch.norm, W.T, b if isinstance(b, Tensor) else None
    raise UsageError(
        f"linear probes read a native (TransformerLens) or Hugging Face checkpoint's final norm and unembedding; "
        f"{type(model).__name__} (format {fmt!r}) is neither"
    )


# --------------------------------------------------------------------------- forks as features


@dataclass
class ForkSet:
    """Decision points (items) as the probes read them: the normed residual per lens layer, the
    branches' unembedding vectors, masks, groups and labels per target (-1 where undefined).

    ``features(layer)`` is ``phi`` for every branch: ``normed[:, layer, None, :] * wsel`` and, with a
    bias, ``bsel`` as the last feature; summing the features (``w = 1``) gives the logit lens.
    """

    normed: Float[np.ndarray, "items layer d_model"]
    wsel: Float[np.ndarray, "items branch d_model"]
    bsel: Float[np.ndarray, "items branch"] | None
    mask: Bool[np.ndarray, "items branch"]
    problem: Int[np.ndarray, " items"]
    kind: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.normed = np.asarray(self.normed, dtype=np.float64)
        self.wsel = np.asarray(self.wsel, dtype=np.float64)
        self.bsel = None if self.bsel is None else np.asarray(self.bsel, dtype=np.float64)
        self.mask = np.asarray(self.mask, dtype=bool)
        self.problem = np.asarray(self.problem).reshape(-1)
        self.kind = np.asarray(self.kind, dtype=object).reshape(-1)
        self.labels = {t: np.asarray(v, dtype=np.int64).reshape(-1) for t, v in self.labels.items()}
        n = self.normed.shape[0]
        if self.normed.ndim != 3 or self.wsel.ndim != 3 or self.mask.ndim != 2:
            raise UsageError("a ForkSet needs normed [items, layer, d_model], wsel [items, branch, d_model] and mask [items, branch]")
        shapes_ok = (self.wsel.shape[:2] == self.mask.shape and self.wsel.shape[0] == n
                     and self.wsel.shape[2] == self.normed.shape[2] and self.problem.size == n and self.kind.size == n
                     and (self.bsel is None or self.bsel.shape == self.mask.shape))
        if not shapes_ok or any(v.size != n for v in self.labels.values()):
            raise UsageError(f"ForkSet arrays disagree on the number of items ({n}) or branches: one entry per decision point")
        if n and (self.mask.sum(axis=1) < 2).any():
            raise UsageError("every decision point needs at least two branches")
        for t, y in self.labels.items():
            ok = y < 0
            inside = (y >= 0) & (y < self.mask.shape[1])
            ok[inside] = self.mask[np.flatnonzero(inside), y[inside]]
            if not ok.all():
                raise UsageError(f"{t} labels must index one of the fork's branches (or be -1)")

    @property
    def n_items(self) -> int:
        return int(self.normed.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.normed.shape[1])

    @property
    def n_features(self) -> int:
        return self.normed.shape[2] + (self.bsel is not None)

    def all_features(self, idx: np.ndarray | None = None) -> Float[np.ndarray, "layer n branch feat"]:
        """``features`` of every layer at once."""
        sel = slice(None) if idx is None else idx
        x = self.normed[sel].transpose(1, 0, 2)[:, :, None, :] * self.wsel[sel][None]
        if self.bsel is not None:
            b = np.broadcast_to(self.bsel[sel][None, :, :, None], x.shape[:3] + (1,))
            x = np.concatenate([x, b], axis=3)
        return x

    def features(self, layer: int, idx: np.ndarray | None = None) -> Float[np.ndarray, "n branch feat"]:
        sel = slice(None) if idx is None else idx
        x = self.normed[sel, layer, None, :] * self.wsel[sel]
        if self.bsel is not None:
            x = np.concatenate([x, self.bsel[sel, :, None]], axis=2)
        return x

    def lens_scores(self, layer: int) -> Float[np.ndarray, "items branch"]:
        """The logit lens at the branches (``w = 1``); -inf where a fork has no such branch."""
        return np.where(self.mask, self.features(layer).sum(axis=2), -np.inf)

    @property
    def n_branches(self) -> np.ndarray:
        return self.mask.sum(axis=1)


def fork_labels(cap: Any, forks: Sequence[Any]) -> dict[str, np.ndarray]:
    """Per item: ``valid`` (index of the one valid branch, -1 unless exactly one), ``taken`` (the
    branch with most raw mass in ``cap``) and ``demonstrated`` (the annotation's ``taken``, -1 where
    none); indices are into the fork's ``branch_ids`` (canonical order)."""
    single = cap.valid_mask.sum(axis=1) == 1
    valid = np.where(single, cap.valid_mask.argmax(axis=1), -1)
    taken = np.where(cap.branch_mask, cap.mass, -np.inf).argmax(axis=1)
    demo = np.array([-1 if f.taken is None else int(f.taken) for f in forks], dtype=np.int64)
    return {"valid": valid.astype(np.int64), "taken": taken.astype(np.int64), "demonstrated": demo}


@torch.inference_mode()
def fork_set(model: Any, cap: Any, encoded: Sequence[Any], *, check: bool = True) -> ForkSet:
    """The probes' view of a teacher-forced capture (``analysis.measure.teacher_forced(model, encoded)``).

    Items follow ``cap``'s order (problems in order, forks in order), which is checked against
    ``encoded``. With ``check``, ``w = 1`` must reproduce ``model.lens`` at the branches on the
    first forks, at every layer (else UsageError: the readout is not final norm + linear unembedding).
    """
    forks = [(p.index, f) for p in encoded for f in p.forks]
    n = len(cap.problem)
    if len(forks) != n or any(int(pi) != int(ci) or f.kind != k for (pi, f), ci, k in zip(forks, cap.problem, cap.kind)):
        raise UsageError(f"the capture holds {n} decision points that do not line up with the {len(forks)} of the encoded "
                         "problems: capture them with teacher_forced(model, encoded) on the same list")
    norm, W, b = readout(model)
    width = cap.branch_mask.shape[1] if n else 2
    ids = np.zeros((n, width), dtype=np.int64)
    for i, (_, f) in enumerate(forks):
        ids[i, : len(f.branch_ids)] = f.branch_ids
    dev = W.device
    dtype = W.dtype
    resid = torch.as_tensor(np.asarray(cap.resid))
    if n:
        normed = torch.cat([norm(chunk.to(dev, dtype)).double().cpu() for chunk in resid.split(1024)])
    else:
        normed = torch.zeros((0, int(model.n_layers) + 1, W.shape[0]), dtype=torch.float64)
    tid = torch.as_tensor(ids, device=dev)
    wsel = W.T[tid].double().cpu()  # [items, branch, d_model]
    bsel = b[tid].double().cpu() if b is not None and bool((b != 0).any()) else None
    mask = np.asarray(cap.branch_mask, dtype=bool)
    fs = ForkSet(normed.numpy(), wsel.numpy(), None if bsel is None else bsel.numpy(), mask, np.asarray(cap.problem),
                 np.asarray(cap.kind, dtype=object), fork_labels(cap, [f for _, f in forks]))
    if check and n:
        m = min(n, 64)
        lens = model.lens(resid[:m].to(dev)).double().cpu()  # [m, layer, vocab]
        want = torch.gather(lens, 2, torch.as_tensor(ids[:m])[:, None, :].expand(-1, lens.shape[1], -1)).numpy()
        for layer in range(fs.n_layers):
            got = fs.features(layer, np.arange(m)).sum(axis=2)
            w = want[:, layer]
            rel = 1e-3 if dtype == torch.float32 else 5e-2  # half-precision HF checkpoints round the lens
            tol = rel * max(1.0, float(np.abs(w[mask[:m]]).max()))
            if not np.allclose(got[mask[:m]], w[mask[:m]], atol=tol, rtol=rel):
                raise UsageError(f"{getattr(model, 'path', model)}: final norm then unembedding (W_U, b_U) does not reproduce "
                                 f"the logit lens at layer {layer}; the candidate-conditioned probes cannot read this model")
    return fs


@dataclass
class ForkReads:
    """What the probes need of a teacher-forced pass, per decision point: the fields of
    ``analysis.measure.ForkCapture`` that :func:`fork_set` reads (problem, kind, resid, raw branch
    mass, masks), and nothing else."""

    problem: np.ndarray
    kind: list[str]
    resid: np.ndarray
    mass: np.ndarray
    branch_mask: np.ndarray
    valid_mask: np.ndarray


@torch.inference_mode()
def read_forks(model: Any, problems: Sequence[Any], batch_size: int = 128) -> ForkReads:
    """Teacher-forced residuals (every lens layer) and raw branch mass at each decision point.

    The same forward pass as ``analysis.measure.teacher_forced`` (gold prefix, right padding,
    ``model.capture``, the choice read at ``fork.pos - 1``), and the same values, but only at the
    decision positions: no entropy, logit lens or KL at every completion position, which the probes
    never read and which cost teacher_forced more than the forward itself on a probe split.
    Non-finite residuals or logits are a UsageError naming the checkpoint.
    """
    from analysis.metrics import branch_mass

    with_forks = [p for p in problems if p.forks]
    max_b = max((len(f.branch_ids) for p in with_forks for f in p.forks), default=2)
    acc: dict[str, list] = {k: [] for k in ("problem", "kind", "resid", "mass", "bmask", "vmask")}
    for start in range(0, len(with_forks), batch_size):
        batch = with_forks[start : start + batch_size]
        ids = pad_ids([p.ids[: max(f.pos for f in p.forks) + 1] for p in batch], model.tokenizer.pad_id)
        attn = pad_ids([[1] * (max(f.pos for f in p.forks) + 1) for p in batch], 0).bool()
        read = pad_ids([[f.pos - 1 for f in p.forks] for p in batch], 0)
        logits, resid = model.capture(ids, attn, read, read)
        logits, resid = logits.float(), resid.float()
        if not (bool(torch.isfinite(logits).all()) and bool(torch.isfinite(resid).all())):
            raise UsageError(f"{model.path}: non-finite logits or residuals in the teacher-forced pass over the probe "
                             "split (an overflow, or damaged weights); no probe number is reported for it")
        counts = [len(p.forks) for p in batch]
        keep = torch.tensor([j < c for c in counts for j in range(read.shape[1])]).reshape(len(batch), -1)
        f_logits, f_resid = logits[keep], resid[keep]
        forks = [f for p in batch for f in p.forks]
        bids = torch.zeros((len(forks), max_b), dtype=torch.long)
        bmask = torch.zeros((len(forks), max_b), dtype=torch.bool)
        vmask = torch.zeros_like(bmask)
        for j, f in enumerate(forks):
            nb = len(f.branch_ids)
            bids[j, :nb] = torch.tensor(f.branch_ids)
            bmask[j, :nb] = True
            vmask[j, :nb] = torch.tensor(f.valid)
        acc["mass"].append(branch_mass(f_logits, bids.to(f_logits.device), bmask.to(f_logits.device)).cpu())
        acc["resid"].append(f_resid.cpu())
        acc["bmask"].append(bmask)
        acc["vmask"].append(vmask)
        acc["problem"] += [p.index for p in batch for _ in p.forks]
        acc["kind"] += [f.kind for f in forks]
    if not acc["mass"]:
        return ForkReads(np.zeros(0, int), [], np.zeros((0, model.n_layers + 1, model.d_model), np.float32),
                         np.zeros((0, max_b)), np.zeros((0, max_b), bool), np.zeros((0, max_b), bool))
    return ForkReads(np.array(acc["problem"]), acc["kind"], torch.cat(acc["resid"]).numpy(), torch.cat(acc["mass"]).numpy(),
                     torch.cat(acc["bmask"]).numpy(), torch.cat(acc["vmask"]).numpy())


# --------------------------------------------------------------------------- the probe
