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
from training.errors import UsageError


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


def build_native(
    cfg: dict[str, Any], device: str | torch.device | None = None, embed_init_std: float = 0.0
) -> torch.nn.Module:
    """The plain native module, initialised as ``boot_native`` would (seeded, RNG forked).

    ``embed_init_std > 0`` redraws the token and position embeddings from N(0, std^2) with a
    generator seeded by the model seed. TransformerLens's GPT-2 init draws them at
    0.8/sqrt(d_model) (0.1 at d_model 64); at that scale the graph task's edge lookup had not
    formed after 2,500 steps (fork cross-entropy 2.5 nats, chain steps 2.0), while unit-scale
    embeddings form it at ~750 steps (chain steps 0.01 nats by step 1,000).
    """
    from transformer_lens.model_bridge.sources.native import NativeModel, initialize_native_model

    tl_cfg = tl_config(cfg)
    with torch.random.fork_rng(devices=[]):
        model = NativeModel(copy.deepcopy(tl_cfg))
        initialize_native_model(model, tl_cfg)
    if embed_init_std > 0:
        g = torch.Generator().manual_seed(int(cfg.get("seed") or 0) + 7919)
        with torch.no_grad():
            for emb in (model.tok_embed, model.pos):
                if emb is not None:
                    emb.weight.copy_(torch.randn(emb.weight.shape, generator=g) * embed_init_std)
    return model.to(device) if device is not None else model


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load a checkpoint's weights into ``module``, every parameter accounted for.

    Only derived buffers (attention masks, cached rotary tables) may be absent from the file; a
    missing or unexpected tensor, or one whose shape differs from the config's, is a user error
    naming the checkpoint.
    """
    try:
        missing, unexpected = module.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a shape that does not match the config
        lines = [ln.strip() for ln in str(e).strip().splitlines()]
        detail = next((ln for ln in lines if "size mismatch" in ln), lines[-1] if lines else "")
        raise UsageError(f"{where}: weights do not match its config.json ({detail[:160]})") from None
    missing = [k for k in missing if "mask" not in k and "cached" not in k]
    if missing or unexpected:
        raise UsageError(f"{where}: weights do not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
