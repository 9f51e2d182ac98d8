"""Find checkpoints from paths and globs, and load each as an instrumented model."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

import torch

from hooks.base import Instrumented
from hooks.record import CheckpointRecord, read_record
from training.errors import UsageError
from training.phases import series_key


def resolve_checkpoints(patterns: Sequence[str | Path] | str | Path) -> list[CheckpointRecord]:
    """Directories and shell-style globs to checkpoint records, in series order (phase, step)."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    if not patterns:
        raise UsageError("no checkpoints given; pass --checkpoints DIR [DIR ...] or a quoted glob")
    found: list[CheckpointRecord] = []
    seen: set[Path] = set()
    for pat in patterns:
        pat = str(pat)
        if any(c in pat for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(pat)) if Path(m).is_dir()]
            if not matches:
                raise UsageError(f"no checkpoint directory matches {pat!r}")
        else:
            matches = [Path(pat)]
        for m in matches:
            rec = read_record(m)  # refuses anything that is not a whole checkpoint, naming it
            if rec.path.resolve() not in seen:
                seen.add(rec.path.resolve())
                found.append(rec)
    return sorted(found, key=lambda r: series_key(r.phase, r.step, str(r.path.resolve())))


def load(checkpoint: CheckpointRecord | str | Path, device: str | torch.device = "cpu", dtype: str | None = None,
         progress: bool = False) -> Instrumented:
    """A checkpoint (its record or its directory) as an instrumented model."""
    rec = checkpoint if isinstance(checkpoint, CheckpointRecord) else read_record(checkpoint)
    if rec.format == "native":
        if dtype not in (None, "float32"):
            raise UsageError(f"--dtype {dtype} applies to Hugging Face checkpoints; native ones run in float32 ({rec.path})")
        from hooks.native import NativeCheckpoint

        return NativeCheckpoint(rec, device=device)
    from hooks.hf import HFCheckpoint

    return HFCheckpoint(rec, device=device, dtype=dtype, progress=progress)
