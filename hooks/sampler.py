"""Batched, KV-cached sampling of n completions per problem, for pass@k.

`generate` (and `sample`, its tokens) is generic over a *stepper* (the `Stepper` protocol
below): anything that can prefill a batch of left-padded prompts and then step one token per
row. TL-native models (a `NativeModel` or a `TransformerBridge` booted with `boot_native`) get
`NativeKVStepper`; Hugging Face models `hooks.hf.HFStepper`.

Reproducibility: every random draw comes from the `generator` passed in: per chunk, one
uniform per row for each of the max_new_tokens steps, drawn in one go (step-major) whether or
not the chunk stops early. The same seed, prompts, n, max_new_tokens, strategy and batch_size
give the same samples on any device, up to float rounding of the probabilities (the uniforms
come from the generator's device, the CPU by default). Changing `batch_size` changes how rows
are chunked and so which uniform each row gets: the samples differ but have the same
distribution.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterator, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hooks.distributions import unusable
from hooks.kv_native import NativeKVStepper, native_model_of
from hooks.strategies import RowState, Strategy, parse_strategy
from training.errors import UsageError

__all__ = ["NonFiniteLogits", "Samples", "StopCheck", "Stepper", "as_stepper", "generate", "sample"]


class NonFiniteLogits(UsageError):
    """The model produced NaN or Inf logits while sampling: no sample drawn from them means anything."""


@runtime_checkable
class Stepper(Protocol):
    """A model with a KV cache, driven one token at a time.

    `prefill` takes [batch, pos] prompts, left-padded when ``lengths`` (real tokens per row)
    is given — then it must hide each row's pads and count its positions from its first real
    token; the sampler passes ``lengths`` only when a chunk's prompts differ in length. It sizes
    its cache for `max_new_tokens` more tokens and returns last-position logits for each prompt
    repeated `repeats` times (row order as `repeat_interleave(repeats, dim=0)`: the copies of a
    prompt are adjacent). `step` appends one token per row and returns the logits after it.
    `device` is where the stepper wants its token ids.
    """

    @property
    def device(self) -> torch.device: ...

    def prefill(
        self, input_ids: Int[Tensor, "batch pos"], max_new_tokens: int = 1, repeats: int = 1
    ) -> Float[Tensor, "rows vocab"]: ...

    def step(self, next_ids: Int[Tensor, " rows"]) -> Float[Tensor, "rows vocab"]: ...


def as_stepper(model: Any) -> Stepper:
    """A stepper for `model`: itself if it already is one, else a KV stepper over a native model."""
    if isinstance(model, Stepper):
        return model
    if native_model_of(model) is not None:
        return NativeKVStepper(model)
    raise UsageError(
        f"cannot sample from a {type(model).__name__}: pass a TransformerLens NativeModel, a "
        f"TransformerBridge booted with boot_native, or an object with prefill/step/device"
    )


def _chunks(problems: int, n: int, batch_size: int) -> Iterator[tuple[int, int, int, int]]:
    """(p0, p1, j0, j1) blocks of problems x samples with at most batch_size rows each."""
    if n <= batch_size:
        per = batch_size // n
        for p0 in range(0, problems, per):
            yield p0, min(p0 + per, problems), 0, n
    else:  # one problem's samples split over several chunks
        for p0 in range(problems):
            for j0 in range(0, n, batch_size):
                yield p0, p0 + 1, j0, min(j0 + batch_size, n)


def _check_int(name: str, value: Any, low: int) -> int:
    """`value` as a Python int (numpy and 0-d torch integers welcome), or a UsageError."""
    try:
        as_int = operator.index(value)
    except TypeError:
        as_int = None
    if isinstance(value, bool) or as_int is None or as_int < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    return as_int


class Samples(NamedTuple):
    """n sampled continuations per problem, and whether each stopped within its budget."""

    tokens: Int[Tensor, "problems n new"]
    """New tokens; after a stop id every token is pad_id."""
    finished: Bool[Tensor, "problems n"]
    """True where the sample emitted a stop id or `stop_check` found its stop (e.g. a stop
    string); False where it ran out of max_new_tokens first (truncated)."""


StopCheck = Callable[[Int[Tensor, "rows t"]], Bool[Tensor, " rows"]]
"""Given rows' new tokens so far, which rows have reached their stop (a stop string, say)."""


def _as_prompts(prompt_ids: Any) -> list[Tensor]:
    """Prompts as a list of 1-d int64 tensors: a [problems, len] tensor or a sequence of id lists."""
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
            raise UsageError(
                f"prompt_ids must be an integer tensor [problems, prompt_len] or a list of id lists, got shape "
                f"{tuple(prompt_ids.shape)}"
            )
        if prompt_ids.is_floating_point() or prompt_ids.is_complex():
            raise UsageError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}")
        return list(prompt_ids.long())
    if not isinstance(prompt_ids, (list, tuple)):
        raise UsageError(f"prompt_ids must be a tensor [problems, prompt_len] or a list of id lists, got {type(prompt_ids).__name__}")
    out = []
    for i, p in enumerate(prompt_ids):
        t = torch.as_tensor(p)
        if t.dim() != 1 or t.numel() < 1 or t.is_floating_point():
            raise UsageError(f"prompt {i} must be a non-empty sequence of integer token ids")
        out.append(t.long())
    return out


def sample(
    model: Any,
    prompt_ids: Int[Tensor, "problems prompt_len"] | Sequence[Sequence[int]],
    n: int,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    pad_id: int,
    strategy: Strategy | str,
    generator: torch.Generator,
    batch_size: int = 1024,
) -> Int[Tensor, "problems n new"]:
    """n completions per prompt, max_new_tokens each; after a stop id every token is pad_id.

    The tokens of :func:`generate` (which also says which samples finished).
    """
    return generate(model, prompt_ids, n, max_new_tokens, eos_id, pad_id, strategy, generator, batch_size).tokens


def generate(
    model: Any,
    prompt_ids: Int[Tensor, "problems prompt_len"] | Sequence[Sequence[int]],
    n: int,
    max_new_tokens: int,
    stop_ids: int | Sequence[int],
    pad_id: int,
    strategy: Strategy | str,
    generator: torch.Generator,
    batch_size: int = 1024,
    stop_check: StopCheck | None = None,
    check_every: int = 8,
    reference: Any = None,
) -> Samples:
    """n completions per prompt, at most max_new_tokens each, stopping at any of ``stop_ids``.

    Prompts may have different lengths: they are ordered by length (stably, so equal-length
    prompts keep their order), cut into chunks of at most batch_size rows, and left-padded
    within a chunk (the stepper masks the pads and keeps each row's positions), so one call
    serves any mix of prompts. Each problem's n samples are rows of a chunk; a chunk stops as
    soon as every row has finished. ``stop_check`` (every ``check_every`` steps and after the
    last) marks rows whose text reached a stop string; their later tokens are the caller's to
    cut. ``reference`` (a second model or stepper, run in lockstep on the same rows) feeds
    strategies that compare with a reference model (``ref_mix``). `strategy` is a Strategy or its spec (see `hooks.strategies.parse_strategy`). Returns
    int64 tokens on the CPU. Same seed and same batch_size give the same samples; another
    batch_size gives other samples from the same distribution (see the module docstring).
    """
    stepper = as_stepper(model)
    strategy = parse_strategy(strategy)
    if strategy.needs_reference and reference is None:
        raise UsageError(f"{strategy} needs a reference model (the series' base checkpoint, or --reference CHECKPOINT); "
                         "none was given")
    ref_stepper = as_stepper(reference) if reference is not None and strategy.needs_reference else None
    n = _check_int("n", n, 1)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    check_every = _check_int("check_every", check_every, 1)
    stops = [_check_int("stop id", x, 0) for x in ([stop_ids] if not isinstance(stop_ids, (list, tuple, set, frozenset)) else sorted(stop_ids))]
    if not stops:
        raise UsageError("stop_ids must name at least one token id (the EOS)")
    pad_id = _check_int("pad_id", pad_id, 0)
    if not isinstance(generator, torch.Generator):
        raise UsageError(f"generator must be a torch.Generator (seeded by the caller), got {type(generator).__name__}")
    prompts = _as_prompts(prompt_ids)
    problems = len(prompts)
    order = sorted(range(problems), key=lambda i: prompts[i].numel())  # stable: equal lengths keep their order
    tokens = torch.full((problems, n, max_new_tokens), pad_id, dtype=torch.long)
    finished = torch.zeros((problems, n), dtype=torch.bool)
    device = stepper.device
    stop_t = torch.tensor(stops, dtype=torch.long, device=device)
    with torch.inference_mode():
        for p0, p1, j0, j1 in _chunks(problems, n, batch_size):
            idx = order[p0:p1]
            lengths = torch.tensor([prompts[i].numel() for i in idx])
            width = int(lengths.max())
            padded = torch.full((len(idx), width), pad_id, dtype=torch.long)
            for r, i in enumerate(idx):
                padded[r, width - prompts[i].numel():] = prompts[i]
            toks, done = _sample_chunk(
                stepper, padded.to(device), None if bool((lengths == width).all()) else lengths, j0, j1,
                max_new_tokens, stop_t, pad_id, strategy, generator, stop_check, check_every, ref_stepper,
            )
            m = j1 - j0
            tokens[idx, j0:j1] = toks.view(len(idx), m, max_new_tokens).cpu()
            finished[idx, j0:j1] = done.view(len(idx), m).cpu()
    return Samples(tokens, finished)


def _sample_chunk(
    stepper: Stepper,
    prompts: Int[Tensor, "chunk prompt_len"],
    lengths: Int[Tensor, " chunk"] | None,
    j0: int,
    j1: int,
    max_new_tokens: int,
    stop_ids: Int[Tensor, " stops"],
    pad_id: int,
    strategy: Strategy,
    generator: torch.Generator,
    stop_check: StopCheck | None,
    check_every: int,
    reference: Stepper | None = None,
) -> tuple[Int[Tensor, "rows new"], Bool[Tensor, " rows"]]:
    """Samples j0..j1-1 of each (left-padded) prompt in the chunk, rows in problem-major order."""
    m = j1 - j0

    def prefill(st: Stepper) -> Tensor:
        if lengths is None:
            return st.prefill(prompts.to(st.device), max_new_tokens=max_new_tokens, repeats=m)
        return st.prefill(prompts.to(st.device), max_new_tokens=max_new_tokens, repeats=m, lengths=lengths)

    logits = prefill(stepper)
    ref_logits = prefill(reference) if reference is not None else None
    rows = logits.shape[0]
    device = logits.device
    state = RowState(sample_index=torch.arange(j0, j1, device=device).repeat(prompts.shape[0]))
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    pad = torch.tensor(pad_id, dtype=torch.long, device=device)
    uniforms = torch.rand((max_new_tokens, rows), generator=generator, device=generator.device).to(device)
    broken = torch.zeros(rows, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        state.step = t
        state.uniforms = uniforms[t]
        state.reference_logits = ref_logits
        broken |= ~finished & unusable(logits)  # checked once per chunk: no sync per step
        if ref_logits is not None:
            broken |= ~finished & unusable(ref_logits)
        next_ids = strategy(logits.float(), state, generator).to(device)
        tokens[:, t] = torch.where(finished, pad, next_ids)
        finished |= torch.isin(next_ids, stop_ids)
        last = t == max_new_tokens - 1
        if stop_check is not None and ((t + 1) % check_every == 0 or last):
            open_rows = (~finished).nonzero().flatten()
            if open_rows.numel():
                hit = stop_check(tokens[open_rows, : t + 1]).to(device)
                finished[open_rows[hit]] = True
        if last or bool(finished.all()):
            break
        logits = stepper.step(next_ids)
        if reference is not None:
            ref_logits = reference.step(next_ids.to(reference.device))
    if bool(broken.any()):
        raise NonFiniteLogits(f"non-finite logits while sampling ({int(broken.sum())} of {rows} rows)")
    return tokens, finished
