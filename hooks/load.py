"""Find checkpoints from paths and globs, and load each as an instrumented model."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

import torch

from hooks.base import Instrumented
from training.checkpoint import NAME, PHASE_ORDER, is_native_checkpoint
from training.errors import UsageError
from training.io import read_json


def is_hf_checkpoint(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    try:
        cfg = read_json(path / "config.json")
    except (ValueError, OSError):
        return False
    return isinstance(cfg, dict) and ("architectures" in cfg or "model_type" in cfg)


def checkpoint_format(path: str | Path) -> str:
    p = Path(path)
    if is_native_checkpoint(p):
        return "native"
    if is_hf_checkpoint(p):
        return "hf"
    raise UsageError(
        f"{p} is neither a fork-probes checkpoint (config.json + model.safetensors) nor a Hugging Face "
        "model directory (config.json with model_type, weights, tokenizer files)"
    )


def _sort_key(p: Path) -> tuple:
    meta = {}
    if (p / "meta.json").is_file():
        try:
            meta = read_json(p / "meta.json")
        except (ValueError, OSError):
            meta = {}
    if is_native_checkpoint(p):
        phase, step = meta.get("phase"), meta.get("step")
        match = NAME.match(p.name)
        if phase is None and match:
            phase, step = match["phase"], int(match["step"])
    else:
        from hooks.hf import hf_phase_step

        phase, step = hf_phase_step(p, meta)
    return (PHASE_ORDER.get(phase, 9) if phase else 9, step if step is not None else -1, str(p))


def resolve_checkpoints(patterns: Sequence[str | Path]) -> list[Path]:
    """Directories and shell-style globs to checkpoint directories, sorted by phase and step."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    if not patterns:
        raise UsageError("no checkpoints given; pass --checkpoints DIR [DIR ...] or a quoted glob")
    found: list[Path] = []
    for pat in patterns:
        pat = str(pat)
        if any(c in pat for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(pat)) if Path(m).is_dir()]
            if not matches:
                raise UsageError(f"no checkpoint directory matches {pat!r}")
        else:
            p = Path(pat)
            if not p.exists():
                raise UsageError(f"no such checkpoint directory: {pat}")
            if not p.is_dir():
                raise UsageError(f"{pat} is a file; give the checkpoint's directory")
            matches = [p]
        for m in matches:
            checkpoint_format(m)  # refuse anything that is not a checkpoint, naming it
            if m.resolve() not in {f.resolve() for f in found}:
                found.append(m)
    return sorted(found, key=_sort_key)


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None) -> Instrumented:
    """A checkpoint directory (native or Hugging Face) as an instrumented model."""
    fmt = checkpoint_format(path)
    if fmt == "native":
        if dtype not in (None, "float32"):
            raise UsageError("--dtype applies to Hugging Face checkpoints; native ones run in float32")
        from hooks.native import NativeCheckpoint

        return NativeCheckpoint(path, device=device)
    from hooks.hf import HFCheckpoint

    return HFCheckpoint(path, device=device, dtype=dtype)


def describe(path: str | Path) -> dict:
    """What a checkpoint is, read cheaply (no weights): format, tokenizer identity, task, meta.

    Lets ``probes run`` refuse a mixed set of checkpoints before it measures or writes anything.
    """
    p = Path(path)
    fmt = checkpoint_format(p)
    if fmt == "native":
        from training.tokenizer import WordTokenizer

        cfg = read_json(p / "config.json")
        meta = read_json(p / "meta.json") if (p / "meta.json").is_file() else {}
        return {
            "format": fmt,
            "tokenizer": WordTokenizer.from_dict(cfg["tokenizer"]).fingerprint(),
            "task": cfg.get("task"),
            "meta": meta,
            "experiment": cfg.get("experiment"),
        }
    from transformers import AutoTokenizer

    from hooks.hf import HFTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"{p}: cannot load its tokenizer ({str(e).splitlines()[0]}); save the tokenizer beside the model") from None
    meta = read_json(p / "meta.json") if (p / "meta.json").is_file() else {}
    return {"format": fmt, "tokenizer": HFTokenizer(tok, where=str(p)).fingerprint(), "task": meta.get("task"),
            "meta": meta, "experiment": None}
