"""Decoding strategies for pass@k sampling, selected by name strings.

A strategy turns next-token logits into next-token ids, one row per sequence. The baselines
(temperature, top-p, min-p) and the diversity-encouraging ones (`fork_temp`: a hotter
temperature only where next-token entropy passes a threshold; `fork_stratified`: spread the n
samples of a problem over the top branches at each sample's first high-entropy position) are
all measured by the same pass@k code, so each one is a small object with the same call:

    ids = strategy(logits, state, generator)

`str(strategy)` is the canonical spec (`parse_strategy(str(s)) == s`); it is what the results
table's `strategy` column holds. `strategy.probs(logits)` is the distribution a row is sampled
from (for `fork_stratified`: the distribution off the fork), so tests can check it exactly.

Entropies are in nats and always of softmax(logits), i.e. at temperature 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from training.errors import UsageError

__all__ = [
    "RowState",
    "Strategy",
    "Greedy",
    "Temperature",
    "TopP",
    "MinP",
    "ForkTemperature",
    "ForkStratified",
    "parse_strategy",
    "entropy",
    "sample_from_probs",
    "VALID_FORMS",
]

VALID_FORMS = (
    "greedy, temperature:T (T>0), top_p:P (0<P<=1), min_p:P (0<P<=1), "
    "fork_temp:T_hi,H[,T_base] (T_hi>0, H>=0 nats, T_base>0, default 1), "
    "fork_stratified[:H[,M[,P]]] (H>=0 nats default 0.5, integer M>=2 default 4, 0<P<=1 default 0.9)"
)


@dataclass
class RowState:
    """What a strategy may know about each row (sequence) of the batch.

    `sample_index` is j, the row's index among its problem's n samples; `forked` marks rows
    that have passed their first high-entropy position (used by `fork_stratified`); `step` is
    the index of the token being chosen (0 = first new token). `uniforms`, when the sampler
    sets it, holds this step's uniforms, drawn for the whole chunk in one go: one host-to-device
    copy per chunk instead of one per step, which on a GPU is a synchronisation saved per step.
    """

    sample_index: Int[Tensor, " batch"]
    forked: Optional[Bool[Tensor, " batch"]] = None  # None -> all False
    step: int = 0
    uniforms: Optional[Float[Tensor, " batch"]] = None
    """This step's uniform per row, drawn ahead by the sampler; None -> draw from the generator."""

    def __post_init__(self) -> None:
        if self.forked is None:
            self.forked = torch.zeros_like(self.sample_index, dtype=torch.bool)

    @classmethod
    def fresh(cls, batch: int, device: torch.device | str = "cpu") -> "RowState":
        """State for `batch` rows that are samples 0..batch-1 of one problem."""
        return cls(sample_index=torch.arange(batch, device=device))


def _fmt(x: float) -> str:
    """Shortest stable text for a parameter: 1 -> '1', 0.9 -> '0.9'."""
    return format(float(x), ".12g")


def entropy(logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
    """Next-token entropy in nats of softmax(logits) (temperature 1); 0·log 0 counts as 0."""
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.special.entr(probs).sum(dim=-1)


def sample_from_probs(
    probs: Float[Tensor, "batch vocab"],
    generator: torch.Generator,
    u: Optional[Float[Tensor, " batch"]] = None,
) -> Int[Tensor, " batch"]:
    """One token per row by inverse CDF: one uniform per row, cumsum, searchsorted.

    The uniforms `u` (in [0, 1)) are drawn from `generator` on the generator's own device when
    not given (so a CPU generator drives a CUDA model reproducibly) and moved to the
    probabilities' device. Using 1 - u in (0, 1] and a left search means a zero-probability
    token is never chosen.
    """
    probs = probs.float()
    if u is None:
        u = torch.rand(probs.shape[0], generator=generator, device=generator.device)
    u = u.to(probs.device)
    cdf = probs.cumsum(dim=-1)
    target = (1.0 - u).unsqueeze(-1) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target).squeeze(-1)
    return ids.clamp_(max=probs.shape[-1] - 1)


def _sorted_desc(probs: Float[Tensor, "batch vocab"]) -> tuple[Tensor, Tensor]:
    """Probabilities sorted high to low, ties broken by lower token id (stable sort)."""
    return torch.sort(probs, dim=-1, descending=True, stable=True)


class Strategy:
    """Base class: subclasses define `probs` (or override `__call__`) and `__str__`."""

    name: str = ""

    def probs(self, logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, "batch vocab"]:
        raise NotImplementedError

    def __call__(
        self,
        logits: Float[Tensor, "batch vocab"],
        state: RowState,
        generator: torch.Generator,
    ) -> Int[Tensor, " batch"]:
        return sample_from_probs(self.probs(logits), generator, state.uniforms)

    def __repr__(self) -> str:
        return f"parse_strategy({str(self)!r})"


@dataclass(frozen=True, repr=False)
class Greedy(Strategy):
    """Argmax (ties -> lowest token id); uses no randomness."""

    name = "greedy"

    def probs(self, logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, "batch vocab"]:
        ids = logits.argmax(dim=-1)
        return torch.nn.functional.one_hot(ids, logits.shape[-1]).float()

    def __call__(self, logits, state, generator):  # noqa: D102 - same contract as Strategy
        return logits.argmax(dim=-1)

    def __str__(self) -> str:
        return "greedy"


@dataclass(frozen=True, repr=False)
class Temperature(Strategy):
    """softmax(logits / T)."""

    t: float
    name = "temperature"

    def probs(self, logits):
        return torch.softmax(logits.float() / self.t, dim=-1)

    def __str__(self) -> str:
        return f"temperature:{_fmt(self.t)}"


@dataclass(frozen=True, repr=False)
class TopP(Strategy):
    """Nucleus sampling at temperature 1: the smallest set of most-probable tokens whose mass
    reaches P (ties by lower id), renormalised."""

    p: float
    name = "top_p"

    def probs(self, logits):
        probs = torch.softmax(logits.float(), dim=-1)
        if self.p >= 1.0:
            return probs
        sorted_p, order = _sorted_desc(probs)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        keep_sorted = mass_before < self.p  # the first token is always kept
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        kept = probs * keep
        return kept / kept.sum(dim=-1, keepdim=True)

    def __str__(self) -> str:
        return f"top_p:{_fmt(self.p)}"


@dataclass(frozen=True, repr=False)
class MinP(Strategy):
    """Min-p at temperature 1: keep tokens with prob >= P * max prob, renormalised."""

    p: float
    name = "min_p"

    def probs(self, logits):
        probs = torch.softmax(logits.float(), dim=-1)
        threshold = self.p * probs.amax(dim=-1, keepdim=True)
        kept = torch.where(probs >= threshold, probs, 0.0)
        return kept / kept.sum(dim=-1, keepdim=True)

    def __str__(self) -> str:
        return f"min_p:{_fmt(self.p)}"


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

    def temperatures(self, logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
        """The temperature each row is sampled at."""
        hot = entropy(logits) >= self.h
        return torch.where(hot, self.t_hi, self.t_base)

    def probs(self, logits):
        t = self.temperatures(logits).unsqueeze(-1)
        return torch.softmax(logits.float() / t, dim=-1)

    def __str__(self) -> str:
        return f"fork_temp:{_fmt(self.t_hi)},{_fmt(self.h)},{_fmt(self.t_base)}"


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

    def probs(self, logits):
        return torch.softmax(logits.float(), dim=-1)

    def branches(
        self, logits: Float[Tensor, "batch vocab"]
    ) -> tuple[Int[Tensor, "batch vocab"], Int[Tensor, " batch"]]:
        """Token ids sorted by probability (ties by id) and the number b of top branches."""
        probs = self.probs(logits)
        sorted_p, order = _sorted_desc(probs)
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

    def __str__(self) -> str:
        return f"fork_stratified:{_fmt(self.h)},{self.m},{_fmt(self.p)}"


def _bad(spec: str, why: str) -> UsageError:
    return UsageError(f"bad decoding strategy {spec!r}: {why}; valid forms: {VALID_FORMS}")


def _number(spec: str, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(spec, f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise _bad(spec, f"{what} must be finite, got {text!r}")
    return value


def _params(spec: str, rest: str | None, names: list[str], required: int) -> list[str]:
    parts = [] if rest is None else [x.strip() for x in rest.split(",")]
    if len(parts) < required or len(parts) > len(names) or any(x == "" for x in parts):
        want = ",".join(names[:required]) + "".join(f"[,{x}]" for x in names[required:])
        raise _bad(spec, f"expected parameters {want or '(none)'}")
    return parts


def parse_strategy(spec: str | Strategy) -> Strategy:
    """Strategy from its spec string (see VALID_FORMS); a Strategy passes through unchanged."""
    if isinstance(spec, Strategy):
        return spec
    if not isinstance(spec, str):
        raise UsageError(f"decoding strategy must be a string, got {type(spec).__name__}; valid forms: {VALID_FORMS}")
    text = spec.strip()
    name, sep, rest = text.partition(":")
    name = name.strip().lower()
    args = rest if sep else None

    if name == "greedy":
        _params(spec, args, [], 0)
        return Greedy()
    if name == "temperature":
        (t,) = (_number(spec, x, "T") for x in _params(spec, args, ["T"], 1))
        if t <= 0:
            raise _bad(spec, f"T must be > 0 (use 'greedy' for argmax), got {t:g}")
        return Temperature(t)
    if name in ("top_p", "min_p"):
        (p,) = (_number(spec, x, "P") for x in _params(spec, args, ["P"], 1))
        if not 0 < p <= 1:
            raise _bad(spec, f"P must be in (0, 1], got {p:g}")
        return TopP(p) if name == "top_p" else MinP(p)
    if name == "fork_temp":
        parts = _params(spec, args, ["T_hi", "H", "T_base"], 2)
        t_hi = _number(spec, parts[0], "T_hi")
        h = _number(spec, parts[1], "H")
        t_base = _number(spec, parts[2], "T_base") if len(parts) > 2 else 1.0
        if t_hi <= 0 or t_base <= 0:
            raise _bad(spec, "temperatures T_hi and T_base must be > 0")
        if h < 0:
            raise _bad(spec, f"entropy threshold H must be >= 0 nats, got {h:g}")
        return ForkTemperature(t_hi, h, t_base)
    if name == "fork_stratified":
        default = ForkStratified()
        if args is None:
            return default
        parts = _params(spec, args, ["H", "M", "P"], 1)
        h = _number(spec, parts[0], "H")
        m, p = default.m, default.p
        if len(parts) > 1:
            try:
                m = int(parts[1])
            except ValueError:
                raise _bad(spec, f"M must be an integer, got {parts[1]!r}") from None
        if len(parts) > 2:
            p = _number(spec, parts[2], "P")
        if h < 0:
            raise _bad(spec, f"entropy threshold H must be >= 0 nats, got {h:g}")
        if m < 2:
            raise _bad(spec, f"M (most branches) must be >= 2, got {m}")
        if not 0 < p <= 1:
            raise _bad(spec, f"P must be in (0, 1], got {p:g}")
        return ForkStratified(h, m, p)
    raise _bad(spec, f"unknown strategy name {name!r}")
