"""Pretraining and SFT: one loop, on the plain module under the bridge (about 2x faster on CPU).

AdamW, linear warmup then cosine decay, gradient clipping, loss on completion tokens only. Every
checkpoint is written atomically with optimizer state, and batches are a pure function of
(seed, step), so an interrupted run resumes to exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    read_checkpoint,
    read_train_state,
    save_checkpoint,
    schedule,
)
from training.config import ExperimentConfig, PhaseConfig
from training.corpus import TokenizedCorpus, batch_indices, load_corpus
from training.errors import UsageError
from training.model import bridge_config_dict, build_native, n_params
from training.synth import build_data
from training.tasks import get_task

PHASE_SEED = {"pretrain": 11, "sft": 23}


def lr_at(step: int, cfg: PhaseConfig) -> float:
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min(max(step - cfg.warmup, 0) / span, 1.0)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def completion_loss(module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = module(ids[:, :-1])
    target = ids[:, 1:]
    m = mask[:, :-1]
    return F.cross_entropy(logits[m], target[m])


def train_phase(
    module: torch.nn.Module,
    corpus: TokenizedCorpus,
    cfg: PhaseConfig,
    phase: str,
    seed: int,
    ckpt_dir: Path,
    make_config: Callable[[], dict[str, Any]],
    make_meta: Callable[[int, int], dict[str, Any]],
    include_zero: bool,
    device: torch.device,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train one phase, resuming from its latest checkpoint; returns timing and loss figures."""
    saves = schedule(cfg.steps, cfg.n_log_checkpoints, cfg.n_even_checkpoints, include_zero)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    step, tokens = 0, 0
    done = list_checkpoints(ckpt_dir, phase)
    if done:
        _, last_step, last_path = done[-1]
        state = read_train_state(last_path)
        if state is None:
            raise UsageError(f"{last_path} has no train_state.pt to resume from; delete it or use another --out")
        _, _, weights = read_checkpoint(last_path)
        module.load_state_dict(weights, strict=False)
        opt.load_state_dict(state["optimizer"])
        step, tokens = int(state["step"]), int(state["tokens_seen"])
    phase_seed = seed * 100 + PHASE_SEED[phase]
    losses: list[float] = []

    def save(at: int) -> None:
        save_checkpoint(
            ckpt_dir / checkpoint_name(phase, at),
            module,
            make_config(),
            make_meta(at, tokens),
            {"optimizer": opt.state_dict(), "step": at, "tokens_seen": tokens},
        )

    if step == 0 and 0 in saves and not done:
        save(0)
    t0 = time.perf_counter()
    module.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=phase, disable=not progress, unit="step", leave=False)
    ids_all, mask_all = corpus.ids, corpus.loss_mask
    while step < cfg.steps:
        idx = batch_indices(step, cfg.batch_size, len(corpus), phase_seed)
        ids = ids_all[idx]
        mask = mask_all[idx]
        T = int(corpus.lengths[idx].max())
        ids, mask = ids[:, :T].to(device, non_blocking=True), mask[:, :T].to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = completion_loss(module, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip)
        opt.step()
        step += 1
        tokens += int(corpus.lengths[idx].sum())
        losses.append(loss.item())
        if step % 25 == 0 or step == cfg.steps:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.3f}")
        bar.update(1)
        if step in saves:
            save(step)
        if stop_after is not None and step >= stop_after:
            break
    bar.close()
    module.eval()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": step, "final_loss": (sum(losses[-50:]) / len(losses[-50:])) if losses else None}


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}; use cpu or cuda")
    return torch.device(device)


def train(
    cfg: ExperimentConfig,
    out: str | Path,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after: dict[str, int] | None = None,
    base_from: str | Path | None = None,
) -> dict[str, Any]:
    """Data, base pretraining and SFT with checkpoints under ``out``; resumes what is there.

    ``base_from`` points at an existing base checkpoint to fine-tune instead of pretraining
    (sweeps share one base model across their SFT cells).
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror}; choose a writable directory") from None
    dev = pick_device(device)
    task = get_task(cfg.task)
    tokenizer = task.tokenizer()
    data_dir = out / "data"
    eval_from = None
    if base_from is not None:
        base_cfg, base_meta, _ = read_checkpoint(base_from)
        if base_cfg.get("task") != task.config_dict():
            raise UsageError(f"base checkpoint {base_from} was trained on another task configuration")
        eval_from = (Path(base_from) / base_meta["data_dir"] / base_meta["eval_file"]).resolve()
    manifest = build_data(cfg, data_dir, log=log, eval_from=eval_from)
    ckpt_dir = out / "checkpoints"
    model_cfg = bridge_config_dict(cfg.model, len(tokenizer), task.max_seq_len, cfg.seed)
    if model_cfg["n_ctx"] < task.max_seq_len:
        raise UsageError(f"model.n_ctx={model_cfg['n_ctx']} is shorter than the task's sequences ({task.max_seq_len})")
    ckpt_config = {
        "model": model_cfg,
        "tokenizer": tokenizer.to_dict(),
        "task": task.config_dict(),
        "experiment": cfg.to_dict(),
    }
    eval_file = eval_from or (data_dir / "eval.jsonl").resolve()

    def meta(phase: str) -> Callable[[int, int], dict[str, Any]]:
        return lambda step, tokens: {
            "phase": phase,
            "step": step,
            "tokens_seen": tokens,
            "data_manifest_hash": manifest["hash"],
            "seed": cfg.seed,
            "run": cfg.name,
            "data_dir": os.path.relpath(eval_file.parent, (ckpt_dir / "x").resolve()),
            "eval_file": eval_file.name,
            "eval_sha256": manifest["eval"]["sha256"],
        }

    module = build_native(model_cfg, dev, embed_init_std=cfg.model.embed_init_std)
    log(f"model: {n_params(module):,} parameters, {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, device {dev}")
    report: dict[str, Any] = {"out": str(out), "device": str(dev)}
    max_len = model_cfg["n_ctx"]
    stop_after = stop_after or {}

    if base_from is None:
        pre_cfg = cfg.pretrain
        pre_done = list_checkpoints(ckpt_dir, "pretrain")
        if not (pre_done and pre_done[-1][1] >= pre_cfg.steps):
            t_corpus = time.perf_counter()
            corpus = load_corpus(data_dir / "pretrain.jsonl", tokenizer, max_len)
            t_corpus = time.perf_counter() - t_corpus
            report["pretrain"] = train_phase(
                module, corpus, pre_cfg, "pretrain", cfg.seed, ckpt_dir, lambda: ckpt_config,
                meta("pretrain"), False, dev, progress, stop_after.get("pretrain"),
            )
            loss = report["pretrain"]["final_loss"]
            log(f"pretrain: {report['pretrain']['steps']} steps in {report['pretrain']['seconds']:.0f}s"
                + (f", loss {loss:.3f}" if loss is not None else "") + f" (corpus tokenized in {t_corpus:.0f}s)")
            if report["pretrain"]["steps"] < pre_cfg.steps:
                return report
        base_path = list_checkpoints(ckpt_dir, "pretrain")[-1][2]
    else:
        base_path = Path(base_from)
    _, _, weights = read_checkpoint(base_path)
    sft_done = list_checkpoints(ckpt_dir, "sft")
    if not sft_done:
        module.load_state_dict(weights, strict=False)
    if not (sft_done and sft_done[-1][1] >= cfg.sft.steps):
        t_corpus = time.perf_counter()
        corpus = load_corpus(data_dir / "sft.jsonl", tokenizer, max_len)
        t_corpus = time.perf_counter() - t_corpus
        if not sft_done:
            module.load_state_dict(weights, strict=False)
        report["sft"] = train_phase(
            module, corpus, cfg.sft, "sft", cfg.seed, ckpt_dir, lambda: ckpt_config,
            meta("sft"), True, dev, progress, stop_after.get("sft"),
        )
        loss = report["sft"]["final_loss"]
        log(f"sft: {report['sft']['steps']} steps in {report['sft']['seconds']:.0f}s"
            + (f", loss {loss:.3f}" if loss is not None else "") + f" (corpus tokenized in {t_corpus:.0f}s)")
    report["checkpoints"] = [str(p) for _, _, p in list_checkpoints(ckpt_dir)]
    return report
