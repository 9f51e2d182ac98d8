"""Researcher verifiers: decide whether a sampled completion solves a problem, for pass@k.

A native checkpoint's task brings its own verifier (``training.tasks.get_task(cfg).verify``).
For a Hugging Face checkpoint, or to score differently, pass ``--verifier SPEC``:

``exact``
    Take the text after the LAST occurrence of the answer prefix (default ``"answer"``), drop
    leading whitespace and at most one ``:`` (then whitespace again), stop at the first newline,
    strip. Success iff that equals ``problem.answer.strip()``. No prefix in the completion ->
    False. ``"... answer: D"`` and ``"... answer D"`` both give ``"D"``; ``"answer: D then E"``
    gives ``"D then E"`` (not a match). With an empty prefix the whole completion is compared.

``math``
    The final answer of the completion checked against ``problem.answer`` with Hugging Face's
    ``math-verify`` (LaTeX, fractions, ``\\boxed{}``, equivalent forms: ``1/2`` matches
    ``$\\frac{1}{2}$`` and ``\\boxed{0.5}``), as reasoning evaluations score. It reads the last
    answer the completion gives (a boxed one first). Needs the package: ``pip install -e ".[math]"``.

``regex:PATTERN``
    ``re.search(PATTERN, completion)``, the first match. If the pattern has a capturing group,
    success iff group 1, stripped, equals the answer stripped (``regex:answer:\\s*(\\S+)``);
    without a group any match is success (``regex:\\bD\\b``). To read the last match, start the
    pattern with a greedy ``.*`` (``regex:(?s).*answer:\\s*(\\S+)``).

``module:function`` or ``path/to/file.py:function``
    Your own Python function::

        # my_checks.py
        from training.schema import Problem

        def numeric(problem: Problem, completion: str) -> bool:
            # problem.answer, problem.prompt and problem.extra (your JSONL's own fields) are there
            tail = completion.rsplit("answer", 1)[-1].strip(" :\\n")
            try:
                return abs(float(tail) - float(problem.answer)) < 1e-6
            except ValueError:
                return False  # garbage text is a wrong answer, not an error

    and pass ``--verifier my_checks:numeric`` (a module importable from ``sys.path`` or the
    current directory) or ``--verifier ./my_checks.py:numeric``. The function must return a
    bool and should itself return False on text it cannot parse: samples are often garbage. If
    it raises anyway, that is a bug in the verifier, not a wrong answer, so it is reported at
    once as a UsageError naming the function, the exception and the completion, rather than
    being counted as a failure that would silently bias pass@k.

The built-in verifiers never raise on any completion text.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from training.errors import UsageError
from training.schema import Problem

VerifyFn = Callable[[Problem, str], bool]

FORMS = "exact, math, regex:PATTERN, module:function or path/to/file.py:function"

__all__ = ["Verifier", "make_verifier", "verifier_for", "extract_answer", "FORMS"]


class Verifier:
    """A verifier with the spec it was made from (recorded in run manifests)."""

    def __init__(self, spec: str, fn: VerifyFn):
        self.spec = spec
        self._fn = fn

    def __call__(self, problem: Problem, completion: str) -> bool:
        return self._fn(problem, completion)

    def __repr__(self) -> str:
        return f"Verifier({self.spec!r})"


def extract_answer(completion: str, answer_prefix: str = "answer") -> str | None:
    """The answer text the ``exact`` verifier compares (see the module docstring), or None."""
    if not isinstance(completion, str):
        return None
    if answer_prefix:
        at = completion.rfind(answer_prefix)
        if at < 0:
            return None
        rest = completion[at + len(answer_prefix):].lstrip()
        if rest.startswith(":"):
            rest = rest[1:].lstrip()
    else:
        rest = completion.lstrip()
    return rest.split("\n", 1)[0].strip()


def _exact(answer_prefix: str) -> VerifyFn:
    def exact(problem: Problem, completion: str) -> bool:
        got = extract_answer(completion, answer_prefix)
        return got is not None and got == problem.answer.strip()

    return exact


def _math() -> VerifyFn:
    try:
        from math_verify import parse, verify
    except ImportError:
        raise UsageError('--verifier math needs the math-verify package: pip install -e ".[math]" '
                         "(or pip install math-verify)") from None
    golds: dict[str, Any] = {}

    def math(problem: Problem, completion: str) -> bool:
        if not isinstance(completion, str) or not completion.strip():
            return False
        answer = problem.answer.strip()
        if answer not in golds:
            golds[answer] = parse(answer if "$" in answer or "\\" in answer else f"${answer}$")
        try:
            return bool(verify(golds[answer], parse(completion)))
        except Exception:  # math-verify's own parse and timeout failures on garbage text: not a match
            return False

    return math


def _regex(pattern: str) -> VerifyFn:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UsageError(f"--verifier regex:{pattern} is not a valid regular expression ({e})") from None

    def regex(problem: Problem, completion: str) -> bool:
        if not isinstance(completion, str):
            return False
        m = rx.search(completion)
        if m is None:
            return False
        if rx.groups == 0:
            return True
        got = m.group(1)
        return got is not None and got.strip() == problem.answer.strip()

    return regex


def _import_function(target: str, name: str, spec: str) -> Callable[..., Any]:
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise UsageError(f"--verifier {spec}: no such file {path}")
        mod_name = f"_fork_probes_verifier_{abs(hash(str(path.resolve())))}"
        try:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ImportError(f"cannot load {path} as Python")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:  # a user's module can fail to import in any way, exit() included
            raise UsageError(f"--verifier {spec}: cannot import {path} ({type(e).__name__}: {e})") from None
    else:
        cwd = os.getcwd()
        added = cwd not in sys.path and "" not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(target)
        except (Exception, SystemExit) as e:
            raise UsageError(
                f"--verifier {spec}: cannot import module {target!r} ({type(e).__name__}: {e}); "
                "it must be importable from sys.path or the current directory, or give path/to/file.py:function"
            ) from None
        finally:
            if added:
                sys.path.remove(cwd)
    fn = getattr(module, name, None)
    if fn is None:
        raise UsageError(f"--verifier {spec}: {target} has no function {name!r}")
    if not callable(fn):
        raise UsageError(f"--verifier {spec}: {target}.{name} is a {type(fn).__name__}, not a function")
    return fn


def _user(fn: Callable[..., Any], spec: str) -> VerifyFn:
    def user(problem: Problem, completion: str) -> bool:
        try:
            out = fn(problem, completion)
        except (Exception, SystemExit) as e:  # sys.exit() in a verifier must not end the run silently
            text = str(completion)
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise UsageError(
                f"verifier {spec} raised {type(e).__name__}: {e} on completion {shown!r}; "
                "a verifier must return False for text it cannot parse"
            ) from e
        if type(out).__name__ in ("bool", "bool_") or (isinstance(out, int) and out in (0, 1)):
            return bool(out)
        raise UsageError(f"verifier {spec} returned {type(out).__name__} {out!r}; it must return True or False")

    return user


def make_verifier(spec: str | None, answer_prefix: str = "answer") -> Verifier | None:
    """A verifier from its spec (see the module docstring); None for None (use the task's own)."""
    if spec is None:
        return None
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"--verifier must be one of {FORMS}, got {spec!r}")
    spec = spec.strip()
    if spec == "exact":
        return Verifier(spec, _exact(answer_prefix))
    if spec == "math":
        return Verifier(spec, _math())
    if spec.startswith("regex:"):
        pattern = spec[len("regex:"):]
        if not pattern:
            raise UsageError("--verifier regex: needs a pattern after 'regex:'")
        return Verifier(spec, _regex(pattern))
    target, sep, name = spec.rpartition(":")
    if sep and target and name:
        if not name.isidentifier():
            raise UsageError(f"--verifier {spec}: {name!r} is not a Python function name")
        return Verifier(spec, _user(_import_function(target, name, spec), spec))
    raise UsageError(f"unknown --verifier {spec!r}; use one of {FORMS}")


def verifier_for(spec: str | None, task_config: dict[str, Any] | None, answer_prefix: str = "answer") -> Verifier:
    """The one way a run gets its verifier: ``spec`` if given, else the checkpoints' task's own.

    Without either there is no honest way to score a sample, so it is a user error (pass@k from a
    guessed answer format would be a wrong number, not a missing one).
    """
    if spec is not None:
        return make_verifier(spec, answer_prefix)
    if task_config:
        from training.tasks import get_task

        task = get_task(task_config)
        return Verifier(f"task:{task.name}", task.verify)
    raise UsageError(f"these checkpoints name no task whose verifier could score samples; pass --verifier ({FORMS})")
