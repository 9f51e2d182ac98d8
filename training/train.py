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
    check_finite,
    checkpoint_name,
    list_checkpoints,
    read_checkpoint,
    read_train_state,
    remove_partial,
    save_checkpoint,
    schedule,
)
from training.config import ExperimentConfig, PhaseConfig
from training.corpus import TokenizedCorpus, batch_indices, load_corpus
from training.errors import UsageError
from training.io import read_json_object, write_json
from training.model import bridge_config_dict, build_native, load_weights, n_params
from training.synth import build_data
from training.tasks import get_task

RUN_FILE = "run.json"
"""The run's resolved config, written before any work: a resume with another config is refused."""
NEUTRAL_KEYS = ("threads", "eval.")
"""Config keys that do not change the trained weights (threads, how the run is later measured)."""

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
        check_finite(weights, str(last_path))
        load_weights(module, weights, str(last_path))
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise UsageError(f"{last_path / 'train_state.pt'} does not fit this model's optimizer ({e}); "
                             "delete that checkpoint directory to resume from the one before it") from None
        step, tokens = int(state["step"]), int(state["tokens_seen"])
    phase_seed = seed * 100 + PHASE_SEED[phase]
    losses: list[float] = []
    kept = [done[-1][1]] if done else []

    def save(at: int) -> None:
        check_finite(module.state_dict(), f"{phase} step {at}")
        kept[:] = [at]
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
        value = loss.item()
        if not math.isfinite(value):
            where = f"its last checkpoint is step {kept[0]}" if kept else "no checkpoint of it was written"
            raise UsageError(
                f"{phase} step {step + 1}: the loss is {value} (non-finite): training diverged ({where}); lower "
                f"{phase}.lr (now {cfg.lr:g}) or raise {phase}.warmup and run again (with --force once {phase} "
                "checkpoints exist)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip)
        opt.step()
        step += 1
        tokens += int(corpus.lengths[idx].sum())
        losses.append(value)
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


def pick_device(device: str | torch.device | None) -> torch.device:
    """cpu, cuda or cuda:N (None or "auto": cuda when torch sees one); anything unusable is one line."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device)
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {text!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text} asked for, but torch sees no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: torch sees {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def train(
    cfg: ExperimentConfig,
    out: str | Path,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after: dict[str, int] | None = None,
    base_from: str | Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Data, base pretraining and SFT with checkpoints under ``out``; resumes what is there.

    ``base_from`` points at an existing base checkpoint to fine-tune instead of pretraining
    (sweeps share one base model across their SFT cells). Every input is checked before anything
    is written. A resume must use the config the run was started with (``run.json``): another
    one is refused, naming the keys that differ, unless ``force``, which starts the run over.
    """
    out = Path(out)
    dev = pick_device(device)
    task = get_task(cfg.task)
    tokenizer = task.tokenizer()
    model_cfg = bridge_config_dict(cfg.model, len(tokenizer), task.max_seq_len, cfg.seed)
    if model_cfg["n_ctx"] < task.max_seq_len:
        raise UsageError(f"model.n_ctx={model_cfg['n_ctx']} is shorter than the task's sequences ({task.max_seq_len})")
    base = _base_checkpoint(base_from, task) if base_from is not None else None
    _writable(out)
    data_dir = out / "data"
    ckpt_dir = out / "checkpoints"
    _claim_run(out, cfg, base, force, log)
    remove_partial(ckpt_dir)
    eval_from = base["eval_file"] if base else None
    manifest = build_data(cfg, data_dir, log=log, eval_from=eval_from)
    ckpt_config = {
        "model": model_cfg,
        "tokenizer": tokenizer.to_dict(),
        "task": task.config_dict(),
        "experiment": cfg.to_dict(),
    }
    eval_file = (data_dir / "eval.jsonl").resolve()

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
    sft_done = list_checkpoints(ckpt_dir, "sft")
    if not (sft_done and sft_done[-1][1] >= cfg.sft.steps):
        t_corpus = time.perf_counter()
        corpus = load_corpus(data_dir / "sft.jsonl", tokenizer, max_len)
        t_corpus = time.perf_counter() - t_corpus
        if not sft_done:
            _, _, weights = read_checkpoint(base_path)
            check_finite(weights, str(base_path))
            load_weights(module, weights, str(base_path))
        report["sft"] = train_phase(
            module, corpus, cfg.sft, "sft", cfg.seed, ckpt_dir, lambda: ckpt_config,
            meta("sft"), True, dev, progress, stop_after.get("sft"),
        )
        loss = report["sft"]["final_loss"]
        log(f"sft: {report['sft']['steps']} steps in {report['sft']['seconds']:.0f}s"
            + (f", loss {loss:.3f}" if loss is not None else "") + f" (corpus tokenized in {t_corpus:.0f}s)")
    report["checkpoints"] = [str(p) for _, _, p in list_checkpoints(ckpt_dir)]
    return report


def _writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror}; choose a writable directory") from None


def _base_checkpoint(base_from: str | Path, task) -> dict[str, Any]:
    """The base a run fine-tunes, checked before any work: readable, finite, this task, its eval set."""
    from training.checkpoint import is_native_checkpoint, read_meta

    p = Path(base_from)
    if not p.is_dir() or not is_native_checkpoint(p):
        raise UsageError(f"--base {p} is not a fork-probes checkpoint directory")
    cfg, meta, weights = read_checkpoint(p)
    check_finite(weights, str(p))
    if cfg.get("task") != task.config_dict():
        raise UsageError(f"base checkpoint {p} was trained on another task configuration")
    if not meta or "eval_file" not in meta:
        raise UsageError(f"--base {p} has no meta.json naming its eval set; fine-tune a checkpoint written by 'probes train'")
    root = p.resolve().parent.parent
    data_dir, name = meta.get("data_dir", "."), meta["eval_file"]
    if not isinstance(data_dir, str) or not isinstance(name, str):
        raise UsageError(f"{p / 'meta.json'}: data_dir and eval_file must be strings (paths)")
    eval_file = (p / data_dir / name).resolve()
    if p.resolve().parent.name != "checkpoints" or not eval_file.is_relative_to(root):
        raise UsageError(f"--base {p}: its eval set {eval_file} is outside its run directory (was the checkpoint moved "
                         "out of RUN/checkpoints/?); refused")
    if not eval_file.is_file():
        raise UsageError(f"--base {p}: its eval set {eval_file} is missing (moved out of its run directory?)")
    from training.io import sha256_file

    return {"path": str(p.resolve()), "eval_file": eval_file, "weights_sha256": sha256_file(p / "model.safetensors"),
            "meta": read_meta(p)}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "eval_mix":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _recorded_config(out: Path) -> dict[str, Any] | None:
    """The config a run was started with: run.json, else (runs older than it) its latest checkpoint's."""
    f = out / RUN_FILE
    if f.is_file():
        rec = read_json_object(f, "a run record", "delete it, or start over with --force")
        if not isinstance(rec.get("experiment"), dict):
            raise UsageError(f"{f} is not a fork-probes run record; delete it, or start over with --force")
        return rec
    done = list_checkpoints(out / "checkpoints")
    if done:
        cfg, _, _ = read_checkpoint(done[-1][2])
        return {"experiment": cfg.get("experiment") or {}, "base": None}
    return None


def _claim_run(out: Path, cfg: ExperimentConfig, base: dict[str, Any] | None, force: bool, log) -> None:
    """Record this run's config, or check a resume against the recorded one.

    With checkpoints written, another config is refused unless ``force``; then what it
    invalidates is deleted: only the SFT checkpoints when nothing but ``sft.*`` keys differ, else
    the data and every checkpoint. Before any checkpoint exists nothing depends on the old
    config, so the new one simply replaces it.
    """
    import shutil

    now = {"experiment": cfg.to_dict(), "base": None if base is None else {k: base[k] for k in ("path", "weights_sha256")}}
    old = _recorded_config(out)
    if old is not None:
        a, b = _flat(old.get("experiment", {})), _flat(now["experiment"])
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(NEUTRAL_KEYS)]
        if (old.get("base") or {}).get("weights_sha256") != (now["base"] or {}).get("weights_sha256"):
            keys.append("--base")
        written = list_checkpoints(out / "checkpoints")
        if keys and written and not force:
            shown = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" if k != "--base" else "--base" for k in keys[:4])
            more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
            raise UsageError(f"{out} holds a run started with another config: {shown}{more}; use another --out, "
                             "or --force to delete what that change invalidates and train again")
        if keys and written:
            if all(k.startswith("sft.") for k in keys):
                log(f"--force: deleting {out}'s SFT checkpoints ({', '.join(keys[:4])} changed); pretraining is kept")
                for _, _, p in list_checkpoints(out / "checkpoints", "sft"):
                    shutil.rmtree(p)
            else:
                log(f"--force: starting {out} over ({', '.join(keys[:4])} changed)")
                for sub in ("checkpoints", "data"):
                    shutil.rmtree(out / sub, ignore_errors=True)
        elif keys:
            shutil.rmtree(out / "data", ignore_errors=True)  # no checkpoint was made from it
    write_json(out / RUN_FILE, now)
