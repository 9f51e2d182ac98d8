"""Where each Hugging Face architecture keeps its blocks, its final norm and its unembedding.

The logit lens and the residual capture need three modules by name: the list of decoder blocks
(the residual stream before block l is that block's input), the final norm (its input is the
stream after the last block) and the unembedding. Module names differ per architecture, so they
are written down here, once, keyed by ``config.model_type``. To support another architecture,
add one entry; ``hooks.hf`` checks at load that final norm then unembedding reproduce the
model's own logits, so a model that does more (a logit soft-cap, a logit scale) is refused
instead of being measured wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from training.errors import UsageError


@dataclass(frozen=True)
class ArchNames:
    layers: str
    """Dotted path of the ModuleList of decoder blocks."""
    final_norm: str
    unembed: tuple[str, ...]
    """Candidate paths of the unembedding, first present wins (GPT-NeoX renamed ``embed_out``)."""


_LLAMA_LIKE = ArchNames("model.layers", "model.norm", ("lm_head",))

ARCHS: dict[str, ArchNames] = {
    "gpt2": ArchNames("transformer.h", "transformer.ln_f", ("lm_head",)),
    "gpt_neox": ArchNames("gpt_neox.layers", "gpt_neox.final_layer_norm", ("embed_out", "lm_head")),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
}


def supported() -> str:
    return ", ".join(sorted(ARCHS))


def arch_names(model_type: str | None, where: str = "") -> ArchNames:
    """The module names for ``model_type``; an architecture not listed is a user error."""
    names = ARCHS.get(str(model_type))
    if names is None:
        at = f"{where}: " if where else ""
        raise UsageError(
            f"{at}model_type {model_type!r} is not supported for residual capture; supported: {supported()} "
            "(add its module names to hooks/hf_arch.py)"
        )
    return names


@dataclass(frozen=True)
class ArchModules:
    """The resolved modules and the paths nnsight reaches them by."""

    layers_path: str
    norm_path: str
    unembed_path: str
    layers: nn.ModuleList
    norm: nn.Module
    unembed: nn.Module


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def resolve(model: nn.Module, names: ArchNames, where: str = "") -> ArchModules:
    """Look the named modules up in a loaded model; a mismatch names what was missing."""
    at = f"{where}: " if where else ""
    layers = _get(model, names.layers)
    norm = _get(model, names.final_norm)
    head_path = next((p for p in names.unembed if _get(model, p) is not None), None)
    missing = [p for p, m in ((names.layers, layers), (names.final_norm, norm)) if m is None]
    if head_path is None:
        missing.append(" or ".join(names.unembed))
    if missing or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UsageError(
            f"{at}{type(model).__name__} has no module {', '.join(missing) or names.layers + ' (a non-empty list)'}; "
            "its module names differ from the ones hooks/hf_arch.py lists for this model_type"
        )
    return ArchModules(names.layers, names.final_norm, head_path, layers, norm, _get(model, head_path))
