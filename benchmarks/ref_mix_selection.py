"""Choose ref_mix's default (L, tau) on a held-out split, never on the cells the sweep reports.

For each task, the sweep's seed-0 base model and its canonical SFT cell at prevalence 1 (trained by
``probes sweep`` into ``--sweep``) are measured on a *selection split*: problems freshly drawn from
the task's generator on their own stream, disjoint from the base's corpora, its eval set and the
cell's SFT corpus. Every (L, tau) of the grid is scored on that split by the sweep's own ratio:
the share of the pass@16 that canonical SFT lost against the base (both at temperature 1) that
ref_mix wins back, and its pass@1 cost against canonical SFT. A candidate qualifies when on every
task it loses at most a third of SFT's pass@1 gain; the default is the qualifying candidate with
the largest won-back share averaged over tasks (the sweep then measures it on the real eval sets).

    python benchmarks/ref_mix_selection.py [--sweep runs/sweep] [--problems 200]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

LAMBDAS = (0.25, 0.5, 0.75, 1.0)
TAUS = (0.01, 0.1, 0.3)


def selection_split(base: Path, cell_final: Path, n: int, seed: int) -> Path:
    """n fresh problems for the base's task, disjoint from everything either model saw or is scored on."""
    from dataclasses import replace

    from training.checkpoint import read_checkpoint
    from training.config import ExperimentConfig
    from training.schema import read_jsonl, write_jsonl
    from training.synth import make_eval
    from training.tasks import get_task

    cfg, meta, _ = read_checkpoint(base)
    task = get_task(cfg["task"])
    data_dir = (base / meta["data_dir"]).resolve()
    dest = data_dir / f"eval-select-{n}.jsonl"
    if dest.is_file():
        return dest
    cell_cfg, cell_meta, _ = read_checkpoint(cell_final)
    sources = [data_dir / f for f in ("pretrain.jsonl", "sft.jsonl", "eval.jsonl")]
    sources.append((cell_final / cell_meta["data_dir"] / "sft.jsonl").resolve())
    seen = {task.key(p) for f in sources if f.is_file() for p in read_jsonl(f)}
    data = replace(ExperimentConfig.from_dict(cfg["experiment"]).data, n_eval=n)
    write_jsonl(dest, make_eval(task, data, seed + 2_000_003, seen))
    return dest


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sweep", default=str(C.REPO / "runs" / "sweep"), help="a probes sweep directory (default runs/sweep)")
    p.add_argument("--problems", type=int, default=200, help="problems in the selection split per task (default 200)")
    p.add_argument("--samples", type=int, default=32)
    args = p.parse_args(argv)

    import pandas as pd

    from probes.runner import run

    threads = C.setup_threads(args.threads)
    print(C.machine_line(threads, C.device_of(args.device)))
    root = Path(args.sweep)
    candidates = [f"ref_mix:{lam:g},{tau:g}" for lam in LAMBDAS for tau in TAUS]
    strategies = ["temperature:1.0", *candidates]
    rows = []
    for task in ("graph", "modes"):
        seed_dir = root / task / "seed0"
        base = seed_dir / "base" / "checkpoints" / "sft-step000000"
        cell = seed_dir / "p1.00-canonical"
        finals = sorted((cell / "checkpoints").glob("sft-step*"))
        if not base.is_dir() or not finals:
            raise SystemExit(f"{seed_dir}: run probes sweep first (the seed-0 base and its canonical prevalence-1 cell)")
        split = selection_split(base, finals[-1], args.problems, 0)
        df = run([str(base), str(finals[-1])], eval=split, out=str(cell / "results-select"), samples=args.samples,
                 strategies=strategies, reference=str(base), probes=False, tuned_lens=False, progress=False,
                 log=lambda *_: None, device=args.device)
        pk = df[(df.metric == "pass@k") & (df.kind == "all")]

        def at(checkpoint: str, strategy: str, k: int) -> float:
            v = pk[(pk.checkpoint == checkpoint) & (pk.strategy == strategy) & (pk.k == k)].value
            return float(v.iloc[0])

        b, f = base.name, finals[-1].name
        lost = at(b, "temperature:1", 16) - at(f, "temperature:1", 16)
        gain = at(f, "temperature:1", 1) - at(b, "temperature:1", 1)
        for s in candidates:
            won = (at(f, s, 16) - at(f, "temperature:1", 16)) / lost if lost > 0 else float("nan")
            cost = at(f, "temperature:1", 1) - at(f, s, 1)
            rows.append({"task": task, "strategy": s, "lost": lost, "pass1_gain": gain, "won_back": won,
                         "pass1_cost": cost, "ok": cost <= gain / 3})
        print(f"{task}: split {split.name} ({args.problems} problems); canonical SFT lost {lost:.3f} pass@16, "
              f"gained {gain:.3f} pass@1")
    t = pd.DataFrame(rows)
    wide = t.pivot(index="strategy", columns="task", values=["won_back", "pass1_cost", "ok"])
    print(wide.to_string(float_format=lambda x: f"{x:.3f}"))
    both = t.groupby("strategy").agg(won=("won_back", "mean"), ok=("ok", "all"))
    qualified = both[both.ok]
    pick = (qualified if len(qualified) else both).sort_values("won", ascending=False).index[0]
    print(f"chosen: {pick} (mean won back {both.loc[pick, 'won']:.2f} on the selection split; "
          f"{'qualifies' if both.loc[pick, 'ok'] else 'NO candidate kept pass@1 within a third of the gain'})")
    print(C.ratio_line("ref_mix_selection", float(both.loc[pick, "won"]), ">= 0.5 won back on the selection split"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
