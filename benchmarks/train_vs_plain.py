"""SFT steps of `probes train` against a minimal plain-PyTorch training loop, same shape and batch.

Toolkit: ``training.train.train_phase`` (the loop ``probes train`` runs for each phase) on the
TransformerLens ``NativeModel`` of the default config's shape, with the default SFT settings
(AdamW, warmup + cosine, gradient clipping, loss on completion tokens, a checkpoint with optimizer
state at the end: all of it is timed). Plain: a nanoGPT-style module of the same shape starting
from the same weights (``_common.plain_gpt``; ``F.scaled_dot_product_attention``), the same
optimizer, schedule, clipping, loss and batches (the same example indices per step).

Both are timed over ``--steps`` steps after a warm-up, alternately ``--repeats`` times; medians
of the per-step times are compared.

R = toolkit step time / plain step time.  Target: R <= 1.3.

    python benchmarks/train_vs_plain.py [--steps 100] [--batch 64]
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def plain_loop(module, corpus, steps: int, cfg, seed: int, device) -> float:
    """A minimal SFT loop; returns the mean loss of its last 50 steps."""
    import torch
    import torch.nn.functional as F

    from training.corpus import batch_indices

    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    module.train()
    losses = []
    for step in range(steps):
        idx = batch_indices(step, cfg.batch_size, len(corpus), seed)
        t = int(corpus.lengths[idx].max())
        ids, mask = corpus.ids[idx, :t].to(device), corpus.loss_mask[idx, :t].to(device)
        if step < cfg.warmup:
            lr = cfg.lr * (step + 1) / cfg.warmup
        else:
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * min((step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1), 1.0)))
        for g in opt.param_groups:
            g["lr"] = lr
        m = mask[:, :-1]
        loss = F.cross_entropy(module(ids[:, :-1])[m], ids[:, 1:][m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip)
        opt.step()
        losses.append(loss.detach())
    module.eval()
    tail = losses[-50:]
    return float(torch.stack(tail).mean()) if tail else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="timed SFT steps per run (default 100)")
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first, each side (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each loop (default 3; medians compared)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the default config's SFT batch, 64)")
    p.add_argument("--examples", type=int, default=None, help="SFT examples (default: the default config's, 20000)")
    args = p.parse_args(argv)

    import copy

    import torch

    from training.config import ExperimentConfig
    from training.corpus import tokenize_problems
    from training.model import bridge_config_dict, build_native, n_params
    from training.synth import make_sft
    from training.tasks import get_task
    from training.train import PHASE_SEED, completion_loss, train_phase

    threads = C.setup_threads(args.threads)
    device = C.device_of(args.device)
    print(C.machine_line(threads, device))
    cfg = ExperimentConfig()
    if args.examples:
        cfg.data.n_sft = args.examples
    sft = copy.deepcopy(cfg.sft)
    if args.batch:
        sft.batch_size = args.batch
    sft.n_log_checkpoints, sft.n_even_checkpoints = 0, 1
    task = get_task(cfg.task)
    tok = task.tokenizer()
    corpus = tokenize_problems(make_sft(task, cfg.data, cfg.seed), tok, task.max_seq_len)
    model_cfg = bridge_config_dict(cfg.model, len(tok), task.max_seq_len, cfg.seed)
    native = build_native(model_cfg, device)
    plain = C.plain_gpt(model_cfg, device)
    plain.load_state_dict(native.state_dict())
    seed = cfg.seed * 100 + PHASE_SEED["sft"]
    with torch.no_grad():
        probe = corpus.ids[:8, :20].to(device)
        diff = float((plain(probe) - native(probe)).abs().max())
        l_native = float(completion_loss(native, corpus.ids[:64].to(device), corpus.loss_mask[:64].to(device)))
        l_plain = float(completion_loss(plain, corpus.ids[:64].to(device), corpus.loss_mask[:64].to(device)))
    print(f"model: {n_params(native):,} parameters (plain {n_params(plain):,}), {cfg.model.n_layers} layers, "
          f"d_model {cfg.model.d_model}; same function at init: max |logits diff| {diff:.1e}, "
          f"loss {l_native:.4f} vs {l_plain:.4f}")
    print(f"SFT: batch {sft.batch_size}, {len(corpus)} examples, {args.steps} timed steps x {args.repeats} runs each, "
          f"after {args.warmup_steps} warm-up steps")

    make_config = lambda: {"model": model_cfg, "tokenizer": tok.to_dict(), "task": task.config_dict()}  # noqa: E731
    make_meta = lambda step, tokens: {"phase": "sft", "step": step, "tokens_seen": tokens}  # noqa: E731
    report: dict = {}

    def run_toolkit(steps: int, where: Path) -> None:
        phase = copy.deepcopy(sft)
        phase.steps = steps
        report.update(train_phase(native, corpus, phase, "sft", cfg.seed, where, make_config, make_meta,
                                  include_zero=False, device=device, progress=False))

    def run_plain(steps: int) -> None:
        phase = copy.deepcopy(sft)
        phase.steps = steps
        report["plain_loss"] = plain_loop(plain, corpus, steps, phase, seed, device)

    times = {"toolkit": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        if args.warmup_steps > 0:
            run_toolkit(args.warmup_steps, Path(tmp) / "warm")
            run_plain(args.warmup_steps)
        for r in range(max(1, args.repeats)):
            sec, _ = C.time_call(lambda: run_toolkit(args.steps, Path(tmp) / f"run{r}"), device)
            times["toolkit"].append(sec / args.steps)
            sec, _ = C.time_call(lambda: run_plain(args.steps), device)
            times["plain"].append(sec / args.steps)
    tk, pl = C.median(times["toolkit"]), C.median(times["plain"])
    tokens = sft.batch_size * (int(corpus.lengths.float().mean()) if len(corpus) else 0)
    print(f"{'loop':<10}{'ms/step':>10}{'steps/s':>10}{'~tokens/s':>11}   runs (ms/step)")
    for name, v in (("toolkit", tk), ("plain", pl)):
        runs = ", ".join(f"{x * 1000:.1f}" for x in times[name])
        print(f"{name:<10}{v * 1000:>10.1f}{1 / v:>10.1f}{tokens / v:>11.0f}   {runs}")
    print(f"last-run loss over its last 50 steps: toolkit {report.get('final_loss', float('nan')):.3f}, "
          f"plain {report.get('plain_loss', float('nan')):.3f} (same data and init; should be close)")
    r = tk / pl
    print(f"toolkit step time {r:.2f}x the plain loop's (target <= 1.3: {'met' if r <= 1.3 else 'NOT MET'})")
    print(C.ratio_line("train_vs_plain", r, "<= 1.3; toolkit step time / plain step time"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
