"""Every user mistake: one line on stderr, exit code 2, no traceback, and nothing written or changed.

The battery reads as a list of cases: each builds its broken input under a fresh directory, runs
the ``probes`` command in-process (``probes.cli.main``: the CLI edge itself, without paying a
Python start per case) and checks the message names the problem. The directory is snapshotted
(every file's bytes) before and after, so a case that half-writes or overwrites anything fails.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from probes.cli import main


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def one_line_exit_2(code: int, err: str, needle: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]


# ----------------------------------------------------------------------------- builders


def _ckpt(tiny_run: Path, tmp: Path, name: str = "sft-step000020") -> Path:
    """A copy of one tiny checkpoint inside a run-shaped directory (RUN/checkpoints/NAME + RUN/data)."""
    run = tmp / "run"
    if not (run / "data").is_dir():
        shutil.copytree(tiny_run / "data", run / "data")
    dest = run / "checkpoints" / name
    shutil.copytree(tiny_run / "checkpoints" / name, dest)
    return dest


def _edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def _eval(tiny_run: Path) -> str:
    return str(tiny_run / "data" / "eval.jsonl")


def corrupt_weights(t, tmp):
    ck = _ckpt(t, tmp)
    (ck / "model.safetensors").write_bytes(b"\x00garbage" * 50)
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "not a readable safetensors file"


def truncated_weights(t, tmp):
    ck = _ckpt(t, tmp)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "truncated or corrupt"


def config_is_a_list(t, tmp):
    ck = _ckpt(t, tmp)
    (ck / "config.json").write_text('["format", "fork-probes-native"]')
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "neither a fork-probes checkpoint"


def config_without_model(t, tmp):
    ck = _ckpt(t, tmp)
    _edit_json(ck / "config.json", lambda c: {k: v for k, v in c.items() if k != "model"})
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "has no 'model' object"


def config_without_tokenizer(t, tmp):
    ck = _ckpt(t, tmp)
    _edit_json(ck / "config.json", lambda c: {k: v for k, v in c.items() if k != "tokenizer"})
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "has no 'tokenizer' object"


def config_shapes_differ(t, tmp):
    ck = _ckpt(t, tmp)
    _edit_json(ck / "config.json", lambda c: {**c, "model": {**c["model"], "d_mlp": c["model"]["d_mlp"] * 2}})
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "weights do not match its config.json"


def meta_invalid(t, tmp):
    ck = _ckpt(t, tmp)
    (ck / "meta.json").write_text("{not json")
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "meta.json is not valid JSON"


def meta_step_not_integer(t, tmp):
    ck = _ckpt(t, tmp)
    _edit_json(ck / "meta.json", lambda m: {**m, "step": "twenty"})
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "'step' must be a whole number"


def meta_eval_outside_run(t, tmp):
    ck = _ckpt(t, tmp)
    outside = tmp / "elsewhere.jsonl"
    shutil.copy(_eval(t), outside)
    _edit_json(ck / "meta.json", lambda m: {**m, "data_dir": "../../..", "eval_file": "elsewhere.jsonl"})
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "outside the run directory"


def eval_not_utf8(t, tmp):
    ck = _ckpt(t, tmp)
    bad = tmp / "latin1.jsonl"
    bad.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    return ["run", "--checkpoints", str(ck), "--eval", str(bad), "--out", str(tmp / "res")], "not UTF-8"


def eval_task_not_a_string(t, tmp):
    ck = _ckpt(t, tmp)
    lines = Path(_eval(t)).read_text().splitlines()
    first = json.loads(lines[0])
    first["task"] = ["graph"]
    bad = tmp / "task.jsonl"
    bad.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    return ["run", "--checkpoints", str(ck), "--eval", str(bad), "--out", str(tmp / "res")], "'task' must be a task name"


def device_index_missing(t, tmp):
    ck = _ckpt(t, tmp)
    return ["run", "--checkpoints", str(ck), "--device", "cuda:7", "--out", str(tmp / "res")], "cuda:7"


def device_unknown(t, tmp):
    ck = _ckpt(t, tmp)
    return ["run", "--checkpoints", str(ck), "--device", "tpu", "--out", str(tmp / "res")], "unknown device 'tpu'"


def dtype_on_native(t, tmp):
    ck = _ckpt(t, tmp)
    return ["run", "--checkpoints", str(ck), "--dtype", "bfloat16", "--out", str(tmp / "res")], "applies to Hugging Face"


def corrupt_manifest_in_out(t, tmp):
    ck = _ckpt(t, tmp)
    (tmp / "res").mkdir()
    (tmp / "res" / "manifest.json").write_text("{truncated")
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "manifest.json is not valid JSON"


def manifest_without_identity(t, tmp):
    ck = _ckpt(t, tmp)
    (tmp / "res").mkdir()
    (tmp / "res" / "manifest.json").write_text('{"hello": 1}')
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "not a fork-probes results manifest"


def out_is_a_file(t, tmp):
    ck = _ckpt(t, tmp)
    (tmp / "res").write_text("a file")
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "is a file"


def out_is_someone_elses(t, tmp):
    ck = _ckpt(t, tmp)
    (tmp / "res").mkdir()
    (tmp / "res" / "notes.txt").write_text("mine")
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "is not a results directory"


def checkpoints_dot(t, tmp, monkeypatch=None):
    return ["run", "--checkpoints", str(tmp), "--out", str(tmp / "res")], "neither a fork-probes checkpoint"


def no_match(t, tmp):
    return ["run", "--checkpoints", str(tmp / "nothing-*")], "no checkpoint directory matches"


def k_above_n(t, tmp):
    ck = _ckpt(t, tmp)
    return ["run", "--checkpoints", str(ck), "--samples", "4", "--k", "8", "--out", str(tmp / "res")], "k=8 is not in 1..n=4"


def samples_zero(t, tmp):
    ck = _ckpt(t, tmp)
    return ["run", "--checkpoints", str(ck), "--samples", "0", "--out", str(tmp / "res")], "--samples must be"


def bad_strategy(t, tmp):
    ck = _ckpt(t, tmp)
    return ["run", "--checkpoints", str(ck), "--strategy", "hot:3", "--out", str(tmp / "res")], "unknown strategy name"


def prompt_longer_than_context(t, tmp):
    ck = _ckpt(t, tmp)
    first = json.loads(Path(_eval(t)).read_text().splitlines()[0])
    first["prompt"] = " ".join([first["prompt"]] * 5)
    bad = tmp / "long.jsonl"
    bad.write_text(json.dumps(first) + "\n")
    return ["run", "--checkpoints", str(ck), "--eval", str(bad), "--out", str(tmp / "res")], "longer than"


def _verifier_file(tmp: Path, body: str) -> str:
    f = tmp / "myverifier.py"
    f.write_text("import sys\n\ndef check(problem, completion):\n" + body + "\n")
    return f"{f}:check"


def verifier_raises(t, tmp):
    ck = _ckpt(t, tmp)
    spec = _verifier_file(tmp, "    raise RuntimeError('boom')")
    return ["run", "--checkpoints", str(ck), "--samples", "2", "--verifier", spec, "--out", str(tmp / "res"),
            "--quiet"], "raised RuntimeError: boom"


def verifier_not_bool(t, tmp):
    ck = _ckpt(t, tmp)
    spec = _verifier_file(tmp, "    return 'yes'")
    return ["run", "--checkpoints", str(ck), "--samples", "2", "--verifier", spec, "--out", str(tmp / "res"),
            "--quiet"], "it must return True or False"


def verifier_exits(t, tmp):
    ck = _ckpt(t, tmp)
    spec = _verifier_file(tmp, "    sys.exit(0)")
    return ["run", "--checkpoints", str(ck), "--samples", "2", "--verifier", spec, "--out", str(tmp / "res"),
            "--quiet"], "raised SystemExit"


def verifier_exits_on_import(t, tmp):
    ck = _ckpt(t, tmp)
    f = tmp / "exits.py"
    f.write_text("import sys\nsys.exit(3)\n")
    return ["run", "--checkpoints", str(ck), "--verifier", f"{f}:check", "--out", str(tmp / "res")], "cannot import"


def nan_weights(t, tmp):
    from safetensors.torch import load_file, save_file

    ck = _ckpt(t, tmp)
    w = load_file(str(ck / "model.safetensors"))
    name = sorted(w)[0]
    w[name].view(-1)[0] = float("nan")
    save_file(w, str(ck / "model.safetensors"))
    return ["run", "--checkpoints", str(ck), "--out", str(tmp / "res")], "non-finite (NaN or Inf) weight values"


def hf_remote_code(t, tmp):
    d = tmp / "evil"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "evil", "architectures": ["EvilForCausalLM"],
                                               "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    (d / "modeling_evil.py").write_text(f"open({str(tmp / 'pwned')!r}, 'w').write('ran')\n")
    return ["run", "--checkpoints", str(d), "--verifier", "exact", "--out", str(tmp / "res")], "model_type 'evil' is not supported"


def gguf_given(t, tmp):
    f = tmp / "model.gguf"
    f.write_bytes(b"GGUF")
    return ["run", "--checkpoints", str(f), "--out", str(tmp / "res")], "GGUF file"


def quantised_directory(t, tmp):
    d = tmp / "q4"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                               "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    return ["run", "--checkpoints", str(d), "--verifier", "exact", "--out", str(tmp / "res")], "holds quantised weights (gptq)"


def train_state_garbage(t, tmp):
    run = tmp / "trun"
    shutil.copytree(t, run)
    last = run / "checkpoints" / "sft-step000010"
    for later in ("sft-step000020",):
        shutil.rmtree(run / "checkpoints" / later)
    (last / "train_state.pt").write_bytes(b"\x80\x04not a pickle at all")
    return ["train", "--config", "tiny", "--out", str(run), "--quiet"], "not a fork-probes train state"


def train_state_code(t, tmp):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    run = tmp / "trun"
    shutil.copytree(t, run)
    shutil.rmtree(run / "checkpoints" / "sft-step000020")
    (run / "checkpoints" / "sft-step000010" / "train_state.pt").write_bytes(pickle.dumps(Evil()))
    return ["train", "--config", "tiny", "--out", str(run), "--quiet"], "refused unread"


def train_resume_corrupt_weights(t, tmp):
    run = tmp / "trun"
    shutil.copytree(t, run)
    shutil.rmtree(run / "checkpoints" / "sft-step000020")
    (run / "checkpoints" / "sft-step000010" / "model.safetensors").write_bytes(b"junk")
    return ["train", "--config", "tiny", "--out", str(run), "--quiet"], "not a readable safetensors file"


def train_resume_other_config(t, tmp):
    run = tmp / "trun"
    shutil.copytree(t, run)
    return ["train", "--config", "tiny", "--out", str(run), "model.d_model=64", "--quiet"], "model.d_model (32 -> 64)"


def train_base_corrupt(t, tmp):
    ck = _ckpt(t, tmp, "sft-step000000")
    (ck / "model.safetensors").write_bytes(b"junk" * 10)
    return ["train", "--config", "tiny", "--base", str(ck), "--out", str(tmp / "cell"), "--quiet"], "not a readable safetensors file"


def train_base_without_meta(t, tmp):
    ck = _ckpt(t, tmp, "sft-step000000")
    (ck / "meta.json").unlink()
    return ["train", "--config", "tiny", "--base", str(ck), "--out", str(tmp / "cell"), "--quiet"], "no meta.json"


def train_base_moved(t, tmp):
    moved = tmp / "moved-base"
    shutil.copytree(t / "checkpoints" / "sft-step000000", moved)
    return ["train", "--config", "tiny", "--base", str(moved), "--out", str(tmp / "cell"), "--quiet"], "outside its run directory"


def train_base_not_a_checkpoint(t, tmp):
    return ["train", "--config", "tiny", "--base", str(tmp), "--out", str(tmp / "cell"), "--quiet"], "not a fork-probes checkpoint"


def train_n_labels_abc(t, tmp):
    return ["train", "--config", "tiny", "--out", str(tmp / "o"), "task.n_labels=abc"], "task.n_labels takes a whole number"


def train_act_fn_bogus(t, tmp):
    return ["train", "--config", "tiny", "--out", str(tmp / "o"), "model.act_fn=bogus"], "model.act_fn must be one of"


def train_norm_bogus(t, tmp):
    return ["train", "--config", "tiny", "--out", str(tmp / "o"), "model.normalization_type=bogus"], "model.normalization_type"


def train_lr_infinite(t, tmp):
    return ["train", "--config", "tiny", "--out", str(tmp / "o"), "sft.lr=Infinity"], "sft.lr must be a finite number"


def train_unknown_key(t, tmp):
    return ["train", "--config", "tiny", "--out", str(tmp / "o"), "sft.stesp=3"], "did you mean sft.steps"


def train_device_missing(t, tmp):
    return ["train", "--config", "tiny", "--out", str(tmp / "o"), "--device", "cuda:7"], "cuda:7"


def _results_copy(tiny_results_dir: Path, tmp: Path) -> Path:
    dest = tmp / "results"
    shutil.copytree(tiny_results_dir, dest)
    return dest


def figures_corrupt_parquet(t, tmp, res):
    d = _results_copy(res, tmp)
    (d / "results.parquet").write_bytes(b"PAR1 not really")
    return ["figures", str(d)], "not a readable parquet file"


def figures_foreign_parquet(t, tmp, res):
    import pandas as pd

    d = tmp / "foreign"
    d.mkdir()
    pd.DataFrame({"a": [1, 2]}).to_parquet(d / "results.parquet")
    return ["figures", str(d)], "not a fork-probes results table"


def figures_out_is_a_file(t, tmp, res):
    d = _results_copy(res, tmp)
    (tmp / "figs").write_text("a file")
    return ["figures", str(d), "--out", str(tmp / "figs")], "is a file"


def figures_bad_manifest(t, tmp, res):
    d = _results_copy(res, tmp)
    (d / "manifest.json").write_text("[1, 2")
    return ["figures", str(d), "--out", str(tmp / "figs")], "manifest.json is not valid JSON"


def figures_bad_format(t, tmp, res):
    d = _results_copy(res, tmp)
    return ["figures", str(d), "--format", "gif"], "unknown figure format 'gif'"


def _sweep_config(tmp: Path, **changes) -> str:
    cfg = json.loads((Path(__file__).parents[1] / "training" / "configs" / "sweep-quick.json").read_text())
    cfg.update(changes)
    f = tmp / "sweep.json"
    f.write_text(json.dumps(cfg))
    return str(f)


def sweep_scalar_prevalence(t, tmp):
    return ["sweep", "--config", _sweep_config(tmp, prevalence=0.5), "--out", str(tmp / "sw")], "takes a list of numbers"


def sweep_bad_strategy(t, tmp):
    return ["sweep", "--config", _sweep_config(tmp, strategies=["temperature:0"]), "--out", str(tmp / "sw")], "T must be > 0"


def sweep_bad_samples(t, tmp):
    return ["sweep", "--config", _sweep_config(tmp, samples=0), "--out", str(tmp / "sw")], "'samples' takes a whole number"


def sweep_bad_override(t, tmp):
    return ["sweep", "--config", _sweep_config(tmp, overrides=["model.act_fn=bogus"]), "--out", str(tmp / "sw")], "model.act_fn"


def sweep_not_an_object(t, tmp):
    f = tmp / "sweep.json"
    f.write_text("[1]")
    return ["sweep", "--config", str(f), "--out", str(tmp / "sw")], "expected a JSON object"


RUN_CASES = [corrupt_weights, truncated_weights, config_is_a_list, config_without_model, config_without_tokenizer,
             config_shapes_differ, meta_invalid, meta_step_not_integer, meta_eval_outside_run, eval_not_utf8,
             eval_task_not_a_string, device_index_missing, device_unknown, dtype_on_native, corrupt_manifest_in_out,
             manifest_without_identity, out_is_a_file, out_is_someone_elses, checkpoints_dot, no_match, k_above_n,
             samples_zero, bad_strategy, prompt_longer_than_context, verifier_raises, verifier_not_bool,
             verifier_exits, verifier_exits_on_import, nan_weights, hf_remote_code, gguf_given, quantised_directory]
TRAIN_CASES = [train_state_garbage, train_state_code, train_resume_corrupt_weights, train_resume_other_config,
               train_base_corrupt, train_base_without_meta, train_base_moved, train_base_not_a_checkpoint,
               train_n_labels_abc, train_act_fn_bogus, train_norm_bogus, train_lr_infinite, train_unknown_key,
               train_device_missing]
FIGURE_CASES = [figures_corrupt_parquet, figures_foreign_parquet, figures_out_is_a_file, figures_bad_manifest,
                figures_bad_format]
SWEEP_CASES = [sweep_scalar_prevalence, sweep_bad_strategy, sweep_bad_samples, sweep_bad_override, sweep_not_an_object]


@pytest.mark.parametrize("case", RUN_CASES + TRAIN_CASES + SWEEP_CASES, ids=lambda c: c.__name__)
def test_mistake_is_one_line_and_changes_nothing(case, tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, needle = case(tiny_run, tmp_path)
    before = _snapshot(tmp_path)
    code, err = run_cli(argv, capsys)
    one_line_exit_2(code, err, needle)
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case", FIGURE_CASES, ids=lambda c: c.__name__)
def test_figures_mistake_is_one_line_and_changes_nothing(case, tiny_run, tiny_results, tmp_path, capsys):
    argv, needle = case(tiny_run, tmp_path, tiny_results[0])
    before = _snapshot(tmp_path)
    code, err = run_cli(argv, capsys)
    one_line_exit_2(code, err, needle)
    assert _snapshot(tmp_path) == before


def test_corrected_command_is_accepted_after_a_failed_one(tiny_run, tmp_path, capsys):
    """A run that failed on its first checkpoint (a raising verifier) leaves --out usable for the fix."""
    argv, needle = verifier_raises(tiny_run, tmp_path)
    code, err = run_cli(argv, capsys)
    one_line_exit_2(code, err, needle)
    fixed = _verifier_file(tmp_path, "    return completion.strip() == problem.answer")
    argv[argv.index("--verifier") + 1] = fixed
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    assert (tmp_path / "res" / "results.parquet").is_file()


def test_corrupt_part_in_out_is_refused(tiny_run, tmp_path, capsys):
    ck = _ckpt(tiny_run, tmp_path)
    argv = ["run", "--checkpoints", str(ck), "--samples", "2", "--out", str(tmp_path / "res"), "--quiet"]
    assert run_cli(argv, capsys)[0] == 0
    part = tmp_path / "res" / "checkpoints" / "sft-step000020.parquet"
    part.write_bytes(b"PAR1 broken")
    before = _snapshot(tmp_path)
    code, err = run_cli(argv, capsys)
    one_line_exit_2(code, err, "not a readable parquet file")
    assert _snapshot(tmp_path) == before


def test_library_reasons_are_cut_at_a_sentence_or_a_word():
    from training.errors import short_reason

    torch_msg = RuntimeError("Weights only load failed. In PyTorch 2.6, we changed the default value of `weights_only`")
    assert short_reason(torch_msg) == "Weights only load failed."
    assert short_reason(OSError("a; b")) == "a"
    assert short_reason(ValueError("")) == "ValueError"
    long = short_reason(ValueError("word " * 60), limit=30)
    assert long.endswith(" …") and len(long) <= 32 and not long[:-2].endswith("wor")
