"""Measurements of next-token distributions given as logits, shared by decoding and analysis.

`hooks.strategies` thresholds on `entropy` while sampling and `analysis.metrics` reports it, so
both read the same function: a decoding threshold and the entropy in the results table agree.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["entropy", "unusable"]


def entropy(logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    """Entropy in nats of softmax(logits) over the last dim (temperature 1).

    Computed through log_softmax, so large logits do not overflow; float16/bfloat16 logits are
    widened to float32 first (other dtypes are kept); logits of -inf (tokens masked by top-p or
    min-p) have probability 0 and add 0 (0·log 0 = 0), not NaN.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)


def unusable(logits: Float[Tensor, "... vocab"]) -> Bool[Tensor, "..."]:
    """Rows no distribution can be read from: a NaN, a +Inf, or no finite logit at all.

    A -Inf entry alone is fine (a masked token has probability 0); overflowed or damaged weights
    produce the others.
    """
    return torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1) | ~torch.isfinite(logits).any(dim=-1)
