"""What a checkpoint directory is, read once and cheaply (no weights): its one record.

Everything that needs a checkpoint's format, place in its series, identity or eval set reads it
from :class:`CheckpointRecord`, made by :func:`read_record` — never from the directory again.
A record is also where a broken directory is refused, with one line naming the file, before
anything is measured or written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.checkpoint import check_safetensors, is_native_checkpoint, read_config, read_meta
from training.io import read_json_object
from training.errors import UsageError
from training.phases import phase_step

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "merges.txt", "tokenizer.model", "special_tokens_map.json", "chat_template.jinja",
            "model.safetensors.index.json")
"""Files of a Hugging Face directory that change its numbers (beside the *.safetensors weights)."""

_DIGESTS: dict[tuple[str, int, int], str] = {}


@dataclass
class CheckpointRecord:
    """One checkpoint directory: format, phase and step, content identity, tokenizer, task, eval set."""

    path: Path
    format: str
    """``native`` (a fork-probes checkpoint) or ``hf`` (a Hugging Face save_pretrained directory)."""
    phase: str
    step: int
    meta: dict[str, Any]
    config: dict[str, Any]
    identity: str
    """sha256 over the files that make its numbers: weights, config, meta (and tokenizer files)."""
    tokenizer_fingerprint: str
    task: dict[str, Any] | None
    experiment: dict[str, Any] | None
    n_ctx: int | None
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def run_dir(self) -> Path:
        """The run a checkpoint belongs to: RUN for RUN/checkpoints/NAME, else the directory holding it."""
        p = self.path.resolve()
        return p.parent.parent if p.parent.name == "checkpoints" else p.parent

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (loaded once, on first use)."""
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self.path, self.format, self.config)
        return self._tokenizer

    def eval_file(self) -> Path | None:
        """The eval set meta.json names, which must lie inside the checkpoint's run directory."""
        if "eval_file" not in self.meta:
            return None
        data_dir, name = self.meta.get("data_dir", "."), self.meta["eval_file"]
        if not isinstance(data_dir, str) or not isinstance(name, str):
            raise UsageError(f"{self.path / 'meta.json'}: data_dir and eval_file must be strings (paths)")
        f = (self.path / data_dir / name).resolve()
        root = self.run_dir.resolve()
        if not f.is_relative_to(root):
            raise UsageError(f"{self.path / 'meta.json'} points its eval set at {f}, outside the run directory {root}; "
                             "refused (pass --eval FILE.jsonl to use it deliberately)")
        return f


def _digest(files: list[Path]) -> str:
    """sha256 over (name, content) of each file, cached by (path, size, mtime) within a process."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        st = f.stat()
        key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:
            fh = hashlib.sha256()
            with open(f, "rb") as stream:
                while block := stream.read(1 << 22):
                    fh.update(block)
            _DIGESTS[key] = fh.hexdigest()
        h.update(f.name.encode() + b"\0" + _DIGESTS[key].encode() + b"\n")
    return h.hexdigest()


def checkpoint_format(path: Path) -> str:
    """``native`` or ``hf``; anything else is one line saying what a checkpoint directory holds."""
    if is_native_checkpoint(path):
        return "native"
    f = path / "config.json"
    if f.is_file():
        try:
            cfg = read_json_object(f, "a model config", "fix it")
        except UsageError:
            cfg = None
        if isinstance(cfg, dict) and ("architectures" in cfg or "model_type" in cfg):
            return "hf"
    raise UsageError(
        f"{path} is neither a fork-probes checkpoint (config.json + model.safetensors) nor a Hugging Face "
        "model directory (config.json with model_type, weights, tokenizer files)"
    )


def read_record(path: str | Path) -> CheckpointRecord:
    """The record of one checkpoint directory; a broken one is a user error naming what is wrong."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"no such checkpoint directory: {p}")
    if not p.is_dir():
        if p.suffix.lower() == ".gguf":
            raise UsageError(f"{p} is a GGUF file (quantised weights); convert it to a float Hugging Face directory first: "
                             "AutoModelForCausalLM.from_pretrained(its_dir, gguf_file=NAME).save_pretrained(OUT), "
                             "likewise the tokenizer (see examples/real_model)")
        raise UsageError(f"{p} is a file; give the checkpoint's directory")
    fmt = checkpoint_format(p)
    meta = read_meta(p)
    name = p.resolve().name
    phase, step = phase_step(name, meta, native=fmt == "native", where=str(p))
    if fmt == "native":
        return _native_record(p, meta, phase, step)
    return _hf_record(p, meta, phase, step)


def _native_record(p: Path, meta: dict, phase: str, step: int) -> CheckpointRecord:
    from training.tokenizer import WordTokenizer

    cfg = read_config(p)
    check_safetensors(p / "model.safetensors")
    try:
        tok = WordTokenizer.from_dict(cfg["tokenizer"])
    except (ValueError, TypeError) as e:
        raise UsageError(f"{p / 'config.json'}: its tokenizer is not usable ({e}); re-save the checkpoint") from None
    n_ctx = cfg["model"].get("n_ctx")
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise UsageError(f"{p / 'config.json'}: model.n_ctx must be a whole number >= 1, got {n_ctx!r}; re-save the checkpoint")
    task = cfg.get("task")
    if task is not None and not isinstance(task, dict):
        raise UsageError(f"{p / 'config.json'}: 'task' must be an object, got {type(task).__name__}")
    files = [p / "model.safetensors", p / "config.json"] + ([p / "meta.json"] if (p / "meta.json").is_file() else [])
    return CheckpointRecord(p, "native", phase, step, meta, cfg, _digest(files), tok.fingerprint(), task,
                            cfg.get("experiment"), n_ctx, tok)


def _hf_record(p: Path, meta: dict, phase: str, step: int) -> CheckpointRecord:
    from hooks.hf_arch import arch_names

    cfg = read_json_object(p / "config.json", "a model config", "re-save it with save_pretrained")
    arch_names(cfg.get("model_type"), where=str(p))  # before any transformers code sees the directory
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?") if isinstance(cfg["quantization_config"], dict) else "?"
        raise UsageError(f"{p} holds quantised weights ({method}); measurements need float weights: load it, "
                         "dequantise and save_pretrained a float32 copy, then measure that")
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        extra = " (found pytorch_model.bin: convert it with save_pretrained(..., safe_serialization=True))" if list(
            p.glob("*.bin")) else ""
        gguf = list(p.glob("*.gguf"))
        if gguf:
            extra = (f" (found {gguf[0].name}: a GGUF file is quantised; load it with transformers "
                     f"from_pretrained(dir, gguf_file=...) and save_pretrained a float copy)")
        raise UsageError(f"no weights file model.safetensors in {p}{extra}")
    for w in weights:
        check_safetensors(w)
    task = meta.get("task")
    if task is not None and not isinstance(task, dict):
        raise UsageError(f"{p / 'meta.json'}: 'task' must be an object (a task config), got {type(task).__name__}")
    n_ctx = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    files = weights + [p / f for f in HF_FILES if (p / f).is_file()] + ([p / "meta.json"] if (p / "meta.json").is_file() else [])
    tok = _load_tokenizer(p, "hf", cfg)
    return CheckpointRecord(p, "hf", phase, step, meta, cfg, _digest(files), tok.fingerprint(), task, None,
                            int(n_ctx) if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) else None, tok)


def _load_tokenizer(p: Path, fmt: str, cfg: dict) -> Any:
    if fmt == "native":
        from training.tokenizer import WordTokenizer

        return WordTokenizer.from_dict(cfg["tokenizer"])
    from hooks.hf import load_hf_tokenizer

    return load_hf_tokenizer(p, cfg)
