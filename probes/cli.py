"""The ``probes`` command: a thin layer over the functions a notebook calls.

Each verb is argument parsing plus one call into ``probes.api``; a user mistake (``UsageError``)
is reported as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from training.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user mistake
        self.exit(2, f"probes: error: {message} (see '{self.prog} --help')\n")


def _train(args: argparse.Namespace) -> None:
    from probes import api

    if args.print_config:
        from training.config import load_config

        print(json.dumps(load_config(args.config, args.overrides).to_dict(), indent=2))
        return
    api.train(config=args.config, out=args.out, overrides=args.overrides, device=args.device, progress=not args.quiet,
              base=args.base, force=args.force)


def _run(args: argparse.Namespace) -> None:
    from probes import api

    api.run(
        checkpoints=args.checkpoints,
        out=args.out,
        eval=args.eval,
        samples=args.samples,
        strategies=args.strategy,
        device=args.device,
        force=args.force,
        progress=not args.quiet,
        k=args.k,
        **({"dtype": args.dtype} if getattr(args, "dtype", None) else {}),
        **({"verifier": args.verifier} if getattr(args, "verifier", None) else {}),
        **({"answer_prefix": args.answer_prefix} if getattr(args, "answer_prefix", None) else {}),
    )


def _figures(args: argparse.Namespace) -> None:
    from probes import api

    api.figures(args.results, out=args.out, formats=args.format.split(","))


def _demo(args: argparse.Namespace) -> None:
    from probes import api

    api.demo(out=args.out, device=args.device, progress=not args.quiet, overrides=args.overrides)


def _sweep(args: argparse.Namespace) -> None:
    from probes import api

    api.sweep(
        config=args.config, out=args.out, task=args.task, workers=args.workers, quick=args.quick,
        device=args.device, progress=not args.quiet,
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="probes", description="Probe decision points (forks) of fine-tuned models, checkpoint by checkpoint.")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these models gain nothing from more, and busy cores make two far slower; 0 = torch's default)")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="synthesise data, pretrain a base model, SFT it with checkpoints")
    t.add_argument("--config", help="a JSON config file or an embedded name (graph, modes, tiny); default: graph")
    t.add_argument("--out", help="run directory (default: runs/<config name>)")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    t.add_argument("--base", default=None, metavar="CHECKPOINT", help="fine-tune this base checkpoint instead of pretraining (shares its eval set)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--force", action="store_true", help="start a run whose --out holds a run with another config over (deletes its data and checkpoints)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sft.steps=500")
    t.set_defaults(fn=_train)

    r = sub.add_parser("run", help="measure checkpoints: entropy, branch mass, logit lens, probes, pass@k")
    r.add_argument("--checkpoints", nargs="+", required=True, metavar="PATH_OR_GLOB", help="checkpoint directories or quoted globs")
    r.add_argument("--out", help="results directory (default: results/ beside the checkpoints' run directory)")
    r.add_argument("--eval", help="annotated JSONL eval set (default: the one in the checkpoints' data manifest)")
    r.add_argument("--samples", type=int, default=None, help="samples per problem for pass@k (default 32)")
    r.add_argument("--k", type=int, nargs="+", default=None, help="pass@k's k values (default 1, 2, 4, ... up to --samples)")
    r.add_argument("--strategy", action="extend", nargs="+", default=None, metavar="NAME",
                   help="decoding strategies: --strategy A B, or the flag repeated (default temperature:1.0)")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    r.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype (Hugging Face checkpoints)")
    r.add_argument("--verifier", default=None, help="exact, regex:PATTERN or module:function (own data)")
    r.add_argument("--answer-prefix", default=None, help="for --verifier exact: the answer follows the last occurrence of this text (default 'answer')")
    r.add_argument("--force", action="store_true", help="measure finished checkpoints again (and replace results measured with other settings)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(fn=_run)

    f = sub.add_parser("figures", help="paper figures and report.md from a results directory")
    f.add_argument("results", help="results directory (holds results.parquet)")
    f.add_argument("--out", help="figure directory (default: RESULTS/figures)")
    f.add_argument("--format", default="pdf,png", help="comma-separated formats (default pdf,png)")
    f.set_defaults(fn=_figures)

    d = sub.add_parser("demo", help="the whole story on the embedded default: train, run, figures, report")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    d.set_defaults(fn=_demo)

    s = sub.add_parser("sweep", help="fork-prevalence x demonstration-policy grid: one SFT run per cell")
    s.add_argument("--config", help="a JSON sweep config (default: the embedded grid)")
    s.add_argument("--out", default="runs/sweep", help="sweep directory (default runs/sweep)")
    s.add_argument("--task", choices=["graph", "modes"], default=None, help="one task only (default both)")
    s.add_argument("--workers", type=int, default=0, help="grid cells run in parallel processes, one torch thread each (default 0: one per CPU core)")
    s.add_argument("--quick", action="store_true", help="a small grid that finishes in minutes")
    s.add_argument("--device", default=None, help="cpu or cuda")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=_sweep)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads < 0:
        print("probes: error: --threads must be ≥ 0 (0 = torch's default)", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        args.fn(args)
    except UsageError as e:
        print(f"probes: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("probes: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
