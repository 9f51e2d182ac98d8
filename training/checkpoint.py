"""The checkpoint format: a directory with weights, config and metadata, written atomically.

``model.safetensors`` (weights only: loading can never run code), ``config.json`` (model +
tokenizer + task + the run's config), ``meta.json`` (phase, step, tokens seen, data manifest hash,
seed, where the eval set is) and ``train_state.pt`` (optimizer state for resuming; tensors only,
read with ``weights_only=True``).
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from training.errors import UsageError, short_reason
from training.io import atomic_directory, read_json, read_json_object, write_json
from training.phases import NATIVE_NAME as NAME
from training.phases import series_key

FORMAT = "fork-probes-native"
_PARTIAL = re.compile(r"^\..+-step\d{6,}\..+$")
"""Temporary directories ``save_checkpoint`` writes before its rename: left behind only by a kill."""


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
    with atomic_directory(path) as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        write_json(tmp / "config.json", {"format": FORMAT, "version": 1, **config})
        write_json(tmp / "meta.json", meta)
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
    return path


def is_native_checkpoint(path: str | Path) -> bool:
    """Whether a directory claims to be a native checkpoint (config.json with our format tag).

    A claim, not a validation: :func:`read_config` and :func:`read_weights` say what is wrong
    with a directory that claims it but is broken.
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    try:
        cfg = read_json(p / "config.json")
    except (ValueError, OSError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") == FORMAT


def read_config(path: str | Path) -> dict[str, Any]:
    """A native checkpoint's config.json, checked for the parts every reader needs."""
    p = Path(path)
    fix = "the checkpoint is damaged: re-save it (or train it again)"
    cfg = read_json_object(p / "config.json", "model, tokenizer, task", fix)
    for key in ("model", "tokenizer"):
        if not isinstance(cfg.get(key), dict):
            raise UsageError(f"{p / 'config.json'} has no {key!r} object; {fix}")
    return cfg


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json as a dict ({} when the directory has none)."""
    f = Path(path) / "meta.json"
    if not f.is_file():
        return {}
    return read_json_object(f, "phase, step, ...", "fix or delete meta.json")


def check_safetensors(path: str | Path) -> list[str]:
    """The tensor names of a safetensors file, after checking its header covers the whole file.

    Reads the header only (no tensor data), so a truncated or corrupt file is refused before
    anything is measured or written.
    """
    f = Path(path)
    if not f.is_file():
        raise UsageError(f"no weights file {f.name} in {f.parent}")
    try:
        with safe_open(str(f), framework="pt") as st:
            return list(st.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0]}): truncated or corrupt; "
                         "re-save the checkpoint") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """model.safetensors of a native checkpoint (tensors only: loading can never run code)."""
    f = Path(path) / "model.safetensors"
    check_safetensors(f)
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0]}); re-save the checkpoint") from None


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(config, meta, weights) of a native checkpoint; a broken one is a user error."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{p} is not a checkpoint directory")
    if not is_native_checkpoint(p):
        raise UsageError(f"{p} is not a fork-probes checkpoint (needs config.json with format {FORMAT!r} and model.safetensors)")
    return read_config(p), read_meta(p), read_weights(p)


def non_finite(weights: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """How many NaN/Inf values the floating-point tensors hold, and the names of the tensors holding them."""
    count, names = 0, []
    for name, t in weights.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                count += bad
                names.append(name)
    return count, names


def check_finite(weights: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights with NaN or Inf: every number measured from them would be meaningless."""
    count, names = non_finite(weights)
    if count:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UsageError(f"{where}: {count} non-finite (NaN or Inf) weight values in {shown}; "
                         "this checkpoint cannot be measured (did training diverge?)")


def read_train_state(path: str | Path) -> dict[str, Any] | None:
    """Optimizer state for resuming, read with ``weights_only=True``: tensors and plain data only."""
    f = Path(path) / "train_state.pt"
    if not f.is_file():
        return None
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing a foreign file
            warnings.simplefilter("ignore")
            state = torch.load(f, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError...: anything but a tensor file
        raise UsageError(f"{f} is not a fork-probes train state ({type(e).__name__}: {short_reason(e)}); it is refused "
                         "unread: delete that checkpoint directory to resume from the one before it") from None
    if not isinstance(state, dict) or not {"optimizer", "step", "tokens_seen"} <= set(state):
        raise UsageError(f"{f} is not a fork-probes train state (needs optimizer, step, tokens_seen); "
                         "delete that checkpoint directory to resume from the one before it")
    return state


def remove_partial(ckpt_dir: str | Path) -> list[Path]:
    """Delete the temporary directories a killed ``save_checkpoint`` left; returns what it removed."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    gone = [p for p in d.iterdir() if p.is_dir() and _PARTIAL.match(p.name)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


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
    return sorted(out, key=lambda t: series_key(t[0], t[1], t[2].name))
