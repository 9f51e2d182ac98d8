"""The toolkit's KV-cached sampler against a minimal plain-PyTorch batched sampler, same weights.

Toolkit: ``hooks.sampler.sample`` driving ``NativeKVStepper`` (what ``probes run`` samples with),
temperature 1. Plain: a nanoGPT-style module holding the same weights (``_common.plain_gpt``),
prompts prefilled once and their keys/values repeated for the n samples, a concatenating KV
cache, ``torch.multinomial``. Same batch (problems x n rows, one chunk), same prompt length,
same number of new tokens: EOS is set to an id no model emits, so every row runs to the end.
Both are checked to compute the same function first (prefill logits; greedy tokens equal).

Two shapes: the task's (the eval prompts, as many new tokens as the context allows) and a long
one (short prompts, long completions: the decode loop dominates). Timed alternately,
``--repeats`` times each, medians compared.

R = toolkit tokens/s / plain tokens/s, the smaller over the two shapes.  Target: R >= 0.7.

    python benchmarks/sampler_vs_plain.py [--problems 64] [--samples 32] [--checkpoint DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def plain_sample(model, prompts, n: int, new_tokens: int, eos_id: int, generator, temperature: float = 1.0):
    """n samples per prompt, as a researcher writes it: prefill once, repeat the cache, step."""
    import torch

    with torch.inference_mode():
        logits, cache = model.forward_cached(prompts)
        cache = [(k.repeat_interleave(n, dim=0), v.repeat_interleave(n, dim=0)) for k, v in cache]
        logits = logits[:, -1].repeat_interleave(n, dim=0)
        rows, s = logits.shape[0], prompts.shape[1]
        out = torch.full((rows, new_tokens), eos_id, dtype=torch.long, device=prompts.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=prompts.device)
        for t in range(new_tokens):
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(dim=-1)
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            out[:, t] = nxt
            finished |= nxt == eos_id
            if t == new_tokens - 1 or bool(finished.all()):
                break
            logits, cache = model.forward_cached(nxt[:, None], cache, start=s + t)
            logits = logits[:, -1]
    return out.view(prompts.shape[0], n, new_tokens)


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=64, help="prompts in the batch (default 64)")
    p.add_argument("--samples", type=int, default=32, help="samples per prompt (default 32: 2048 rows)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each sampler per shape (default 5)")
    p.add_argument("--long-prompt", type=int, default=8, help="prompt length of the long shape (default 8)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: as run_vs_naive finds one)")
    p.add_argument("--eval", default=None, help="eval JSONL whose prompts to use (default: the checkpoint's)")
    args = p.parse_args(argv)

    import torch

    from hooks.encode import encode_problems
    from hooks.native import NativeCheckpoint
    from hooks.sampler import sample
    from training.schema import read_jsonl

    threads = C.setup_threads(args.threads)
    device = C.device_of(args.device)
    print(C.machine_line(threads, device))
    ck_path, ev = C.find_checkpoint(args.checkpoint, args.eval, args.problems)
    ck = NativeCheckpoint(ck_path, device=device)
    plain = C.plain_gpt(ck.config["model"], device).eval()
    plain.load_state_dict(ck.module.state_dict())
    encoded, _ = encode_problems(ck.tokenizer, read_jsonl(ev))
    plen = min(p.prompt_len for p in encoded)
    prompts = [p.ids[:plen] for p in encoded if p.prompt_len >= plen]
    prompts = (prompts * (args.problems // len(prompts) + 1))[: args.problems]
    task_prompts = torch.tensor(prompts, device=device)
    never = len(ck.tokenizer) + 7  # an id outside the vocabulary: no row stops early
    rows = args.problems * args.samples

    # same function first: prefill logits, then greedy tokens
    stepper = ck.stepper()
    with torch.inference_mode():
        a = stepper.prefill(task_prompts[:4], max_new_tokens=2, repeats=1)
        b = plain.forward_cached(task_prompts[:4])[0][:, -1]
    new_task = ck.n_ctx - plen
    g_tk = sample(stepper, task_prompts[:4], 2, new_task, never, 0, "greedy", torch.Generator().manual_seed(0))
    g_pl = plain_sample(plain, task_prompts[:4], 2, new_task, never, None, temperature=0.0)
    same = bool(torch.equal(g_tk.cpu(), g_pl.cpu()))
    print(f"same function: max |prefill logits diff| {float((a - b).abs().max()):.1e}; greedy tokens equal: {same}")

    shapes = [("task", task_prompts, new_task)]
    lp = min(args.long_prompt, ck.n_ctx - 2)
    shapes.append(("long", task_prompts[:, :lp], ck.n_ctx - lp))
    ratios = []
    print(f"batch {args.problems} prompts x {args.samples} samples = {rows} rows, temperature 1, "
          f"{args.repeats} timed runs each (median)")
    print(f"{'shape':<8}{'prompt':>7}{'new':>5}{'toolkit tok/s':>15}{'plain tok/s':>13}{'R':>7}")
    for name, pr, new in shapes:
        times = {"toolkit": [], "plain": []}
        gen_tk = torch.Generator().manual_seed(1)
        gen_pl = torch.Generator(device=device).manual_seed(1)

        def run_tk():
            return sample(stepper, pr, args.samples, new, never, 0, "temperature:1.0", gen_tk, batch_size=rows)

        def run_pl():
            return plain_sample(plain, pr, args.samples, new, never, gen_pl)

        run_tk(), run_pl()  # warm up
        for _ in range(max(1, args.repeats)):
            for key, fn in (("toolkit", run_tk), ("plain", run_pl)):
                sec, out = C.time_call(fn, device)
                assert out.shape == (pr.shape[0], args.samples, new)
                times[key].append(sec)
        tokens = rows * new
        tk, pl = tokens / C.median(times["toolkit"]), tokens / C.median(times["plain"])
        ratios.append(tk / pl)
        print(f"{name:<8}{pr.shape[1]:>7}{new:>5}{tk:>15.0f}{pl:>13.0f}{tk / pl:>7.2f}")
    r = min(ratios)
    print(f"toolkit sampler at {r:.2f}x the plain sampler's tokens/s (target >= 0.7: {'met' if r >= 0.7 else 'NOT MET'})")
    print(C.ratio_line("sampler_vs_plain", r, f">= 0.7; smaller of the task and long shapes; same function {'yes' if same else 'NO'}"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
