"""The toolkit's sampler against Hugging Face ``generate`` on a real model (SmolLM2-135M-Instruct).

Toolkit: ``hooks.sampler.generate`` over ``HFStepper`` — what ``probes run`` samples an HF
checkpoint with: prompts of every length in one call (left padding, per-row positions), each
prompt computed once and its cache repeated for its n samples, 256-row chunks on the CPU.
Generate: ``model.generate(do_sample=True, num_return_sequences=n)`` on left-padded batches of
the same rows per call, as a careful user batches it. Same prompts (chat-formatted questions of
different lengths), same n, same max new tokens; the EOS is set to an id the model never emits
and ``min_new_tokens`` equals ``max_new_tokens``, so every row runs to the end in both. Both are
checked to compute the same function first (greedy tokens equal on a few prompts).

Also: the teacher-forced measuring pass (``analysis.measure.teacher_forced``: residuals at the
forks for every lens layer, logits at every completion position) per problem, against a plain
HF forward with ``output_hidden_states`` on the same padded batches.

R = toolkit tokens/s / generate tokens/s.  Target: R >= 1.0.

    python benchmarks/hf_sampler_vs_generate.py [--problems 32] [--samples 16] [--new 64] [--checkpoint DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def questions(n: int) -> list[tuple[str, str]]:
    """n (question, answer) pairs whose chat prompts differ in length."""
    fillers = ["", "Think it through. ", "Please think step by step before you answer. ",
               "A short explanation first, then the result on its own line, please. "]
    out = []
    for i in range(n):
        a, b = 3 + 7 * i % 41, 2 + 5 * i % 23
        out.append((f"{fillers[i % len(fillers)]}What is {a} + {b}?", f"{a} + {b} = {a + b}"))
    return out


def hf_generate(model, tok, prompts: list[list[int]], n: int, new: int, never: int, pad: int, rows: int,
                sample: bool = True):
    """Left-padded batches of `rows // n` prompts x n return sequences each, as a careful user writes it."""
    import torch

    per = max(1, rows // n)
    outs = []
    with torch.inference_mode():
        for p0 in range(0, len(prompts), per):
            chunk = prompts[p0:p0 + per]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            g = model.generate(input_ids=ids, attention_mask=mask, do_sample=sample, num_return_sequences=n if sample else 1,
                               max_new_tokens=new, min_new_tokens=new, eos_token_id=never, pad_token_id=pad,
                               top_k=0, top_p=1.0, temperature=1.0)
            outs.append(g[:, width:])
    return torch.cat(outs)


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=32, help="prompts (default 32, of different lengths)")
    p.add_argument("--samples", type=int, default=16, help="samples per prompt (default 16)")
    p.add_argument("--new", type=int, default=64, help="new tokens per sample (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each sampler (default 3, median)")
    p.add_argument("--checkpoint", default=None, help="an HF directory (default: the SmolLM2 build of tests/real_model.py)")
    args = p.parse_args(argv)

    import torch

    from analysis.measure import teacher_forced
    from hooks.encode import encode_problems
    from hooks.hf import HFCheckpoint
    from hooks.sampler import generate
    from training.schema import DecisionPoint, Problem

    threads = C.setup_threads(args.threads)
    device = C.device_of(args.device)
    print(C.machine_line(threads, device))
    if args.checkpoint:
        path = Path(args.checkpoint)
    else:
        sys.path.insert(0, str(C.REPO))
        from tests.real_model import smollm2_dir

        path = smollm2_dir()
    ck = HFCheckpoint(path, device=device)
    tok, model = ck.tokenizer, ck.module
    problems = []
    for q, a in questions(args.problems):
        c = a
        problems.append(Problem(tok.chat_prompt(q), c, a.split("= ")[1],
                                [DecisionPoint(c.index("= ") + 2, ["1", "9"], ["1"], "decipherable")]))
    encoded, _ = encode_problems(tok, problems)
    prompts = [e.ids[: e.prompt_len] for e in encoded]
    lengths = sorted(len(x) for x in prompts)
    never = model.get_input_embeddings().weight.shape[0] - 1  # an id the model is never asked to stop at
    rows_per_chunk = 4096 if device.type == "cuda" else 256
    print(f"{path.name}: {len(prompts)} prompts of {lengths[0]}..{lengths[-1]} tokens x {args.samples} samples, "
          f"{args.new} new tokens each; {rows_per_chunk}-row batches for both")

    # same function first: greedy tokens on a few prompts
    few = prompts[:4]
    g_tk = generate(ck.stepper(), few, 1, 12, [never], tok.pad_id, "greedy", torch.Generator(), batch_size=4).tokens[:, 0]
    g_hf = hf_generate(model, tok, few, 1, 12, never, tok.pad_id, rows=4, sample=False)
    same = bool(torch.equal(g_tk.cpu(), g_hf.cpu()))
    print(f"same function: greedy tokens equal on {len(few)} left-padded prompts: {same}")

    times = {"toolkit": [], "generate": []}
    gen = torch.Generator().manual_seed(0)

    def run_tk():
        return generate(ck.stepper(), prompts, args.samples, args.new, [never], tok.pad_id, "temperature:1", gen,
                        batch_size=rows_per_chunk).tokens

    def run_hf():
        return hf_generate(model, tok, prompts, args.samples, args.new, never, tok.pad_id, rows_per_chunk)

    for _ in range(max(1, args.repeats)):
        for key, fn in (("toolkit", run_tk), ("generate", run_hf)):
            sec, out = C.time_call(fn, device)
            assert out.numel() == len(prompts) * args.samples * args.new, out.shape
            times[key].append(sec)
    tokens = len(prompts) * args.samples * args.new
    tk, hf = tokens / C.median(times["toolkit"]), tokens / C.median(times["generate"])
    print(f"{'sampler':<10}{'median s':>10}{'tok/s':>10}")
    for key, rate in (("toolkit", tk), ("generate", hf)):
        print(f"{key:<10}{C.median(times[key]):>10.2f}{rate:>10.0f}")

    # teacher-forced measuring pass per problem vs a plain forward with output_hidden_states
    def run_tf():
        return teacher_forced(ck, encoded, batch_size=64)

    def run_plain():
        with torch.inference_mode():
            for s in range(0, len(encoded), 64):
                batch = encoded[s:s + 64]
                width = max(len(e.ids) for e in batch)
                ids = torch.full((len(batch), width), tok.pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, e in enumerate(batch):
                    ids[i, : len(e.ids)] = torch.tensor(e.ids)
                    mask[i, : len(e.ids)] = 1
                model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)

    tf_t, plain_t = [], []
    for _ in range(max(1, args.repeats)):
        tf_t.append(C.time_call(run_tf, device)[0])
        plain_t.append(C.time_call(run_plain, device)[0])
    per_tf, per_plain = C.median(tf_t) / len(encoded), C.median(plain_t) / len(encoded)
    print(f"teacher-forced pass per problem: toolkit {1000 * per_tf:.1f} ms, plain forward with hidden states "
          f"{1000 * per_plain:.1f} ms (ratio {per_plain / per_tf:.2f})")
    r = tk / hf
    print(f"toolkit sampler at {r:.2f}x HF generate's tokens/s (target >= 1.0: {'met' if r >= 1.0 else 'NOT MET'})")
    print(C.ratio_line("hf_sampler_vs_generate", r, f">= 1.0; same function {'yes' if same else 'NO'}"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
