"""Decoding strategies for pass@k sampling, selected by name strings.

A strategy turns next-token logits into next-token ids, one row per sequence. The baselines
(temperature, top-p, min-p) and the diversity-encouraging ones (`fork_temp`: a hotter
temperature only where next-token entropy passes a threshold; `fork_stratified`: spread the n
samples of a problem over the top branches at each sample's first high-entropy position) are
all measured by the same pass@k code, so each one is a small object with the same call:

    ids = strategy(logits, state, generator)

`str(strategy)` is the canonical spec (`parse_strategy(str(s)) == s` for parameters of at most
12 significant digits); it is what the results table's `strategy` column holds.
`strategy.probs(logits)` is the distribution a row is sampled from (for `fork_stratified`: the
distribution off the fork), so tests can check it exactly.

Entropies are in nats and always of softmax(logits), i.e. at temperature 1
(`hooks.distributions.entropy`, the same function `analysis.metrics` reports).

Each strategy class registers itself with `@register_strategy`, declaring its spec name, its
parameters (`Param`: name, float or int, default or required, allowed range), a one-line
description and an example spec; `parse_strategy`, the canonical `str`, and `VALID_FORMS` all
come from those declarations. Adding a strategy is one class, one registration, one test:

    @register_strategy
    @dataclass(frozen=True, repr=False)
    class Hot(Strategy):
        t: float
        name = "hot"
        params = (Param("T", gt=0),)
        description = "softmax(logits / T)"
        example = "hot:2"

        def probs(self, logits): ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooks import strategy_base
from hooks.distributions import entropy
from training.errors import UsageError
from hooks.strategy_base import (  # noqa: F401  (the strategy protocol, re-exported where callers look)
    Param,
    RowState,
    Strategy,
    parse_strategy,
    register_strategy,
    registered_strategies,
    sample_from_probs,
    sorted_desc,
    strategy_names,
    unregister_strategy,
)

__all__ = [
    "RowState",
    "Strategy",
    "Greedy",
    "Temperature",
    "TopP",
    "MinP",
    "ForkTemperature",
    "ForkStratified",
    "RefMix",
    "Param",
    "register_strategy",
    "unregister_strategy",
    "strategy_names",
    "registered_strategies",
    "parse_strategy",
    "entropy",
    "sample_from_probs",
    "VALID_FORMS",  # noqa: F822  (served by the module __getattr__ below)
]


def __getattr__(name: str):
    if name == "VALID_FORMS":  # always the registry's current forms, never a copy made at import
        return strategy_base.VALID_FORMS
    raise AttributeError(f"module 'hooks.strategies' has no attribute {name!r}")


@register_strategy
@dataclass(frozen=True, repr=False)
class Greedy(Strategy):
    """Argmax (ties -> lowest token id); uses no randomness."""

    name = "greedy"
    description = "argmax, ties to the lowest token id; no randomness"
    example = "greedy"

    def probs(self, logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, "batch vocab"]:
        ids = logits.argmax(dim=-1)
        return torch.nn.functional.one_hot(ids, logits.shape[-1]).float()

    def __call__(self, logits, state, generator):  # noqa: D102 - same contract as Strategy
        return logits.argmax(dim=-1)


@register_strategy
@dataclass(frozen=True, repr=False)
class Temperature(Strategy):
    """softmax(logits / T)."""

    t: float
    name = "temperature"
    params = (Param("T", gt=0, hint="use 'greedy' for argmax"),)
    description = "softmax(logits / T)"
    example = "temperature:0.7"

    def probs(self, logits):
        return torch.softmax(logits.float() / self.t, dim=-1)


@register_strategy
@dataclass(frozen=True, repr=False)
class TopP(Strategy):
    """Nucleus sampling at temperature 1: the smallest set of most-probable tokens whose mass
    reaches P (ties by lower id), renormalised."""

    p: float
    name = "top_p"
    params = (Param("P", gt=0, le=1),)
    description = "nucleus: the fewest most-probable tokens with mass >= P, renormalised"
    example = "top_p:0.9"

    def probs(self, logits):
        probs = torch.softmax(logits.float(), dim=-1)
        if self.p >= 1.0:
            return probs
        sorted_p, order = sorted_desc(probs)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        keep_sorted = mass_before < self.p  # the first token is always kept
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        kept = probs * keep
        return kept / kept.sum(dim=-1, keepdim=True)


@register_strategy
@dataclass(frozen=True, repr=False)
class MinP(Strategy):
    """Min-p at temperature 1: keep tokens with prob >= P * max prob, renormalised."""

    p: float
    name = "min_p"
    params = (Param("P", gt=0, le=1),)
    description = "tokens with probability >= P times the largest, renormalised"
    example = "min_p:0.1"

    def probs(self, logits):
        probs = torch.softmax(logits.float(), dim=-1)
        threshold = self.p * probs.amax(dim=-1, keepdim=True)
        kept = torch.where(probs >= threshold, probs, 0.0)
        return kept / kept.sum(dim=-1, keepdim=True)


@register_strategy
@dataclass(frozen=True, repr=False)
class ForkTemperature(Strategy):
    """Temperature T_hi on rows whose entropy (nats, at temperature 1) is >= H, else T_base.

    Flattens the distribution only where the model is already unsure (a likely fork), so
    confident steps stay as sharp as the base sampler.
    """

    t_hi: float
    h: float
    t_base: float = 1.0
    name = "fork_temp"
    params = (
        Param("T_hi", gt=0),
        Param("H", ge=0, unit="nats", what="entropy threshold H"),
        Param("T_base", default=1.0, gt=0),
    )
    description = "temperature T_hi where next-token entropy >= H nats, T_base elsewhere"
    example = "fork_temp:2,0.5"

    def temperatures(self, logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
        """The temperature each row is sampled at."""
        hot = entropy(logits) >= self.h
        return torch.where(hot, self.t_hi, self.t_base)

    def probs(self, logits):
        t = self.temperatures(logits).unsqueeze(-1)
        return torch.softmax(logits.float() / t, dim=-1)


@register_strategy
@dataclass(frozen=True, repr=False)
class ForkStratified(Strategy):
    """Branch-stratified sampling: spread a problem's n samples over the top branches.

    Each row, at ITS first position whose entropy (nats, temperature 1) is >= H, takes the
    (j mod b)-th top branch, where j is its index among its problem's samples and the b top
    branches are the smallest set of most-probable tokens with mass >= P, capped at M and at
    least 2, ordered by probability (ties by lower token id). Everywhere else it samples at
    temperature 1 (that is what `probs` returns). If all n samples of a problem reach the fork
    at the same position with the same top set, each branch gets floor(n/b) or ceil(n/b).
    """

    h: float = 0.5
    m: int = 4
    p: float = 0.9
    name = "fork_stratified"
    params = (
        Param("H", default=0.5, ge=0, unit="nats", what="entropy threshold H"),
        Param("M", type=int, default=4, ge=2, what="M (most branches)"),
        Param("P", default=0.9, gt=0, le=1),
    )
    description = "sample j takes the (j mod b)-th of the top b <= M branches (mass P) at its first entropy >= H"
    example = "fork_stratified:0.3"

    def probs(self, logits):
        return torch.softmax(logits.float(), dim=-1)

    def branches(
        self, logits: Float[Tensor, "batch vocab"]
    ) -> tuple[Int[Tensor, "batch vocab"], Int[Tensor, " batch"]]:
        """Token ids sorted by probability (ties by id) and the number b of top branches."""
        probs = self.probs(logits)
        sorted_p, order = sorted_desc(probs)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        b = (mass_before < self.p).sum(dim=-1)  # smallest prefix with mass >= P
        b = b.clamp(min=2, max=min(self.m, logits.shape[-1]))
        return order, b

    def __call__(self, logits, state, generator):
        ids = sample_from_probs(self.probs(logits), generator, state.uniforms)
        at_fork = (entropy(logits) >= self.h) & ~state.forked
        if bool(at_fork.any()):
            order, b = self.branches(logits)
            rank = state.sample_index.to(b.device) % b
            branch = order.gather(-1, rank.unsqueeze(-1)).squeeze(-1)
            ids = torch.where(at_fork, branch, ids)
            state.forked = state.forked | at_fork
        return ids


@register_strategy
@dataclass(frozen=True, repr=False)
class RefMix(Strategy):
    """Reference-guided decoding: where the model has diverged from a reference model, mix them.

    At each row, D = KL(p_model ‖ p_reference) in nats (both at temperature 1). Where D >= tau the
    row is sampled from (1 - L) * p_model + L * p_reference; elsewhere from p_model alone, so
    where the two models agree the samples are exactly the model's. The reference is the model
    before fine-tuning (the series' base): at a fork whose entropy SFT drove to zero, the base
    still spreads its mass over the branches, so D is large exactly there — which no entropy
    threshold on the fine-tuned model alone can see.
    """

    lam: float
    tau: float
    name = "ref_mix"
    params = (
        Param("L", field="lam", ge=0, le=1, what="mixture weight L"),
        Param("tau", ge=0, unit="nats", what="divergence threshold tau"),
    )
    description = "where KL(model || reference) >= tau nats, sample (1-L) p_model + L p_reference"
    example = "ref_mix:0.5,0.1"
    needs_reference = True

    def probs(self, logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, "batch vocab"]:
        raise UsageError("ref_mix samples from two models: use probs_with(logits, reference_logits)")

    def divergence(self, logits: Float[Tensor, "batch vocab"], reference_logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
        """KL(p_model ‖ p_reference) in nats per row (0·log 0 = 0)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        logq = torch.log_softmax(reference_logits.float(), dim=-1)
        p = logp.exp()
        return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(dim=-1).clamp_min(0.0)

    def probs_with(self, logits: Float[Tensor, "batch vocab"], reference_logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, "batch vocab"]:
        """The distribution each row is sampled from, given the reference's logits for it."""
        if reference_logits.shape != logits.shape:
            raise UsageError(f"ref_mix: the reference's logits {tuple(reference_logits.shape)} do not match the model's "
                             f"{tuple(logits.shape)}: the two models need one vocabulary")
        p = torch.softmax(logits.float(), dim=-1)
        q = torch.softmax(reference_logits.float(), dim=-1)
        mixed = (1.0 - self.lam) * p + self.lam * q
        diverged = (self.divergence(logits, reference_logits) >= self.tau).unsqueeze(-1)
        return torch.where(diverged, mixed, p)

    def __call__(self, logits, state, generator):
        if state.reference_logits is None:
            raise UsageError("ref_mix needs a reference model (the series' base checkpoint, or --reference CHECKPOINT); "
                             "none was given")
        return sample_from_probs(self.probs_with(logits, state.reference_logits.to(logits.device)), generator,
                                 state.uniforms)
