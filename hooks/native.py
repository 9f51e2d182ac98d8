"""Native checkpoints as hooked models: a TransformerLens bridge for every captured activation,
the plain module underneath for KV-cached sampling (same weights, no hook dispatch per token)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hooks.base import Instrumented, Stepper
from hooks.record import CheckpointRecord
from training.checkpoint import check_finite, read_weights
from training.errors import UsageError
from training.model import build_native, load_weights, tl_config


def resid_hook_names(n_layers: int) -> list[str]:
    """The lens layers by TransformerLens hook name: before each block, then after the last."""
    return [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]


class NativeCheckpoint(Instrumented):
    format = "native"

    def __init__(self, record: CheckpointRecord | str | Path, device: torch.device | str = "cpu"):
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        self._adopt(record)
        self.config = self.record.config
        weights = read_weights(self.path)
        check_finite(weights, str(self.path))
        self.device = torch.device(device)
        self.task_config: dict[str, Any] = self.config.get("task") or {}
        model_cfg = self.config["model"]
        try:
            self.module = build_native(model_cfg)
        except (TypeError, ValueError, KeyError) as e:
            raise UsageError(f"{self.path / 'config.json'}: its model config cannot build a model ({e}); re-save the checkpoint") from None
        load_weights(self.module, weights, str(self.path))
        self.module.to(self.device).eval()
        self.bridge = build_bridge_from_module(
            copy.deepcopy(self.module), architecture="TransformerLensNative", tl_config=tl_config(model_cfg)
        )
        self.bridge.eval()  # the module was on its device before wrapping; bridge.to() would print
        self.n_layers = int(model_cfg["n_layers"])
        self.d_model = int(model_cfg["d_model"])
        self.n_ctx = int(model_cfg["n_ctx"])
        self._names = resid_hook_names(self.n_layers)

    @torch.inference_mode()
    def capture(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Bool[Tensor, "batch pos"],
        resid_pos: Int[Tensor, "batch m"],
        logit_pos: Int[Tensor, "batch q"],
    ) -> tuple[Float[Tensor, "batch q vocab"], Float[Tensor, "batch m layer d_model"]]:
        # Causal attention and right padding: positions before the padding never see it, so the
        # mask is not needed for the positions read here.
        input_ids = input_ids.to(self.device)
        rows = torch.arange(input_ids.shape[0], device=self.device)[:, None]
        rp = resid_pos.to(self.device)
        picked: dict[str, Tensor] = {}

        def keep(name: str):
            def hook_fn(act: Tensor, hook) -> None:
                picked[name] = act[rows, rp]

            return hook_fn

        logits = self.bridge.run_with_hooks(input_ids, fwd_hooks=[(n, keep(n)) for n in self._names])
        resid = torch.stack([picked[n] for n in self._names], dim=2)
        return logits[rows, logit_pos.to(self.device)], resid

    @torch.inference_mode()
    def lens(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        return self.bridge.unembed(self.bridge.ln_final(resid.to(self.device)))

    @torch.inference_mode()
    def _patch_forward(self, input_ids: Tensor, attention_mask: Tensor, patch_pos: Tensor, layers: list[int],
                       replacement: Tensor, logit_pos: Tensor) -> Tensor:
        # A hook that returns a tensor replaces the activation: the lens layer's hook point, with
        # only [rows, patch_pos] overwritten (right padding is never read, as in capture).
        input_ids = input_ids.to(self.device)
        rows = torch.arange(input_ids.shape[0], device=self.device)[:, None]
        pos = patch_pos.to(self.device)
        rep = replacement.to(self.device)

        def put(k: int):
            def hook_fn(act: Tensor, hook) -> Tensor:
                act = act.clone()
                act[rows, pos] = rep[:, :, k].to(act.dtype)
                return act

            return hook_fn

        logits = self.bridge.run_with_hooks(input_ids, fwd_hooks=[(self._names[l], put(k)) for k, l in enumerate(layers)])
        return logits[rows, logit_pos.to(self.device)]

    def stepper(self) -> Stepper:
        from hooks.kv_native import NativeKVStepper

        return NativeKVStepper(self.module)
