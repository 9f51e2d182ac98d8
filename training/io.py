"""Atomic file writes: a result or checkpoint file is either whole or absent, never half-written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from training.errors import UsageError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a hidden temporary name beside ``path``, then rename it into place
    (replacing what was there): the directory is whole or absent, never half-written.

    The temporary is named ``.<name>.<random>``, so a kill leaves something a later run recognises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether a file is one of :func:`atomic_write`'s temporaries (only a kill leaves one behind)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries a killed :func:`atomic_write` left in ``directory``; returns them."""
    d = Path(directory)
    gone = [p for p in d.glob(".*.tmp") if p.is_file()] if d.is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_json_object(path: Path, what: str, fix: str) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is one line naming the file."""
    try:
        obj = read_json(path)
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text; {fix}") from None
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); {fix}") from None
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror}); {fix}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} must hold a JSON object ({what}), not a {type(obj).__name__}; {fix}")
    return obj


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
