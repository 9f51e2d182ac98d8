"""A tuned lens beside the logit lens: per-layer affine translators, trained per checkpoint.

Following tuned-lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with
the Tuned Lens"): for lens layer l < n_layers, ``logits_l = lens(h + A_l h + b_l)`` with A_l and
b_l initialised at zero (so the untrained tuned lens *is* the logit lens), then the model's own
final norm and unembedding. The translators are trained on the KL from the model's final
distribution to each layer's, summed over layers and averaged over completion positions of
training-distribution text, with SGD + Nesterov momentum (lr 1.0 * (1 - momentum), weight decay
1e-3, linear decay, gradient norm clipped at 1), the recipe's defaults; Adam (amsgrad, lr 1e-3,
warmup 20%) is the alternative (on the default graph model it is no better held out: see
``TunedLensSettings``). Layer n_layers, the stream after the last block, gets the
identity translator (no parameters): its tuned lens is the model's output.

The PyPI package ``tuned-lens`` (0.2.0) installs beside this environment's torch and
transformers, but its ``Unembed`` asks ``isinstance(model, transformer_lens.HookedTransformer)``
first, which raises ImportError under TransformerLens 4 for every model (HF ones included); it
reaches the final norm only for a fixed list of HF classes and saves pickles. The translator is
small, so it lives here, on the ``Instrumented`` interface, for native and HF checkpoints alike.

A lens on disk is two files in one directory: ``translators.safetensors`` (A [n_layers, d, d],
b [n_layers, d]) and ``tuned_lens.json`` (the checkpoint's identity, the settings, the training
data's hash, held-out KL per layer for the tuned and the logit lens, the weights' sha256), each
written atomically, weights first. :func:`tuned_lens_for` reuses a saved lens only when all of
identity, settings and data match, and refits otherwise: never a stale lens. Fitting and the
cache live in :mod:`analysis.tuned_lens_fit`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from analysis.metrics import branch_mass, kl, mass_top_branch, mass_valid
from hooks.base import Instrumented
from hooks.distributions import unusable
from hooks.encode import EncodedProblem
from training.errors import UsageError
from training.io import atomic_write, read_json_object, sha256_file

FORMAT = "fork-probes tuned lens"
VERSION = 1
WEIGHTS = "translators.safetensors"
CONFIG = "tuned_lens.json"
SOURCES = ("problems", "pretrain", "mixed")

__all__ = ["TunedLens", "TunedLensSettings", "load", "tuned_lens_rows", "final_lens_parts"]


@dataclass(frozen=True)
class TunedLensSettings:
    """Everything that changes a fitted lens's numbers (besides the checkpoint and the data)."""

    optimizer: str = "sgd"
    """``sgd`` (Nesterov momentum, the recipe) or ``adam``."""
    steps: int = 100
    """The recipe's 250 steps draw fresh tokens every step; here a pool of ``max_positions`` is
    reused, and on the default graph model held-out KL is best near 100 steps of 512 positions."""
    lr: float | None = None
    """None: the recipe's, 1.0 * (1 - momentum) for SGD, 1e-3 for Adam."""
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 1.0
    warmup: int | None = None
    """None: 0 for SGD, steps // 5 for Adam (the recipe's)."""
    max_positions: int = 2048
    """Training positions (completion positions of training text), at most."""
    held_out_positions: int = 512
    """Positions of other problems, never trained on, for the held-out KL."""
    batch_positions: int = 512
    """Positions per step, drawn afresh each step from the pool; 0 trains on all of them every step."""
    source: str = "problems"
    """Generated training text: ``problems`` (gold completions, the kinds in turn), ``pretrain``
    (the task's diverse pretraining examples) or ``mixed`` (alternating)."""

    def check(self) -> "TunedLensSettings":
        if self.optimizer not in ("sgd", "adam"):
            raise UsageError(f"tuned lens optimizer {self.optimizer!r}: use 'sgd' or 'adam'")
        if self.source not in SOURCES:
            raise UsageError(f"tuned lens source {self.source!r}: use one of {', '.join(SOURCES)}")
        for name in ("steps", "max_positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"tuned lens {name} must be a whole number >= 1, got {v!r}")
        for name in ("held_out_positions", "batch_positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UsageError(f"tuned lens {name} must be a whole number >= 0, got {v!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise UsageError(f"tuned lens momentum must lie in [0, 1), got {self.momentum!r}")
        return self

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 1.0 * (1.0 - self.momentum) if self.optimizer == "sgd" else 1e-3

    @property
    def warmup_steps(self) -> int:
        if self.warmup is not None:
            return int(self.warmup)
        return 0 if self.optimizer == "sgd" else min(1000, self.steps // 5)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ the lens
def final_lens_parts(model: Instrumented) -> Callable[[Tensor], Tensor]:
    """The model's final norm then unembedding as a differentiable function (``model.lens`` runs
    in inference mode, so gradients cannot pass through it). A model whose final norm the toolkit
    does not know is one line."""
    bridge = getattr(model, "bridge", None)
    module = getattr(model, "module", None)
    arch = getattr(model, "_arch", None)
    fmt = getattr(model, "format", None)
    if fmt == "native" and isinstance(getattr(module, "ln_out", None), torch.nn.Module) and isinstance(
            getattr(module, "head", None), torch.nn.Module):
        # The plain module under the bridge: the same weights, without the bridge's hook dispatch
        # (half the cost per training step); fit_tuned_lens checks it against model.lens.
        norm, unembed = module.ln_out, module.head

        def f(x: Tensor) -> Tensor:
            return unembed(norm(x.to(model.device)))
    elif fmt == "native" and bridge is not None and hasattr(bridge, "ln_final") and hasattr(bridge, "unembed"):
        norm, unembed = bridge.ln_final, bridge.unembed

        def f(x: Tensor) -> Tensor:
            return unembed(norm(x.to(model.device)))
    elif fmt == "hf" and arch is not None and getattr(arch, "norm", None) is not None:
        norm, unembed, dtype = arch.norm, arch.unembed, getattr(model, "dtype", torch.float32)

        def f(x: Tensor) -> Tensor:
            return unembed(norm(x.to(model.device, dtype))).float()
    else:
        raise UsageError(f"{getattr(model, 'path', model)}: no final norm the toolkit knows for a "
                         f"{type(model).__name__} (format {fmt!r}); the tuned lens "
                         "needs the model's own final norm and unembedding")
    return f


class TunedLens(torch.nn.Module):
    """Translators for lens layers 0..n_layers-1; layer n_layers is the identity."""

    def __init__(self, n_layers: int, d_model: int, info: dict[str, Any] | None = None):
        super().__init__()
        self.n_layers, self.d_model = int(n_layers), int(d_model)
        self.A = torch.nn.Parameter(torch.zeros(self.n_layers, self.d_model, self.d_model))
        self.b = torch.nn.Parameter(torch.zeros(self.n_layers, self.d_model))
        self.info: dict[str, Any] = dict(info or {})
        """What ``tuned_lens.json`` records: checkpoint, settings, data, held-out KL, timings."""

    def translate(self, resid: Float[Tensor, "... layer d_model"]) -> Float[Tensor, "... layer d_model"]:
        """h + A_l h + b_l per layer l < n_layers (A applied as nn.Linear does), the last layer as is."""
        n = self.n_layers
        if resid.shape[-2:] != (n + 1, self.d_model):
            raise UsageError(f"tuned lens of {n + 1} layers x d_model {self.d_model} cannot read residuals shaped "
                             f"{tuple(resid.shape)}: pass [items, layer, d_model] with every lens layer")
        h = resid[..., :n, :]
        A, b = self.A.to(h.dtype), self.b.to(h.dtype)
        moved = h + torch.einsum("lde,...le->...ld", A, h) + b
        return torch.cat([moved, resid[..., n:, :]], dim=-2)

    def check_model(self, model: Instrumented) -> None:
        """Refuse a model the lens was not fitted on (another shape, or other weights: stale)."""
        if (model.n_layers, model.d_model) != (self.n_layers, self.d_model):
            raise UsageError(f"the tuned lens has {self.n_layers} layers x d_model {self.d_model} but {model.path} has "
                             f"{model.n_layers} x {model.d_model}; fit one for this checkpoint")
        ident = (self.info.get("checkpoint") or {}).get("identity")
        if ident is not None and ident != model.record.identity:
            raise UsageError(f"the tuned lens was fitted on another checkpoint than {model.path} (identity "
                             f"{str(ident)[:12]} vs {model.record.identity[:12]}): a stale lens; fit it again")

    @torch.inference_mode()
    def logits(self, model: Instrumented, resid: Float[Tensor, "items layer d_model"] | np.ndarray
               ) -> Float[Tensor, "items layer vocab"]:
        """Tuned-lens logits per layer through the model's own final norm and unembedding."""
        self.check_model(model)
        r = torch.as_tensor(resid).float().to(model.device)
        t = self.translate(r.to(self.A.device)).to(model.device)
        return model.lens(t).float()

    # --------------------------------------------------------------------------- saving
    def save(self, path: str | Path) -> Path:
        """``path/translators.safetensors`` then ``path/tuned_lens.json`` (with the weights' sha256), atomically."""
        from safetensors.torch import save_file

        d = Path(path)
        tensors = {"A": self.A.detach().cpu().float().contiguous(), "b": self.b.detach().cpu().float().contiguous()}
        atomic_write(d / WEIGHTS, lambda p: save_file(tensors, str(p)))
        info = {**self.info, "format": FORMAT, "version": VERSION, "n_layers": self.n_layers, "d_model": self.d_model,
                "weights_sha256": sha256_file(d / WEIGHTS)}
        atomic_write(d / CONFIG, lambda p: p.write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8"))
        self.info = info
        return d


def load(path: str | Path, model: Instrumented | None = None) -> TunedLens:
    """A saved lens; with ``model``, refused unless it was fitted on that very checkpoint."""
    from safetensors.torch import load_file

    d = Path(path)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise UsageError(f"{d} holds no tuned lens ({CONFIG} and {WEIGHTS}); fit one with fit_tuned_lens")
    info = read_json_object(d / CONFIG, "a tuned lens config", "fit the lens again")
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise UsageError(f"{d / CONFIG} is not a tuned lens of this version ({info.get('format')!r} "
                         f"v{info.get('version')}); fit the lens again")
    if info.get("weights_sha256") != sha256_file(d / WEIGHTS):
        raise UsageError(f"{d / WEIGHTS} is not the file {d / CONFIG} was written with (a write was cut short?); "
                         "fit the lens again")
    try:
        tensors = load_file(str(d / WEIGHTS))
        lens = TunedLens(int(info["n_layers"]), int(info["d_model"]), info)
        with torch.no_grad():
            lens.A.copy_(tensors["A"])
            lens.b.copy_(tensors["b"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise UsageError(f"{d}: the tuned lens weights do not match its config ({type(e).__name__}); fit it again") from None
    if not (torch.isfinite(lens.A).all() and torch.isfinite(lens.b).all()):
        raise UsageError(f"{d / WEIGHTS}: non-finite translator weights; fit the lens again")
    if model is not None:
        lens.check_model(model)
    return lens


# ------------------------------------------------------------------------------------ data
def _fork_branches(cap, encoded: Sequence[EncodedProblem]) -> tuple[Tensor, Tensor, Tensor]:
    """Branch ids and masks per decision point, in the order ``teacher_forced`` lists them."""
    max_b = cap.mass.shape[1]
    items = [(p.index, f) for p in encoded for f in p.forks]
    if len(items) != len(cap.problem) or any(int(i) != int(q) for (i, _), q in zip(items, cap.problem)):
        raise UsageError("the fork capture and the encoded problems differ: pass the problems teacher_forced was run on")
    bids = torch.zeros((len(items), max_b), dtype=torch.long)
    for j, (_, f) in enumerate(items):
        bids[j, : len(f.branch_ids)] = torch.tensor(f.branch_ids)
    return bids, torch.from_numpy(cap.branch_mask), torch.from_numpy(cap.valid_mask)


def tuned_lens_rows(model: Instrumented, lens: TunedLens, cap, encoded: Sequence[EncodedProblem],
                    where: dict[str, Any], rng: np.random.Generator, n_boot: int = 1000,
                    batch: int = 4096) -> list[dict]:
    """``tuned_lens_mass_valid``, ``tuned_lens_mass_top_branch`` and ``tuned_lens_kl_final`` per
    kind and layer, as ``fork_rows`` gives the ``lens_*`` rows (same kinds, same bootstrap), read
    from the fork capture's residuals (``cap = teacher_forced(model, encoded)``)."""
    from analysis.measure import _by_kind, layer_rows

    rows: list[dict] = []
    if not len(cap.problem):
        return rows
    lens.check_model(model)
    bids, bmask, vmask = _fork_branches(cap, encoded)
    masses, kls = [], []
    n = lens.n_layers
    for s in range(0, len(bids), batch):
        logits = lens.logits(model, torch.from_numpy(cap.resid[s: s + batch])).cpu()
        if bool(unusable(logits).any()):
            raise UsageError(f"{model.path}: non-finite tuned-lens logits; no number is reported for them")
        masses.append(branch_mass(logits, bids[s: s + batch], bmask[s: s + batch]))
        kls.append(kl(logits[:, n:], logits))  # the last layer's tuned lens is the model's output
    lmass = torch.cat(masses)
    tol = 1e-3 if getattr(model, "dtype", torch.float32) == torch.float32 else 5e-2
    if not np.allclose(lmass[:, n].numpy(), cap.mass, atol=tol):
        raise UsageError("the fork capture was not made with this checkpoint (its branch mass differs from the "
                         "model's own output): run teacher_forced with the same model")
    ltop = mass_top_branch(lmass, bmask).numpy()
    lvalid = mass_valid(lmass, vmask).numpy()
    lkl = torch.cat(kls).numpy()

    metrics = {"tuned_lens_mass_valid": lvalid, "tuned_lens_mass_top_branch": ltop, "tuned_lens_kl_final": lkl}
    for kind, sel in _by_kind(cap.kind):
        rows += layer_rows(metrics, sel, kind, rng, n_boot, where)
    return rows
