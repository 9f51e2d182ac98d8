"""Batched, KV-cached sampling of n completions per problem, for pass@k.

`sample` is generic over a *stepper* (the `Stepper` protocol below): anything that can prefill
a batch of equal-length prompts and then step one token per row. TL-native models (a
`NativeModel` or a `TransformerBridge` booted with `boot_native`) get `NativeKVStepper`; a
Hugging Face model plugs in later by wrapping its `past_key_values` in the same two methods.

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
from typing import Any, Iterator, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooks.distributions import unusable
from hooks.kv_native import NativeKVStepper, native_model_of
from hooks.strategies import RowState, Strategy, parse_strategy
from training.errors import UsageError

__all__ = ["NonFiniteLogits", "Stepper", "as_stepper", "sample"]


class NonFiniteLogits(UsageError):
    """The model produced NaN or Inf logits while sampling: no sample drawn from them means anything."""


@runtime_checkable
class Stepper(Protocol):
    """A model with a KV cache, driven one token at a time.

    `prefill` takes [batch, pos] prompts of one length, sizes its cache for `max_new_tokens`
    more tokens, and returns last-position logits for each prompt repeated `repeats` times
    (row order as `repeat_interleave(repeats, dim=0)`: the copies of a prompt are adjacent).
    `step` appends one token per row and returns the logits after it. `device` is where the
    stepper wants its token ids.
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


def sample(
    model: Any,
    prompt_ids: Int[Tensor, "problems prompt_len"],
    n: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    strategy: Strategy | str,
    generator: torch.Generator,
    batch_size: int = 1024,
) -> Int[Tensor, "problems n new"]:
    """n completions per prompt, max_new_tokens each; after EOS every token is pad_id.

    All prompts share one length (group by length before calling). Each problem's n samples
    are rows of the batch; problems are chunked so a batch holds at most batch_size rows, and
    a chunk stops as soon as every row has emitted EOS. `strategy` is a Strategy or its spec
    (see `hooks.strategies.parse_strategy`). Returns int64 on prompt_ids' device.
    Same seed and same batch_size give the same samples; another batch_size gives other
    samples from the same distribution (see the module docstring).
    """
    stepper = as_stepper(model)
    strategy = parse_strategy(strategy)
    n = _check_int("n", n, 1)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    eos_id = _check_int("eos_id", eos_id, 0)
    pad_id = _check_int("pad_id", pad_id, 0)
    if not isinstance(generator, torch.Generator):
        raise UsageError(f"generator must be a torch.Generator (seeded by the caller), got {type(generator).__name__}")
    if not isinstance(prompt_ids, Tensor) or prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        shape = tuple(prompt_ids.shape) if isinstance(prompt_ids, Tensor) else type(prompt_ids).__name__
        raise UsageError(
            f"prompt_ids must be an integer tensor [problems, prompt_len] of equal-length prompts, got {shape}; "
            f"group prompts by length and call once per group"
        )
    if prompt_ids.is_floating_point() or prompt_ids.is_complex():
        raise UsageError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}")

    problems = prompt_ids.shape[0]
    out = torch.full((problems, n, max_new_tokens), pad_id, dtype=torch.long, device=prompt_ids.device)
    device = stepper.device
    with torch.inference_mode():
        for p0, p1, j0, j1 in _chunks(problems, n, batch_size):
            tokens = _sample_chunk(
                stepper, prompt_ids[p0:p1].to(device, torch.long), j0, j1,
                max_new_tokens, eos_id, pad_id, strategy, generator,
            )
            out[p0:p1, j0:j1] = tokens.view(p1 - p0, j1 - j0, max_new_tokens).to(out.device)
    return out


def _sample_chunk(
    stepper: Stepper,
    prompts: Int[Tensor, "chunk prompt_len"],
    j0: int,
    j1: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    strategy: Strategy,
    generator: torch.Generator,
) -> Int[Tensor, "rows new"]:
    """Samples j0..j1-1 of each prompt in the chunk, rows in problem-major order."""
    m = j1 - j0
    logits = stepper.prefill(prompts, max_new_tokens=max_new_tokens, repeats=m)
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
        broken |= ~finished & unusable(logits)  # checked once per chunk: no sync per step
        next_ids = strategy(logits.float(), state, generator).to(device)
        tokens[:, t] = torch.where(finished, pad, next_ids)
        finished |= next_ids == eos_id
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = stepper.step(next_ids)
    if bool(broken.any()):
        raise NonFiniteLogits(f"non-finite logits while sampling ({int(broken.sum())} of {rows} rows)")
    return tokens
