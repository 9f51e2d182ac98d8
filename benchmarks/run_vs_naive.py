"""`probes run` on one checkpoint against two scripts a researcher would write with TransformerLens.

Contenders, each in its own process (so peak memory does not mix), on the same eval problems:

- toolkit: ``probes.api.run`` on the checkpoint (fork metrics, logit lens, linear probes,
  bootstrap intervals, n samples per problem for pass@k, the tidy table written to disk);
- TL used well: ``bridge.run_with_cache`` batched over problems with a ``names_filter`` for the
  residual stream only, and ``bridge.generate`` over all n samples of a problem at once with
  its KV cache;
- naive: full ``bridge.run_with_cache`` one problem at a time, and ``bridge.generate`` one
  completion at a time. Measured on a subset of the problems (``--naive-problems``) and
  extrapolated linearly per problem, as printed.

The hand-written scripts compute fewer numbers than the toolkit (no linear probes, no intervals),
so the ratios are conservative. Their numbers are checked against the toolkit's: entropy at the
forks, branch mass and the logit lens per layer per decision point (atol 1e-4, against the
toolkit's own teacher-forced capture) and the table's means per kind; pass@k only statistically
(their random streams differ).

R = TL-used-well time / toolkit time.  Target: R >= 3, and >= 10 against naive, with the
toolkit's peak memory no higher than either.

    python benchmarks/run_vs_naive.py [--problems 200] [--samples 32] [--checkpoint DIR --eval FILE]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

ATOL = 1e-4
SEED = 0


# ----------------------------------------------------------------------------- hand-written scripts
def _budgets(encoded, n_ctx: int) -> dict[int, int]:
    """Max new tokens per prompt length, as `probes run` sets them: longest gold completion + 2."""
    by_len: dict[int, int] = {}
    for p in encoded:
        by_len[p.prompt_len] = max(by_len.get(p.prompt_len, 0), len(p.ids) - p.prompt_len)
    return {plen: max(1, min(gold + 2, n_ctx - plen)) for plen, gold in by_len.items()}


class _Features:
    """Per decision point: entropy, branch mass, logit-lens branch mass and KL; entropy elsewhere."""

    def __init__(self, max_b: int):
        self.max_b = max_b
        self.problem: list[int] = []
        self.kind: list[str] = []
        self.entropy: list[float] = []
        self.mass: list[Any] = []
        self.bmask: list[Any] = []
        self.vmask: list[Any] = []
        self.lmass: list[Any] = []
        self.lkl: list[Any] = []
        self.other: list[float] = []
        self.other_kind: list[str] = []

    def add(self, p, logits, resid, lens) -> None:
        """logits [pos, vocab] and resid [pos, layer, d_model] of one problem's gold sequence."""
        import torch

        logp = torch.log_softmax(logits.float(), dim=-1)
        ent = -(logp.exp() * logp).sum(-1)
        fork_at = {f.pos - 1 for f in p.forks}
        for q in range(p.prompt_len - 1, len(p.ids) - 1):
            if q not in fork_at:
                self.other.append(float(ent[q]))
                self.other_kind.append(p.kind)
        for f in p.forks:
            q = f.pos - 1
            probs = logp[q].exp()
            lens_logp = torch.log_softmax(lens(resid[q][None])[0].float(), dim=-1)  # [layer, vocab]
            nb = len(f.branch_ids)
            mass = torch.zeros(self.max_b)
            mass[:nb] = probs[f.branch_ids].cpu()
            lmass = torch.zeros(lens_logp.shape[0], self.max_b)
            lmass[:, :nb] = lens_logp.exp()[:, f.branch_ids].cpu()
            self.mass.append(mass)
            self.lmass.append(lmass)
            self.lkl.append((probs * (logp[q] - lens_logp)).sum(-1).cpu())
            self.entropy.append(float(ent[q]))
            self.bmask.append([j < nb for j in range(self.max_b)])
            self.vmask.append([j < nb and f.valid[j] for j in range(self.max_b)])
            self.problem.append(p.index)
            self.kind.append(f.kind)

    def save(self, path: str) -> None:
        import numpy as np
        import torch

        np.savez(
            path, problem=np.array(self.problem), kind=np.array(self.kind), entropy=np.array(self.entropy),
            mass=torch.stack(self.mass).numpy(), bmask=np.array(self.bmask), vmask=np.array(self.vmask),
            lmass=torch.stack(self.lmass).numpy(), lkl=torch.stack(self.lkl).numpy(),
            other=np.array(self.other), other_kind=np.array(self.other_kind),
        )


def _setup(checkpoint: str, eval: str, device: str):
    from hooks.encode import encode_problems
    from hooks.native import NativeCheckpoint
    from training.schema import read_jsonl
    from training.tasks import get_task

    ck = NativeCheckpoint(checkpoint, device=device)
    ck.bridge.cfg.device = device  # generate() places its tokens on cfg.device
    encoded, _ = encode_problems(ck.tokenizer, read_jsonl(eval))
    verify = get_task(ck.task_config).verify
    names = [f"blocks.{l}.hook_resid_pre" for l in range(ck.n_layers)] + [f"blocks.{ck.n_layers - 1}.hook_resid_post"]
    max_b = max((len(f.branch_ids) for p in encoded for f in p.forks), default=2)
    return ck, encoded, verify, names, max_b


def _lens(bridge):
    return lambda x: bridge.unembed(bridge.ln_final(x))


def _count_correct(tok, verify, p, new_ids) -> int:
    c = 0
    for s in new_ids.tolist():
        text, finished = tok.decode_completion(s)
        c += bool(finished and verify(p.problem, text))
    return c


def worker_toolkit(device: str, checkpoint: str, eval: str, samples: int, out: str) -> dict[str, Any]:
    """`probes run` on one checkpoint, as a user calls it."""
    return C.time_probes_run(device, checkpoint, eval, samples, out, seed=SEED)


def worker_well(device: str, checkpoint: str, eval: str, samples: int, out: str, batch_size: int = 64) -> dict[str, Any]:
    """TransformerLens used well: batched run_with_cache (residuals only), batched KV-cached generate."""
    import numpy as np
    import torch

    C.preimport()
    t_load, t_fwd, t_gen = C.Timer(device), C.Timer(device), C.Timer(device)
    with t_load.run():
        ck, encoded, verify, names, max_b = _setup(checkpoint, eval, device)
    bridge, tok = ck.bridge, ck.tokenizer
    feats = _Features(max_b)
    with t_fwd.run(), torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(p.ids) for p in batch)
            ids = torch.full((len(batch), width), tok.pad_id, dtype=torch.long)
            for i, p in enumerate(batch):  # right padding: causal attention never lets a real position see it
                ids[i, : len(p.ids)] = torch.tensor(p.ids)
            logits, cache = bridge.run_with_cache(ids.to(device), names_filter=names)
            resid = torch.stack([cache[n] for n in names], dim=2)
            for i, p in enumerate(batch):
                feats.add(p, logits[i], resid[i], _lens(bridge))
    budgets = _budgets(encoded, ck.n_ctx)
    correct = np.zeros(len(encoded), dtype=int)
    tokens = 0
    cuda = [torch.device(device)] if device.startswith("cuda") else []
    with t_gen.run(), torch.random.fork_rng(devices=cuda):  # generate() draws from torch's global RNG
        torch.manual_seed(SEED)
        for i, p in enumerate(encoded):
            prompt = torch.tensor([p.ids[: p.prompt_len]] * samples, device=device)
            seqs = bridge.generate(prompt, max_new_tokens=budgets[p.prompt_len], stop_at_eos=True,
                                   eos_token_id=tok.eos_id, do_sample=True, temperature=1.0,
                                   use_past_kv_cache=True, verbose=False)
            new = seqs[:, p.prompt_len :].cpu()
            tokens += new.numel()
            correct[i] = _count_correct(tok, verify, p, new)
    feats.save(out)
    return {"seconds": t_load.seconds + t_fwd.seconds + t_gen.seconds, "load_seconds": t_load.seconds,
            "forward_seconds": t_fwd.seconds, "generate_seconds": t_gen.seconds, "problems": len(encoded),
            "correct": correct.tolist(), "generated_tokens": tokens, "cuda_peak_mb": C.cuda_peak_mb(device)}


def worker_naive(device: str, checkpoint: str, eval: str, samples: int, out: str, problems: int) -> dict[str, Any]:
    """The naive script: full run_with_cache per problem, generate one completion at a time."""
    import numpy as np
    import torch

    C.preimport()
    t_load, t_work = C.Timer(device), C.Timer(device)
    with t_load.run():
        ck, encoded, verify, names, max_b = _setup(checkpoint, eval, device)
    bridge, tok = ck.bridge, ck.tokenizer
    budgets = _budgets(encoded, ck.n_ctx)  # over every problem, as the toolkit sets them
    subset = encoded[:problems] if problems > 0 else encoded
    feats = _Features(max_b)
    correct = np.zeros(len(subset), dtype=int)
    cuda = [torch.device(device)] if device.startswith("cuda") else []
    with t_work.run(), torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(SEED)
        for i, p in enumerate(subset):
            ids = torch.tensor([p.ids], device=device)
            logits, cache = bridge.run_with_cache(ids)  # every hook point
            resid = torch.stack([cache[n] for n in names], dim=2)
            feats.add(p, logits[0], resid[0], _lens(bridge))
            prompt = ids[:, : p.prompt_len]
            for _ in range(samples):
                seq = bridge.generate(prompt, max_new_tokens=budgets[p.prompt_len], stop_at_eos=True,
                                      eos_token_id=tok.eos_id, do_sample=True, temperature=1.0, verbose=False)
                correct[i] += _count_correct(tok, verify, p, seq[:, p.prompt_len :].cpu())
    feats.save(out)
    return {"seconds": t_load.seconds + t_work.seconds, "load_seconds": t_load.seconds,
            "work_seconds": t_work.seconds, "problems": len(subset), "correct": correct.tolist(),
            "cuda_peak_mb": C.cuda_peak_mb(device)}


WORKERS = {"toolkit": worker_toolkit, "well": worker_well, "naive": worker_naive}


# ----------------------------------------------------------------------------- checks
def _load_features(path: str) -> dict[str, Any]:
    import numpy as np

    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _reference_capture(checkpoint: Path, eval_file: Path, device: str):
    """The toolkit's own teacher-forced capture, per decision point, to compare per fork."""
    from analysis.measure import teacher_forced
    from hooks.encode import encode_problems
    from hooks.load import load
    from training.schema import read_jsonl

    model = load(checkpoint, device=C.device_of(device))
    encoded, _ = encode_problems(model.tokenizer, read_jsonl(eval_file))
    return teacher_forced(model, encoded)


def _per_fork_diff(feats: dict[str, Any], cap) -> float:
    """Largest |difference| between a script's per-fork numbers and the toolkit's, on its problems."""
    import numpy as np

    m = len(feats["entropy"])
    if m == 0:
        return 0.0
    if not np.array_equal(feats["problem"], cap.problem[:m]):
        return float("inf")
    nb = min(feats["mass"].shape[1], cap.mass.shape[1])
    diffs = [
        np.abs(feats["entropy"] - cap.entropy[:m]).max(),
        np.abs(feats["mass"][:, :nb] - cap.mass[:m, :nb]).max(),
        np.abs(feats["lmass"][:, :, :nb] - cap.lens_mass[:m, :, :nb]).max(),
        np.abs(feats["lkl"] - cap.lens_kl[:m]).max(),
        np.abs(feats["other"] - cap.other_entropy[: len(feats["other"])]).max() if len(feats["other"]) else 0.0,
    ]
    return float(max(diffs))


def _table_diff(feats: dict[str, Any], df) -> tuple[float, int]:
    """Largest |difference| between the table's means (per kind, per layer) and the script's."""
    import numpy as np

    kinds = feats["kind"]
    share = np.where(feats["bmask"], feats["mass"], 0.0) / np.where(feats["bmask"], feats["mass"], 0.0).sum(-1, keepdims=True)
    top = np.where(feats["bmask"], share, -1.0).max(-1)
    valid = np.where(feats["vmask"], feats["mass"], 0.0).sum(-1)
    lshare = np.where(feats["bmask"][:, None], feats["lmass"], 0.0)
    lshare = lshare / lshare.sum(-1, keepdims=True)
    ltop = np.where(feats["bmask"][:, None], lshare, -1.0).max(-1)
    lvalid = np.where(feats["vmask"][:, None], feats["lmass"], 0.0).sum(-1)
    mine: dict[tuple[str, str, float], float] = {}
    for kind in sorted(set(kinds)) + ["all"]:
        sel = np.ones(len(kinds), bool) if kind == "all" else kinds == kind
        mine[("entropy_fork", kind, -1)] = feats["entropy"][sel].mean()
        mine[("mass_valid", kind, -1)] = valid[sel].mean()
        mine[("mass_top_branch", kind, -1)] = top[sel].mean()
        for layer in range(feats["lmass"].shape[1]):
            mine[("lens_mass_valid", kind, layer)] = lvalid[sel, layer].mean()
            mine[("lens_mass_top_branch", kind, layer)] = ltop[sel, layer].mean()
            mine[("lens_kl_final", kind, layer)] = feats["lkl"][sel, layer].mean()
    okinds = feats["other_kind"]
    for kind in sorted(set(okinds)) + ["all"]:
        sel = np.ones(len(okinds), bool) if kind == "all" else okinds == kind
        mine[("entropy_other", kind, -1)] = feats["other"][sel].mean()
    worst, compared = 0.0, 0
    for (metric, kind, layer), value in mine.items():
        rows = df[(df["metric"] == metric) & (df["kind"] == kind)]
        rows = rows[rows["layer"].isna()] if layer == -1 else rows[rows["layer"] == layer]
        if len(rows) != 1:
            return float("inf"), compared
        worst = max(worst, abs(float(rows["value"].iloc[0]) - float(value)))
        compared += 1
    return worst, compared


def _passk_lines(df, correct: list[int], n: int) -> tuple[list[str], float]:
    """pass@k of the toolkit's table and of the TL-used-well samples, and the largest |z|."""
    import numpy as np

    from analysis.passk import ks_for, pass_at_k_array

    lines, worst = [], 0.0
    c = np.asarray(correct)
    for k in ks_for(n):
        rows = df[(df["metric"] == "pass@k") & (df["kind"] == "all") & (df["k"] == k)]
        if len(rows) != 1:
            continue
        r = rows.iloc[0]
        mine = pass_at_k_array(n, c, k)
        se_tl = mine.std(ddof=1) / np.sqrt(len(mine)) if len(mine) > 1 else 0.0
        se_tk = (float(r["ci_high"]) - float(r["ci_low"])) / 3.92
        se = float(np.hypot(se_tl, se_tk))
        z = (float(r["value"]) - float(mine.mean())) / se if se > 0 else 0.0
        worst = max(worst, abs(z))
        lines.append(f"  pass@{k:<3d} toolkit {float(r['value']):.3f} [{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}]"
                     f"   TL used well {mine.mean():.3f} ± {se_tl:.3f}   z = {z:+.2f}")
    return lines, worst


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=200, help="eval problems (the first N of the eval set; default 200)")
    p.add_argument("--samples", type=int, default=32, help="samples per problem, n (default 32)")
    p.add_argument("--naive-problems", type=int, default=20,
                   help="problems the naive script really runs, extrapolated to --problems (default 20; 0 = all)")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: runs/demo's final SFT checkpoint, "
                   "else a short default-shape run trained once under runs/bench/)")
    p.add_argument("--eval", default=None, help="annotated eval JSONL (default: the checkpoint's own)")
    args = p.parse_args(argv)
    if C.serve_worker(args, WORKERS):
        return 0

    import pandas as pd

    threads = C.setup_threads(args.threads)
    device = str(C.device_of(args.device))
    print(C.machine_line(threads, device))
    ck, ev = C.find_checkpoint(args.checkpoint, args.eval, args.problems)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        tmp = Path(tmp)
        sub, n_problems = C.subset_eval(ev, args.problems, tmp)
        if n_problems < args.problems:
            print(f"the eval set holds only {n_problems} problems: measuring those")
        n_naive = min(args.naive_problems, n_problems) if args.naive_problems > 0 else n_problems
        n = args.samples
        print(f"{n_problems} problems, n = {n} samples each, strategy temperature:1.0; naive script on {n_naive} problems")
        common = {"checkpoint": str(ck), "eval": str(sub), "samples": n}
        script = Path(__file__).resolve()
        tk = C.run_worker(script, "toolkit", {**common, "out": str(tmp / "results")}, threads, device)
        well = C.run_worker(script, "well", {**common, "out": str(tmp / "well.npz")}, threads, device)
        naive = C.run_worker(script, "naive", {**common, "out": str(tmp / "naive.npz"), "problems": n_naive}, threads, device)
        df = pd.read_parquet(tmp / "results" / "results.parquet")
        f_well, f_naive = _load_features(str(tmp / "well.npz")), _load_features(str(tmp / "naive.npz"))
        cap = _reference_capture(ck, sub, device)

    scale = n_problems / max(naive["problems"], 1)
    naive_full = naive["load_seconds"] + naive["work_seconds"] * scale
    tokens = well["generated_tokens"]
    tf_tokens = len(f_well["other"]) + len(f_well["entropy"])  # teacher-forced positions read
    print()
    print(f"{'contender':<34}{'seconds':>10}{'peak RSS MiB':>14}{'gen tokens/s':>14}")
    rows = [
        ("toolkit (probes run)", tk["seconds"], tk["peak_rss_mb"]),
        ("TransformerLens used well", well["seconds"], well["peak_rss_mb"]),
        (f"naive, {naive['problems']} problems measured", naive["seconds"], naive["peak_rss_mb"]),
        (f"naive, extrapolated to {n_problems}", naive_full, naive["peak_rss_mb"]),
    ]
    for name, sec, rss in rows:
        print(f"{name:<34}{sec:>10.2f}{rss:>14.0f}{tokens / sec:>14.0f}")
    print(f"  (gen tokens/s: the {tokens} tokens TL-used-well sampled, over each contender's time; "
          f"{tf_tokens} completion positions read teacher-forced)")
    print(f"  TL used well: load {well['load_seconds']:.2f}s, run_with_cache {well['forward_seconds']:.2f}s, "
          f"generate {well['generate_seconds']:.2f}s")
    print(f"  naive: load {naive['load_seconds']:.2f}s, {naive['work_seconds'] / max(naive['problems'], 1):.3f}s per problem "
          f"(x {n_problems} problems = {naive['work_seconds'] * scale:.1f}s, extrapolated linearly)")
    if device.startswith("cuda"):
        print(f"  CUDA peak allocated MiB: toolkit {tk['cuda_peak_mb']:.0f}, well {well['cuda_peak_mb']:.0f}, "
              f"naive {naive['cuda_peak_mb']:.0f}")

    print()
    d_well, d_naive = _per_fork_diff(f_well, cap), _per_fork_diff(f_naive, cap)
    d_table, compared = _table_diff(f_well, df)
    same = max(d_well, d_naive, d_table) <= ATOL
    print(f"same numbers (atol {ATOL:g}): per decision point (entropy, branch mass, lens mass and KL per layer, "
          f"entropy elsewhere) vs the toolkit's capture: TL used well max |diff| {d_well:.1e}, naive max |diff| {d_naive:.1e}; "
          f"{compared} table means (per kind and layer) vs TL used well: max |diff| {d_table:.1e} -> "
          f"{'OK' if same else 'MISMATCH'}")
    lines, worst_z = _passk_lines(df, well["correct"], n)
    print("pass@k (different random streams, so compared statistically):")
    print("\n".join(lines))
    print(f"  largest |z| {worst_z:.2f} -> {'consistent' if worst_z < 3 else 'INCONSISTENT'}")

    r_well = well["seconds"] / tk["seconds"]
    r_naive = naive_full / tk["seconds"]
    mem_ok = tk["peak_rss_mb"] <= min(well["peak_rss_mb"], naive["peak_rss_mb"])
    print()
    print(f"toolkit is {r_well:.1f}x faster than TransformerLens used well (target >= 3: {'met' if r_well >= 3 else 'NOT MET'}), "
          f"{r_naive:.1f}x faster than naive (target >= 10: {'met' if r_naive >= 10 else 'NOT MET'}); "
          f"peak RSS {tk['peak_rss_mb']:.0f} MiB vs {well['peak_rss_mb']:.0f} / {naive['peak_rss_mb']:.0f} MiB "
          f"({'not higher: met' if mem_ok else 'HIGHER: NOT MET'})")
    print(C.ratio_line("run_vs_naive", r_well, f">= 3; naive ratio {r_naive:.2f}, target >= 10; "
                       f"memory {'ok' if mem_ok else 'higher'}; numbers {'same' if same else 'differ'}"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
