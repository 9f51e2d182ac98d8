"""Shared helpers for the benchmarks: threads, timing, peak memory, worker processes, a trained run.

Every benchmark compares contenders side by side in one invocation, because absolute times on
shared machines drift. Contenders whose peak memory is compared run in their own process (a
*worker*: the same script started again with ``--worker NAME``), so peaks never mix; each
worker reports its own ``ru_maxrss`` and, on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/NAME.py` from anywhere finds the packages
    sys.path.insert(0, str(REPO))

RESULT_TAG = "BENCH_RESULT "
DEMO_CHECKPOINT = REPO / "runs" / "demo" / "checkpoints" / "sft-step003000"
FALLBACK_DIR = REPO / "runs" / "bench"


# ----------------------------------------------------------------------------- arguments
def base_parser(description: str, default_threads: int = 1) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark takes (--device, --threads).

    Ratio benchmarks default to one torch thread for every contender: these models are too
    small to gain from intra-op threads, and on a shared 2-core machine two threads per process
    were measured 20-36x slower than one (spinning threads fight the other processes' load).
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--threads", type=int, default=default_threads,
        help=f"torch intra-op threads for every contender (default {default_threads}; 0 = torch's default for this machine)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-args", default=None, help=argparse.SUPPRESS)
    return p


def setup_threads(n: int) -> int:
    """Pin torch's intra-op threads (benchmark processes only) and return the count in force."""
    import torch

    if n and n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def device_of(name: str):
    from training.train import pick_device

    return pick_device(name)


def machine_line(threads: int, device) -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    line = (f"machine: {os.cpu_count()} cores, load average {load:.1f}, torch {torch.__version__}, "
            f"device {device}, torch threads {threads}")
    if str(device) == "cpu" and load > (os.cpu_count() or 1):
        line += " (busy machine: timings are noisy" + ("; --threads 1 is much faster here)" if threads > 1 else ")")
    if str(device).startswith("cuda"):
        line += f" ({torch.cuda.get_device_name(device)})"
    return line


def ratio_line(name: str, ratio: float, target: str) -> str:
    """The last line each benchmark prints: ``NAME: ratio R (target ...)``."""
    return f"{name}: ratio {ratio:.2f} (target {target})"


# ----------------------------------------------------------------------------- timing
def synchronize(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


class Timer:
    """Wall time of a block: CUDA events on a GPU, ``time.perf_counter`` on the CPU.

    ``with timer.run(): ...`` adds the block's seconds to ``timer.seconds``.
    """

    def __init__(self, device) -> None:
        self.device = str(device)
        self.seconds = 0.0

    @contextmanager
    def run(self) -> Iterator["Timer"]:
        import torch

        if self.device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            yield self
            end.record()
            end.synchronize()
            torch.cuda.synchronize(self.device)  # work on other streams, too
            self.seconds += start.elapsed_time(end) / 1000.0
        else:
            t0 = time.perf_counter()
            yield self
            self.seconds += time.perf_counter() - t0


def time_call(fn: Callable[[], Any], device) -> tuple[float, Any]:
    t = Timer(device)
    with t.run():
        out = fn()
    return t.seconds, out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


# ----------------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def cuda_peak_mb(device) -> float | None:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def run_measured(cmd: list[str], env: dict[str, str] | None = None, log_file: Path | None = None,
                 cwd: Path = REPO) -> dict[str, Any]:
    """Run a command to completion; its wall seconds, peak RSS (MiB, from wait4) and exit code.

    The peak is that of the child (and of any grandchild it waited for), never this process's.
    Output goes to ``log_file`` (or is discarded) so a chatty child cannot block on a full pipe.
    """
    out = open(log_file, "wb") if log_file else subprocess.DEVNULL
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log_file:
            out.close()
    peak = usage.ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else usage.ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak, "returncode": proc.returncode}


def thread_env(threads: int) -> dict[str, str]:
    """The environment for a child process, with its torch threads pinned when asked."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if threads and threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    return env


# ----------------------------------------------------------------------------- workers
def run_worker(script: str | Path, name: str, args: dict[str, Any], threads: int, device: str) -> dict[str, Any]:
    """Start ``script --worker NAME`` in a fresh process; return the dict its worker returned.

    The worker's own peak RSS (MiB) is added as ``peak_rss_mb``. Fails loudly with the
    worker's output tail if it crashes.
    """
    cmd = [sys.executable, str(script), "--worker", name, "--worker-args", json.dumps(args),
           "--threads", str(threads), "--device", str(device)]
    proc = subprocess.run(cmd, cwd=REPO, env=thread_env(threads), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"worker {name!r} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def serve_worker(args: argparse.Namespace, workers: dict[str, Callable[..., dict[str, Any]]]) -> bool:
    """If this process was started as a worker, run it, print its result line and return True."""
    if not args.worker:
        return False
    threads = setup_threads(args.threads)
    kwargs = json.loads(args.worker_args or "{}")
    result = workers[args.worker](device=args.device, **kwargs)
    result["threads"] = threads
    result["peak_rss_mb"] = peak_rss_mb()
    print(RESULT_TAG + json.dumps(result), flush=True)
    return True


def preimport() -> None:
    """Import every module any contender needs before its clock starts, so neither import time
    nor the libraries' resident memory differ between contenders."""
    import pandas  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import transformer_lens.model_bridge.sources._bridge_builder  # noqa: F401

    import analysis.measure  # noqa: F401
    import hooks.native  # noqa: F401
    import hooks.sampler  # noqa: F401
    import probes.linear  # noqa: F401
    import probes.runner  # noqa: F401
    import training.tasks  # noqa: F401


def time_probes_run(device: str, checkpoint: str, eval: str, samples: int, out: str, seed: int = 0) -> dict[str, Any]:
    """``probes.api.run`` on one checkpoint as a user calls it, timed after the imports (a worker)."""
    preimport()
    from probes.api import run

    t = Timer(device)
    with t.run():
        run([checkpoint], out=out, eval=eval, samples=samples, device=device, progress=False,
            log=lambda *_: None, seed=seed)
    return {"seconds": t.seconds, "cuda_peak_mb": cuda_peak_mb(device)}


# ----------------------------------------------------------------------------- a trained run
def fallback_overrides(n_eval: int) -> list[str]:
    """A run of the default model shape trained only a few steps: timing needs the shape, not skill."""
    return [
        "data.n_pretrain=2000", "data.n_sft=500", f"data.n_eval={n_eval}",
        "pretrain.steps=20", "pretrain.warmup=2", "sft.steps=20", "sft.warmup=2",
        "sft.n_log_checkpoints=0", "sft.n_even_checkpoints=1",
    ]


def find_checkpoint(checkpoint: str | None, eval_file: str | None, min_problems: int,
                    log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """The checkpoint to measure and its eval set.

    ``--checkpoint`` if given; else the one ``probes demo`` writes (runs/demo/...); else a short
    run of the default config's model shape, trained once under runs/bench/ and reused.
    """
    from hooks.record import read_record
    from probes.runner import eval_from_meta

    if checkpoint:
        ck = Path(checkpoint)
        note = f"checkpoint {ck} (--checkpoint)"
    elif DEMO_CHECKPOINT.is_dir():
        ck = DEMO_CHECKPOINT
        note = f"checkpoint {ck} (written by probes demo)"
    else:
        n_eval = max(200, min_problems)
        run_dir = FALLBACK_DIR / f"default-shape-e{n_eval}"
        ck = run_dir / "checkpoints" / "sft-step000020"
        if not ck.is_dir():
            from probes.api import train

            log(f"no {DEMO_CHECKPOINT} and no --checkpoint: training a short run of the default model shape "
                f"(20 + 20 steps, {n_eval} eval problems) under {run_dir} once, reused afterwards")
            train(None, out=run_dir, overrides=fallback_overrides(n_eval), progress=False, log=lambda *_: None)
        note = (f"checkpoint {ck} (a default-shape model trained 20 + 20 steps on the fly: "
                "timings need the shape, not a good model; run probes demo for the real one)")
    ev = Path(eval_file) if eval_file else eval_from_meta([read_record(ck)])
    log(note)
    log(f"eval set {ev}")
    return ck, ev


def subset_eval(eval_file: Path, n: int, out_dir: Path, cycle: bool = False) -> tuple[Path, int]:
    """The first n problems of an eval set, as its own JSONL file (every contender reads it).

    With ``cycle`` a set shorter than n is repeated until it holds n problems (for timing only).
    """
    lines = [ln for ln in Path(eval_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if cycle and n > len(lines):
        lines = (lines * (n // len(lines) + 1))[:n]
    take = lines[: n] if n > 0 else lines
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"eval-{len(take)}.jsonl"
    path.write_text("\n".join(take) + "\n", encoding="utf-8")
    return path, len(take)


# ----------------------------------------------------------------------------- a plain-PyTorch GPT
def plain_gpt_class():
    """A minimal GPT in plain PyTorch (nanoGPT style), parameter names matching TL's NativeModel.

    Pre-LN blocks, learned positions, GELU MLP, ``F.scaled_dot_product_attention`` and a
    concatenating KV cache: what a researcher writes by hand. Built lazily so importing this
    module does not import torch.
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Attention(nn.Module):
        def __init__(self, d_model: int, n_heads: int):
            super().__init__()
            self.n_heads, self.d_head = n_heads, d_model // n_heads
            self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

        def forward(self, x, past=None):
            b, t, c = x.shape
            q, k, v = (f(x).view(b, t, self.n_heads, self.d_head).transpose(1, 2) for f in (self.q, self.k, self.v))
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
            return self.o(y.transpose(1, 2).reshape(b, t, c)), (k, v)

    class MLP(nn.Module):
        def __init__(self, d_model: int, d_mlp: int):
            super().__init__()
            self.fc_in, self.fc_out = nn.Linear(d_model, d_mlp), nn.Linear(d_mlp, d_model)

        def forward(self, x):
            return self.fc_out(F.gelu(self.fc_in(x)))

    class Block(nn.Module):
        def __init__(self, d_model: int, n_heads: int, d_mlp: int, eps: float):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d_model, eps=eps), nn.LayerNorm(d_model, eps=eps)
            self.attn, self.mlp = Attention(d_model, n_heads), MLP(d_model, d_mlp)

        def forward(self, x, past=None):
            a, kv = self.attn(self.ln1(x), past)
            x = x + a
            return x + self.mlp(self.ln2(x)), kv

    class PlainGPT(nn.Module):
        def __init__(self, d_vocab: int, n_ctx: int, d_model: int, n_layers: int, n_heads: int, d_mlp: int,
                     eps: float = 1e-5):
            super().__init__()
            self.tok_embed, self.pos = nn.Embedding(d_vocab, d_model), nn.Embedding(n_ctx, d_model)
            self.layers = nn.ModuleList(Block(d_model, n_heads, d_mlp, eps) for _ in range(n_layers))
            self.ln_out, self.head = nn.LayerNorm(d_model, eps=eps), nn.Linear(d_model, d_vocab, bias=False)

        def forward_cached(self, ids, cache=None, start: int = 0):
            x = self.tok_embed(ids) + self.pos(torch.arange(start, start + ids.shape[1], device=ids.device))
            new = []
            for i, block in enumerate(self.layers):
                x, kv = block(x, cache[i] if cache is not None else None)
                new.append(kv)
            return self.head(self.ln_out(x)), new

        def forward(self, ids):
            return self.forward_cached(ids)[0]

    return PlainGPT


def plain_gpt(model_cfg: dict[str, Any], device=None):
    """A PlainGPT of a checkpoint's model shape (the default architecture only)."""
    want = {"act_fn": "gelu", "normalization_type": "LN", "positional_embedding_type": "standard"}
    bad = {k: model_cfg.get(k) for k, v in want.items() if model_cfg.get(k, v) != v}
    if bad:
        raise SystemExit(f"the plain-PyTorch baseline implements the default architecture only ({want}); got {bad}")
    m = plain_gpt_class()(model_cfg["d_vocab"], model_cfg["n_ctx"], model_cfg["d_model"], model_cfg["n_layers"],
                          model_cfg["n_heads"], model_cfg["d_mlp"])
    return m.to(device) if device is not None else m
