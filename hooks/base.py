"""What every instrumented checkpoint offers the measurements, whatever its format.

A native checkpoint goes through a TransformerLens bridge, a Hugging Face directory through
nnsight; ``analysis`` and ``probes`` see only this interface, so every metric works on both.
Residual layers are numbered as the logit lens reads them: layer l < n_layers is the residual
stream before block l, layer n_layers the stream after the last block (before the final norm).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hooks.sampler import Stepper  # the one definition of the KV-cached stepping protocol


class TextTokenizer(Protocol):
    """The tokenizer surface measurements need (the word tokenizer and HF tokenizers both have it)."""

    eos_id: int
    pad_id: int

    def encode_with_offsets(self, text: str) -> list[tuple[int, tuple[int, int]]]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode_completion(self, ids) -> tuple[str, bool]: ...

    def fingerprint(self) -> str: ...


class Instrumented(ABC):
    """A loaded checkpoint with hooks at the residual stream, the final norm and the unembedding."""

    path: Path
    name: str
    phase: str
    step: int
    format: str  # "native" or "hf"
    tokenizer: Any
    n_layers: int
    d_model: int
    device: torch.device
    meta: dict[str, Any]

    @abstractmethod
    def capture(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Bool[Tensor, "batch pos"],
        resid_pos: Int[Tensor, "batch m"],
        logit_pos: Int[Tensor, "batch q"],
    ) -> tuple[Float[Tensor, "batch q vocab"], Float[Tensor, "batch m layer d_model"]]:
        """One teacher-forced forward pass: logits at ``logit_pos`` and residuals (every lens
        layer) at ``resid_pos`` only, never the whole activation cache."""

    @abstractmethod
    def lens(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        """The logit lens: the model's own final norm, then its unembedding."""

    @abstractmethod
    def stepper(self) -> Stepper:
        """A fresh KV-cached stepper over this checkpoint's weights."""

    def sort_key(self) -> tuple[int, int, str]:
        from training.checkpoint import PHASE_ORDER

        return (PHASE_ORDER.get(self.phase, 9), self.step, str(self.path))
