"""A short Markdown report from the results table: key numbers, the figures, and the run's manifest.

Every number in the report is read from the table through :func:`key_numbers` (which tests compare
against the table), so the text cannot drift from the data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from analysis.conventions import (
    base_of,
    checkpoint_info,
    default_strategy,
    final_checkpoint,
    is_sweep_table,
    kind_rows,
    pick_k,
    pick_kind,
    require_columns,
)
from analysis.figures import registry
from analysis.mitigation import won_back, won_back_summary
from analysis.sweep_stats import sweep_shrinkage, sweep_spearman, sweep_summary
from analysis.table import KINDS
from analysis.report_format import _f, _pair, _plain, _with_ci
from analysis.report_mechanism import mechanism_numbers, mechanism_sentences, probe_best, skipped_sentence
from analysis.report_sweep import sweep_section
from training.errors import UsageError
from training.io import atomic_write

__all__ = ["COLLAPSE_FRACTION", "key_numbers", "write_report"]

COLLAPSE_FRACTION = 0.9
"""The collapse layer is the first lens layer whose rise in top-branch share (base to final
checkpoint) reaches this fraction of the last layer's rise."""

COLLAPSE_MIN_RISE = 0.02
"""Below this rise of the last layer's top-branch share there is no collapse to locate."""


# --------------------------------------------------------------------------- numbers


def _collapse_layer(df: pd.DataFrame, base: str, final: str) -> dict[str, Any] | None:
    """Where in the stack SFT's collapse appears: the first lens layer whose lens_mass_top_branch
    rose from ``base`` to ``final`` by COLLAPSE_FRACTION of the last layer's rise.

    A rise, not a level: early layers' lens distributions put little mass on any branch, and the
    share among those crumbs can be high in the base model already (0.76 at layer 0 in the default
    run), which says nothing about the fine-tuning.
    """
    kind = pick_kind(df, "lens_mass_top_branch", ["indecipherable", "all", ""])
    if kind is None or base == final:
        return None
    sub = df[(df["metric"] == "lens_mass_top_branch") & (df["kind"] == kind) & df["layer"].notna()]
    per = sub.assign(layer=sub["layer"].astype(int)).pivot_table(index="layer", columns="checkpoint", values="value")
    if base not in per or final not in per:
        return None
    per = per[[base, final]].dropna().sort_index()
    if per.empty:
        return None
    rise = per[final] - per[base]
    out = {
        "base": base, "checkpoint": final, "kind": kind, "last_layer": int(per.index[-1]), "fraction": COLLAPSE_FRACTION,
        "rise": {int(layer): float(v) for layer, v in rise.items()},
        "last_rise": float(rise.iloc[-1]), "base_last": float(per[base].iloc[-1]), "final_last": float(per[final].iloc[-1]),
    }
    if not float(rise.iloc[-1]) >= COLLAPSE_MIN_RISE:
        return {**out, "layer": None, "threshold": None, "value": None}
    threshold = COLLAPSE_FRACTION * float(rise.iloc[-1])
    layer = int(rise[rise >= threshold].index[0])  # the last layer always qualifies
    return {**out, "layer": layer, "threshold": threshold, "value": float(rise.loc[layer])}


def _best_layer(df: pd.DataFrame, checkpoint: str, metric: str) -> dict[str, Any] | None:
    kind = pick_kind(df, metric, ["all", ""])
    if kind is None:
        return None
    sub = df[(df["metric"] == metric) & (df["checkpoint"] == checkpoint) & (df["kind"] == kind) & df["layer"].notna()]
    sub = sub[np.isfinite(sub["value"].to_numpy(float))]
    if sub.empty:
        return None
    best = sub.sort_values(["value", "layer"], ascending=[False, True]).iloc[0]
    return {"kind": kind, "layer": int(best["layer"]), "value": float(best["value"])}


def key_numbers(df: pd.DataFrame) -> dict[str, Any]:
    """The numbers the report states, read from the table; None wherever the table lacks them.

    Per-run tables: base and final checkpoints (and why the base is the base, ``base_reason``:
    :func:`training.phases.base_position`'s reason), pass@1 and pass@K (K = 16 or the largest k) with
    intervals under the default strategy, entropy_fork per kind, entropy_other, mass_top_branch at
    indecipherable forks, the collapse layer (final checkpoint) and the best probe-selectivity layer
    (base and final). Sweep tables: shrinkage per cell (mean over seeds) and Spearman rho.
    """
    require_columns(df)
    out: dict[str, Any] = {"sweep": is_sweep_table(df), "n_rows": int(len(df))}
    if out["sweep"]:
        try:
            shrink = sweep_shrinkage(df)
        except UsageError as exc:
            out.update(shrinkage=None, spearman=None, sweep_note=str(exc))
            return out
        out["k"] = int(shrink["k"].iloc[0])
        out["strategy"] = default_strategy(df)
        out["shrinkage"] = sweep_summary(shrink).to_dict("records")
        out["spearman"] = sweep_spearman(shrink).to_dict("records")
        try:
            out["won_back"] = won_back_summary(won_back(df)).to_dict("records")
        except UsageError as exc:
            out.update(won_back=None, won_back_note=str(exc))
        return out

    info = checkpoint_info(df)
    base, base_reason = base_of(info)
    final = final_checkpoint(df)
    out.update(
        base=base,
        base_reason=base_reason,
        final=final,
        checkpoints=[{"checkpoint": c, "phase": str(info.loc[c, "phase"]), "step": int(info.loc[c, "step"])} for c in info.index],
    )
    strategy = default_strategy(df) if (df["metric"] == "pass@k").any() else None
    out["strategy"] = strategy
    out["pass@k"] = {}
    out["k"] = None
    if strategy is not None:
        ks = kind_rows(df[(df["metric"] == "pass@k") & (df["strategy"] == strategy)], "all")["k"].dropna()
        if len(ks):
            kk = pick_k(ks)
            out["k"] = kk
            for k in sorted({1, kk} & {int(x) for x in ks}):
                out["pass@k"][k] = _pair(df, base, final, "pass@k", kind="all", k=k, strategy=strategy)
    out["entropy_fork"] = {
        kind: _pair(df, base, final, "entropy_fork", kind=kind) for kind in list(KINDS) + ["all"] if ((df["metric"] == "entropy_fork") & (df["kind"] == kind)).any()
    }
    out["entropy_other"] = _pair(df, base, final, "entropy_other", kind="all") if (df["metric"] == "entropy_other").any() else None
    ind = pick_kind(df, "mass_top_branch", ["indecipherable"])
    out["mass_top_branch"] = {"kind": ind, **_pair(df, base, final, "mass_top_branch", kind=ind)} if ind is not None else None
    out["collapse_layer"] = _collapse_layer(df, base, final)
    out["probe_selectivity"] = {
        metric: {"base": _best_layer(df, base, metric), "final": _best_layer(df, final, metric)}
        for metric in ("probe_selectivity_taken", "probe_selectivity_valid")
        if (df["metric"] == metric).any()
    }
    out["probe_valid"] = {kind: probe_best(df, final, "valid", kind) for kind in ("decipherable", "indecipherable")}
    out.update(mechanism_numbers(df, base, final))
    return out


# --------------------------------------------------------------------------- text


def _layer_cell(best: dict[str, Any] | None) -> str:
    return "not measured" if best is None else f"layer {best['layer']} ({_f(best['value'])})"


def _run_section(kn: dict[str, Any]) -> list[str]:
    base, final = kn["base"], kn["final"]
    if kn.get("base_reason") == "earliest":  # say so rather than call it the model before SFT
        why = ("no model before SFT (SFT step 0, a `base` or `pretrain` checkpoint) is in the table, "
               "so the earliest measured checkpoint stands in")
    else:
        why = "the model before SFT"
    lines = [
        f"Base: `{base}` ({why}). Final: `{final}`. "
        f"{len(kn['checkpoints'])} checkpoint(s); pass@k under `{kn['strategy'] or 'n/a'}`."
        + (f" {kn['skipped']}" if kn.get("skipped") else ""),
        "",
    ]
    if base == final:
        lines += ["Only one checkpoint is in the table, so there is no before/after comparison.", ""]
    lines += [f"| measure | base `{base}` | final `{final}` |", "| --- | --- | --- |"]
    for k, pair in kn["pass@k"].items():
        lines.append(f"| pass@{k} (fraction of problems, 95% CI) | {_with_ci(pair['base'])} | {_with_ci(pair['final'])} |")
    for kind, pair in kn["entropy_fork"].items():
        lines.append(f"| entropy at {kind} forks (nats) | {_plain(pair['base'])} | {_plain(pair['final'])} |")
    if kn["entropy_other"] is not None:
        lines.append(f"| entropy at ordinary positions (nats) | {_plain(kn['entropy_other']['base'])} | {_plain(kn['entropy_other']['final'])} |")
    if kn["mass_top_branch"] is not None:
        m = kn["mass_top_branch"]
        lines.append(f"| top-branch share, {m['kind'] or 'all'} forks (probability) | {_plain(m['base'])} | {_plain(m['final'])} |")
    for metric, pair in kn["probe_selectivity"].items():
        what = "taken" if metric.endswith("taken") else "valid"
        lines.append(f"| best probe selectivity, {what} branch | {_layer_cell(pair['base'])} | {_layer_cell(pair['final'])} |")
    lines.append("")

    pk = kn["pass@k"]
    if base != final and 1 in pk and kn["k"] in pk and kn["k"] != 1 and all(pk[k][w] for k in (1, kn["k"]) for w in ("base", "final")):
        d1 = pk[1]["final"]["value"] - pk[1]["base"]["value"]
        dk = pk[kn["k"]]["final"]["value"] - pk[kn["k"]]["base"]["value"]
        lines += [
            f"From base to final, pass@1 changed by {d1:+.3f} and pass@{kn['k']} by {dk:+.3f} "
            f"(coverage {'shrank' if dk < 0 else 'did not shrink'}).",
            "",
        ]
    for sentence in mechanism_sentences(kn):
        lines += [sentence, ""]
    c = kn["collapse_layer"]
    if c is None:
        where = "not measured (no logit-lens rows, or no base checkpoint to compare with)."
    elif c["layer"] is None:
        where = (f"none: at {c['kind'] or 'all'} forks the last layer's share rose by only {_f(c['last_rise'])} "
                 f"({_f(c['base_last'])} → {_f(c['final_last'])}), below {COLLAPSE_MIN_RISE:g}.")
    else:
        rises = ", ".join(_f(v) for v in c["rise"].values())
        where = (f"layer {c['layer']} of {c['last_layer']} at {c['kind'] or 'all'} forks (the last layer's share rose "
                 f"{_f(c['base_last'])} → {_f(c['final_last'])}; rise per layer, 0 to {c['last_layer']}: {rises}).")
    lines.append(
        f"**Collapse layer** — the first logit-lens layer (0 = the residual before block 0, the last = after the "
        f"final block) at which the rise of `lens_mass_top_branch` from the base to the final checkpoint reaches "
        f"{COLLAPSE_FRACTION:.0%} of the last layer's rise: " + where
    )
    lines.append("")
    return lines


def _figure_section(out_dir: Path, figure_files: Sequence[Path], skipped: Sequence[str]) -> list[str]:
    by_stem: dict[str, dict[str, Path]] = {}
    for f in figure_files:
        f = Path(f)
        by_stem.setdefault(f.stem, {})[f.suffix.lstrip(".").lower()] = f
    stems = registry.stems()  # draw order
    order = [s for s in stems if s in by_stem] + sorted(s for s in by_stem if s not in stems)
    lines: list[str] = []
    for stem in order:
        files = by_stem[stem]
        lines.append(f"### {stem}")
        lines.append("")
        caption = registry.caption(stem)
        if caption is not None:
            lines += [caption, ""]
        shown = files.get("png") or files.get("svg")
        if shown is not None:
            lines += [f"![{stem}]({_rel(shown, out_dir)})", ""]
        others = [f"[{fmt.upper()}]({_rel(p, out_dir)})" for fmt, p in sorted(files.items()) if p is not shown]
        if others:
            lines += ["Also: " + ", ".join(others), ""]
    if not order:
        lines += ["No figures were drawn.", ""]
    if skipped:
        lines += ["Not drawn:", ""] + [f"- {s}" for s in skipped] + [""]
    return lines


def _rel(path: Path, out_dir: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), out_dir.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).as_posix()


def _manifest_section(manifest: dict | None) -> list[str]:
    if not manifest:
        return ["No manifest was given.", ""]
    lines: list[str] = []
    grid = manifest.get("sweep")
    if isinstance(grid, dict) and grid:
        lines += ["### Sweep grid", "", "```json", json.dumps(grid, indent=2, sort_keys=True, default=str), "```", ""]
    config = manifest.get("config")
    if config:
        title = "### Config of one cell (the first task and seed; each cell sets its own prevalence and policy)" if grid else "### Config"
        lines += [title, "", "```json", json.dumps(config, indent=2, sort_keys=True, default=str), "```", ""]
    versions = manifest.get("versions")
    if isinstance(versions, dict) and versions:
        lines += ["### Package versions", "", "| package | version |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(versions.items(), key=lambda kv: str(kv[0]))] + [""]
    timings = manifest.get("timings")
    if isinstance(timings, dict) and timings:
        lines += ["### Timings", "", "| step | seconds |", "| --- | --- |"]
        for k, v in timings.items():
            val = f"{v:.1f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else (json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
            lines.append(f"| {k} | {val} |")
        lines.append("")
    checkpoints = manifest.get("checkpoints")
    if checkpoints:
        lines += ["### Checkpoints", ""]
        for c in checkpoints:
            lines.append(f"- `{json.dumps(c, sort_keys=True, default=str) if isinstance(c, dict) else c}`")
        lines.append("")
    if not lines:
        lines = ["The manifest has no config, versions, timings or checkpoints.", ""]
    return lines


def write_report(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    manifest: dict | None = None,
    figure_files: Sequence[Path] = (),
    skipped: Sequence[str] = (),
) -> Path:
    """Write `out_dir/report.md` (atomically) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kn = key_numbers(df)
    lines = ["# fork-probes report", ""]
    lines += ["## Key numbers", ""]
    if not kn["sweep"]:
        kn["skipped"] = skipped_sentence(manifest if isinstance(manifest, dict) else None)
    lines += sweep_section(kn) if kn["sweep"] else _run_section(kn)
    lines += ["## Figures", ""] + _figure_section(out, figure_files, skipped)
    lines += ["## Run", ""] + _manifest_section(manifest if isinstance(manifest, dict) else None)
    text = "\n".join(lines).rstrip() + "\n"
    return atomic_write(out / "report.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
