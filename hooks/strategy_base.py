"""What a decoding strategy is, and the registry that turns spec strings into strategies.

A strategy is a frozen dataclass subclass of :class:`Strategy` that registers itself with
``@register_strategy``, declaring its spec name, its parameters (:class:`Param`: name, float or
int, default or required, allowed range), a one-line description and an example spec.
:func:`parse_strategy`, the canonical ``str`` (what the results table's ``strategy`` column
holds) and ``VALID_FORMS`` all come from those declarations. The strategies themselves live in
:mod:`hooks.strategies`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from training.errors import UsageError

__all__ = ["RowState", "Param", "Strategy", "register_strategy", "unregister_strategy", "strategy_names",
           "registered_strategies", "parse_strategy", "sample_from_probs", "sorted_desc", "VALID_FORMS"]

VALID_FORMS = ""
"""Every registered spec form with its rules, one line (e.g. "greedy, temperature:T (T>0), ...").

Generated from the registry and regenerated whenever a strategy registers; error messages read
it at raise time, so `hooks.strategies.VALID_FORMS` is always current (a `from hooks.strategies
import VALID_FORMS` copy holds the strategies registered by then: all the built-in ones)."""


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
    reference_logits: Optional[Float[Tensor, "batch vocab"]] = None
    """The reference model's next-token logits for the same rows, for strategies that need one."""

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


Number = Union[float, int]


@dataclass(frozen=True)
class Param:
    """One parameter of a strategy spec, declared in the order it is written after the colon.

    `name` is how forms and errors write it ("T", "H", "M"); `field` the dataclass attribute it
    fills (default: `name.lower()`). `type` is float or int. `default` None means required; an
    optional parameter may be left off the end of a spec. The allowed range is given by any of
    `gt`, `ge`, `lt`, `le` (bounds); a value outside it is an error "<what> must be <range>
    [unit] [(hint)], got <value>", with `what` defaulting to `name`.
    """

    name: str
    type: type = float
    default: Optional[Number] = None
    gt: Optional[float] = None
    ge: Optional[float] = None
    lt: Optional[float] = None
    le: Optional[float] = None
    unit: str = ""
    what: str = ""
    hint: str = ""
    field: str = ""

    @property
    def required(self) -> bool:
        return self.default is None

    @property
    def attr(self) -> str:
        """The dataclass attribute this parameter fills."""
        return self.field or self.name.lower()

    def admits(self, value: Number) -> bool:
        """Whether `value` lies in the declared range."""
        return not (
            (self.gt is not None and not value > self.gt)
            or (self.ge is not None and not value >= self.ge)
            or (self.lt is not None and not value < self.lt)
            or (self.le is not None and not value <= self.le)
        )

    def _bounds(self) -> tuple[Optional[tuple[str, float]], Optional[tuple[str, float]]]:
        """(lower, upper) as (operator, bound), e.g. ('>', 0) and ('<=', 1); None where unbounded."""
        low = (">", self.gt) if self.gt is not None else (">=", self.ge) if self.ge is not None else None
        high = ("<", self.lt) if self.lt is not None else ("<=", self.le) if self.le is not None else None
        return low, high

    def range_text(self) -> str:
        """The range as errors say it: '> 0', '>= 0', 'in (0, 1]' ('' when unbounded)."""
        low, high = self._bounds()
        if low and high:
            return f"in {'(' if low[0] == '>' else '['}{low[1]:g}, {high[1]:g}{')' if high[0] == '<' else ']'}"
        bound = low or high
        return f"{bound[0]} {bound[1]:g}" if bound else ""

    def rule(self) -> str:
        """The rule as VALID_FORMS writes it: 'T>0', 'H>=0 nats default 0.5', 'integer M>=2 default 4'."""
        low, high = self._bounds()
        if low and high:  # 0<P<=1
            text = f"{low[1]:g}{low[0].replace('>', '<')}{self.name}{high[0]}{high[1]:g}"
        elif low or high:
            op, bound = low or high
            text = f"{self.name}{op}{bound:g}"
        else:
            text = self.name
        if self.type is int:
            text = f"integer {text}"
        if self.unit:
            text = f"{text} {self.unit}"
        if not self.required:
            text = f"{text} default {self.format(self.default)}"
        return text

    def format(self, value: Number) -> str:
        """The canonical text of a value: ints as integers, floats by `_fmt` (1.0 -> '1')."""
        return str(int(value)) if self.type is int else _fmt(value)

    def convert(self, spec: str, text: str) -> Number:
        """The number written as `text` in `spec` (float: finite; int: an integer literal)."""
        if self.type is int:
            try:
                return int(text)
            except ValueError:
                raise _bad(spec, f"{self.name} must be an integer, got {text!r}") from None
        try:
            value = float(text)
        except ValueError:
            raise _bad(spec, f"{self.name} must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise _bad(spec, f"{self.name} must be finite, got {text!r}")
        return value

    def check(self, spec: str, value: Number) -> None:
        """Raise the declared range's error if `value` is outside it."""
        if not self.admits(value):
            unit = f" {self.unit}" if self.unit else ""
            hint = f" ({self.hint})" if self.hint else ""
            shown = f"{value}" if self.type is int else f"{value:g}"
            raise _bad(spec, f"{self.what or self.name} must be {self.range_text()}{unit}{hint}, got {shown}")


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


def sorted_desc(probs: Float[Tensor, "batch vocab"]) -> tuple[Tensor, Tensor]:
    """Probabilities sorted high to low, ties broken by lower token id (stable sort)."""
    return torch.sort(probs, dim=-1, descending=True, stable=True)


class Strategy:
    """Base class: subclasses are frozen dataclasses that define `probs` (or override `__call__`)
    and register with `@register_strategy`, declaring the class attributes below.

    `str(strategy)` is generated from the declarations: the name, then every parameter (defaults
    included) in declared order, so the canonical spec does not depend on how it was written.
    """

    name: ClassVar[str] = ""
    """Spec name, lower case: what comes before the colon."""
    params: ClassVar[tuple[Param, ...]] = ()
    """The spec's parameters in the order they are written; they match the dataclass fields."""
    description: ClassVar[str] = ""
    """One line saying what the strategy does."""
    example: ClassVar[str] = ""
    """A valid spec, for documentation and the registry's round-trip test."""
    needs_reference: ClassVar[bool] = False
    """True if sampling needs the reference model's logits as well as the model's own."""

    def probs(self, logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, "batch vocab"]:
        raise NotImplementedError

    def __call__(
        self,
        logits: Float[Tensor, "batch vocab"],
        state: RowState,
        generator: torch.Generator,
    ) -> Int[Tensor, " batch"]:
        return sample_from_probs(self.probs(logits), generator, state.uniforms)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}:" + ",".join(p.format(getattr(self, p.attr)) for p in self.params)

    def __repr__(self) -> str:
        return f"parse_strategy({str(self)!r})"

    @classmethod
    def signature(cls) -> str:
        """The parameters as a spec writes them: 'T_hi,H[,T_base]', 'H[,M[,P]]', '' for none."""
        optional = ""
        for p in reversed([p for p in cls.params if not p.required]):
            optional = f"[,{p.name}{optional}]"
        required = ",".join(p.name for p in cls.params if p.required)
        return required + optional if required else optional[2:-1]

    @classmethod
    def form(cls) -> str:
        """The spec form with its rules, as VALID_FORMS lists it: 'fork_temp:T_hi,H[,T_base] (...)'."""
        if not cls.params:
            return cls.name
        head = f"{cls.name}:{cls.signature()}" if any(p.required for p in cls.params) else f"{cls.name}[:{cls.signature()}]"
        rules = [p.rule() for p in cls.params] + (["needs a reference model"] if cls.needs_reference else [])
        return f"{head} ({', '.join(rules)})"

    @classmethod
    def from_params(cls, spec: str, rest: Optional[str]) -> "Strategy":
        """The strategy from the text after the colon (None: no colon), checked against `params`."""
        parts = [] if rest is None else [x.strip() for x in rest.split(",")]
        required = sum(p.required for p in cls.params)
        if len(parts) < required or len(parts) > len(cls.params) or any(x == "" for x in parts):
            raise _bad(spec, f"expected parameters {cls.signature() or '(none)'}")
        given = [(p, p.convert(spec, x)) for p, x in zip(cls.params, parts)]  # every number, then every range
        for p, value in given:
            p.check(spec, value)
        values = {p.attr: value for p, value in given}
        values.update({p.attr: p.default for p in cls.params[len(parts):]})
        return cls(**values)


_REGISTRY: dict[str, type[Strategy]] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _refresh_forms() -> None:
    global VALID_FORMS
    VALID_FORMS = ", ".join(cls.form() for cls in _REGISTRY.values())


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator (above `@dataclass`): make `cls` parseable under `cls.name`.

    Checks the declarations against the class (a programming error raises TypeError at import):
    the parameters name the dataclass fields in order, required ones first, with the fields'
    defaults and within their own ranges; description and example are given.
    """
    where = getattr(cls, "__name__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, Strategy) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{where}: a strategy is a dataclass subclass of Strategy (put @register_strategy above @dataclass)")
    name = cls.name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TypeError(f"{where}: strategy name {name!r} must be lower case letters, digits and _")
    if _REGISTRY.get(name, cls) is not cls:
        raise TypeError(f"{where}: strategy name {name!r} is already registered by {_REGISTRY[name].__name__}")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    if [p.attr for p in cls.params] != [f.name for f in fields]:
        raise TypeError(f"{where}: params {[p.attr for p in cls.params]} must match the dataclass fields {[f.name for f in fields]}")
    seen_optional = False
    for p, f in zip(cls.params, fields):
        if p.type not in (float, int):
            raise TypeError(f"{where}: parameter {p.name} must be float or int, not {p.type!r}")
        if (p.gt is not None and p.ge is not None) or (p.lt is not None and p.le is not None):
            raise TypeError(f"{where}: parameter {p.name} has two lower or two upper bounds")
        if p.required and seen_optional:
            raise TypeError(f"{where}: required parameter {p.name} follows an optional one")
        seen_optional |= not p.required
        field_default = None if f.default is dataclasses.MISSING else f.default
        if p.default != field_default:
            raise TypeError(f"{where}: parameter {p.name} declares default {p.default!r}, the field has {field_default!r}")
        if p.default is not None and not (isinstance(p.default, p.type) and p.admits(p.default)):
            raise TypeError(f"{where}: default {p.default!r} of {p.name} is not a valid {p.type.__name__} {p.range_text()}")
    if not isinstance(cls.description, str) or not cls.description.strip() or "\n" in cls.description:
        raise TypeError(f"{where}: give a one-line description")
    if not isinstance(cls.example, str) or not cls.example.strip():
        raise TypeError(f"{where}: give an example spec")
    if not isinstance(cls.needs_reference, bool):
        raise TypeError(f"{where}: needs_reference must be True or False")
    _REGISTRY[name] = cls
    _refresh_forms()
    return cls


def unregister_strategy(name: str) -> None:
    """Remove a registered strategy (for tests and notebooks that registered a throw-away one)."""
    if _REGISTRY.pop(name, None) is None:
        raise KeyError(f"no strategy named {name!r} is registered")
    _refresh_forms()


def strategy_names() -> list[str]:
    """Registered spec names, in registration order."""
    return list(_REGISTRY)


def registered_strategies() -> dict[str, type[Strategy]]:
    """Registered strategy classes by spec name, in registration order (a copy)."""
    return dict(_REGISTRY)


def _bad(spec: str, why: str) -> UsageError:
    return UsageError(f"bad decoding strategy {spec!r}: {why}; valid forms: {VALID_FORMS}")


def parse_strategy(spec: str | Strategy) -> Strategy:
    """Strategy from its spec string (see VALID_FORMS); a Strategy passes through unchanged.

    The name before the colon (any case, whitespace ignored) picks a registered class; the
    comma-separated parameters after it are checked against the class's `params`.
    """
    if isinstance(spec, Strategy):
        return spec
    if not isinstance(spec, str):
        raise UsageError(f"decoding strategy must be a string, got {type(spec).__name__}; valid forms: {VALID_FORMS}")
    name, sep, rest = spec.strip().partition(":")
    name = name.strip().lower()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise _bad(spec, f"unknown strategy name {name!r}")
    return cls.from_params(spec, rest if sep else None)
