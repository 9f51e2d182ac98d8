"""The tuned lens: the recipe's fixed points (identity at zero, the last layer is the model's
output), that training helps held out, saving and the cache (never a stale lens), determinism,
the table rows, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from analysis import tuned_lens as tl
from analysis import tuned_lens_fit as tlf
from analysis.measure import fork_rows, teacher_forced
from hooks.base import Instrumented
from hooks.encode import encode_problems
from hooks.load import load
from training.errors import UsageError
from training.schema import read_jsonl

SMALL = tl.TunedLensSettings(steps=30, max_positions=256, held_out_positions=128, batch_positions=128)


@pytest.fixture(scope="module")
def model(tiny_run):
    return load(tiny_run / "checkpoints" / "sft-step000020")


@pytest.fixture(scope="module")
def eval_problems(tiny_run):
    return read_jsonl(tiny_run / "data" / "eval.jsonl")


@pytest.fixture(scope="module")
def fitted(model, eval_problems):
    return tlf.fit_tuned_lens(model, seed=0, exclude=eval_problems)


def _eval_batch(model, eval_problems, k=8):
    enc, _ = encode_problems(model.tokenizer, eval_problems[:k])
    enc = [e for e in enc if len(e.ids) == len(enc[0].ids)]
    ids = torch.tensor([e.ids for e in enc])
    pos = torch.tensor([list(range(e.prompt_len - 1, len(e.ids) - 1)) for e in enc])
    return ids, torch.ones_like(ids, dtype=torch.bool), pos


def test_last_layer_is_the_models_logits_and_zero_translators_are_the_logit_lens(model, fitted, eval_problems):
    ids, mask, pos = _eval_batch(model, eval_problems)
    logits, resid = model.capture(ids, mask, pos, pos)
    flat = resid.reshape(-1, model.n_layers + 1, model.d_model)
    tuned = fitted.logits(model, flat)
    assert tuned.shape == (flat.shape[0], model.n_layers + 1, logits.shape[-1])
    torch.testing.assert_close(tuned[:, -1], logits.reshape(-1, logits.shape[-1]), atol=1e-5, rtol=0)
    assert not torch.allclose(tuned[:, 0], model.lens(flat)[:, 0], atol=1e-3)  # earlier layers are translated
    zero = tl.TunedLens(model.n_layers, model.d_model)
    assert torch.equal(zero.logits(model, flat), model.lens(flat))  # A = 0, b = 0: exactly the logit lens


def test_translator_follows_the_recipe(model):
    """h + A h + b per layer, as nn.Linear applies A; the last layer untouched; the KL objective."""
    lens = tl.TunedLens(model.n_layers, model.d_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lens.A.copy_(torch.randn(lens.A.shape, generator=g) * 0.1)
        lens.b.copy_(torch.randn(lens.b.shape, generator=g))
    h = torch.randn(5, model.n_layers + 1, model.d_model, generator=g)
    out = lens.translate(h)
    for layer in range(model.n_layers):
        lin = torch.nn.Linear(model.d_model, model.d_model)
        with torch.no_grad():
            lin.weight.copy_(lens.A[layer])
            lin.bias.copy_(lens.b[layer])
            torch.testing.assert_close(out[:, layer], h[:, layer] + lin(h[:, layer]), atol=1e-6, rtol=0)
    assert torch.equal(out[:, -1], h[:, -1])
    assert {n for n, _ in lens.named_parameters()} == {"A", "b"}
    assert lens.A.shape == (model.n_layers, model.d_model, model.d_model)  # no translator for the last layer


def test_tuned_lens_beats_the_logit_lens_held_out(model, fitted, eval_problems):
    info = fitted.info
    held = info["held_out_kl"]
    n = model.n_layers
    assert held["tuned"][n] == pytest.approx(0.0, abs=1e-6) and held["logit"][n] == pytest.approx(0.0, abs=1e-6)
    for layer in range(n):
        assert held["tuned"][layer] < held["logit"][layer], (layer, held)
    # and on the eval set itself (never trained on: its problems were excluded), read as table rows
    enc, _ = encode_problems(model.tokenizer, eval_problems)
    cap = teacher_forced(model, enc)
    where = {"checkpoint": model.name, "phase": model.phase, "step": model.step}
    tuned = tl.tuned_lens_rows(model, fitted, cap, enc, where, np.random.default_rng(0), n_boot=50)
    plain = fork_rows(cap, where, np.random.default_rng(0), n_boot=50)
    val = {(r["metric"], r["kind"], r["layer"]): r for r in tuned + plain}
    for layer in range(n):
        assert val[("tuned_lens_kl_final", "all", layer)]["value"] < val[("lens_kl_final", "all", layer)]["value"]
    for metric in ("mass_valid", "mass_top_branch", "kl_final"):  # same kinds, layers and counts as the logit lens
        a = {(r["kind"], r["layer"], r["n"]) for r in tuned if r["metric"] == f"tuned_lens_{metric}"}
        b = {(r["kind"], r["layer"], r["n"]) for r in plain if r["metric"] == f"lens_{metric}"}
        assert a == b
    for kind in ("indecipherable", "decipherable", "multi-valid", "all"):  # the last layer is the model's output
        for metric in ("mass_valid", "mass_top_branch"):
            assert val[(f"tuned_lens_{metric}", kind, n)]["value"] == pytest.approx(
                val[(f"lens_{metric}", kind, n)]["value"], abs=1e-5)
    # the zero lens gives the logit lens's rows, interval included, under the same bootstrap stream
    zero = tl.TunedLens(n, model.d_model, {"checkpoint": {"identity": model.record.identity}})
    z = tl.tuned_lens_rows(model, zero, cap, enc, where, np.random.default_rng(1), n_boot=50)
    lens_only = [r for r in plain if r["metric"].startswith("lens_")]
    assert len(z) == len(lens_only)
    for r in z:
        ref = val[(r["metric"].removeprefix("tuned_"), r["kind"], r["layer"])]
        assert r["value"] == pytest.approx(ref["value"], abs=1e-6)


def test_rows_refuse_a_capture_of_another_model(tiny_run, model, fitted, eval_problems):
    other = load(tiny_run / "checkpoints" / "sft-step000000")
    enc, _ = encode_problems(model.tokenizer, eval_problems)
    cap = teacher_forced(other, enc)
    with pytest.raises(UsageError) as e:
        tl.tuned_lens_rows(model, fitted, cap, enc, {"checkpoint": "x", "phase": "sft", "step": 0},
                           np.random.default_rng(0), n_boot=10)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="stale"):
        fitted.logits(other, torch.zeros(1, other.n_layers + 1, other.d_model))


def test_save_load_round_trip(model, fitted, tmp_path):
    d = fitted.save(tmp_path / "lens")
    info = json.loads((d / "tuned_lens.json").read_text())
    assert info["checkpoint"]["identity"] == model.record.identity
    assert info["settings"] == tl.TunedLensSettings().to_dict() and len(info["held_out_kl"]["tuned"]) == model.n_layers + 1
    back = tl.load(d, model)
    assert torch.equal(back.A, fitted.A) and torch.equal(back.b, fitted.b)
    r = torch.randn(4, model.n_layers + 1, model.d_model, generator=torch.Generator().manual_seed(0))
    assert torch.equal(back.logits(model, r), fitted.logits(model, r))
    assert not list(d.glob(".*.tmp"))  # written atomically
    # weights that are not the ones the config was written with are refused, never read
    shutil.copy(d / "translators.safetensors", tmp_path / "keep")
    tl.TunedLens(model.n_layers, model.d_model).save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "translators.safetensors", d / "translators.safetensors")
    with pytest.raises(UsageError, match="fit the lens again"):
        tl.load(d)


def test_same_seed_same_lens(model, fitted, eval_problems):
    again = tlf.fit_tuned_lens(model, seed=0, exclude=eval_problems)
    assert torch.equal(again.A, fitted.A) and torch.equal(again.b, fitted.b)
    assert again.info["held_out_kl"] == fitted.info["held_out_kl"]
    other = tlf.fit_tuned_lens(model, seed=1, exclude=eval_problems, settings=SMALL)
    small = tlf.fit_tuned_lens(model, seed=0, exclude=eval_problems, settings=SMALL)
    assert not torch.equal(other.A, small.A)


def test_training_text_is_disjoint_from_the_eval_set(model, eval_problems):
    from training.tasks import get_task

    task = get_task(model.task_config)
    train, held = tlf.training_problems(model, SMALL, 0, eval_problems)
    keys = [task.key(e.problem) for e in train + held]
    assert len(set(keys)) == len(keys) and not set(keys) & {task.key(p) for p in eval_problems}
    assert sum(len(e.ids) - e.prompt_len for e in train) >= SMALL.max_positions


def test_cache_reuses_and_refits_when_the_checkpoint_changes(tiny_run, model, eval_problems, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = tlf.tuned_lens_for(model, cache, seed=0, settings=SMALL, exclude=eval_problems)
    fits = []
    real_fit = tlf.fit_tuned_lens
    monkeypatch.setattr(tlf, "fit_tuned_lens", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    again = tlf.tuned_lens_for(model, cache, seed=0, settings=SMALL, exclude=eval_problems)
    assert fits == [] and torch.equal(again.A, first.A)  # reused
    tlf.tuned_lens_for(model, cache, seed=0, settings=tl.TunedLensSettings(**{**SMALL.to_dict(), "steps": 31}),
                      exclude=eval_problems)
    assert fits == [1]  # other settings: fitted again
    # the same checkpoint name with other content (meta.json changed): another identity, refitted
    copy = tmp_path / "run" / "checkpoints" / model.name
    shutil.copytree(model.path, copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "note": "changed"}))
    changed = load(copy)
    assert changed.name == model.name and changed.record.identity != model.record.identity
    notes: list[str] = []
    lens = tlf.tuned_lens_for(changed, cache, seed=0, settings=SMALL, exclude=eval_problems, log=notes.append)
    assert fits == [1, 1] and lens.info["checkpoint"]["identity"] == changed.record.identity and notes
    with pytest.raises(UsageError, match="stale"):
        tl.load(cache / model.name, model)


class _NoNorm(Instrumented):
    """A checkpoint kind the toolkit does not know: no final norm to build a tuned lens on."""

    format = "custom"
    n_layers, d_model = 1, 4
    path = Path("custom-model")
    task_config: ClassVar[dict] = {}

    def capture(self, input_ids, attention_mask, resid_pos, logit_pos):  # pragma: no cover
        raise NotImplementedError

    def lens(self, resid):  # pragma: no cover
        return resid

    def stepper(self):  # pragma: no cover
        raise NotImplementedError


def test_model_without_a_known_final_norm_is_one_line(tmp_path):
    for call in (lambda: tlf.fit_tuned_lens(_NoNorm(), data=[]), lambda: tlf.tuned_lens_for(_NoNorm(), tmp_path)):
        with pytest.raises(UsageError) as e:
            call()
        assert "no final norm" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="optimizer"):
        tl.TunedLensSettings(optimizer="lbfgs").check()
