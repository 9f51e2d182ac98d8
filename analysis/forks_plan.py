"""The inputs of ``probes forks``: problems read, settings checked, a plan made — nothing written.

See :mod:`analysis.forks` for the rule and the parameters.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hooks.encode import EncodeReport, encode_problem
from training.errors import UsageError
from training.schema import DecisionPoint, Problem, check_problem_tasks, iter_json_lines, problem_from_dict


DEFAULTS = {"samples": 16, "p": 0.02, "entropy_quantile": 0.7, "tau": 0.5}
"""Defaults of the rule (see the module docstring; chosen on a tuning split, not an eval set)."""
DEFAULT_STRATEGY = "temperature:1.0"
DEFAULT_HF_MAX_NEW_TOKENS = 512
GIVEN = "decision_points_given"


# ----------------------------------------------------------------------------- input
def read_problems(path: str | os.PathLike) -> list[Problem]:
    """Lines with prompt, completion, answer (``decision_points`` optional), validated as the
    schema validates them; the line's own decision points go to ``decision_points_given``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such file: {path} (give a JSONL file with prompt, completion, answer per line)")
    return [_as_problem(obj, where) for where, obj in iter_json_lines(path)]


def _as_problem(obj: Any, where: str) -> Problem:
    if isinstance(obj, Problem):
        obj = obj.to_dict()
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object with prompt, completion, answer")
    obj = dict(obj)
    had = "decision_points" in obj
    obj.setdefault("decision_points", [])
    p = problem_from_dict(obj, where)  # validates prompt/completion/answer and the given points
    if GIVEN in p.extra:
        given = p.extra[GIVEN]
        if not isinstance(given, list):
            raise UsageError(f"{where}: '{GIVEN}' must be a list of decision points")
        problem_from_dict({**obj, "decision_points": given}, f"{where} ({GIVEN})")
    elif had:
        p.extra[GIVEN] = [dp.to_dict() for dp in p.decision_points]
    return replace(p, decision_points=[])


def given_points(problem: Problem) -> list[DecisionPoint]:
    """The decision points a line came with (``decision_points_given``)."""
    d = problem.to_dict()
    return problem_from_dict({**d, "decision_points": d.get(GIVEN, [])}).decision_points


# ----------------------------------------------------------------------------- settings
def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class Settings:
    samples: int
    p: float
    entropy_quantile: float | None
    entropy: float | None
    tau: float
    max_new_tokens: int | None
    seed: int
    strategy: str


def check_settings(samples=None, p=None, entropy_quantile=None, entropy=None, tau=None, max_new_tokens=None,
                   seed=0, strategy=DEFAULT_STRATEGY) -> Settings:
    """Every parameter in its range, or one line naming it (the CLI's flag names)."""
    m = DEFAULTS["samples"] if samples is None else samples
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 2:
        raise UsageError(f"--samples must be a whole number ≥ 2 (continuations per alternative; one cannot "
                         f"estimate a success rate), got {samples!r}")
    p = DEFAULTS["p"] if p is None else _number("--p", p)
    if not 0.0 < p < 1.0:
        raise UsageError(f"--p must lie in (0, 1) (the mass a token needs to count as an alternative), got {p}")
    tau = DEFAULTS["tau"] if tau is None else _number("--tau", tau)
    if not 0.0 < tau <= 1.0:
        raise UsageError(f"--tau must lie in (0, 1] (the success rate a branch needs to count as valid), got {tau}")
    if entropy_quantile is not None and entropy is not None:
        raise UsageError("give --entropy-quantile or --entropy (an absolute threshold in nats), not both")
    if entropy is not None:
        entropy = _number("--entropy", entropy)
        if entropy < 0:
            raise UsageError(f"--entropy must be ≥ 0 nats, got {entropy}")
        q = None
    else:
        q = DEFAULTS["entropy_quantile"] if entropy_quantile is None else _number("--entropy-quantile", entropy_quantile)
        if not 0.0 < q < 1.0:
            raise UsageError(f"--entropy-quantile must lie in (0, 1) (0.7: the top 30% of positions), got {q}")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise UsageError(f"--max-new-tokens must be a whole number ≥ 1, got {max_new_tokens!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"--seed must be a whole number, got {seed!r}")
    from hooks.strategies import parse_strategy

    return Settings(int(m), p, q, entropy, tau, max_new_tokens, seed, str(parse_strategy(strategy)))


# ----------------------------------------------------------------------------- plan
@dataclass
class Encoded:
    ids: list[int]
    """Prompt, gold completion and EOS."""
    prompt_len: int


@dataclass
class ForkPlan:
    """Everything a discovery needs, checked; nothing is written before one exists."""

    model: Any
    """A loaded model, or the record of one to load."""
    tokenizer: Any
    name: str
    problems: list[Problem]
    encoded: list[Encoded]
    verifier: Callable[[Problem, str], bool]
    verifier_spec: str
    settings: Settings
    budget: int
    """Tokens a whole completion may take (prefix + forced token + continuation)."""
    n_ctx: int | None
    device: Any
    out: Path | None
    data_path: Path | None
    batch_size: int
    sample_batch: int
    user_prompts: list[str] | None = None
    """With a chat template: each line's own ``prompt`` (the user turn), written back in the output
    while ``problems`` hold the templated prompts the model reads."""


def candidates_path(out: str | os.PathLike) -> Path:
    """``FILE.candidates.parquet`` beside an output ``FILE.jsonl``."""
    out = Path(out)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".candidates.parquet")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _encode_all(tokenizer: Any, problems: list[Problem], where: str, name: str) -> list[Encoded]:
    """Prompt + completion + EOS for each problem; a completion the tokenizer cannot round-trip
    (an unknown word, the prompt/completion boundary inside a token, a decode that differs) is an
    error naming the line."""
    out = []
    for i, p in enumerate(problems):
        at = f"{where}: problem {i + 1}"
        try:
            e = encode_problem(tokenizer, replace(p, decision_points=[]), i, EncodeReport())
        except UsageError as err:
            raise UsageError(f"{at}: {name}'s tokenizer cannot encode it ({err})") from None
        if e is None:
            raise UsageError(f"{at}: the prompt/completion boundary falls inside a token of {name}'s tokenizer; "
                             "end the prompt where a token ends (e.g. move a space into the completion)")
        got, _ = tokenizer.decode_completion(e.ids[e.prompt_len:-1])
        if got != p.completion:
            shown = got if len(got) <= 60 else got[:57] + "..."
            raise UsageError(f"{at}: the completion does not round-trip through {name}'s tokenizer (decodes to "
                             f"{shown!r}); write it as the tokenizer decodes it")
        out.append(Encoded(e.ids, e.prompt_len))
    return out


def _as_verifier(verifier: Any, task: dict | None, answer_prefix: str) -> tuple[Callable, str]:
    from analysis.verifiers import verifier_for

    if callable(verifier) and not isinstance(verifier, str):
        return verifier, getattr(verifier, "spec", getattr(verifier, "__name__", "callable"))
    v = verifier_for(verifier, task, answer_prefix)
    return v, v.spec


def plan_forks(model: Any, data: Any, out: str | os.PathLike | None = None, verifier: Any = None,
               samples: int | None = None, p: float | None = None, entropy_quantile: float | None = None,
               entropy: float | None = None, tau: float | None = None, max_new_tokens: int | None = None,
               device: Any = None, seed: int = 0, answer_prefix: str = "answer", strategy: str = DEFAULT_STRATEGY,
               batch_size: int | None = None, sample_batch: int | None = None,
               chat_template: bool = False) -> ForkPlan:
    """Validate every input of a discovery and resolve its defaults, loading no weights, writing nothing.

    ``model``: a checkpoint directory (native or Hugging Face) or a loaded model (anything with
    ``tokenizer``, ``capture``, ``stepper()`` and ``device``). ``data``: a JSONL path, or a list of
    ``Problem`` / dicts. ``chat_template``: each line's ``prompt`` is the user turn of the
    tokenizer's chat template (as ``probes run --chat-template``); the output keeps the line's own.
    """
    from training.train import pick_device

    settings = check_settings(samples, p, entropy_quantile, entropy, tau, max_new_tokens, seed, strategy)
    if isinstance(model, (str, os.PathLike)):
        from hooks.record import read_record

        record = read_record(model)
        tokenizer, task, n_ctx, fmt, name = record.tokenizer, record.task, record.n_ctx, record.format, str(record.path)
        dev = pick_device(device)
        loaded: Any = record
    else:
        record = getattr(model, "record", None)
        tokenizer = model.tokenizer
        task = getattr(record, "task", None) or getattr(model, "task_config", None) or None
        n_ctx = getattr(model, "n_ctx", None)
        fmt = getattr(model, "format", "native")
        name = str(getattr(model, "path", type(model).__name__))
        dev = model.device
        loaded = model
    data_path = None
    if isinstance(data, (str, os.PathLike)):
        data_path = Path(data)
        problems = read_problems(data_path)
        where = str(data_path)
    else:
        problems = [_as_problem(d, f"problem {i + 1}") for i, d in enumerate(data)]
        where = "the problems"
    if not problems:
        raise UsageError(f"{where} holds no problems")
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        if out_path.is_dir():
            raise UsageError(f"--out {out_path} is a directory; give a file name (FILE.jsonl)")
        cand = candidates_path(out_path)
        if data_path is not None and (_same_file(out_path, data_path) or _same_file(cand, data_path)):
            raise UsageError(f"--out {out_path} is the input {data_path}; write the annotated copy to another file")
        if cand.is_dir():
            raise UsageError(f"{cand} (the candidate table beside --out) is a directory; choose another --out")
    check_problem_tasks(problems, task, where, "the model was")
    user_prompts = None
    if chat_template:
        chat = getattr(tokenizer, "chat_prompt", None)
        if chat is None:
            raise UsageError(f"{name}: --chat-template needs a Hugging Face tokenizer with a chat template; "
                             f"this checkpoint's tokenizer has none")
        user_prompts = [q.prompt for q in problems]
        problems = [replace(q, prompt=chat(q.prompt)) for q in problems]
    verify, spec = _as_verifier(verifier, task, answer_prefix)
    encoded = _encode_all(tokenizer, problems, where, name)
    longest = max(len(e.ids) for e in encoded)
    if n_ctx and longest > n_ctx:
        raise UsageError(f"{where} has sequences of {longest} tokens (prompt + completion + EOS), longer than "
                         f"{name}'s context {n_ctx}")
    need = max(len(e.ids) - e.prompt_len for e in encoded) + 2  # the longest gold completion (with EOS) + 2
    if settings.max_new_tokens is not None:
        if settings.max_new_tokens < need - 2:
            raise UsageError(f"--max-new-tokens {settings.max_new_tokens} is shorter than the longest completion of "
                             f"{where} ({need - 2} tokens with its EOS); it is the budget of a whole completion")
        budget = settings.max_new_tokens
    elif fmt == "native":
        budget = need
    else:
        from hooks.hf import generation_config

        path = getattr(record, "path", None)
        size = generation_config(path).get("max_new_tokens") if path is not None else None
        size = size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else DEFAULT_HF_MAX_NEW_TOKENS
        budget = max(size, need)
    cuda = getattr(dev, "type", str(dev)) == "cuda"
    if batch_size is None:
        batch_size = 64 if fmt == "native" else 8
    if sample_batch is None:
        sample_batch = 4096 if cuda else 256
    for nm, v in (("batch_size", batch_size), ("sample_batch", sample_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"{nm} must be a whole number ≥ 1, got {v!r}")
    return ForkPlan(loaded, tokenizer, name, problems, encoded, verify, spec, settings, budget, n_ctx, dev, out_path,
                    data_path, batch_size, sample_batch, user_prompts)


# ----------------------------------------------------------------------------- position statistics
