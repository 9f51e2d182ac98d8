"""Draw every registered figure the table supports and save each atomically, PDF (vector) and 200-dpi PNG."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd
from matplotlib.figure import Figure

from analysis.conventions import is_sweep_table, require_columns
from analysis.figures import registry
from analysis.table import SWEEP_COLUMNS
from training.errors import UsageError
from training.io import atomic_write

__all__ = ["FORMATS", "make_figures"]

FORMATS = ("pdf", "png", "svg")


def _check_out_dir(out: Path) -> None:
    """Refuse an out_dir that is (or lies under) an existing file, before anything is drawn or written."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == out else f"lies under {p}, which is a file"
                raise UsageError(f"figure out_dir {out} {what}, not a directory; pass a directory path (probes figures --out DIR) or move the file away")
            return


def _save(fig: Figure, path: Path, fmt: str) -> None:
    """Through training.io.atomic_write, so a reader never sees half a figure."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format=fmt, dpi=200, bbox_inches="tight", pad_inches=0.03)

    atomic_write(path, write)


def make_figures(df: pd.DataFrame, out_dir: str | os.PathLike, formats: Sequence[str] = ("pdf", "png")) -> tuple[list[Path], list[str]]:
    """Draw and save every registered figure the table supports; returns (files written, 'skipped <figure>: <why>' lines).

    Run-scope figures need a table of one run; sweep-scope figures need the sweep columns. A figure
    that cannot be drawn from this table is skipped with its reason, never raised; a bad table,
    format or ``out_dir`` (an existing file) is refused before anything is drawn or written.
    """
    require_columns(df)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UsageError(f"figure formats must be among {', '.join(FORMATS)}; got {list(formats)}")
    out = Path(out_dir)
    _check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    sweep = is_sweep_table(df)
    written: list[Path] = []
    skipped: list[str] = []
    for spec in registry.specs():
        name = spec.stem
        if sweep and spec.scope == "run":
            skipped.append(f"skipped {name}: this is a sweep table (many runs); filter it to one (task, prevalence, policy, seed) cell and drop the sweep columns to draw it")
            continue
        if not sweep and spec.scope == "sweep":
            skipped.append(f"skipped {name}: no sweep columns ({', '.join(SWEEP_COLUMNS)}) in the table")
            continue
        try:
            fig = spec.draw(df)
        except UsageError as exc:
            skipped.append(f"skipped {name}: {exc}")
            continue
        except Exception as exc:  # a figure bug must not cost the others; say so loudly
            warnings.warn(f"figure {name} failed: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
            skipped.append(f"skipped {name}: failed with {type(exc).__name__}: {exc}")
            continue
        try:
            for fmt in formats:
                path = out / f"{name}.{fmt}"
                _save(fig, path, fmt)
                written.append(path)
        finally:
            fig.clear()  # bare Figure (no pyplot registry): clearing frees the artists
    return written, skipped
