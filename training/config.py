"""Experiment configuration: plain dataclasses whose defaults are the embedded default run.

Defaults live here and only here. A config file (JSON) and ``key=value`` overrides are applied on
top; an unknown key is an error that names the nearest known one, never a silent no-op.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from training.errors import UsageError
from training.schema import KINDS

ACT_FNS = ("gelu", "gelu_new", "relu", "silu", "swish", "solu", "solu_ln")
"""Activations the TL-native model builds (its own table; tests/test_config.py holds them equal)."""
NORMALIZATION_TYPES = ("LN", "LNPre", "RMS", "RMSPre")
POSITIONAL_EMBEDDINGS = ("standard", "rotary")


@dataclass
class DataConfig:
    n_pretrain: int = 150_000
    n_sft: int = 100_000
    n_eval: int = 200
    eval_mix: dict[str, float] = field(
        default_factory=lambda: {"indecipherable": 0.4, "decipherable": 0.3, "multi-valid": 0.3}
    )
    prevalence: float = 1.0
    """Fork prevalence knob: share of multi-valid examples among the SFT examples that are not
    decipherable controls (the rest are indecipherable)."""
    decipherable_share: float = 0.2
    policy: str = "canonical"
    """Demonstration policy at multi-valid forks: ``canonical`` (always the style rule's branch),
    ``balanced`` (every valid branch equally often) or ``paired`` (each multi-valid problem once per
    valid branch: demonstrations that differ only at the fork)."""


@dataclass
class ModelConfig:
    n_layers: int = 3
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    act_fn: str = "gelu"
    normalization_type: str = "LN"
    positional_embedding_type: str = "standard"
    n_ctx: int = 0
    """Context length; 0 means the task's longest sequence."""
    embed_init_std: float = 1.0
    """Std of the token and position embeddings at init (0 keeps TransformerLens's 0.8/sqrt(d_model)).
    Unit-scale embeddings let the edge-lookup (induction) circuit form in ~750 steps instead of
    several thousand: measured on the graph task, see training/model.py."""


@dataclass
class PhaseConfig:
    steps: int = 2500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0
    n_log_checkpoints: int = 0
    """Log-spaced checkpoints early in the phase (catch the collapse while it happens)."""
    n_even_checkpoints: int = 1
    """Evenly spaced checkpoints after that; the last is always the final step."""


@dataclass
class EvalConfig:
    samples: int = 32
    strategy: str = "temperature:1.0"
    seed: int = 0


@dataclass
class ExperimentConfig:
    name: str = "graph"
    seed: int = 0
    task: dict[str, Any] = field(default_factory=lambda: {"name": "graph"})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PhaseConfig = field(default_factory=PhaseConfig)
    sft: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(steps=3000, lr=1e-3, n_log_checkpoints=4, n_even_checkpoints=4)
    )
    eval: EvalConfig = field(default_factory=EvalConfig)
    threads: int = 1
    """torch intra-op threads for training (0 leaves torch's default). One thread: these models are
    too small to gain from a second, and two threads waiting on each other on a busy 2-core machine
    made an SFT step 20-36x slower (benchmarks/RESULTS.md)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        cfg = cls()
        for key, value in _flatten(d):
            _set(cfg, key, value)
        validate(cfg)
        return cfg


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("data.eval_mix", "task") and not key.startswith("task."):
            out += _flatten(v, key + ".")
        elif key == "task" and isinstance(v, dict):
            out += [(f"task.{tk}", tv) for tk, tv in v.items()]
        else:
            out.append((key, v))
    return out


def _known_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        val = getattr(obj, f.name)
        if dataclasses.is_dataclass(val):
            keys += _known_keys(val, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set(cfg: ExperimentConfig, key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[0] == "task" and len(parts) == 2:  # task keys are checked by the task itself
        if parts[1] == "name" and value != cfg.task.get("name"):
            cfg.task = {"name": value}
        else:
            cfg.task[parts[1]] = value
        return
    if key.startswith("data.eval_mix.") and len(parts) == 3:
        cfg.data.eval_mix[parts[2]] = value
        return
    obj: Any = cfg
    for p in parts[:-1]:
        obj = getattr(obj, p, None)
        if not dataclasses.is_dataclass(obj):
            break
    known = _known_keys(cfg) + ["task.<key>", "data.eval_mix.<kind>"]
    if not dataclasses.is_dataclass(obj) or parts[-1] not in {f.name for f in dataclasses.fields(obj)} or (
        dataclasses.is_dataclass(getattr(obj, parts[-1]))
    ):
        near = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {near[0]}?" if near else f"; known keys: {', '.join(known)}"
        raise UsageError(f"unknown config key {key!r}{hint}")
    current = getattr(obj, parts[-1])
    if isinstance(current, bool) or isinstance(current, (int, float)):
        if isinstance(value, bool) != isinstance(current, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"config key {key} takes a {type(current).__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"config key {key} must be a finite number, got {value!r}")
        if isinstance(current, int) and not isinstance(current, bool):
            if isinstance(value, float) and not value.is_integer():
                raise UsageError(f"config key {key} takes a whole number, got {value!r}")
            value = int(value)
        elif isinstance(current, float):
            value = float(value)
    elif isinstance(current, str) and not isinstance(value, str):
        raise UsageError(f"config key {key} takes a string, got {value!r}")
    elif isinstance(current, dict) and not isinstance(value, dict):
        raise UsageError(f"config key {key} takes an object, got {value!r}")
    setattr(obj, parts[-1], value)


def validate(cfg: ExperimentConfig) -> None:
    """Refuse values that cannot make a run, each with the fix in one line."""
    from training.tasks import get_task

    get_task(cfg.task)
    d = cfg.data
    for name in ("n_pretrain", "n_sft", "n_eval"):
        if getattr(d, name) < 1:
            raise UsageError(f"data.{name} must be ≥ 1, got {getattr(d, name)}")
    for name in ("prevalence", "decipherable_share"):
        v = getattr(d, name)
        if not 0.0 <= v <= 1.0:
            raise UsageError(f"data.{name} must be in [0, 1], got {v}")
    if d.policy not in ("canonical", "balanced", "paired"):
        raise UsageError(f"data.policy must be canonical, balanced or paired, got {d.policy!r}")
    bad = sorted(set(d.eval_mix) - set(KINDS))
    if bad:
        raise UsageError(f"data.eval_mix has unknown kind {bad[0]!r}; kinds: {', '.join(KINDS)}")
    if any(v < 0 for v in d.eval_mix.values()) or sum(d.eval_mix.values()) <= 0:
        raise UsageError("data.eval_mix shares must be ≥ 0 and not all zero")
    m = cfg.model
    for name in ("n_layers", "d_model", "n_heads", "d_mlp"):
        if getattr(m, name) < 1:
            raise UsageError(f"model.{name} must be ≥ 1, got {getattr(m, name)}")
    if m.d_model % m.n_heads:
        raise UsageError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    if m.embed_init_std < 0:
        raise UsageError(f"model.embed_init_std must be ≥ 0, got {m.embed_init_std}")
    if m.n_ctx < 0:
        raise UsageError(f"model.n_ctx must be ≥ 0 (0 = the task's longest sequence), got {m.n_ctx}")
    for name, allowed in (("act_fn", ACT_FNS), ("normalization_type", NORMALIZATION_TYPES),
                          ("positional_embedding_type", POSITIONAL_EMBEDDINGS)):
        if getattr(m, name) not in allowed:
            raise UsageError(f"model.{name} must be one of {', '.join(allowed)}, got {getattr(m, name)!r}")
    for phase in ("pretrain", "sft"):
        p: PhaseConfig = getattr(cfg, phase)
        for name in ("batch_size",):
            if getattr(p, name) < 1:
                raise UsageError(f"{phase}.{name} must be ≥ 1, got {getattr(p, name)}")
        for name in ("steps", "warmup", "n_log_checkpoints", "n_even_checkpoints"):
            if getattr(p, name) < 0:
                raise UsageError(f"{phase}.{name} must be ≥ 0, got {getattr(p, name)}")
        if p.lr <= 0 or p.clip < 0 or p.weight_decay < 0:
            raise UsageError(f"{phase}.lr must be > 0 and clip, weight_decay ≥ 0")
    if cfg.eval.samples < 1:
        raise UsageError(f"eval.samples must be ≥ 1, got {cfg.eval.samples}")
    if cfg.threads < 0:
        raise UsageError(f"threads must be ≥ 0, got {cfg.threads}")


def named_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("training.configs").iterdir() if p.name.endswith(".json"))


def load_config(path: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Defaults, then a config file (a path or an embedded name), then ``key=value`` overrides."""
    base: dict[str, Any] = {}
    if path:
        p = Path(path)
        if p.is_file():
            text = p.read_text(encoding="utf-8")
        elif path in named_configs():
            text = resources.files("training.configs").joinpath(f"{path}.json").read_text(encoding="utf-8")
        else:
            raise UsageError(f"no config file {path!r}; give a JSON file or one of: {', '.join(named_configs())}")
        try:
            base = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"config {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(base, dict):
            raise UsageError(f"config {path}: expected a JSON object")
    cfg = ExperimentConfig()
    for key, value in _flatten(base):
        _set(cfg, key, value)
    for item in overrides or []:
        if "=" not in item:
            raise UsageError(f"override {item!r} is not key=value (e.g. sft.steps=500)")
        key, text = item.split("=", 1)
        _set(cfg, key.strip(), _parse_value(text.strip()))
    validate(cfg)
    return cfg
