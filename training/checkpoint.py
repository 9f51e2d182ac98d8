"""The checkpoint format: a directory with weights, config and metadata, written atomically.

``model.safetensors`` (weights only: loading can never run code), ``config.json`` (model +
tokenizer + task + the run's config), ``meta.json`` (phase, step, tokens seen, data manifest hash,
seed, where the eval set is) and ``train_state.pt`` (optimizer state for resuming; tensors only,
read with ``weights_only=True``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from training.errors import UsageError
from training.io import read_json, write_json

FORMAT = "fork-probes-native"
NAME = re.compile(r"^(?P<phase>[a-z]+)-step(?P<step>\d{6,})$")
PHASE_ORDER = {"pretrain": 0, "base": 0, "sft": 1}


def checkpoint_name(phase: str, step: int) -> str:
    return f"{phase}-step{step:06d}"


def schedule(total: int, n_log: int, n_even: int, include_zero: bool) -> list[int]:
    """Checkpoint steps: log-spaced early (the collapse happens fast), then evenly spaced."""
    n_even = max(n_even, 1)
    even = [round(total * i / n_even) for i in range(1, n_even + 1)]
    steps = set(even)
    if n_log > 0 and total > 0:
        lo, hi = max(1.0, total / 100), even[0]
        if hi > lo:
            steps.update(int(round(x)) for x in np.geomspace(lo, hi, n_log + 1)[:-1])
    if include_zero:
        steps.add(0)
    return sorted(s for s in steps if 0 <= s <= total)


def save_checkpoint(
    path: str | Path,
    module: torch.nn.Module,
    config: dict[str, Any],
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write the directory under a temporary name, then rename: a checkpoint is whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        write_json(tmp / "config.json", {"format": FORMAT, "version": 1, **config})
        write_json(tmp / "meta.json", meta)
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        os.chmod(tmp, 0o755)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_native_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        return False
    try:
        return read_json(p / "config.json").get("format") == FORMAT
    except (ValueError, OSError):
        return False


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(config, meta, weights) of a native checkpoint; a broken one is a user error."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{p} is not a checkpoint directory")
    if not is_native_checkpoint(p):
        raise UsageError(f"{p} is not a fork-probes checkpoint (needs config.json with format {FORMAT!r} and model.safetensors)")
    config = read_json(p / "config.json")
    meta = read_json(p / "meta.json") if (p / "meta.json").is_file() else {}
    return config, meta, load_file(str(p / "model.safetensors"))


def read_train_state(path: str | Path) -> dict[str, Any] | None:
    f = Path(path) / "train_state.pt"
    return torch.load(f, weights_only=True) if f.is_file() else None


def list_checkpoints(ckpt_dir: str | Path, phase: str | None = None) -> list[tuple[str, int, Path]]:
    """(phase, step, path) of every finished checkpoint under a run's checkpoints/ folder."""
    out = []
    d = Path(ckpt_dir)
    if not d.is_dir():
        return out
    for p in d.iterdir():
        m = NAME.match(p.name)
        if m and p.is_dir() and (phase is None or m["phase"] == phase) and is_native_checkpoint(p):
            out.append((m["phase"], int(m["step"]), p))
    return sorted(out, key=lambda t: (PHASE_ORDER.get(t[0], 9), t[1]))
