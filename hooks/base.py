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
from training.errors import UsageError


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

    def patched_logits(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Bool[Tensor, "batch pos"],
        patch_pos: Int[Tensor, "batch ..."],
        layers: int | list[int] | tuple[int, ...],
        replacement: Float[Tensor, "batch ... d_model"],
        logit_pos: Int[Tensor, "batch q"],
    ) -> Float[Tensor, "batch q vocab"]:
        """One forward pass with the residual at ``patch_pos`` replaced at lens layer(s) ``layers``.

        Layer l < n_layers replaces the input of block l, l = n_layers the stream after the last
        block (the final norm's input), as ``capture`` numbers them. ``patch_pos`` is [batch] (one
        position per row) or [batch, m]; ``layers`` one layer or a list of distinct layers; the
        replacement is [batch, (m,) (k,) d_model] accordingly, the layout ``capture`` returns its
        residuals in. Only those positions change; every other position runs as usual (later
        positions see the patched one through attention). Returns logits at ``logit_pos``.
        """
        n = self.n_layers
        b = input_ids.shape[0]
        pos = patch_pos[:, None] if patch_pos.dim() == 1 else patch_pos
        one_layer = isinstance(layers, int) and not isinstance(layers, bool)
        layer_list = [int(layers)] if one_layer else [int(l) for l in layers]
        rep = replacement
        if patch_pos.dim() == 1:
            rep = rep.unsqueeze(1)
        if one_layer:
            rep = rep.unsqueeze(2)
        if pos.dim() != 2 or pos.shape[0] != b or rep.dim() != 4 or tuple(rep.shape) != (b, pos.shape[1], len(layer_list), self.d_model):
            raise UsageError(
                f"patched_logits: patch_pos {tuple(patch_pos.shape)} and replacement {tuple(replacement.shape)} do not "
                f"match [batch={b}, (m,) (k={len(layer_list)},) d_model={self.d_model}] for layers {layers}")
        if not layer_list or len(set(layer_list)) != len(layer_list) or min(layer_list) < 0 or max(layer_list) > n:
            raise UsageError(f"patched_logits: layers {layers} must be distinct lens layers in 0..{n}")
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= input_ids.shape[1]):
            raise UsageError(f"patched_logits: patch position outside the {input_ids.shape[1]} input positions")
        order = sorted(range(len(layer_list)), key=lambda i: layer_list[i])  # execution order
        return self._patch_forward(input_ids, attention_mask, pos, [layer_list[i] for i in order], rep[:, :, order],
                                   logit_pos)

    def _patch_forward(self, input_ids: Tensor, attention_mask: Tensor, patch_pos: Tensor, layers: list[int],
                       replacement: Tensor, logit_pos: Tensor) -> Tensor:
        """``patched_logits`` with checked arguments: pos [b, m], layers ascending, replacement [b, m, k, d]."""
        raise UsageError(f"{type(self).__name__} does not support activation patching")

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
