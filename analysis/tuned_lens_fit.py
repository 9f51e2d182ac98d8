"""Fitting a tuned lens: training text from the task's generator, the recipe's optimisation, the cache.

See :mod:`analysis.tuned_lens` for the lens itself (translators, saving, rows).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from analysis.metrics import kl
from hooks.base import Instrumented
from hooks.encode import EncodeReport, EncodedProblem, encode_problem, pad_ids
from training.errors import UsageError
from training.schema import KINDS, Problem

from analysis.tuned_lens import CONFIG, TunedLens, TunedLensSettings, final_lens_parts, load

__all__ = ["fit_tuned_lens", "training_problems", "tuned_lens_for", "capture_positions"]


def _keys(task, exclude: Iterable[Problem | EncodedProblem | str] | None) -> set[str]:
    out: set[str] = set()
    for e in exclude or ():
        if isinstance(e, str):
            out.add(e)
        else:
            out.add(task.key(e.problem if isinstance(e, EncodedProblem) else e))
    return out


def _n_positions(e: EncodedProblem) -> int:
    return len(e.ids) - e.prompt_len


def training_problems(model: Instrumented, settings: TunedLensSettings, seed: int,
                      exclude: Iterable[Problem | EncodedProblem | str] | None = None
                      ) -> tuple[list[EncodedProblem], list[EncodedProblem]]:
    """Train and held-out problems drawn from the checkpoint's task (a seeded generator), none of
    them sharing a key with ``exclude`` (pass the eval set) or with each other."""
    from training.tasks import get_task

    if not model.task_config:
        raise UsageError(f"{model.path} records no task to draw training text from; pass the training problems "
                         "(e.g. read_jsonl(RUN/data/sft.jsonl)) to fit_tuned_lens")
    task = get_task(model.task_config)
    seen = _keys(task, exclude)
    rng = np.random.default_rng([int(seed), 0x7E1E])
    report = EncodeReport()
    train: list[EncodedProblem] = []
    held: list[EncodedProblem] = []
    counts = [0, 0]
    tries, i = 0, 0
    while counts[0] < settings.max_positions or counts[1] < settings.held_out_positions:
        tries += 1
        if tries > 50 * (settings.max_positions + settings.held_out_positions) + 1000:
            raise UsageError("cannot draw enough tuned-lens training problems disjoint from the eval set; "
                             "make the task larger or ask for fewer positions")
        use_pretrain = settings.source == "pretrain" or (settings.source == "mixed" and i % 2 == 1)
        p = task.pretrain_example(rng) if use_pretrain else task.problem(KINDS[(i // (2 if settings.source == "mixed" else 1)) % len(KINDS)], rng)
        k = task.key(p)
        if k in seen:
            continue
        seen.add(k)
        i += 1
        e = encode_problem(model.tokenizer, p, len(train) + len(held), report)
        if e is None or _n_positions(e) < 1:
            continue
        side = 0 if counts[0] < settings.max_positions else 1
        (train if side == 0 else held).append(e)
        counts[side] += _n_positions(e)
    return train, held


def _as_encoded(model: Instrumented, data: Sequence[Problem | EncodedProblem]) -> list[EncodedProblem]:
    report = EncodeReport()
    out = []
    for i, p in enumerate(data):
        e = p if isinstance(p, EncodedProblem) else encode_problem(model.tokenizer, p, i, report)
        if e is not None and _n_positions(e) >= 1:
            out.append(e)
    return out


def _split(model: Instrumented, data: Sequence[Problem | EncodedProblem], settings: TunedLensSettings, seed: int
           ) -> tuple[list[EncodedProblem], list[EncodedProblem]]:
    """Given problems: a seeded order, then train problems up to the cap and held-out ones after."""
    enc = _as_encoded(model, data)
    if not enc:
        raise UsageError("no tuned-lens training problem could be encoded (none has a completion position)")
    order = np.random.default_rng([int(seed), 0x5B11]).permutation(len(enc))
    train, held, counts = [], [], [0, 0]
    for j in order:
        e = enc[int(j)]
        if counts[0] < settings.max_positions:
            train.append(e)
            counts[0] += _n_positions(e)
        elif counts[1] < settings.held_out_positions:
            held.append(e)
            counts[1] += _n_positions(e)
        else:
            break
    if settings.held_out_positions and not held:
        raise UsageError(f"{len(enc)} problems give no held-out positions beyond the {settings.max_positions} "
                         "training ones; pass more problems or lower max_positions")
    return train, held


def _data_hash(train: list[EncodedProblem], held: list[EncodedProblem]) -> str:
    h = hashlib.sha256()
    for tag, part in ((b"T", train), (b"H", held)):
        for e in part:
            h.update(tag + json.dumps([e.prompt_len, e.ids]).encode() + b"\n")
    return h.hexdigest()


@torch.inference_mode()
def capture_positions(model: Instrumented, problems: Sequence[EncodedProblem], limit: int, batch_size: int = 64
                      ) -> Float[Tensor, "positions layer d_model"]:
    """Residuals (every lens layer) at every completion prediction position, at most ``limit``."""
    out: list[Tensor] = []
    total = 0
    for start in range(0, len(problems), batch_size):
        if total >= limit:
            break
        batch = problems[start: start + batch_size]
        ids = pad_ids([p.ids for p in batch], model.tokenizer.pad_id)
        attn = pad_ids([[1] * len(p.ids) for p in batch], 0).bool()
        pos = [list(range(p.prompt_len - 1, len(p.ids) - 1)) for p in batch]
        _, resid = model.capture(ids, attn, pad_ids(pos, 0), torch.zeros((len(batch), 1), dtype=torch.long))
        keep = torch.cat([resid[i, : len(pos[i])] for i in range(len(batch))]).float().cpu()
        out.append(keep)
        total += keep.shape[0]
    if not out:
        return torch.zeros((0, model.n_layers + 1, model.d_model))
    resid = torch.cat(out)[:limit]
    if not bool(torch.isfinite(resid).all()):
        raise UsageError(f"{model.path}: non-finite residual stream on the tuned-lens training text; no lens is fitted")
    return resid


# ------------------------------------------------------------------------------------ fitting
def _kl_per_layer(lens_fn: Callable[[Tensor], Tensor], lens: TunedLens, resid: Tensor, target_logp: Tensor | None,
                  chunk: int = 4096) -> np.ndarray:
    """Mean KL(final || tuned lens_l) per layer l = 0..n_layers over ``resid``'s positions."""
    n = lens.n_layers
    tot = torch.zeros(n + 1, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, resid.shape[0], chunk):
            r = resid[s: s + chunk]
            logits = lens_fn(lens.translate(r))
            final = logits[:, n:] if target_logp is None else target_logp[s: s + chunk, None]
            tot += kl(final, logits).double().sum(dim=0).cpu()
    return (tot / max(1, resid.shape[0])).numpy()


def _targets(lens_fn: Callable[[Tensor], Tensor], resid: Tensor, n: int) -> Tensor | None:
    """The final distribution's log-probs per position, kept when they fit in 256 MiB (else recomputed per step)."""
    with torch.no_grad():
        vocab = lens_fn(resid[:1, n]).shape[-1]
        if resid.shape[0] * vocab * 4 > (256 << 20):
            return None
        return torch.cat([torch.log_softmax(lens_fn(resid[s: s + 4096, n]).float(), -1)
                          for s in range(0, resid.shape[0], 4096)])


def _train(lens_fn: Callable[[Tensor], Tensor], resid: Tensor, target_logp: Tensor | None, n: int, d_model: int,
           settings: TunedLensSettings, seed: int) -> tuple[TunedLens, list[float]]:
    """The optimisation: sum over layers of the mean KL(final || tuned lens_l), translators only."""
    dev = resid.device
    lens = TunedLens(n, d_model).to(dev)
    params = [lens.A, lens.b]
    if settings.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=settings.learning_rate, momentum=settings.momentum,
                              nesterov=settings.momentum > 0, weight_decay=settings.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=settings.learning_rate, betas=(settings.momentum, 0.999), amsgrad=True,
                               weight_decay=settings.weight_decay)
    warm, steps = settings.warmup_steps, settings.steps

    def factor(s: int) -> float:  # linear warmup, then linear decay to 0 (transformers' linear schedule)
        if s < warm:
            return (s + 1) / warm
        return max(0.0, (steps - s) / max(1, steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(int(seed))
    N = resid.shape[0]
    bp = settings.batch_positions if 0 < settings.batch_positions < N else N
    losses: list[float] = []
    for _ in range(steps):
        idx = torch.randperm(N, generator=gen)[:bp].to(dev) if bp < N else None
        r = resid if idx is None else resid[idx]
        h = r[:, :n]
        moved = h + torch.einsum("lde,ble->bld", lens.A, h) + lens.b
        logq = torch.log_softmax(lens_fn(moved).float(), dim=-1)
        if target_logp is not None:
            logp = target_logp if idx is None else target_logp[idx]
        else:
            with torch.no_grad():
                logp = torch.log_softmax(lens_fn(r[:, n]).float(), dim=-1)
        p = logp.exp()[:, None]
        loss = (p * (logp[:, None] - logq)).sum(-1).mean(0).sum()  # sum over layers of the mean KL
        gA, gb = torch.autograd.grad(loss, params)  # the translators' gradients only: the model is untouched
        lens.A.grad, lens.b.grad = gA, gb
        if settings.clip:
            torch.nn.utils.clip_grad_norm_(params, settings.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
    return lens, losses


def fit_tuned_lens(
    model: Instrumented,
    data: Sequence[Problem | EncodedProblem] | None = None,
    seed: int = 0,
    settings: TunedLensSettings | None = None,
    exclude: Iterable[Problem | EncodedProblem | str] | None = None,
    batch_size: int = 64,
    _split_data: tuple[list[EncodedProblem], list[EncodedProblem]] | None = None,
) -> TunedLens:
    """Fit translators for ``model`` on completion positions of training text.

    ``data``: problems (or encoded problems) to train on, split by problem into training and
    held-out positions; None draws fresh problems from the checkpoint's task (``exclude`` their
    keys: pass the eval set). Same model, data, seed and settings give the same lens.
    """
    settings = (settings or TunedLensSettings()).check()
    t0 = time.perf_counter()
    lens_fn = final_lens_parts(model)
    if _split_data is not None:
        train_p, held_p = _split_data
    elif data is None:
        train_p, held_p = training_problems(model, settings, seed, exclude)
    else:
        train_p, held_p = _split(model, data, settings, seed)
    resid = capture_positions(model, train_p, settings.max_positions, batch_size)
    held = capture_positions(model, held_p, settings.held_out_positions, batch_size) if held_p else None
    if resid.shape[0] == 0:
        raise UsageError("the tuned-lens training text has no completion positions")
    t_capture = time.perf_counter() - t0
    dev = model.device
    resid = resid.to(dev).clone()  # a plain tensor (not an inference one), so autograd may save it
    with torch.no_grad():
        probe = resid[:2]
        if not torch.allclose(lens_fn(probe).float(), model.lens(probe).float().clone(), atol=1e-4, rtol=1e-4):
            raise UsageError(f"{model.path}: the final norm and unembedding found for the tuned lens do not "
                             "reproduce the model's logit lens")
    n = model.n_layers
    target_logp = _targets(lens_fn, resid, n)
    lens, losses = _train(lens_fn, resid, target_logp, n, model.d_model, settings, seed)
    if not (torch.isfinite(lens.A).all() and torch.isfinite(lens.b).all()):
        raise UsageError(f"{model.path}: the tuned lens diverged (non-finite translators); lower its learning rate")
    t_fit = time.perf_counter() - t0 - t_capture
    zero = TunedLens(n, model.d_model).to(dev)
    info: dict[str, Any] = {
        "checkpoint": {"identity": model.record.identity, "name": model.name, "path": str(model.path),
                       "format": model.format, "n_layers": n, "d_model": model.d_model},
        "settings": settings.to_dict(),
        "seed": int(seed),
        "data": {"hash": _data_hash(train_p, held_p), "source": "given" if data is not None else settings.source,
                 "train_problems": len(train_p), "held_out_problems": len(held_p),
                 "train_positions": int(resid.shape[0]), "held_out_positions": int(held.shape[0]) if held is not None else 0},
        "train_kl": {"tuned": _kl_per_layer(lens_fn, lens, resid, target_logp).tolist(),
                     "logit": _kl_per_layer(lens_fn, zero, resid, target_logp).tolist()},
        "loss_first_last": [losses[0], losses[-1]],
        "seconds": {"capture": round(t_capture, 3), "fit": round(t_fit, 3)},
    }
    if held is not None and held.shape[0]:
        held = held.to(dev).clone()
        info["held_out_kl"] = {"tuned": _kl_per_layer(lens_fn, lens, held, None).tolist(),
                               "logit": _kl_per_layer(lens_fn, zero, held, None).tolist()}
    lens.info = info
    return lens.cpu() if dev.type != "cpu" else lens


# ------------------------------------------------------------------------------------ cache
def _wanted(model: Instrumented, settings: TunedLensSettings, seed: int, data_hash: str) -> dict[str, Any]:
    return {"identity": model.record.identity, "settings": settings.to_dict(), "seed": int(seed), "data": data_hash}


def _recorded(info: dict[str, Any]) -> dict[str, Any]:
    return {"identity": (info.get("checkpoint") or {}).get("identity"), "settings": info.get("settings"),
            "seed": info.get("seed"), "data": (info.get("data") or {}).get("hash")}


def tuned_lens_for(
    model: Instrumented,
    cache_dir: str | Path,
    data: Sequence[Problem | EncodedProblem] | None = None,
    seed: int = 0,
    settings: TunedLensSettings | None = None,
    exclude: Iterable[Problem | EncodedProblem | str] | None = None,
    batch_size: int = 64,
    log: Callable[[str], None] | None = None,
    save: bool = True,
) -> TunedLens:
    """The lens saved under ``cache_dir/<checkpoint name>/`` if it was fitted on this checkpoint
    (identity), with these settings, seed and training data; else fitted now and saved there
    (``save=False``: not yet; the caller saves it with ``lens.save(cache_dir / model.name)`` once
    its measurement has finished, so a failed one leaves nothing behind)."""
    settings = (settings or TunedLensSettings()).check()
    final_lens_parts(model)  # a model the lens cannot read is refused before anything is drawn
    split = training_problems(model, settings, seed, exclude) if data is None else _split(model, data, settings, seed)
    want = _wanted(model, settings, seed, _data_hash(*split))
    d = Path(cache_dir) / model.name
    if (d / CONFIG).is_file():
        try:
            lens = load(d)
        except UsageError:
            lens = None
        if lens is not None and _recorded(lens.info) == want:
            return lens
        if log:
            log(f"{model.name}: saved tuned lens is for another checkpoint or settings; fitting it again")
    lens = fit_tuned_lens(model, data, seed, settings, exclude, batch_size, _split_data=split)
    if save:
        lens.save(d)
    return lens


# ------------------------------------------------------------------------------------ rows
