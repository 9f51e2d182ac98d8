"""What the mechanism instruments cost: ``probes run`` on one checkpoint, now against a reference commit.

Each contender is ``python -m probes run`` on the same checkpoint (the demo's last SFT checkpoint
by default: 200 eval problems x 32 samples), in a fresh process and a fresh ``--out``, so the
tuned lens is fitted from nothing (its cache is empty: the worst case):

- ``reference``: the code of ``--reference-commit`` (default ``4b0fdbd``, the tree before the
  tuned lens, candidate-conditioned probes, forcing and patching), checked out with
  ``git worktree`` into a temporary directory, its defaults (probes and the logit lens);
- ``default``: this tree's defaults (probes, logit lens and tuned lens);
- ``no tuned lens``: this tree with ``--no-tuned-lens`` (what the tuned lens adds);
- ``demo settings``: this tree with ``--forcing 16 --patching --reference BASE`` (what ``probes
  demo`` runs on each checkpoint; BASE is the series' SFT step 0 beside the checkpoint).

R = default / reference (wall time of the whole command, imports included). Target: R <= 2.

    python benchmarks/run_cost.py [--checkpoint DIR] [--reference-commit REV] [--samples 32]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def _worktree(rev: str, where: Path) -> Path:
    tree = where / "reference"
    subprocess.run(["git", "-C", str(C.REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    return tree


def _contender(name: str, tree: Path, args: list[str], out: Path, threads: int, logs: Path) -> dict:
    env = C.thread_env(threads)
    env["PYTHONPATH"] = str(tree)  # the tree's own packages, never this checkout's
    cmd = [sys.executable, "-m", "probes", "run", *args, "--out", str(out / name.replace(" ", "_")), "--quiet"]
    res = C.run_measured(cmd, env=env, log_file=logs / f"{name.replace(' ', '_')}.log", cwd=tree)
    if res["returncode"] != 0:
        tail = (logs / f"{name.replace(' ', '_')}.log").read_text()[-3000:]
        raise SystemExit(f"{name} failed (exit {res['returncode']}):\n{tail}")
    print(f"{name}: {res['seconds']:.1f} s wall, peak RSS {res['peak_rss_mb']:.0f} MiB", flush=True)
    return res


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(C.DEMO_CHECKPOINT), help="the checkpoint to measure")
    p.add_argument("--reference-commit", default="4b0fdbd", help="the commit whose `probes run` is the reference")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="alternate the contenders this many times; medians")
    args = p.parse_args()
    ck = Path(args.checkpoint).resolve()
    if not (ck / "model.safetensors").is_file():
        raise SystemExit(f"no checkpoint at {ck}: run `probes demo` first or pass --checkpoint DIR")
    base = ck.parent / "sft-step000000"  # patching's reference: the series' base, as in the demo
    if not (base / "model.safetensors").is_file():
        raise SystemExit(f"no base checkpoint beside {ck} (expected {base}): the demo settings patch against it")
    common = ["--checkpoints", str(ck), "--samples", str(args.samples), "--device", args.device]
    print(C.machine_line(args.threads or 0, args.device))
    with tempfile.TemporaryDirectory(prefix="run_cost_") as tmp:
        tmp = Path(tmp)
        tree = _worktree(args.reference_commit, tmp)
        try:
            contenders = [("reference", tree, common), ("default", C.REPO, common),
                          ("no tuned lens", C.REPO, [*common, "--no-tuned-lens"]),
                          ("demo settings", C.REPO, [*common, "--forcing", "16", "--patching", "--reference", str(base)])]
            seconds: dict[str, list[float]] = {}
            for r in range(args.repeats):
                for name, where, a in contenders:
                    res = _contender(name, where, a, tmp / f"out{r}", args.threads, tmp)
                    seconds.setdefault(name, []).append(res["seconds"])
        finally:
            subprocess.run(["git", "-C", str(C.REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    med = {k: C.median(v) for k, v in seconds.items()}
    for name in med:
        print(f"  {name:14s} median {med[name]:6.1f} s  ({med[name] / med['reference']:.2f}x reference)")
    print(C.ratio_line("run_cost", med["default"] / med["reference"], "<= 2"))


if __name__ == "__main__":
    main()
