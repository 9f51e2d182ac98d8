"""Pure tensor measurements at decision points: entropy, branch mass, KL and the logit lens.

Every function takes logits (or residuals) that the caller captured through hooks and returns
tensors; nothing here runs a model or touches global state. Branch mass is read from each
branch's first token, so a fork's branches must start with different tokens.

Shapes: ``batch`` is one row per decision point; ``max_branches`` pads each fork's branch list,
with a boolean mask saying which entries are real. Functions that take branch mass also accept
extra dims between ``batch`` and ``max_branches`` (e.g. the logit lens's ``layer``), with the
``[batch, max_branches]`` masks broadcast over them.

``entropy`` is `hooks.distributions.entropy`, re-exported: the same function the decoding
strategies threshold on, so a strategy's H and the table's entropy agree.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hooks.distributions import entropy
from training.errors import UsageError

__all__ = [
    "branch_mass",
    "entropy",
    "kl",
    "logit_lens",
    "mass_branches",
    "mass_top_branch",
    "mass_valid",
    "renormalised",
]


def _wide(x: Tensor) -> Tensor:
    """Half-precision logits are widened so softmax sums and logs keep their digits."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def kl(p_logits: Float[Tensor, "... vocab"], q_logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    """KL(softmax(p) || softmax(q)) in nats per row; shapes broadcast (final [b,1,v] vs lens [b,l,v]).

    For the logit lens, p is the final distribution and q a layer's: how many nats the layer's
    reading is short of what the model finally says. Rounding below zero is clipped to 0.
    """
    logp = torch.log_softmax(_wide(p_logits), dim=-1)
    logq = torch.log_softmax(_wide(q_logits), dim=-1)
    p = logp.exp()
    term = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return term.sum(dim=-1).clamp_min(0.0)


def _expand_mask(mask: Tensor, like: Tensor) -> Tensor:
    """[batch, max_branches] mask -> [batch, 1, ..., max_branches] to broadcast against ``like``."""
    if mask.shape[0] != like.shape[0] or mask.shape[-1] != like.shape[-1]:
        raise UsageError(
            f"branch mask of shape {tuple(mask.shape)} does not match branch mass of shape "
            f"{tuple(like.shape)}: pass one [batch, max_branches] mask per decision point"
        )
    extra = like.ndim - mask.ndim
    return mask.reshape(mask.shape[0], *([1] * extra), mask.shape[-1]).to(torch.bool)


def branch_mass(
    logits: Float[Tensor, "batch *layer vocab"],
    branch_ids: Int[Tensor, "batch max_branches"],
    branch_mask: Bool[Tensor, "batch max_branches"],
) -> Float[Tensor, "batch *layer max_branches"]:
    """Raw probability of each branch's first token (0 where masked).

    Works on lens logits too: with ``[batch, layer, vocab]`` logits it returns the branch mass
    per layer. Padding ids under a False mask may hold anything (e.g. -1).
    """
    if branch_ids.shape != branch_mask.shape or branch_ids.ndim != 2 or branch_ids.shape[0] != logits.shape[0]:
        raise UsageError(
            f"branch_ids {tuple(branch_ids.shape)} and branch_mask {tuple(branch_mask.shape)} must both be "
            f"[batch, max_branches] with batch = {logits.shape[0]} (one row per decision point)"
        )
    vocab = logits.shape[-1]
    mask = branch_mask.to(torch.bool)
    real = branch_ids[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
        raise UsageError(
            f"branch token id {int(real.max()) if int(real.max()) >= vocab else int(real.min())} is outside "
            f"the vocabulary [0, {vocab}): check the decision-point annotations against the tokenizer"
        )
    # two branches with one first token would count the same probability twice
    ids = torch.where(mask, branch_ids, torch.full_like(branch_ids, -1))
    srt, _ = ids.sort(dim=-1)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if bool(dup.any()):
        row = int(dup.any(dim=-1).nonzero()[0])
        raise UsageError(
            f"decision point {row} lists two branches that start with the same token: branch mass is "
            "read from each branch's first token, so annotate branches that start differently"
        )
    probs = torch.softmax(_wide(logits), dim=-1)
    safe = torch.where(mask, branch_ids, torch.zeros_like(branch_ids)).long()
    extra = logits.ndim - 2
    index = safe.reshape(safe.shape[0], *([1] * extra), safe.shape[-1]).expand(*logits.shape[:-1], safe.shape[-1])
    mass = probs.gather(-1, index)
    return torch.where(_expand_mask(mask, mass), mass, torch.zeros_like(mass))


def renormalised(
    mass: Float[Tensor, "batch *layer max_branches"], mask: Bool[Tensor, "batch max_branches"]
) -> Float[Tensor, "batch *layer max_branches"]:
    """Each branch's share of the mass on all branches (0 where masked; NaN if the total is 0)."""
    m = _expand_mask(mask, mass)
    masked = torch.where(m, mass, torch.zeros_like(mass))
    total = masked.sum(dim=-1, keepdim=True)
    return masked / total


def mass_top_branch(
    mass: Float[Tensor, "batch *layer max_branches"], mask: Bool[Tensor, "batch max_branches"]
) -> Float[Tensor, "batch *layer"]:
    """Largest branch's share of the branch mass: 1/b when spread evenly, 1 when collapsed."""
    share = renormalised(mass, mask)
    share = torch.where(_expand_mask(mask, mass), share, torch.full_like(share, -1.0))
    return share.max(dim=-1).values


def mass_valid(
    mass: Float[Tensor, "batch *layer max_branches"], valid_mask: Bool[Tensor, "batch max_branches"]
) -> Float[Tensor, "batch *layer"]:
    """Total raw probability on the valid branches."""
    m = _expand_mask(valid_mask, mass)
    return torch.where(m, mass, torch.zeros_like(mass)).sum(dim=-1)


def mass_branches(
    mass: Float[Tensor, "batch *layer max_branches"], mask: Bool[Tensor, "batch max_branches"]
) -> Float[Tensor, "batch *layer"]:
    """Total raw probability on all branches: how much of the model's mass the fork accounts for."""
    return mass_valid(mass, mask)


def logit_lens(
    resid: Float[Tensor, "batch layer d_model"],
    final_norm: Callable[[Tensor], Tensor],
    unembed: Callable[[Tensor], Tensor],
) -> Float[Tensor, "batch layer vocab"]:
    """Read each layer's residual through the model's final norm and unembedding.

    The norm is applied to every vector on its own (its statistics are recomputed per layer), the
    standard logit lens. Applied to the residual after the last block it gives the model's logits.
    ``resid`` is passed to the norm as a 3-d [batch, layer, d_model] tensor, the [batch, pos,
    d_model] layout that TransformerLens norm components expect; stats are per vector, so the
    layer axis stands in for the position axis.
    """
    if resid.ndim != 3:
        raise UsageError(
            f"logit_lens wants residuals shaped [batch, layer, d_model], got {tuple(resid.shape)}: "
            "select the decision-point position before calling it"
        )
    return unembed(final_norm(resid))
