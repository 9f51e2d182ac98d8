"""Weight interpolation (WiSE-FT): exact endpoints, the midpoint tensor by tensor, both formats."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.test_bad_input import one_line_exit_2, run_cli
from training.errors import UsageError


def test_native_endpoints_and_midpoint(tiny_run, tmp_path):
    from hooks.load import load
    from hooks.record import read_record
    from training.interpolate import interpolate

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("results"))
    base, sft = run / "checkpoints" / "sft-step000000", run / "checkpoints" / "sft-step000020"
    paths = interpolate(base, sft, [0.0, 0.5, 1.0], log=lambda *_: None)
    assert [p.name for p in paths] == ["interp-a0.00", "interp-a0.50", "interp-a1.00"]
    wb, ws = load_file(str(base / "model.safetensors")), load_file(str(sft / "model.safetensors"))
    w0, w5, w1 = (load_file(str(p / "model.safetensors")) for p in paths)
    for k in ws:
        assert torch.equal(w0[k], wb[k]) and torch.equal(w1[k], ws[k])
        torch.testing.assert_close(w5[k], 0.5 * wb[k] + 0.5 * ws[k], atol=1e-7, rtol=0)
    rec = read_record(paths[1])
    assert (rec.phase, rec.step, rec.meta["alpha"]) == ("interp", 20, 0.5)
    assert rec.meta["parents"]["base"]["path"] == str(base.resolve())
    assert rec.eval_file() == (run / "data" / "eval.jsonl").resolve()  # the same eval set, from the new place
    model = load(paths[2])  # alpha 1 is the SFT model exactly
    ids = torch.randint(0, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.module(ids), load(sft).module(ids), atol=0, rtol=0)
    again = interpolate(base, sft, [0.5], log=lambda *_: None)  # same inputs: nothing rewritten
    assert (again[0] / "model.safetensors").read_bytes() == (paths[1] / "model.safetensors").read_bytes()


def test_hf_directories_interpolate_and_load(tmp_path):
    from hooks.hf import HFCheckpoint
    from tests.hf_fixtures import build_hf_checkpoint
    from training.interpolate import interpolate

    a = build_hf_checkpoint(tmp_path / "base", "llama", seed=1)
    b = build_hf_checkpoint(tmp_path / "sft", "llama", seed=2)
    (mid,) = interpolate(a, b, [0.25], out=tmp_path / "wise", log=lambda *_: None)
    ck = HFCheckpoint(mid)
    wa, wb = HFCheckpoint(a).module.state_dict(), HFCheckpoint(b).module.state_dict()
    for k, v in ck.module.state_dict().items():
        torch.testing.assert_close(v, 0.75 * wa[k] + 0.25 * wb[k], atol=1e-6, rtol=0)
    assert json.loads((mid / "meta.json").read_text())["alpha"] == 0.25


def test_interpolation_mistakes_are_one_line(tiny_run, tmp_path, capsys):
    from tests.hf_fixtures import build_hf_checkpoint

    base = str(tiny_run / "checkpoints" / "sft-step000000")
    sft = str(tiny_run / "checkpoints" / "sft-step000020")
    g = build_hf_checkpoint(tmp_path / "g", "gpt2")
    g2 = build_hf_checkpoint(tmp_path / "g2", "gpt2", n_embd=64)
    capsys.readouterr()  # the fixtures' own progress output
    one_line_exit_2(*run_cli(["interpolate", base, sft, "--alpha", "1.5", "--out", str(tmp_path / "o")], capsys),
                    "--alpha values must lie in [0, 1]")
    one_line_exit_2(*run_cli(["interpolate", base, str(g), "--out", str(tmp_path / "o")], capsys), "different formats")
    one_line_exit_2(*run_cli(["interpolate", str(g), str(g2), "--out", str(tmp_path / "o")], capsys),
                    "different architectures")
    (tmp_path / "file").write_text("x")
    one_line_exit_2(*run_cli(["interpolate", base, sft, "--out", str(tmp_path / "file")], capsys), "is a file")
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError, match="different tokenizers"):
        from training.interpolate import interpolate

        other = tmp_path / "other"
        shutil.copytree(sft, other)
        cfg = json.loads((other / "config.json").read_text())
        cfg["tokenizer"]["vocab"][-1] = "zzz"
        (other / "config.json").write_text(json.dumps(cfg))
        interpolate(base, other, [0.5], out=tmp_path / "o2")
