"""`probes run` on CUDA against `probes run` on the CPU: same checkpoint, same seed, same numbers?

The teacher-forced metrics (fork entropy, branch mass, the logit lens) are deterministic given the
weights, so the two devices may differ only by float rounding; they are compared value by value.
Sampled metrics (pass@k, fork valid rate, branch coverage) draw every uniform from one CPU
generator, so they agree up to the rare draw that lands on the other side of a rounding
difference; they are compared in units of their bootstrap standard error. Linear probes are fit on
features from either device and compared as accuracies.

R = the largest absolute difference of a teacher-forced value.  Target: <= 1e-4.

    python benchmarks/cuda_vs_cpu.py [--checkpoint DIR] [--problems 200] [--samples 32]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

KEYS = ["checkpoint", "metric", "kind", "layer", "k", "strategy"]
SAMPLED = ("pass@k", "fork_valid_rate", "branch_coverage")


def compare(cpu, cuda) -> dict[str, float]:
    """Largest differences between two results tables of the same run on two devices."""
    import numpy as np

    m = cpu.merge(cuda, on=KEYS, suffixes=("_cpu", "_cuda"), how="outer", indicator=True)
    missing = int((m["_merge"] != "both").sum())
    m = m[m["_merge"] == "both"]
    diff = (m["value_cpu"] - m["value_cuda"]).abs()
    sampled = m["metric"].isin(SAMPLED)
    probe = m["metric"].str.startswith("probe_")
    forced = ~sampled & ~probe
    se = ((m["ci_high_cpu"] - m["ci_low_cpu"]) / (2 * 1.96)).where(lambda s: s > 0)
    z = (diff / se)[sampled].replace([np.inf], np.nan)
    return {
        "rows": len(m), "rows_missing": missing,
        "forced_max_abs": float(diff[forced].max()) if forced.any() else float("nan"),
        "forced_metric_worst": str(m.loc[diff[forced].idxmax(), "metric"]) if forced.any() else "",
        "sampled_max_abs": float(diff[sampled].max()) if sampled.any() else float("nan"),
        "sampled_max_z": float(z.max()) if z.notna().any() else 0.0,
        "sampled_identical": float((diff[sampled] == 0).mean()) if sampled.any() else float("nan"),
        "probe_max_abs": float(diff[probe].max()) if probe.any() else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=200, help="eval problems (default 200)")
    p.add_argument("--samples", type=int, default=32, help="samples per problem (default 32)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: as run_vs_naive finds one)")
    p.add_argument("--eval", default=None, help="eval JSONL (default: the checkpoint's own)")
    args = p.parse_args(argv)
    threads = C.setup_threads(args.threads)
    import torch

    from probes.api import run

    if not torch.cuda.is_available():
        raise SystemExit("cuda_vs_cpu needs a CUDA device; none is visible to torch here")
    print(C.machine_line(threads, "cuda"))
    ck, ev = C.find_checkpoint(args.checkpoint, args.eval, args.problems)
    tables, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-xdev-") as tmp:
        sub, n_p = C.subset_eval(ev, args.problems, Path(tmp) / "evals")
        for dev in ("cpu", "cuda"):
            t0 = time.perf_counter()
            tables[dev] = run([str(ck)], out=Path(tmp) / dev, eval=sub, samples=args.samples, device=dev,
                              progress=False, log=lambda *_: None)
            seconds[dev] = time.perf_counter() - t0
    r = compare(tables["cpu"], tables["cuda"])
    print(f"{n_p} problems x {args.samples} samples: probes run {seconds['cpu']:.2f} s on cpu "
          f"({threads} threads), {seconds['cuda']:.2f} s on cuda (first CUDA call included)")
    print(f"rows compared {r['rows']}, rows in one table only {r['rows_missing']}")
    print(f"teacher-forced metrics: largest |cpu - cuda| {r['forced_max_abs']:.2e} ({r['forced_metric_worst']})")
    print(f"sampled metrics: largest |diff| {r['sampled_max_abs']:.4f}, largest |z| {r['sampled_max_z']:.2f}, "
          f"identical values {100 * r['sampled_identical']:.0f}%")
    print(f"probe accuracies: largest |diff| {r['probe_max_abs']:.4f}")
    print(f"cuda_vs_cpu: ratio {r['forced_max_abs']:.2e} (target <= 1e-4 for teacher-forced values; "
          f"sampled |z| {r['sampled_max_z']:.2f}, rows missing {r['rows_missing']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
