"""The public Python API: what the CLI verbs call, usable from a notebook as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from training.config import ExperimentConfig, load_config


def train(
    config: str | ExperimentConfig | None = None,
    out: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    device: str | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Synthesise data, pretrain the base model and SFT it, writing checkpoints under ``out``.

    ``config`` is an :class:`ExperimentConfig`, a JSON file or an embedded config name; ``out``
    defaults to ``runs/<config name>``. Resumes whatever a previous call left.
    """
    from training.train import train as _train

    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, list(overrides or []))
    if isinstance(config, ExperimentConfig) and overrides:
        raise ValueError("give overrides with a config name or file, not with an ExperimentConfig")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    return _train(cfg, out or Path("runs") / cfg.name, device=device, progress=progress, log=log)
