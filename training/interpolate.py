"""Weight interpolation (WiSE-FT): checkpoints on the straight line between a base and its SFT.

θ(α) = (1 − α)·θ_base + α·θ_SFT, tensor by tensor, for native checkpoints and Hugging Face
directories alike (the safetensors files only: no model class is built, no code is run). The
two must be the same architecture (same tensor names and shapes, same config apart from
bookkeeping) and tokenizer. The output is a copy of the SFT checkpoint with the interpolated
weights, and a ``meta.json`` that records α and both parents (path and content hash): phase
``interp``, step the SFT's. Interpolating in float32 and storing in the SFT's dtype keeps α = 1
bit-identical to the SFT and α = 0 to the base.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.checkpoint import check_safetensors, is_native_checkpoint, read_meta
from training.errors import UsageError
from training.io import atomic_directory, read_json_object, sha256_file, write_json

__all__ = ["interpolate", "interpolation_name"]

_BOOKKEEPING = {"_name_or_path", "_model_name_or_path", "transformers_version", "torch_dtype", "dtype", "experiment"}
"""Config keys that record how a checkpoint was made, not what it computes."""


def interpolation_name(alpha: float) -> str:
    """The directory name of the checkpoint at α: ``interp-a0.50``."""
    return f"interp-a{alpha:.2f}"


def _weights(path: Path) -> list[Path]:
    if is_native_checkpoint(path):
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UsageError(f"no weights file model.safetensors in {path}")
    return files


def _tensors(files: list[Path]) -> dict[str, tuple[Path, Any]]:
    out: dict[str, tuple[Path, Any]] = {}
    for f in files:
        check_safetensors(f)
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = (f, st.get_slice(k).get_shape())
    return out


def _config(path: Path) -> dict[str, Any]:
    cfg = read_json_object(path / "config.json", "a model config", "re-save the checkpoint")
    return {k: v for k, v in cfg.items() if k not in _BOOKKEEPING}


def _tokenizer_id(path: Path) -> str:
    """What must agree for two checkpoints to share a tokenizer: native vocab, else the tokenizer files."""
    if is_native_checkpoint(path):
        return json.dumps(read_json_object(path / "config.json", "a model config", "re-save it").get("tokenizer"), sort_keys=True)
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        f = path / name
        if f.is_file():
            h.update(name.encode() + f.read_bytes())
    return h.hexdigest()


def _check_pair(base: Path, sft: Path) -> tuple[dict, dict]:
    for p in (base, sft):
        if not p.is_dir() or not (p / "config.json").is_file():
            raise UsageError(f"{p} is not a checkpoint directory (config.json and weights)")
    if is_native_checkpoint(base) != is_native_checkpoint(sft):
        raise UsageError(f"{base} and {sft} are of different formats (one native, one Hugging Face); interpolate within one")
    a, b = _config(base), _config(sft)
    if is_native_checkpoint(base):
        a, b = a.get("model"), b.get("model")
        if not isinstance(a, dict) or not isinstance(b, dict):
            raise UsageError(f"{base} or {sft}: config.json has no 'model' object")
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ("seed",))
    if diff:
        raise UsageError(f"{base} and {sft} are different architectures (config differs in {', '.join(diff[:4])}); "
                         "interpolate a base with its own fine-tuned checkpoint")
    if _tokenizer_id(base) != _tokenizer_id(sft):
        raise UsageError(f"{base} and {sft} use different tokenizers; interpolate checkpoints that share one")
    ta, tb = _tensors(_weights(base)), _tensors(_weights(sft))
    if set(ta) != set(tb):
        only = sorted(set(ta) ^ set(tb))
        raise UsageError(f"{base} and {sft} hold different tensors (e.g. {only[0]}); interpolate checkpoints of one architecture")
    bad = [k for k in ta if list(ta[k][1]) != list(tb[k][1])]
    if bad:
        raise UsageError(f"{base} and {sft} differ in the shape of {bad[0]} ({list(ta[bad[0]][1])} vs {list(tb[bad[0]][1])})")
    return ta, tb


def _identity(path: Path) -> str:
    h = hashlib.sha256()
    for f in _weights(path) + [path / "config.json"]:
        h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()


def interpolate(base: str | Path, sft: str | Path, alphas: Sequence[float], out: str | Path | None = None,
                log=print) -> list[Path]:
    """Write one checkpoint per α (in ``out``, default: beside ``sft``); returns their paths.

    Every input is checked before anything is written; each directory is written under a
    temporary name and renamed, so it is whole or absent. An existing directory for an α is
    rewritten only when its recorded parents or α differ (same inputs, same bytes: nothing to do).
    """
    base, sft = Path(base), Path(sft)
    alphas = list(alphas)
    if not alphas:
        raise UsageError("give at least one --alpha in [0, 1]")
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0.0 <= a <= 1.0:
            raise UsageError(f"--alpha values must lie in [0, 1] (0 = the base, 1 = the SFT checkpoint), got {a!r}")
    ta, tb = _check_pair(base, sft)
    out = Path(out) if out else sft.parent
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory for the interpolated checkpoints")
    parents = {"base": {"path": str(base.resolve()), "identity": _identity(base)},
               "sft": {"path": str(sft.resolve()), "identity": _identity(sft)}}
    sft_meta = read_meta(sft)
    written = []
    for alpha in alphas:
        dest = out / interpolation_name(alpha)
        meta = _meta(sft, sft_meta, dest, float(alpha), parents)
        if dest.is_dir() and (dest / "meta.json").is_file():
            old = read_json_object(dest / "meta.json", "interpolation metadata", f"delete {dest}")
            if old.get("alpha") == meta["alpha"] and old.get("parents") == parents:
                log(f"{dest}: already there (same parents and alpha)")
                written.append(dest)
                continue
        _write(sft, dest, ta, tb, float(alpha), meta)
        log(f"{dest}: alpha {alpha:g} ({1 - alpha:g} x {base.name} + {alpha:g} x {sft.name})")
        written.append(dest)
    return written


def _meta(sft: Path, sft_meta: dict, dest: Path, alpha: float, parents: dict) -> dict[str, Any]:
    meta = {k: v for k, v in sft_meta.items() if k not in ("phase", "step")}
    meta.update({"phase": "interp", "step": int(sft_meta.get("step", 0) or 0), "alpha": alpha, "parents": parents})
    if "eval_file" in sft_meta:  # the same eval set, addressed from the new directory
        target = (sft / sft_meta.get("data_dir", ".")).resolve()
        meta["data_dir"] = os.path.relpath(target, dest.resolve().parent / dest.name)
    return meta


def _write(sft: Path, dest: Path, ta: dict, tb: dict, alpha: float, meta: dict) -> None:
    with atomic_directory(dest) as tmp:
        for f in sft.iterdir():  # configs, tokenizer, generation config: the SFT checkpoint's
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("meta.json", "train_state.pt") \
                    and not f.name.endswith((".bin", ".pt", ".pth")):
                shutil.copy2(f, tmp / f.name)
        by_file: dict[str, list[str]] = {}
        for k, (f, _) in tb.items():
            by_file.setdefault(f.name, []).append(k)
        for name, keys in by_file.items():
            mixed = {}
            for k in keys:
                with safe_open(str(ta[k][0]), framework="pt") as fa, safe_open(str(tb[k][0]), framework="pt") as fb:
                    x, y = fa.get_tensor(k), fb.get_tensor(k)
                if y.is_floating_point():
                    v = x if alpha == 0.0 else y if alpha == 1.0 else ((1 - alpha) * x.float() + alpha * y.float()).to(y.dtype)
                elif torch.equal(x, y):
                    v = y
                else:
                    raise UsageError(f"tensor {k} is not floating point and differs between the two checkpoints; "
                                     "it cannot be interpolated")
                mixed[k] = v.contiguous()
            with safe_open(str(tb[keys[0]][0]), framework="pt") as fb:
                st_meta = fb.metadata()
            save_file(mixed, str(tmp / name), metadata=st_meta)
        write_json(tmp / "meta.json", meta)
