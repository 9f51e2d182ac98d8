"""Verifier specs: exact, regex, a researcher's module or file, and their user errors."""

from __future__ import annotations

import sys
import textwrap

import pytest

from analysis.verifiers import extract_answer, make_verifier, verifier_for
from training.errors import UsageError
from training.schema import Problem


def P(answer: str = "D") -> Problem:
    return Problem(prompt="Q: go from A to D. A:", completion=" A -> B -> D answer: D", answer=answer, decision_points=[])


@pytest.mark.parametrize(
    "completion, ok",
    [
        (" A -> B -> D answer: D", True),
        (" answer D", True),
        ("answer:D\nQ: next question", True),  # the answer line ends at the newline
        ("answer: D\nQ: next question answer: E", False),  # ... but the LAST prefix is the one read
        (" answer: C answer:  D  ", True),  # the LAST occurrence counts
        (" answer: D answer: C", False),
        (" answer: D then E", False),  # the whole line is the answer, not its first word
        (" answer: DD", False),
        (" A -> B -> D", False),  # no prefix at all
        ("", False),
        ("answer:", False),
        ("\x00\uffff answer ::D", False),  # one ':' is dropped, not two
    ],
)
def test_exact(completion, ok):
    assert make_verifier("exact")(P(), completion) is ok


def test_exact_strips_the_gold_answer_and_takes_a_prefix():
    assert make_verifier("exact")(P("  D "), " answer: D")
    v = make_verifier("exact", answer_prefix="####")
    assert v(P("42"), "6 * 7 = 42\n#### 42")
    assert not v(P("42"), "answer: 42")
    assert extract_answer(" so the result is 5", "") == "so the result is 5"
    assert make_verifier("exact", answer_prefix="")(P("5"), "  5 \n")


def test_regex_with_and_without_a_group():
    grouped = make_verifier(r"regex:answer:\s*(\S+)")
    assert grouped(P(), " ... answer: D")
    assert not grouped(P(), " ... answer: C")
    assert not grouped(P(), " no answer here")
    assert not grouped(P(), " answer: C answer: D")  # re.search: the first match
    last = make_verifier(r"regex:(?s).*answer:\s*(\S+)")
    assert last(P(), " answer: C answer: D")
    optional = make_verifier(r"regex:x(y)?")
    assert not optional(P(), "x")  # the group did not take part: no answer to compare
    plain = make_verifier(r"regex:\bD\b")
    assert plain(P("ignored"), " A -> D")
    assert not plain(P("ignored"), " A -> DD")


def test_bad_specs_are_usage_errors():
    for spec in ("regex:(", "regex:", "fuzzy", "", "mod:not-a-name"):
        with pytest.raises(UsageError) as e:
            make_verifier(spec)
        assert "\n" not in str(e.value)
    assert make_verifier(None) is None


def test_module_function_from_a_file_and_from_sys_path(tmp_path, monkeypatch):
    src = textwrap.dedent(
        """
        def ends_with_answer(problem, completion):
            return completion.strip().endswith(problem.answer)

        def broken(problem, completion):
            return int(completion)

        def says_maybe(problem, completion):
            return None

        NOT_A_FUNCTION = 3
        """
    )
    f = tmp_path / "my_checks_fp.py"
    f.write_text(src)
    by_file = make_verifier(f"{f}:ends_with_answer")
    assert by_file(P(), " x -> D") and not by_file(P(), " x -> C")
    assert by_file.spec == f"{f}:ends_with_answer"

    monkeypatch.chdir(tmp_path)  # importable from the current directory
    by_module = make_verifier("my_checks_fp:ends_with_answer")
    assert by_module(P(), "D") and not by_module(P(), "C")
    sys.modules.pop("my_checks_fp", None)

    raising = make_verifier("my_checks_fp:broken")
    assert raising(P(), "1") is True  # int 1 is accepted as True
    with pytest.raises(UsageError, match=r"my_checks_fp:broken raised ValueError.*'garbage'"):
        raising(P(), "garbage")
    with pytest.raises(UsageError, match="must return True or False"):
        make_verifier("my_checks_fp:says_maybe")(P(), "x")
    with pytest.raises(UsageError, match="has no function 'missing'"):
        make_verifier("my_checks_fp:missing")
    with pytest.raises(UsageError, match="not a function"):
        make_verifier("my_checks_fp:NOT_A_FUNCTION")
    sys.modules.pop("my_checks_fp", None)


def test_modules_that_do_not_import(tmp_path):
    with pytest.raises(UsageError, match="cannot import module 'no_such_module_fp'"):
        make_verifier("no_such_module_fp:f")
    bad = tmp_path / "bad_fp.py"
    bad.write_text("import no_such_dependency_fp\n")
    with pytest.raises(UsageError, match="ModuleNotFoundError") as e:
        make_verifier(f"{bad}:f")
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no such file"):
        make_verifier(f"{tmp_path}/absent.py:f")


def test_verifier_for_falls_back_to_the_task():
    from training.tasks import get_task, task_names

    assert verifier_for("exact", None)(P(), "answer: D")
    with pytest.raises(UsageError, match="--verifier"):
        verifier_for(None, {})
    task = get_task({"name": task_names()[0]})
    v = verifier_for(None, task.config_dict())
    assert v.spec == f"task:{task.name}" and v._fn.__func__ is type(task).verify
