"""Hugging Face causal LMs from a local directory, instrumented through nnsight.

A directory holds what ``save_pretrained`` writes: ``config.json``, safetensors weights and the
tokenizer files (``tokenizer.json``). It is read from disk only: ``local_files_only=True`` and
Hub offline mode while loading, so nothing ever reaches the network, and ``trust_remote_code=False``
on every load, so a directory's own Python never runs and transformers never asks whether it
should. Optional ``meta.json`` gives the checkpoint's place in training (the rule is
``training.phases.phase_step``).

Measurements read the residual stream through one nnsight trace per batch (the input of every
decoder block, then the input of the final norm, which is the stream after the last block), so
layer numbering matches the native checkpoints (``hooks.base``). Module names per architecture
live in ``hooks.hf_arch``. Sampling bypasses nnsight: :class:`HFStepper` drives the model's own
forward with a ``DynamicCache``; hooks are not needed there and the per-token trace overhead
would dominate a small model.

The tokenizer (:class:`HFTokenizer`) adds no special tokens except a BOS where the tokenizer's
own default encoding starts with one (Llama-family tokenizers do; GPT-2's does not), because that
is the input the model was trained on. The BOS gets offsets (0, 0), so character offsets still
map to the same tokens in every encoding.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hooks.base import Instrumented
from hooks.hf_arch import ArchModules, arch_names, resolve
from hooks.record import CheckpointRecord
from training.checkpoint import check_finite
from training.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

__all__ = ["HFCheckpoint", "HFTokenizer", "HFStepper", "DTYPES", "parse_dtype", "load_hf_tokenizer"]


@contextlib.contextmanager
def offline(progress: bool = True) -> Iterator[None]:
    """Hub offline mode for the duration of a load, and transformers' progress bars off unless
    ``progress`` (both restored afterwards, whatever they were)."""
    from transformers.utils import logging as hf_logging

    try:
        import huggingface_hub.constants as hub
    except ImportError:  # pragma: no cover
        hub = None
    before = hub.HF_HUB_OFFLINE if hub is not None else None
    bars = hf_logging.is_progress_bar_enabled()
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hub is not None:
            hub.HF_HUB_OFFLINE = before
        if bars:
            hf_logging.enable_progress_bar()


def load_hf_tokenizer(path: Path, config: dict[str, Any]) -> "HFTokenizer":
    """The directory's fast tokenizer, from disk only and never with the directory's own code."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise UsageError(f"no tokenizer file tokenizer.json in {p}; save the tokenizer there with tokenizer.save_pretrained")
    with offline(progress=False):
        try:
            hf_tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"cannot load the tokenizer in {p}: {_first_line(e)}") from None
    stops = generation_config(p).get("eos_token_id")
    stops = [stops] if isinstance(stops, int) and not isinstance(stops, bool) else list(stops or [])
    return HFTokenizer(hf_tok, eos_fallback=config.get("eos_token_id"), where=str(p),
                       extra_stop_ids=[x for x in stops if isinstance(x, int) and not isinstance(x, bool)])


def generation_config(path: Path) -> dict[str, Any]:
    """generation_config.json of a directory ({} without one): its eos ids and max_new_tokens matter here."""
    from training.io import read_json_object

    f = Path(path) / "generation_config.json"
    return read_json_object(f, "a generation config", "fix or delete it") if f.is_file() else {}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` means float32: metrics compare small probability differences, so full precision by default."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UsageError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    if str(dtype) not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


# ---------------------------------------------------------------------------------- tokenizer
class HFTokenizer:
    """A fast Hugging Face tokenizer with the surface of ``training.tokenizer.WordTokenizer``."""

    kind = "hf"

    def __init__(self, tokenizer: Any, eos_fallback: int | Sequence[int] | None = None, where: str = "",
                 extra_stop_ids: Sequence[int] = ()):
        at = f"{where}: " if where else ""
        if not getattr(tokenizer, "is_fast", False):
            raise UsageError(
                f"{at}the tokenizer is not a fast tokenizer, which character offsets need; "
                "save one with tokenizer.json (PreTrainedTokenizerFast.save_pretrained)"
            )
        self.tok = tokenizer
        eos = tokenizer.eos_token_id
        if eos is None and eos_fallback is not None:
            eos = eos_fallback[0] if isinstance(eos_fallback, (list, tuple)) else eos_fallback
        if eos is None:
            raise UsageError(f"{at}the tokenizer has no eos_token and config.json no eos_token_id; set eos_token in tokenizer_config.json")
        self.eos_id = int(eos)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id
        bos = tokenizer.bos_token_id
        self.bos_id: int | None = None
        if bos is not None:
            with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
            plain = tokenizer("a", add_special_tokens=False)["input_ids"]
            if with_special[:1] == [bos] and plain[:1] != [bos]:
                self.bos_id = int(bos)
        self.stop_ids: frozenset[int] = frozenset([self.eos_id, *map(int, extra_stop_ids)])
        """Every id that ends a sample: the EOS and the generation config's eos_token_id list."""
        self.where = where
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.tok)

    def encode_with_offsets(self, text: str) -> list[tuple[int, tuple[int, int]]]:
        """(id, (start, end)) per token; a BOS, where the model expects one, comes first with (0, 0)."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        out = [(int(i), (int(s), int(e))) for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
        if self.bos_id is not None and (not out or out[0][0] != self.bos_id):  # a chat template may write it already
            out.insert(0, (self.bos_id, (0, 0)))
        return out

    def chat_prompt(self, user: str) -> str:
        """``user`` as the one user turn of the tokenizer's chat template, ready for the assistant's reply."""
        if not getattr(self.tok, "chat_template", None):
            at = f"{self.where}: " if self.where else ""
            raise UsageError(f"{at}the tokenizer has no chat template; drop --chat-template or save a tokenizer that has one")
        return self.tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return [i for i, _ in self.encode_with_offsets(text)]

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.tok)
        return self.tok.decode(
            [int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def decode_completion(self, ids: Sequence[int]) -> tuple[str, bool]:
        """Sampled ids to text, up to the first EOS; whether an EOS was emitted.

        Special tokens and ids past the tokenizer's vocabulary (padded embedding rows) are dropped,
        never raised on: a garbage sample is a failure for the verifier to score, not an error.
        """
        kept: list[int] = []
        for i in ids:
            i = int(i)
            if i in self.stop_ids:
                return self.decode(kept), True
            kept.append(i)
        return self.decode(kept), False

    def fingerprint(self) -> str:
        """Hash of the whole tokenizer (vocab, merges, normalisation, special tokens, BOS rule)."""
        if self._fingerprint is None:
            spec = json.loads(self.tok.backend_tokenizer.to_str())
            spec.pop("padding", None)
            spec.pop("truncation", None)
            spec["fork_probes"] = {"eos": self.eos_id, "pad": self.pad_id, "bos": self.bos_id, "stops": sorted(self.stop_ids)}
            blob = json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()
            self._fingerprint = "hf:" + hashlib.sha256(blob).hexdigest()[:16]
        return self._fingerprint


# ------------------------------------------------------------------------------------ stepper
class HFStepper:
    """KV-cached incremental decoding with the model's own forward and a ``DynamicCache``.

    The ``hooks.sampler`` stepper protocol: ``prefill`` runs (left-padded) prompts once and
    returns last-position logits for each prompt repeated ``repeats`` times (copies adjacent, as
    ``repeat_interleave``); ``step`` appends one token per row. With ``lengths`` (real tokens per
    row) the attention mask hides each row's left pads and position ids count its real tokens
    only, on the prompt and on every step, so each row equals its unpadded forward. Logits are
    float32.
    """

    def __init__(self, model: torch.nn.Module, max_len: int | None = None):
        self.model = model
        self.max_len = int(max_len) if max_len else 1 << 62  # None: no limit of our own
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        self._cache: Any = None
        self._len = 0
        self._mask: Tensor | None = None
        self._next_pos: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers: no config argument
            return DynamicCache()

    def _forward(self, ids: Tensor, mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        kwargs: dict[str, Any] = {self._cache_kw: self._cache, "use_cache": True}
        if self._keep_kw:
            kwargs["logits_to_keep"] = 1
        if mask is not None:
            kwargs["attention_mask"] = mask
            kwargs["position_ids"] = positions
        return self.model(input_ids=ids, **kwargs).logits[:, -1].float()

    @torch.inference_mode()
    def prefill(
        self, input_ids: Int[Tensor, "batch pos"], max_new_tokens: int = 1, repeats: int = 1,
        lengths: Int[Tensor, " batch"] | None = None,
    ) -> Float[Tensor, "rows vocab"]:
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise UsageError(f"prefill needs input_ids shaped [batch, pos] with pos >= 1, got {tuple(input_ids.shape)}")
        s = input_ids.shape[1]
        if s + max_new_tokens - 1 > self.max_len:
            raise UsageError(
                f"prompt length {s} + max_new_tokens {max_new_tokens} - 1 exceeds {self.max_len} tokens "
                "(the stepper's max_len or the model's context); shorten the prompt or max_new_tokens"
            )
        self._cache = self._new_cache()
        ids = input_ids.to(self.device)
        self._mask = self._next_pos = None
        if lengths is not None and bool((lengths < s).any()):
            lengths = lengths.to(self.device)
            cols = torch.arange(s, device=self.device)[None, :]
            mask = (cols >= (s - lengths)[:, None]).long()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self._forward(ids, mask, positions)
            self._mask = mask.repeat_interleave(repeats, dim=0) if repeats > 1 else mask
            self._next_pos = lengths.repeat_interleave(repeats) if repeats > 1 else lengths
        else:
            logits = self._forward(ids)
        if repeats > 1:
            self._cache.batch_repeat_interleave(repeats)
            logits = logits.repeat_interleave(repeats, dim=0)
        self._len = s
        return logits

    @torch.inference_mode()
    def step(self, next_ids: Int[Tensor, " rows"]) -> Float[Tensor, "rows vocab"]:
        if self._cache is None:
            raise UsageError("call prefill(...) before step(...)")
        if self._len >= self.max_len:
            raise UsageError(f"the sequence is at max_len={self.max_len} tokens; prefill with a larger max_new_tokens")
        ids = next_ids.to(self.device).view(-1, 1)
        if self._mask is None:
            logits = self._forward(ids)
        else:
            self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
            logits = self._forward(ids, self._mask, self._next_pos[:, None])
            self._next_pos = self._next_pos + 1
        self._len += 1
        return logits


# --------------------------------------------------------------------------------- checkpoint
def _dtype_kw() -> str:
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class HFCheckpoint(Instrumented):
    """A local Hugging Face causal LM: nnsight for captures, the plain module for sampling."""

    format = "hf"

    def __init__(self, record: CheckpointRecord | str | Path, device: torch.device | str = "cpu",
                 dtype: str | torch.dtype | None = None, progress: bool = False):
        from transformers import AutoModelForCausalLM

        self._adopt(record)
        p = self.path
        self.config: dict[str, Any] = self.record.config
        names = arch_names(self.config.get("model_type"), where=str(p))
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
        self.task_config: dict[str, Any] = self.record.task or {}

        with offline(progress):
            try:
                model, info = AutoModelForCausalLM.from_pretrained(
                    str(p), local_files_only=True, use_safetensors=True, output_loading_info=True,
                    trust_remote_code=False, **{_dtype_kw(): self.dtype},
                )
            except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
                raise UsageError(f"cannot load the model in {p}: {_first_line(e)}") from None
        missing = [k for k in info.get("missing_keys", []) if "rotary" not in k and "masked_bias" not in k]
        if missing:
            raise UsageError(f"weights in {p} do not match its config.json: missing {sorted(missing)[:3]}")
        mismatched = info.get("mismatched_keys") or []
        if mismatched:
            raise UsageError(f"weights in {p} do not match its config.json: shapes differ for {sorted(map(str, mismatched))[:2]}")
        check_finite(dict(model.named_parameters()), str(p))
        hf_tok = self.tokenizer.tok
        self.module = model.to(self.device).eval()
        vocab_rows = model.get_input_embeddings().weight.shape[0]
        if len(hf_tok) > vocab_rows:
            raise UsageError(
                f"{p}: the tokenizer has {len(hf_tok)} tokens but the model's embedding only {vocab_rows} rows; "
                "they are from different models"
            )
        self._arch: ArchModules = resolve(self.module, names, where=str(p))
        self.n_layers = len(self._arch.layers)
        cfg = model.config
        self.d_model = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))
        n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.n_ctx: int | None = int(n_ctx) if n_ctx else None
        self._check_lens()

        from nnsight.modeling.transformers import TransformersModel

        # nnsight adopts the tokenizer it is given (and sets its padding side / pad token), so
        # it gets a copy: our tokenizer's ids and fingerprint stay as saved.
        with offline(progress):
            self.nn = TransformersModel(self.module, tokenizer=copy.deepcopy(hf_tok))
        self._layer_envoys = [self._envoy(self._arch.layers_path)[l] for l in range(self.n_layers)]
        self._norm_envoy = self._envoy(self._arch.norm_path)
        self._head_envoy = self._envoy(self._arch.unembed_path)

    def _envoy(self, path: str) -> Any:
        e = self.nn
        for part in path.split("."):
            e = getattr(e, part)
        return e

    @torch.inference_mode()
    def _check_lens(self) -> None:
        """Refuse an architecture whose logits are not final norm then unembedding (soft-caps, scales)."""
        n = min(4, self.module.get_input_embeddings().weight.shape[0])
        ids = torch.arange(n, device=self.device)[None]
        seen: dict[str, Tensor] = {}
        handle = self._arch.norm.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
        try:
            logits = self.module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        finally:
            handle.remove()
        lensed = self.lens(seen["x"]) if "x" in seen else None
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        scale = float(logits.abs().max()) + 1.0
        if lensed is None or not torch.allclose(lensed, logits, rtol=tol, atol=tol * scale):
            raise UsageError(
                f"{self.path}: {self._arch.norm_path} then {self._arch.unembed_path} does not reproduce this "
                f"{type(self.module).__name__}'s logits (a logit soft-cap or scale?); the logit lens cannot read it"
            )

    @torch.inference_mode()
    def capture(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Bool[Tensor, "batch pos"],
        resid_pos: Int[Tensor, "batch m"],
        logit_pos: Int[Tensor, "batch q"],
    ) -> tuple[Float[Tensor, "batch q vocab"], Float[Tensor, "batch m layer d_model"]]:
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device).long()
        # Positions count real tokens, so right padding (what encode produces) and left padding
        # both keep every token at its own position.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = torch.arange(ids.shape[0], device=self.device)[:, None]
        rp = resid_pos.to(self.device)
        lp = logit_pos.to(self.device)
        picked: dict[int, Any] = {}
        layers, norm, head, n = self._layer_envoys, self._norm_envoy, self._head_envoy, self.n_layers
        # nnsight runs the body against the forward as it executes: read modules in that order.
        with self.nn.trace({"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}):
            for l in range(n):
                picked[l] = layers[l].input[rows, rp].save()
            picked[n] = norm.input[rows, rp].save()
            picked[-1] = head.output[rows, lp].save()
        resid = torch.stack([picked[l] for l in range(n + 1)], dim=2).float()
        return picked[-1].float(), resid

    @torch.inference_mode()
    def lens(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        x = resid.to(self.device, self.dtype)
        return self._arch.unembed(self._arch.norm(x)).float()

    @torch.inference_mode()
    def _patch_forward(self, input_ids: Tensor, attention_mask: Tensor, patch_pos: Tensor, layers: list[int],
                       replacement: Tensor, logit_pos: Tensor) -> Tensor:
        # One nnsight trace: each patched module's input is swapped for a copy with [rows, pos]
        # overwritten, in execution order (layers ascending, the final norm last), as capture reads.
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device).long()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = torch.arange(ids.shape[0], device=self.device)[:, None]
        pos = patch_pos.to(self.device)
        rep = replacement.to(self.device, self.dtype)
        lp = logit_pos.to(self.device)
        with self.nn.trace({"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}):
            for k, l in enumerate(layers):
                envoy = self._layer_envoys[l] if l < self.n_layers else self._norm_envoy
                x = envoy.input.clone()
                x[rows, pos] = rep[:, :, k]
                envoy.input = x
            out = self._head_envoy.output[rows, lp].save()
        return out.float()

    def stepper(self, max_len: int | None = None) -> HFStepper:
        """A fresh stepper for sequences up to ``max_len`` tokens (default and cap: the model's context)."""
        limits = [x for x in (max_len, self.n_ctx) if x]
        return HFStepper(self.module, max_len=min(limits) if limits else None)
