"""What every instrumented checkpoint offers the measurements, whatever its format.

A native checkpoint goes through a TransformerLens bridge, a Hugging Face directory through
nnsight; ``analysis`` and ``probes`` see only this interface, so every metric works on both.
Residual layers are numbered as the logit lens reads them: layer l < n_layers is the residual
stream before block l, layer n_layers the stream after the last block (before the final norm).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hooks.record import CheckpointRecord
from hooks.sampler import Stepper  # the one definition of the KV-cached stepping protocol


class Instrumented(ABC):
    """A loaded checkpoint with hooks at the residual stream, the final norm and the unembedding."""

    record: CheckpointRecord
    """Where the checkpoint came from and what it is (format, phase, step, identity, meta)."""
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

    def _adopt(self, record: CheckpointRecord | str | Path) -> None:
        """Take identity, place in the series and tokenizer from the record (read once, never again).

        A directory path is read into its record here, so notebooks can construct a checkpoint directly.
        """
        if not isinstance(record, CheckpointRecord):
            from hooks.record import read_record

            record = read_record(record)
        self.record = record
        self.path = record.path
        self.name = record.name
        self.phase, self.step = record.phase, record.step
        self.meta = record.meta
        self.tokenizer = record.tokenizer
