"""The results directory: what ``probes run`` writes, and the rules that make a resume trustworthy.

Layout: ``manifest.json`` (written with the first finished checkpoint, so a directory killed at
any moment later is still known as ours), ``checkpoints/<label>.parquet`` (one checkpoint's
rows, each file written atomically and carrying in its own metadata the identity of the
checkpoint and of the settings that made it), ``samples/<label>.parquet`` (its samples, written
just before), then the combined ``results.parquet`` / ``results.csv`` / ``samples.parquet``. A finished part is reused only when its
checkpoint's content *and* the run's settings are the ones asked for now; anything else is a
fresh measurement or a clear error, never a silent reuse.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.table import to_frame
from training.io import read_json_object
from training.errors import UsageError, short_reason
from training.io import atomic_write, is_temporary, remove_temporaries, sha256_json, write_json
from training.phases import series_key

_META_KEY = b"fork_probes"


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'samples 32 -> 8, dtype float32 -> bfloat16' for the settings that differ."""
    keys = [k for k in dict.fromkeys(list(old) + list(new)) if sha256_json(old.get(k)) != sha256_json(new.get(k))]

    def show(v: Any) -> str:
        text = json.dumps(v, default=str) if not isinstance(v, str) else v
        return text if len(text) <= 40 else text[:18] + "…" + text[-18:]

    return ", ".join(f"{k} {show(old.get(k))} -> {show(new.get(k))}" for k in keys)


class ResultsDir:
    """One results directory under one set of measurement settings (its *identity*)."""

    def __init__(self, root: Path, identity: dict[str, Any], manifest: dict[str, Any], reset: bool):
        self.root = root
        self.identity = identity
        self.manifest = manifest
        self._reset = reset
        self._ready = False

    @property
    def parts(self) -> Path:
        return self.root / "checkpoints"

    @property
    def settings_hash(self) -> str:
        return sha256_json(self.identity)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, root: str | Path, identity: dict[str, Any], force: bool = False) -> "ResultsDir":
        """Check ``root`` for these settings, writing nothing; refuse what would mix or overwrite results.

        A directory whose manifest records other settings is refused while it holds finished
        parts (``force`` discards them, but only once the first new part is ready); one that
        holds none (a run that failed before finishing a checkpoint) is taken over. Nothing is
        written until the first checkpoint is measured, so a mistake found while loading or
        measuring it leaves ``root`` as it was.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise UsageError(f"--out {root} is a file; give a directory for the results")
        manifest_path = root / "manifest.json"
        fresh = {"identity": identity, "checkpoints": {}, "timings": {}}
        reset = False
        if manifest_path.is_file():
            old = read_json_object(manifest_path, "a results manifest", f"delete {root} or choose another --out")
            if not isinstance(old.get("identity"), dict):
                raise UsageError(f"{manifest_path} is not a fork-probes results manifest (no identity); "
                                 f"delete {root} or choose another --out")
            if sha256_json(old["identity"]) != sha256_json(identity):  # JSON-wise: NaN equals NaN
                finished = sorted(root.glob("checkpoints/*.parquet"))
                if finished and not force:
                    raise UsageError(
                        f"{root} holds results measured with other settings ({settings_diff(old['identity'], identity)}); "
                        "choose another --out, or pass --force to discard them and measure again")
                reset, manifest = True, fresh
            else:
                manifest = {**fresh, **old, "identity": identity}
        elif root.exists() and not cls._only_leftovers(root):
            raise UsageError(f"{root} exists and is not a results directory (no manifest.json); choose another --out")
        else:
            manifest = fresh
        writable = root if root.exists() else next((p for p in root.parents if p.exists()), Path("."))
        if not os.access(writable, os.W_OK):
            raise UsageError(f"cannot write to --out {root}: permission denied")
        return cls(root, identity, manifest, reset)

    @classmethod
    def attach(cls, root: str | Path, identity: dict[str, Any]) -> "ResultsDir":
        """A directory a driver has opened and prepared, for a task that only writes its own part."""
        out = cls(Path(root), identity, {}, reset=False)
        out._ready = True
        return out

    def prepare(self) -> None:
        """Reset (if other settings were there) and write the manifest now, before parallel parts."""
        self._ensure()

    def _ensure(self) -> None:
        """Before the first write: clear what other settings left (if so), create the layout, drop temporaries."""
        if self._ready:
            return
        if self._reset:
            self._clear(self.root)
            self._reset = False
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot write to --out {self.root}: {e.strerror}") from None
        self._remove_temporaries(self.root)
        write_json(self.root / "manifest.json", self.manifest)
        self._ready = True

    @staticmethod
    def _only_leftovers(root: Path) -> bool:
        """An empty directory, or one holding only what a killed first run leaves (temp files, checkpoints/)."""
        for p in root.iterdir():
            if is_temporary(p):
                continue
            if p.name in ("checkpoints", "samples", "tuned_lens") and p.is_dir() and all(
                    is_temporary(q) or q.is_dir() for q in p.iterdir()):
                continue
            return False
        return True

    @staticmethod
    def _remove_temporaries(root: Path) -> None:
        for d in (root, root / "checkpoints", root / "samples"):
            remove_temporaries(d)

    @staticmethod
    def _clear(root: Path) -> None:
        """Remove what ``probes run`` wrote (and nothing else) before measuring under new settings."""
        shutil.rmtree(root / "checkpoints", ignore_errors=True)
        shutil.rmtree(root / "samples", ignore_errors=True)
        for name in ("results.parquet", "results.csv", "manifest.json", "samples.parquet"):
            (root / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ parts
    def part_path(self, label: str) -> Path:
        return self.parts / f"{label}.parquet"

    def part_identity(self, label: str) -> dict[str, Any] | None:
        """The identity a finished part was measured under (None when it is not there)."""
        f = self.part_path(label)
        if self._reset or not f.is_file():
            return None
        try:
            meta = pq.read_schema(f).metadata or {}
        except (pa.ArrowException, OSError) as e:
            raise UsageError(f"{f} is not a readable parquet file ({short_reason(e)}); "
                             "delete it (or pass --force) to measure that checkpoint again") from None
        if _META_KEY not in meta:
            raise UsageError(f"{f} records no identity (written by an older fork-probes); "
                             "pass --force to measure it again, or choose another --out")
        return json.loads(meta[_META_KEY])

    def write_part(self, label: str, df: pd.DataFrame, checkpoint: dict[str, Any],
                   samples: pd.DataFrame | None = None) -> None:
        """One checkpoint's rows with its identity, atomically: a part is whole or absent.

        Its samples are written first (``samples/<label>.parquet``), so a finished part always has them.
        """
        self._ensure()
        if samples is not None:
            atomic_write(self.root / "samples" / f"{label}.parquet", lambda tmp: samples.to_parquet(tmp, index=False))
        info = {"label": label, "settings": self.settings_hash, **checkpoint}
        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META_KEY: json.dumps(info).encode()})
        atomic_write(self.part_path(label), lambda tmp: pq.write_table(table, tmp))

    def read_part(self, label: str) -> pd.DataFrame:
        f = self.part_path(label)
        try:
            return pd.read_parquet(f)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise UsageError(f"{f} is not a readable parquet file ({short_reason(e)}); "
                             "delete it (or pass --force) to measure that checkpoint again") from None

    def labels(self) -> list[str]:
        return [] if self._reset else sorted(p.stem for p in self.parts.glob("*.parquet"))

    # ------------------------------------------------------------------ table
    def write_table(self, frames: dict[str, pd.DataFrame], extra: dict[str, Any]) -> pd.DataFrame:
        """The combined table of every finished part (this call's and earlier calls'), in series order."""
        self._ensure()
        for label in self.labels():
            if label not in frames:
                frames[label] = self.read_part(label)
        df = pd.concat([frames[k] for k in sorted(frames)], ignore_index=True) if frames else to_frame([])
        df = sort_table(df)
        samples = [self.root / "samples" / f"{label}.parquet" for label in sorted(frames)]
        samples = [pd.read_parquet(f) for f in samples if f.is_file()]
        if samples:
            sdf = sort_table(pd.concat(samples, ignore_index=True))
            atomic_write(self.root / "samples.parquet", lambda tmp: sdf.to_parquet(tmp, index=False))
        atomic_write(self.root / "results.parquet", lambda tmp: df.to_parquet(tmp, index=False))
        atomic_write(self.root / "results.csv", lambda tmp: df.to_csv(tmp, index=False))
        self.manifest.update(extra)
        write_json(self.root / "manifest.json", self.manifest)
        return df


def sort_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in series order of their checkpoint (training.phases), each checkpoint's rows as measured."""
    if df.empty:
        return df.reset_index(drop=True)
    keys = {c: series_key(p, s, c) for c, p, s in df[["checkpoint", "phase", "step"]].drop_duplicates().itertuples(index=False)}
    rank = df["checkpoint"].map({c: i for i, c in enumerate(sorted(keys, key=keys.get))})
    return df.assign(_rank=rank).sort_values("_rank", kind="stable").drop(columns="_rank").reset_index(drop=True)


def load_results(results_dir: str | Path) -> pd.DataFrame:
    """The tidy table of a results directory (or a results.parquet), with the dtypes ``run`` returns."""
    d = Path(results_dir)
    f = d / "results.parquet" if d.is_dir() else d
    if not f.is_file():
        raise UsageError(f"no results.parquet in {d}; run 'probes run --checkpoints ... --out {d}' first")
    try:
        raw = pd.read_parquet(f)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UsageError(f"{f} is not a readable parquet file ({short_reason(e)})") from None
    from analysis.table import COLUMNS

    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise UsageError(f"{f} is not a fork-probes results table (missing column(s) {', '.join(missing)})")
    try:
        return to_frame(raw.to_dict("records"))
    except (ValueError, TypeError) as e:
        raise UsageError(f"{f} is not a fork-probes results table ({short_reason(e)})") from None


def iter_labels(records: Iterable[Any]) -> list[str]:
    """Checkpoint labels: the directory name, or run__name where two checkpoints share a name."""
    records = list(records)
    names = [r.name for r in records]
    return [f"{r.run_dir.name}__{r.name}" if names.count(r.name) > 1 else r.name for r in records]
