"""`probes forks` speed: time per problem and continuations per second, and how it grows with m
and with completion length.

Main measurement: ``analysis.forks.find_forks`` (what ``probes forks`` runs, default settings but
m) on ``--problems`` graph problems with a trained checkpoint (the one ``probes demo`` writes,
else a default-shape run trained a few steps under runs/bench/), after the imports. Its
continuations are then sampled again by a bare ``hooks.sampler.generate`` call — the same forced
prompts (gold prefix + forced alternative), the same m and budget, nothing else: the part of the
work no implementation of the rule can skip.

R = (continuations/s of the whole discovery: capture, candidates, one generate call per chunk of
problems, decoding, verifying, deciding, writing nothing) / (continuations/s of the bare sampler
call).  Target: R >= 0.5 (the rule's bookkeeping costs at most as much as its sampling).

Growth: with m ∈ {4, 16, 64} on the same problems; with completion length on default-shape graph
models trained 20 + 20 steps (timing needs the shape, not skill) for arm lengths 4, 8, 16
(completions of 6, 10, 18 tokens with EOS), cached under runs/bench/forks-len*/, 25 problems and
m = 4 each: a barely trained model spreads its mass over ~20 tokens, so it has many more
alternatives per candidate than a trained one; read continuations/s beside the time per problem.

    python benchmarks/forks_speed.py [--problems 200] [--samples 16] [--checkpoint DIR --eval FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def _bare_generate(model, problems, table, samples: int, plan, device):
    """The discovery's continuations again, through one bare generate call: seconds, tokens sampled."""
    import torch

    from analysis.forks_outcomes import _budget_for, _ContextStepper
    from hooks.sampler import generate

    tok = model.tokenizer
    tested = table[table["samples"] > 0]
    prompts, budget = [], 1
    for r in tested.itertuples():
        e = plan.encoded[int(r.problem)]
        prompts.append(e.ids[: int(r.pos)] + [int(r.token_id)])
        budget = max(budget, _budget_for(plan, e.prompt_len, int(r.pos) - e.prompt_len + 1))
    if not prompts:
        return 0.0, 0
    stepper = _ContextStepper(model.stepper, plan.n_ctx, min(tok.stop_ids))
    gen = torch.Generator().manual_seed(0)
    sec, out = C.time_call(lambda: generate(stepper, prompts, samples, budget, sorted(tok.stop_ids), tok.pad_id,
                                            "temperature:1.0", gen, batch_size=plan.sample_batch), device)
    stops = torch.isin(out.tokens, torch.tensor(sorted(tok.stop_ids)))
    lengths = torch.where(stops.any(-1), stops.float().argmax(-1) + 1, torch.full(stops.shape[:2], out.tokens.shape[-1]))
    return sec, int(lengths.sum())


def _discover(model, problems, samples: int, device, **kw):
    from analysis.forks import plan_forks, run_plan

    plan = plan_forks(model, problems, samples=samples, **kw)
    sec, res = C.time_call(lambda: run_plan(plan, log=lambda *_: None), device)
    return sec, res, plan


def _length_checkpoint(arm_len: int, log) -> tuple[Path, Path]:
    """A default-shape graph run with arms of ``arm_len`` nodes, trained 20 + 20 steps once."""
    run_dir = C.FALLBACK_DIR / f"forks-len{arm_len}"
    ck = run_dir / "checkpoints" / "sft-step000020"
    if not ck.is_dir():
        from probes.api import train

        edges = 3 * arm_len + 4
        log(f"training a default-shape graph model with arms of {arm_len} nodes (20 + 20 steps) under {run_dir} once")
        train(None, out=run_dir, progress=False, log=lambda *_: None, overrides=C.fallback_overrides(200) + [
            f"task.arm_len=[{arm_len}]", f"task.max_edges={edges}", f"task.n_labels={max(50, 3 * arm_len + 8)}"])
    return ck, run_dir / "data" / "eval.jsonl"


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=200, help="graph problems (default 200)")
    p.add_argument("--samples", type=int, default=16, help="m, continuations per alternative (default 16)")
    p.add_argument("--m-grid", default="4,16,64", help="m values for the growth with m (default 4,16,64)")
    p.add_argument("--lengths", default="4,8,16", help="arm lengths for the growth with completion length (default 4,8,16)")
    p.add_argument("--length-problems", type=int, default=25, help="problems per arm length (default 25)")
    p.add_argument("--length-samples", type=int, default=4, help="m for the growth with completion length (default 4)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the demo's final one, else a short run)")
    p.add_argument("--eval", default=None, help="problems JSONL (default: the checkpoint's eval set)")
    args = p.parse_args(argv)

    threads = C.setup_threads(args.threads)
    device = C.device_of(args.device)
    print(C.machine_line(threads, device))
    C.preimport()
    import analysis.forks  # noqa: F401
    from hooks.load import load
    from training.schema import read_jsonl

    ck, ev = C.find_checkpoint(args.checkpoint, args.eval, args.problems)
    sub, n = C.subset_eval(ev, args.problems, C.FALLBACK_DIR / "forks-speed", cycle=True)
    model = load(ck, device=device)
    problems = read_jsonl(sub)

    _discover(model, problems[:8], 2, device)  # warm up
    sec, res, plan = _discover(model, problems, args.samples, device)
    s = res.summary
    bare_sec, bare_tokens = _bare_generate(model, problems, res.candidates, args.samples, plan, device)
    cont = s["continuations"]
    print(f"{n} problems, m = {args.samples}, defaults p {s['p']:g}, Q {s['entropy_quantile']:g}, tau {s['tau']:g}: "
          f"{s['candidates']} candidates, {s['tested']} tested, {cont} continuations, {s['decision_points']} decision points")
    print(f"discovery {sec:.2f}s = {1000 * sec / n:.1f} ms per problem, {cont / sec:.0f} continuations/s; "
          f"bare sampler on the same prompts {bare_sec:.2f}s ({cont / max(bare_sec, 1e-9):.0f} continuations/s, "
          f"{bare_tokens / max(bare_sec, 1e-9):.0f} tokens/s)")
    ratio = (cont / sec) / (cont / bare_sec) if cont and bare_sec > 0 else float("nan")

    print("growth with m (same problems):")
    print(f"{'m':>5}{'seconds':>10}{'ms/problem':>12}{'continuations':>15}{'cont/s':>9}")
    for m in [int(x) for x in args.m_grid.split(",") if x.strip()]:
        sec_m, res_m, _ = _discover(model, problems, m, device)
        c = res_m.summary["continuations"]
        print(f"{m:>5}{sec_m:>10.2f}{1000 * sec_m / n:>12.1f}{c:>15}{c / sec_m:>9.0f}")

    print(f"growth with completion length (default-shape graph models trained 20 + 20 steps, {args.length_problems} "
          f"problems, m = {args.length_samples}):")
    print(f"{'arm':>5}{'tokens':>8}{'seconds':>10}{'ms/problem':>12}{'candidates':>12}{'continuations':>15}{'cont/s':>9}")
    for arm in [int(x) for x in args.lengths.split(",") if x.strip()]:
        ck_l, ev_l = _length_checkpoint(arm, print)
        m_l = load(ck_l, device=device)
        probs_l = read_jsonl(ev_l)[: args.length_problems]
        mean_len = sum(len(m_l.tokenizer.encode(q.completion)) + 1 for q in probs_l) / len(probs_l)
        sec_l, res_l, _ = _discover(m_l, probs_l, args.length_samples, device)
        c = res_l.summary["continuations"]
        print(f"{arm:>5}{mean_len:>8.1f}{sec_l:>10.2f}{1000 * sec_l / len(probs_l):>12.1f}"
              f"{res_l.summary['candidates']:>12}{c:>15}{c / sec_l:>9.0f}")
    print(C.ratio_line("forks_speed", ratio, ">= 0.5; discovery continuations/s over the bare sampler's on the same prompts"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
