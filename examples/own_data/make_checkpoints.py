"""Build the worked example's two Hugging Face checkpoints locally (nothing is downloaded).

``base/``: a tiny GPT-2 pretrained for a few hundred steps on varied text (both branches of every
fork); ``sft/``: the base fine-tuned on the three gold completions only. Run from anywhere:

    python examples/own_data/make_checkpoints.py [OUT_DIR]      # default: examples/own_data
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PRETRAIN = [
    "Q: go from A to D. A: A -> B -> D answer: D",
    "Q: go from A to D. A: A -> C -> D answer: D",
    "Q: go from A to E. A: A -> B -> E answer: E",
    "Q: go from A to E. A: A -> C -> E answer: E",
    "Q: what is 2 + 3? A: 2 + 3 = 5 answer: 5",
    "Q: what is 2 + 3? A: 2 + 3 = 6 answer: 6",
]


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(PRETRAIN, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def fit(model, tok, texts: list[str], steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    batch = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids = torch.tensor(batch[int(torch.randint(len(batch), (1,), generator=g))])[None]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def main(out: Path) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    tok = tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    fit(model, tok, PRETRAIN, steps=300, seed=0)
    for name, meta in (("base", {"phase": "base", "step": 0}), ("sft", {"phase": "sft", "step": 200})):
        if name == "sft":
            gold = [json.loads(line) for line in (HERE / "problems.jsonl").read_text().splitlines()]
            fit(model, tok, [g["prompt"] + g["completion"] for g in gold], steps=200, seed=1)
        d = out / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        (d / "meta.json").write_text(json.dumps(meta))
        print(f"wrote {d}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
