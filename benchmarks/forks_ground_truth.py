"""Fork discovery scored against the synthetic tasks' own annotations (the README's table).

For each task, with its base model (SFT step 0) and a final SFT model as the reference: precision
and recall of ``probes forks`` against the generator's decision points (a match = same token
position), kind accuracy on the matches, and the fork prevalence it estimates on a sample of the
SFT corpus against what the generator used. Graph: the default run (``probes demo``, ``--graph``);
modes: a run of the embedded modes config with SFT cut to 600 steps (``--modes``; trained here
once if missing, about 9 minutes on one core). ``--tune`` re-runs the default selection on the
tuning split instead (200 fresh problems per task, make_eval seed 777, disjoint from the eval
sets): one loose run per cell, then ``decide`` over the p x Q x tau grid.

    python benchmarks/forks_ground_truth.py [--graph runs/demo] [--modes runs/forks-modes] [--sft-sample 400] [--tune]
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

TUNE_GRID = {"p": (0.02, 0.05, 0.1, 0.2), "q": (0.5, 0.7, 0.8, 0.9, 0.95), "tau": (0.1, 0.25, 0.5, 0.75, 0.9)}


def modes_run(path: Path) -> Path:
    """The short modes run: the embedded config, SFT 600 steps (trained once, then reused)."""
    from probes.api import train

    train("modes", out=path, overrides=["sft.steps=600", "sft.n_log_checkpoints=0", "sft.n_even_checkpoints=1"],
          progress=False, log=lambda *_: None)
    return path


def cells(graph: Path, modes: Path) -> list[tuple[str, str, Path, Path]]:
    """(task, which, checkpoint, run) for each reference model."""
    finals = {t: sorted((r / "checkpoints").glob("sft-step*"))[-1] for t, r in (("graph", graph), ("modes", modes))}
    return [(t, w, ck, r) for t, r in (("graph", graph), ("modes", modes))
            for w, ck in (("base", r / "checkpoints" / "sft-step000000"), ("final", finals[t]))]


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--graph", default=str(C.REPO / "runs" / "demo"), help="a default graph run (probes demo)")
    p.add_argument("--modes", default=str(C.REPO / "runs" / "forks-modes"), help="a modes run (trained if missing)")
    p.add_argument("--sft-sample", type=int, default=400, help="SFT corpus lines for the prevalence estimate (default 400)")
    p.add_argument("--tune", action="store_true", help="score the default selection on the tuning split instead")
    args = p.parse_args(argv)

    import json
    from dataclasses import replace

    import pandas as pd

    from analysis.forks import annotate, decide, entropy_threshold, find_forks, read_problems, score_discovery
    from analysis.forks_plan import DEFAULTS
    from hooks.load import load
    from training.config import ExperimentConfig
    from training.schema import read_jsonl
    from training.synth import make_eval
    from training.tasks import get_task

    threads = C.setup_threads(args.threads)
    print(C.machine_line(threads, C.device_of(args.device)))
    graph = Path(args.graph)
    if not (graph / "checkpoints" / "sft-step000000").is_dir():
        raise SystemExit(f"no default graph run at {graph}: run probes demo first")
    modes = Path(args.modes)
    if not list((modes / "checkpoints").glob("sft-step*")):
        print(f"training the modes run at {modes} (embedded config, SFT 600 steps) ...")
    modes = modes_run(modes)
    rows = []
    for task, which, ck, run in cells(graph, modes):
        model = load(ck)
        if args.tune:
            cfg = ExperimentConfig.from_dict(json.loads((run / "run.json").read_text())["experiment"])
            t = get_task(cfg.task)
            ev = read_jsonl(run / "data" / "eval.jsonl")
            split = make_eval(t, replace(cfg.data, n_eval=200), 777, {t.key(x) for x in ev})
            res = find_forks(model, split, log=lambda *_: None, p=0.02, entropy_quantile=0.5, samples=16, tau=0.5)
            for pp, q, tau in itertools.product(*TUNE_GRID.values()):
                found, _ = annotate(split, decide(res.candidates, pp, entropy_threshold(res.entropies, q), tau),
                                    model.tokenizer)
                s = score_discovery(found, split, model.tokenizer)
                f1 = 2 * s["precision"] * s["recall"] / (s["precision"] + s["recall"]) if s["precision"] + s["recall"] else 0.0
                rows.append({"task": task, "model": which, "p": pp, "q": q, "tau": tau, "f1": f1,
                             "kind_accuracy": s["kind_accuracy"]})
            continue
        for split, path in (("eval", run / "data" / "eval.jsonl"), ("sft sample", run / "data" / "sft.jsonl")):
            problems = read_problems(path)
            if split != "eval":
                problems = problems[: args.sft_sample]
            res = find_forks(model, problems, log=lambda *_: None)
            s = score_discovery(res.problems, None, model.tokenizer)
            rows.append({"task": task, "model": f"{which} ({ck.name})", "split": split, "found": s["found"],
                         "true": s["true"], "precision": s["precision"], "recall": s["recall"],
                         "kind_accuracy": s["kind_accuracy"], "prevalence_found": s["prevalence_found"].get("any"),
                         "knob_found": s["knob_found"], "knob_true": s["knob_true"],
                         "seconds": res.summary["seconds"]})
            print(json.dumps(rows[-1], default=float))
    df = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    if args.tune:
        g = df.groupby(["p", "q", "tau"])[["f1", "kind_accuracy"]].mean()
        g["score"] = g["f1"] + g["kind_accuracy"]
        print(g.sort_values("score", ascending=False).head(10).to_string(float_format=lambda x: f"{x:.3f}"))
        best = g["score"].idxmax()
        print(f"best on the tuning split: p {best[0]}, Q {best[1]}, tau {best[2]}; defaults: {DEFAULTS}")
        r = float(g.loc[best, "f1"])
    else:
        print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        ev = df[df["split"] == "eval"]
        r = float(ev["precision"].mean())
    print(C.ratio_line("forks_ground_truth", r, "precision (eval) or F1 (tuning) near 1"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
