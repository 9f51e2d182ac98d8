"""Builders for tiny Hugging Face checkpoints: random weights from a config, a tokenizer trained here.

Nothing is downloaded. Each builder writes a directory the way ``save_pretrained`` does
(config.json, model.safetensors, tokenizer.json + tokenizer_config.json), so ``hooks.hf`` loads it
exactly as it would load a researcher's local checkpoint. Models are 2 layers, hidden 32; the
tokenizer is a byte-level BPE trained on the sentences below (a few hundred tokens), with ``<eos>``
and, when asked, a ``<bos>`` that the tokenizer prepends (as Llama-family tokenizers do).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ARCHS = ("gpt2", "llama", "gpt_neox")

SENTENCES = [
    "Q: go from A to D. A: A -> B -> D answer: D",
    "Q: go from A to D. A: A -> C -> D answer: D",
    "Q: what is 2 + 3? A: 2 + 3 = 5 answer: 5",
    "Q: what is 4 + 4? A: 4 + 4 = 8 answer: 8",
    "the path goes left then right and ends at the goal",
    "the path goes right then left and ends at the goal",
    "answer: yes answer: no answer: maybe",
]


def build_tokenizer(bos: bool = False, pad: bool = True):
    """A fast byte-level BPE tokenizer; ``bos=True`` makes it prepend ``<bos>`` to every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    if bos:
        bos_id = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs: dict[str, Any] = {"eos_token": "<eos>"}
    if pad:
        kwargs["pad_token"] = "<pad>"
    if bos:
        kwargs["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def build_config(arch: str, vocab_size: int = 400, **overrides: Any):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if arch == "gpt2":
        kw = dict(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cfg = GPT2Config
    elif arch == "llama":
        kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        cfg = LlamaConfig
    elif arch == "gpt_neox":
        kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
                  hidden_dropout=0.0, attention_dropout=0.0)
        cfg = GPTNeoXConfig
    else:
        raise ValueError(f"no fixture for {arch!r}; have {ARCHS}")
    kw.update(overrides)
    return cfg(**kw)


def build_hf_checkpoint(
    path: str | Path,
    arch: str = "gpt2",
    seed: int = 0,
    bos: bool | None = None,
    meta: dict[str, Any] | None = None,
    tokenizer: bool = True,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random ``arch`` model and its tokenizer to ``path``; returns the path.

    ``bos`` defaults to True for Llama (its tokenizers prepend a BOS) and False otherwise.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(bos=(arch == "llama") if bos is None else bos)
    config_overrides.setdefault("vocab_size", len(tok))
    cfg = build_config(
        arch, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
        **config_overrides,
    )
    gen = torch.random.fork_rng()  # from_config draws from the global RNG; keep the caller's untouched
    with gen:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    model.save_pretrained(path)
    if tokenizer:
        tok.save_pretrained(path)
    if meta is not None:
        (path / "meta.json").write_text(json.dumps(meta))
    return path


def build_scripted_checkpoint(path: str | Path, text: str, meta: dict[str, Any] | None = None) -> Path:
    """A GPT-2 that writes ``text`` (then EOS) whatever it is fed, with probability ~1 at each token.

    Its blocks add nothing (output projections zero) and token embeddings are zero, so the
    residual is the position embedding alone; position embeddings are orthogonal, zero-mean
    vectors (the final LayerNorm only rescales them) and the untied unembedding maps position p
    to token p + 1 of ``text``. Sampled pass@k through a real pipeline is then known exactly.
    """
    from transformers import AutoModelForCausalLM

    path = build_hf_checkpoint(path, "gpt2", tie_word_embeddings=False, meta=meta)
    tok = build_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    d = model.config.n_embd
    if len(ids) > d - 1:
        raise ValueError(f"text is {len(ids)} tokens; a scripted model of width {d} holds at most {d - 1}")
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    centre = torch.ones(d, 1) / d**0.5  # orthonormal vectors orthogonal to all-ones have zero mean
    basis = torch.linalg.qr(torch.cat([centre, basis], dim=1))[0][:, 1:]
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias.zero_()
        model.lm_head.weight.zero_()
        for pos in range(len(ids) - 1):
            v = basis[:, pos]
            model.transformer.wpe.weight[pos] = v
            model.lm_head.weight[ids[pos + 1]] += 10.0 * v * d**0.5
    model.save_pretrained(path)
    return path
