"""KV-cached incremental forward over a TransformerLens-native model's own parameters.

`NativeModel.forward` (what `bridge.original_model(ids)` runs) has no KV cache, so sampling
with it re-runs the whole sequence every step. `NativeKVStepper` computes the same function
one token at a time: `prefill` runs each prompt once and keeps its keys/values, shared by the
n sampled rows of that prompt; each `step` embeds one token per row, writes its key/value into
a per-row cache preallocated for max_new_tokens positions, attends over prompt + generated
keys with one softmax, and returns the next-token logits. It reads the model's modules at call time (no weight copies),
so a stepper stays correct while the model trains.

Supported: learned ("standard") or rotary positions (through `model.rotary.apply_rope`),
GQA (`n_key_value_heads`), `attn_only`, plain and gated MLPs (any `act_fn`, SoLU-LN),
every norm type (the model's own norm modules), attention-score and output-logit soft caps.
Not supported: bidirectional attention (no incremental form).

When handed a TransformerBridge (or a NativeModel inside one) it unwraps each bridge
component to the module underneath, for speed: hooks added to the bridge do NOT fire here.
Use the bridge itself when a hook must take part in a forward.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge.sources.native.model import (
    NativeGatedMLP,
    NativeMLP,
    NativeModel,
)
from transformer_lens.utilities.activation_functions import apply_softcap, softcap_enabled

from training.errors import UsageError

__all__ = ["NativeKVStepper", "native_model_of"]


def _unwrap(module: Any) -> Any:
    """The module a TransformerBridge component wraps (itself when it is not a bridge)."""
    while isinstance(module, nn.Module) and "_original_component" in module._modules:
        module = module._modules["_original_component"]
    return module


def native_model_of(model: Any) -> Optional[NativeModel]:
    """The NativeModel behind `model` (a NativeModel or a TransformerBridge over one), or None."""
    for candidate in (model, getattr(model, "original_model", None)):
        candidate = _unwrap(candidate)
        if isinstance(candidate, NativeModel):
            return candidate
    return None


class _Layer:
    """References to one block's modules, resolved once (weights are read at call time)."""

    def __init__(self, block: nn.Module):
        block = _unwrap(block)
        attn = _unwrap(block.attn)
        self.ln1 = _unwrap(block.ln1)
        self.q, self.k, self.v, self.o = (_unwrap(attn.q), _unwrap(attn.k), _unwrap(attn.v), _unwrap(attn.o))
        self.n_heads: int = attn.n_heads
        self.n_kv: int = attn.n_kv_heads
        self.d_head: int = attn.d_head
        self.inv_scale = 1.0 / float(attn.scale)
        self.softcap = float(attn.attn_scores_soft_cap)
        self.use_sdpa = not softcap_enabled(self.softcap)
        self.rotary = attn.rotary
        self.attn_only = bool(block.cfg.attn_only)
        self.mlp: Optional[Callable[[Tensor], Tensor]] = None
        if not self.attn_only:
            self.ln2 = _unwrap(block.ln2)
            self.mlp = self._make_mlp(_unwrap(block.mlp))

    @staticmethod
    def _make_mlp(mlp: nn.Module) -> Callable[[Tensor], Tensor]:
        if isinstance(mlp, NativeMLP):
            fc_in, fc_out, act = _unwrap(mlp.fc_in), _unwrap(mlp.fc_out), mlp.act
            ln = _unwrap(mlp.ln) if mlp.ln is not None else None

            def plain(x: Tensor) -> Tensor:
                mid = act(fc_in(x))
                return fc_out(ln(mid) if ln is not None else mid)

            return plain
        if isinstance(mlp, NativeGatedMLP):
            gate, up, down, act = _unwrap(mlp.gate), _unwrap(getattr(mlp, "in")), _unwrap(mlp.out), mlp.act

            def gated(x: Tensor) -> Tensor:
                return down(act(gate(x)) * up(x))

            return gated
        return mlp  # unknown MLP module: call it as the model does


class NativeKVStepper:
    """Prefill a batch of equal-length prompts, then step one token per row with a KV cache.

    The stepper protocol of `hooks.sampler`: `prefill(input_ids, max_new_tokens, repeats,
    lengths)` returns last-position logits for each (left-padded) prompt repeated `repeats`
    times (rows in problem-major order, like `repeat_interleave`), `step(next_ids)` appends one
    token per row and returns the logits after it. Equals `model(row_ids)[:, -1]` of each row's
    unpadded sequence at every step.
    """

    def __init__(self, model: Any):
        native = native_model_of(model)
        if native is None:
            raise UsageError(
                f"NativeKVStepper needs a TransformerLens NativeModel or a TransformerBridge "
                f"booted with boot_native, got {type(model).__name__}"
            )
        cfg = native.cfg
        if getattr(cfg, "attention_dir", "causal") != "causal":
            raise UsageError(
                f"cannot sample incrementally from a model with attention_dir={cfg.attention_dir!r}; "
                f"use a causal model"
            )
        self.model = native
        self.n_ctx: int = int(cfg.n_ctx)
        self._embed = _unwrap(native.tok_embed)
        self._pos = _unwrap(native.pos) if native.pos is not None else None
        self._layers = [_Layer(block) for block in native.layers]
        self._ln_out = _unwrap(native.ln_out)
        self._head = _unwrap(native.head)
        self._logit_cap = float(native.output_logits_soft_cap)
        # per layer: prompt keys/values [P, Hkv, s, d], generated keys/values [rows, Hkv, cap, d]
        self._cache: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._prompt_len = self._rows = self._new = self._capacity = 0
        self._pad_keys: Optional[Tensor] = None
        self._next_pos: Optional[Tensor] = None

    @property
    def device(self) -> torch.device:
        return self._embed.weight.device

    @property
    def vocab_size(self) -> int:
        return int(self._head.weight.shape[0])

    # ------------------------------------------------------------------ attention
    @staticmethod
    def _attend_prompt(layer: _Layer, q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor] = None) -> Tensor:
        """Causal self-attention over the prompt: q [b, H, s, d], k/v [b, Hkv, s, d].

        ``allowed`` [b, 1, s, s] (left-padded prompts): which keys each query may read — causal,
        real tokens only (a pad query reads itself, so its row is defined; nothing reads it).
        F.scaled_dot_product_attention when there is no score soft cap (it matches the model's
        matmul-softmax-matmul to ~1e-7 and is faster); steps use `_attend_step` instead, whose
        shared-prompt matmuls beat SDPA there (SDPA would need the prompt keys per sample).
        """
        rep = layer.n_heads // layer.n_kv
        if rep > 1:  # GQA, in repeat_interleave order like the model
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if layer.use_sdpa:
            if allowed is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.inv_scale)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=layer.inv_scale)
        scores = apply_softcap(torch.matmul(q, k.transpose(-2, -1)) * layer.inv_scale, layer.softcap)
        s = q.shape[-2]
        if allowed is None:
            allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    @staticmethod
    def _attend_step(
        layer: _Layer, q: Tensor, k_prompt: Tensor, v_prompt: Tensor, k_new: Tensor, v_new: Tensor,
        pad_keys: Optional[Tensor] = None,
    ) -> Tensor:
        """One query per row over [its problem's prompt keys ; its own generated keys].

        q [rows, H, 1, d]; k/v_prompt [P, Hkv, s, d] shared by the rows = P * m copies of each
        prompt (problem-major); k/v_new [rows, Hkv, t, d]; ``pad_keys`` [P, s], True at a left
        pad (never read). One softmax over both parts, so this is exactly attention over the
        whole sequence, but the prompt keys are read once per problem instead of once per sample.
        Returns [rows, H * d].
        """
        rows, n_heads, _, d = q.shape
        problems, n_kv, s, _ = k_prompt.shape
        m, rep, t = rows // problems, n_heads // n_kv, k_new.shape[2]
        # Head h reads KV head h // rep (repeat_interleave order), so group query heads per KV head.
        q_p = q.view(problems, m, n_kv, rep, d).permute(0, 2, 3, 1, 4).reshape(problems, n_kv, rep * m, d)
        scores_p = torch.matmul(q_p, k_prompt.transpose(-2, -1))  # [P, Hkv, rep*m, s]
        scores_p = scores_p.view(problems, n_kv, rep, m, s).permute(0, 3, 1, 2, 4).reshape(rows, n_kv, rep, s)
        scores_n = torch.matmul(q.view(rows, n_kv, rep, d), k_new.transpose(-2, -1))  # [rows, Hkv, rep, t]
        scores = apply_softcap(torch.cat([scores_p, scores_n], dim=-1) * layer.inv_scale, layer.softcap)
        if pad_keys is not None:  # after the soft cap, which would turn -inf into -cap
            hidden = pad_keys.repeat_interleave(m, dim=0)[:, None, None, :]  # [rows, 1, 1, s]
            scores[..., :s] = scores[..., :s].masked_fill(hidden, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        w_p, w_n = weights.split([s, t], dim=-1)
        w_p = w_p.view(problems, m, n_kv, rep, s).permute(0, 2, 3, 1, 4).reshape(problems, n_kv, rep * m, s)
        out_p = torch.matmul(w_p, v_prompt).view(problems, n_kv, rep, m, d).permute(0, 3, 1, 2, 4)
        out_n = torch.matmul(w_n, v_new)  # [rows, Hkv, rep, d]
        return (out_p.reshape(rows, n_kv, rep, d) + out_n).reshape(rows, n_heads * d)

    def _qkv(self, layer: _Layer, h: Tensor, position_ids: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        b, s, _ = h.shape
        q = layer.q(h).view(b, s, layer.n_heads, layer.d_head).transpose(1, 2)
        k = layer.k(h).view(b, s, layer.n_kv, layer.d_head).transpose(1, 2)
        v = layer.v(h).view(b, s, layer.n_kv, layer.d_head).transpose(1, 2)
        if layer.rotary is not None:
            q, k = layer.rotary.apply_rope(q, k, position_ids=position_ids)
        return q, k, v

    def _finish(self, layer: _Layer, x: Tensor, attn: Tensor) -> Tensor:
        """Residual update from attention output [b, s, H * d], then the MLP."""
        x = x + layer.o(attn)
        if layer.mlp is not None:
            x = x + layer.mlp(layer.ln2(x))
        return x

    def _logits(self, x: Tensor) -> Tensor:
        return apply_softcap(self._head(self._ln_out(x)), self._logit_cap)

    # ------------------------------------------------------------------ protocol
    @torch.inference_mode()
    def prefill(
        self,
        input_ids: Int[Tensor, "batch pos"],
        max_new_tokens: int = 1,
        repeats: int = 1,
        lengths: Optional[Int[Tensor, " batch"]] = None,
    ) -> Float[Tensor, "batch_x_repeats vocab"]:
        """Run the prompts once; set up `repeats` rows per prompt (problem-major order).

        Prompts of different lengths come left-padded, with ``lengths`` the real tokens per row:
        each row's tokens keep their own positions (0 for its first real token) and no query
        reads a pad, so a padded row gives exactly its unpadded numbers. The prompt keys/values
        are kept once per prompt and shared by its rows; each row gets its own cache for
        max_new_tokens generated positions (the sampler steps at most max_new_tokens - 1
        times), preallocated so a step never concatenates.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise UsageError(f"prefill needs input_ids shaped [batch, pos] with pos >= 1, got {tuple(input_ids.shape)}")
        if max_new_tokens < 1 or repeats < 1:
            raise UsageError(f"max_new_tokens and repeats must be >= 1, got {max_new_tokens} and {repeats}")
        b, s = input_ids.shape
        if s + max_new_tokens - 1 > self.n_ctx:
            raise UsageError(
                f"prompt length {s} + max_new_tokens {max_new_tokens} - 1 exceeds the model's "
                f"context n_ctx={self.n_ctx}; shorten the prompt or max_new_tokens"
            )
        input_ids = input_ids.to(self.device)
        positions = allowed = pad_keys = None
        if lengths is not None and bool((lengths.to(self.device) < s).any()):
            lengths = lengths.to(self.device)
            if bool((lengths < 1).any()) or bool((lengths > s).any()):
                raise UsageError(f"prompt lengths must lie in 1..{s}, got {lengths.tolist()}")
            offset = (s - lengths)[:, None]
            cols = torch.arange(s, device=self.device)[None, :]
            positions = (cols - offset).clamp(min=0)  # [b, s]
            pad_keys = cols < offset  # [b, s]
            causal = torch.ones(s, s, dtype=torch.bool, device=self.device).tril()
            allowed = (causal[None] & ~pad_keys[:, None, :]) | torch.eye(s, dtype=torch.bool, device=self.device)[None]
            allowed = allowed[:, None]  # [b, 1, s, s]
        x = self._embed(input_ids)
        if self._pos is not None:
            x = x + (self._pos.weight[:s] if positions is None else self._pos.weight[positions])
        rows, capacity = b * repeats, min(max_new_tokens, self.n_ctx - s)
        self._cache = []
        for layer in self._layers:
            q, k, v = self._qkv(layer, layer.ln1(x), positions)
            k_new = k.new_empty(rows, layer.n_kv, capacity, layer.d_head)
            self._cache.append((k, v, k_new, torch.empty_like(k_new)))
            attn = self._attend_prompt(layer, q, k, v, allowed).transpose(1, 2).reshape(b, s, -1)
            x = self._finish(layer, x, attn)
        self._prompt_len, self._rows, self._new, self._capacity = s, rows, 0, capacity
        self._pad_keys = pad_keys
        real = lengths if positions is not None else torch.full((b,), s, device=self.device)
        self._next_pos = real.repeat_interleave(repeats) if repeats > 1 else real  # [rows]
        logits = self._logits(x[:, -1])
        return logits.repeat_interleave(repeats, dim=0) if repeats > 1 else logits

    @torch.inference_mode()
    def step(self, next_ids: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
        """Append one token per row; return next-token logits."""
        if not self._cache:
            raise UsageError("call prefill(...) before step(...)")
        if next_ids.shape != (self._rows,):
            raise UsageError(f"step needs one token id per row, shape ({self._rows},), got {tuple(next_ids.shape)}")
        t = self._new
        if t >= self._capacity:
            raise UsageError(
                f"KV cache is full after {t} new tokens (n_ctx={self.n_ctx}); prefill with a "
                f"larger max_new_tokens"
            )
        next_ids = next_ids.to(self.device)
        x = self._embed(next_ids).unsqueeze(1)
        pos = self._next_pos + t  # [rows]: each row's own position (left padding shifts it)
        if self._pos is not None:
            x = x + self._pos.weight[pos].unsqueeze(1)
        position_ids = pos[:, None]
        for layer, (k_prompt, v_prompt, k_new, v_new) in zip(self._layers, self._cache):
            q, k, v = self._qkv(layer, layer.ln1(x), position_ids)
            k_new[:, :, t] = k[:, :, 0]
            v_new[:, :, t] = v[:, :, 0]
            attn = self._attend_step(layer, q, k_prompt, v_prompt, k_new[:, :, : t + 1], v_new[:, :, : t + 1],
                                     self._pad_keys)
            x = self._finish(layer, x, attn.unsqueeze(1))
        self._new = t + 1
        return self._logits(x[:, 0])
