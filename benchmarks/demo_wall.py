"""Wall time of `probes demo` end to end; peak memory of `probes run`, and how both grow.

1. ``probes demo`` (data, base pretraining, SFT with checkpoints, ``probes run`` on every SFT
   checkpoint, figures, report) as a user starts it, in a fresh directory: wall time and peak
   resident memory of the whole process.
2. ``probes run`` on one checkpoint (the demo's last SFT checkpoint) at the default size
   (``--problems`` eval problems x ``--samples`` samples): peak resident memory.
3. ``probes run`` at 1x, 2x and 4x the eval problems (n fixed; the eval set repeated to reach
   them) and 1x, 2x, 4x the samples (problems fixed), each ``probes.api.run`` in a fresh
   process timed after its imports: time and peak memory, the marginal cost of each step up,
   and whether it grows linearly.

Every command runs in its own process; its peak RSS comes from ``wait4``. Threads default to
torch's own default (what ``probes demo`` users get); on a busy machine ``--threads 1`` is far
faster (two spinning threads per process fight the other load).

R = the demo's wall time in minutes.  Target: <= 10 minutes on the 2-core CPU; ``probes run``
peak RSS <= 3 GB.

    python benchmarks/demo_wall.py [--problems 200] [--samples 32] [--tiny] [--skip-demo --checkpoint DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

TINY = [  # the embedded "tiny" config, for a quick check that the benchmark works
    "data.n_pretrain=2000", "data.n_sft=500", "data.n_eval=24", "model.n_layers=2", "model.d_model=32",
    "model.n_heads=2", "model.d_mlp=64", "pretrain.steps=20", "pretrain.batch_size=16", "pretrain.warmup=2",
    "sft.steps=20", "sft.batch_size=16", "sft.warmup=2", "sft.n_log_checkpoints=0", "sft.n_even_checkpoints=1",
    "eval.samples=8",
]
GB = 1024.0


def _probes(*args: str) -> list[str]:
    return [sys.executable, "-m", "probes", *args]


def _run_probes(ck: Path, eval_file: Path, samples: int, out: Path, threads: int, device: str, log: Path) -> dict:
    cmd = _probes("run", "--checkpoints", str(ck), "--eval", str(eval_file), "--samples", str(samples),
                  "--out", str(out), "--device", device, "--quiet")
    res = C.run_measured(cmd, env=C.thread_env(threads), log_file=log)
    if res["returncode"] != 0:
        raise SystemExit(f"probes run failed (exit {res['returncode']}); its output:\n{log.read_text()[-3000:]}")
    timings = json.loads((out / "manifest.json").read_text())["timings"]
    res["measure_seconds"] = float(sum(timings.values()))
    return res


def _growth(xs: list[int], ys: list[float]) -> tuple[list[float], str, str]:
    """Marginal cost per unit between consecutive sizes, a word for the growth, and why.

    Linear means the largest size lands within 15% of the line through the two smaller ones
    (a fixed cost plus a cost per unit); noise on a busy machine is about that size.
    """
    slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    top = max(abs(y) for y in ys) or 1.0
    if max(ys) - min(ys) < 0.05 * top:
        return slopes, "flat", f"within {100 * (max(ys) - min(ys)) / top:.1f}% over a {xs[-1] // xs[0]}x range"
    predicted = ys[1] + slopes[0] * (xs[2] - xs[1])
    dev = (ys[2] - predicted) / ys[2]
    word = "linear" if abs(dev) <= 0.15 else ("superlinear" if dev > 0 else "sublinear")
    return slopes, word, f"the largest size is {100 * dev:+.0f}% off the line through the two smaller ones"


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0], default_threads=0)  # the demo as users start it
    p.add_argument("--problems", type=int, default=200, help="eval problems for the probes run measurements (default 200)")
    p.add_argument("--samples", type=int, default=32, help="samples per problem for them (default 32)")
    p.add_argument("--tiny", action="store_true", help="run the demo with the tiny config's sizes (a quick check)")
    p.add_argument("--skip-demo", action="store_true", help="only the probes run measurements")
    p.add_argument("--checkpoint", default=None, help="checkpoint for the probes run measurements (default: the demo's last)")
    p.add_argument("--out", default=None, help="keep the demo's run directory here (must not exist; default: a temporary one)")
    p.add_argument("--no-growth", action="store_true", help="skip the three-size growth measurements")
    p.add_argument("--growth-repeats", type=int, default=2, help="runs per growth size, fastest kept (default 2)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides passed to probes demo")
    args = p.parse_args(argv)
    if C.serve_worker(args, {"run": C.time_probes_run}):
        return 0

    threads = C.setup_threads(args.threads)
    device = str(C.device_of(args.device))
    print(C.machine_line(threads, device) + "; each command runs in its own process with the same threads")
    overrides = (TINY if args.tiny else []) + list(args.overrides)
    demo_minutes = float("nan")
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        tmp = Path(tmp)
        ck = Path(args.checkpoint) if args.checkpoint else None
        ev = None
        if not args.skip_demo:
            out = Path(args.out) if args.out else tmp / "demo"
            if out.exists():
                raise SystemExit(f"--out {out} exists: the demo would resume instead of running; give a new directory")
            cmd = _probes("demo", "--out", str(out), "--device", device, "--quiet", *overrides)
            print(f"probes demo {' '.join(overrides) or '(default config)'} -> {out}")
            res = C.run_measured(cmd, env=C.thread_env(threads), log_file=tmp / "demo.log")
            if res["returncode"] != 0:
                raise SystemExit(f"probes demo failed (exit {res['returncode']}); its output:\n{(tmp / 'demo.log').read_text()[-3000:]}")
            demo_minutes = res["seconds"] / 60
            lines = [ln for ln in (tmp / "demo.log").read_text().splitlines() if ln.strip()]
            for ln in lines:
                if ln.startswith(("pretrain:", "sft:", "data:", "demo finished")):
                    print(f"  | {ln}")
            print(f"probes demo: wall {res['seconds']:.0f}s = {demo_minutes:.1f} min, peak RSS {res['peak_rss_mb']:.0f} MiB")
            if ck is None:
                sft = sorted((out / "checkpoints").glob("sft-step*"))
                ck = sft[-1]
        if ck is None:
            ck, ev = C.find_checkpoint(None, None, args.problems)
        else:
            ck, ev = C.find_checkpoint(str(ck), None, args.problems)
        full, n_full = C.subset_eval(ev, args.problems, tmp / "evals")
        n = args.samples

        res = _run_probes(ck, full, n, tmp / "r-default", threads, device, tmp / "run.log")
        print(f"probes run, one checkpoint, {n_full} problems x {n} samples: wall {res['seconds']:.1f}s "
              f"(measuring {res['measure_seconds']:.1f}s), peak RSS {res['peak_rss_mb']:.0f} MiB "
              f"(target <= 3 GB: {'met' if res['peak_rss_mb'] <= 3 * GB else 'NOT MET'})")
        peak_default = res["peak_rss_mb"]

        sizes_p = [n_full, 2 * n_full, 4 * n_full] if not args.no_growth else []
        sizes_n = [n, 2 * n, 4 * n] if not args.no_growth else []
        grid = sorted({(P, n) for P in sizes_p} | {(n_full, s) for s in sizes_n})
        measured: dict[tuple[int, int], dict] = {}
        script = Path(__file__).resolve()
        for r in range(args.growth_repeats if grid else 0):
            for (P, s) in grid:
                sub, _ = C.subset_eval(ev, P, tmp / f"evals-{P}", cycle=True)
                got = C.run_worker(script, "run", {"checkpoint": str(ck), "eval": str(sub), "samples": s,
                                                   "out": str(tmp / f"r-{P}-{s}-{r}")}, threads, device)
                old = measured.get((P, s))
                measured[(P, s)] = got if old is None else {
                    "seconds": min(old["seconds"], got["seconds"]), "peak_rss_mb": max(old["peak_rss_mb"], got["peak_rss_mb"])}
        verdicts = []
        for axis, sizes, fixed in (("problems", sizes_p, f"n = {n}"), ("samples", sizes_n, f"{n_full} problems")):
            if not sizes:
                continue
            keys = [(x, n) if axis == "problems" else (n_full, x) for x in sizes]
            print(f"growth with {axis} ({fixed}{'; problems beyond the eval set repeat it' if axis == 'problems' else ''}; "
                  f"probes.api.run in a fresh process, timed after its imports, best of {args.growth_repeats}):")
            print(f"  {axis:>9}{'seconds':>9}{'peak MiB':>10}{'samples/s':>11}")
            for x, k in zip(sizes, keys):
                m = measured[k]
                print(f"  {x:>9}{m['seconds']:>9.2f}{m['peak_rss_mb']:>10.0f}{k[0] * k[1] / m['seconds']:>11.0f}")
            if len(sizes) == 3:
                t_sl, t_word, t_why = _growth(sizes, [measured[k]["seconds"] for k in keys])
                m_sl, m_word, m_why = _growth(sizes, [measured[k]["peak_rss_mb"] for k in keys])
                print(f"  time: {', '.join(f'{s * 1000:.1f} ms' for s in t_sl)} per extra {axis[:-1]} -> {t_word} ({t_why})")
                print(f"  memory: {', '.join(f'{s:.2f} MiB' for s in m_sl)} per extra {axis[:-1]} -> {m_word} ({m_why})")
                verdicts.append(f"{axis}: time {t_word}, memory {m_word}")
    mem_ok = peak_default <= 3 * GB
    if args.skip_demo:
        print("demo skipped (--skip-demo): no wall time")
    else:
        print(f"probes demo took {demo_minutes:.1f} min (target <= 10 min on the 2-core CPU: "
              f"{'met' if demo_minutes <= 10 else 'NOT MET'})")
    print(C.ratio_line("demo_wall", demo_minutes, f"<= 10 minutes on the 2-core CPU; probes run peak RSS "
                       f"{peak_default / GB:.2f} GB, target <= 3 GB ({'met' if mem_ok else 'NOT MET'}); "
                       + "; ".join(verdicts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
