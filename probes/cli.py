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
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        chat_template=args.chat_template,
        forcing=args.forcing,
        reference=args.reference,
        tuned_lens=not args.no_tuned_lens,
        patching=args.patching,
        executor=args.executor,
        address=args.address,
        resources=args.resources,
        workers=args.workers,
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
    from probes import grid  # api.sweep does not take the executor options (yet)

    grid.sweep(
        config=args.config, out=args.out, task=args.task, workers=args.workers, quick=args.quick,
        device=args.device, progress=not args.quiet,
        executor=args.executor, address=args.address, resources=args.resources,
    )


def _forks(args: argparse.Namespace) -> None:
    from pathlib import Path

    from probes import api

    data = Path(args.data)
    out = args.out or str(data.with_name((data.name[:-6] if data.name.endswith(".jsonl") else data.name) + ".forks.jsonl"))
    api.find_forks(args.model, str(data), out=out, verifier=args.verifier, samples=args.samples, p=args.p,
                   entropy_quantile=args.entropy_quantile, entropy=args.entropy, tau=args.tau,
                   max_new_tokens=args.max_new_tokens, device=args.device, seed=args.seed, progress=not args.quiet,
                   chat_template=args.chat_template,
                   **({"answer_prefix": args.answer_prefix} if args.answer_prefix else {}))


def _interpolate(args: argparse.Namespace) -> None:
    from probes import api

    api.interpolate(args.base, args.sft, args.alpha, out=args.out)


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
    r.add_argument("--verifier", default=None, help="exact, math, regex:PATTERN or module:function (own data)")
    r.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="sampling budget per sample (default: a native task's own bound; own data: the model's "
                        "generation_config max_new_tokens, else 512); samples that reach it are counted in truncated_rate")
    r.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="a stop string (repeat the flag for several); the text before it is what the verifier sees")
    r.add_argument("--chat-template", action="store_true",
                   help="use each line's prompt as the user turn of the tokenizer's chat template")
    r.add_argument("--reference", default=None, metavar="CHECKPOINT",
                   help="the model ref_mix compares with (default: the series' base, SFT step 0)")
    r.add_argument("--patching", action="store_true",
                   help="activation patching at the forks, per layer, between each checkpoint and the reference "
                        "(patch_recovered_share, patch_induced_share)")
    r.add_argument("--no-tuned-lens", action="store_true",
                   help="skip the tuned lens (per-layer translators fitted per checkpoint on task text, cached in OUT/tuned_lens)")
    r.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local (one checkpoint after another) or ray (checkpoints as parallel Ray tasks)")
    r.add_argument("--address", default=None, help="with --executor ray: a running cluster (HOST:PORT or auto)")
    r.add_argument("--resources", default=None, help="with --executor ray: what each task reserves, e.g. cpu=1,gpu=0.25")
    r.add_argument("--workers", type=int, default=0, help="with --executor ray and no --address: CPUs of the local Ray instance (0: one per core)")
    r.add_argument("--forcing", type=int, nargs="?", const=16, default=0, metavar="M",
                   help="branch forcing at each first fork: M continuations per branch (default M 16): "
                        "branch_value_* and forced_pass@k")
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

    i = sub.add_parser("interpolate", help="weight interpolation between a base and its SFT checkpoint (WiSE-FT)")
    i.add_argument("base", help="the base checkpoint (native or Hugging Face directory)")
    i.add_argument("sft", help="its fine-tuned checkpoint (same architecture and tokenizer)")
    i.add_argument("--alpha", type=float, nargs="+", default=[0.5], help="weights on the SFT checkpoint, in [0, 1] (default 0.5)")
    i.add_argument("--out", default=None, help="directory for the interp-aA.AA checkpoints (default: beside SFT)")
    i.set_defaults(fn=_interpolate)

    s = sub.add_parser("sweep", help="fork-prevalence x demonstration-policy grid: one SFT run per cell")
    s.add_argument("--config", help="a JSON sweep config (default: the embedded grid)")
    s.add_argument("--out", default="runs/sweep", help="sweep directory (default runs/sweep)")
    s.add_argument("--task", choices=["graph", "modes"], default=None, help="one task only (default both)")
    s.add_argument("--workers", type=int, default=0, help="grid cells run in parallel processes, one torch thread each (default 0: one per CPU core)")
    s.add_argument("--quick", action="store_true", help="a small grid that finishes in minutes")
    s.add_argument("--device", default=None, help="cpu or cuda")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--executor", default="local", metavar="local|ray",
                   help="local (--workers processes, default) or ray (every base, cell and measurement a Ray task)")
    s.add_argument("--address", default=None, metavar="ADDR",
                   help="with --executor ray: a running cluster (HOST:PORT or auto; default: start a local one of --workers CPUs)")
    s.add_argument("--resources", default=None, metavar="cpu=1,gpu=0.25",
                   help="with --executor ray: what each task reserves (default cpu=1, plus gpu=0.25 for cuda)")
    s.set_defaults(fn=_sweep)

    fk = sub.add_parser("forks", help="fork discovery: find, test and classify the decision points of unannotated data")
    fk.add_argument("--model", required=True, metavar="CHECKPOINT", help="the reference model: a checkpoint or Hugging Face directory")
    fk.add_argument("--data", required=True, metavar="FILE.jsonl", help="lines with prompt, completion, answer (decision_points, if any, are kept as decision_points_given)")
    fk.add_argument("--out", default=None, metavar="FILE.jsonl",
                    help="annotated output (default: DATA.forks.jsonl beside the input); FILE.candidates.parquet is written beside it")
    fk.add_argument("--verifier", default=None, help="exact, math, regex:PATTERN or module:function (default: the native model's task)")
    fk.add_argument("--answer-prefix", default=None, help="for --verifier exact: the answer follows the last occurrence of this text (default 'answer')")
    fk.add_argument("--samples", type=int, default=None, metavar="M", help="continuations per forced alternative (default 16, at least 2)")
    fk.add_argument("--p", type=float, default=None, metavar="P", help="mass a token needs to be an alternative, in (0, 1) (default 0.02)")
    grp = fk.add_mutually_exclusive_group()
    grp.add_argument("--entropy-quantile", type=float, default=None, metavar="Q",
                     help="entropy candidates: the top 1-Q of completion positions by entropy, Q in (0, 1) (default 0.7)")
    grp.add_argument("--entropy", type=float, default=None, metavar="H", help="entropy candidates: entropy at least H nats (instead of a quantile)")
    fk.add_argument("--tau", type=float, default=None, metavar="T", help="success rate a branch needs to be valid, in (0, 1] (default 0.5)")
    fk.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                    help="budget of a whole completion, prefix included (default: a native model's longest gold completion + 2; "
                         "Hugging Face: its generation config, else 512)")
    fk.add_argument("--chat-template", action="store_true",
                    help="each line's prompt is the user turn of the tokenizer's chat template (as in probes run); the output keeps it as written")
    fk.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    fk.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    fk.add_argument("--quiet", action="store_true", help="no progress bar")
    fk.set_defaults(fn=_forks)
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
