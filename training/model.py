"""Tiny TL-native models from a config: no downloads, and the same weights load as hooked bridges.

Training runs on the plain ``NativeModel`` (the module ``TransformerBridge.boot_native`` wraps),
which skips the bridge's hook dispatch; ``hooks.load`` wraps the very same weights in a bridge for
every measurement.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from training.config import ModelConfig


def bridge_config_dict(model: ModelConfig, d_vocab: int, n_ctx: int, seed: int) -> dict[str, Any]:
    """The TransformerBridgeConfig fields a checkpoint's config.json stores."""
    return {
        "d_model": model.d_model,
        "d_head": model.d_model // model.n_heads,
        "n_layers": model.n_layers,
        "n_heads": model.n_heads,
        "d_mlp": model.d_mlp,
        "d_vocab": d_vocab,
        "n_ctx": model.n_ctx or n_ctx,
        "act_fn": model.act_fn,
        "normalization_type": model.normalization_type,
        "positional_embedding_type": model.positional_embedding_type,
        "seed": seed,
    }


def tl_config(cfg: dict[str, Any]):
    from transformer_lens.config import TransformerBridgeConfig

    return TransformerBridgeConfig(**cfg)


def build_native(cfg: dict[str, Any], device: str | torch.device | None = None) -> torch.nn.Module:
    """The plain native module, initialised exactly as ``boot_native`` would (seeded, RNG forked)."""
    from transformer_lens.model_bridge.sources.native import NativeModel, initialize_native_model

    tl_cfg = tl_config(cfg)
    with torch.random.fork_rng(devices=[]):
        model = NativeModel(copy.deepcopy(tl_cfg))
        initialize_native_model(model, tl_cfg)
    return model.to(device) if device is not None else model


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
