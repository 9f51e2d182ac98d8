"""The annotated-problem schema shared by generated corpora and researchers' own data.

One JSON object per line: ``{"prompt", "completion", "answer", "decision_points": [{"char",
"branches", "valid", "taken", "kind"}], ...}``. A decision point's ``char`` is an offset into
``completion`` where a branch starts; tokenizers map it to a token position. Extra keys (a task's
own fields) ride along untouched in ``Problem.extra``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from training.errors import UsageError
from training.io import atomic_write

KINDS = ("indecipherable", "decipherable", "multi-valid")


@dataclass
class DecisionPoint:
    char: int
    branches: list[str]
    valid: list[str]
    kind: str
    taken: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"char": self.char, "branches": self.branches, "valid": self.valid, "kind": self.kind}
        if self.taken is not None:
            d["taken"] = self.taken
        return d


@dataclass
class Problem:
    prompt: str
    completion: str
    answer: str
    decision_points: list[DecisionPoint]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "prompt": self.prompt,
            "completion": self.completion,
            "answer": self.answer,
            "decision_points": [dp.to_dict() for dp in self.decision_points],
        }
        d.update(self.extra)
        return d

    @property
    def kinds(self) -> set[str]:
        return {dp.kind for dp in self.decision_points}


def problem_from_dict(obj: Any, where: str = "") -> Problem:
    """Validate one line of the schema; every complaint names ``where`` (file:line)."""
    at = f"{where}: " if where else ""
    if not isinstance(obj, dict):
        raise UsageError(f"{at}expected a JSON object with prompt, completion, answer, decision_points")
    for key, typ in (("prompt", str), ("completion", str), ("answer", str), ("decision_points", list)):
        if key not in obj:
            raise UsageError(f"{at}missing field {key!r}; every line needs prompt, completion, answer, decision_points")
        if not isinstance(obj[key], typ):
            raise UsageError(f"{at}field {key!r} must be a {typ.__name__}, got {type(obj[key]).__name__}")
    dps = []
    for i, d in enumerate(obj["decision_points"]):
        here = f"{at}decision_points[{i}]"
        if not isinstance(d, dict):
            raise UsageError(f"{here}: expected an object with char, branches, valid, kind")
        for key in ("char", "branches", "valid", "kind"):
            if key not in d:
                raise UsageError(f"{here}: missing field {key!r} (needs char, branches, valid, kind; taken optional)")
        char = d["char"]
        if not isinstance(char, int) or isinstance(char, bool) or char < 0:
            raise UsageError(f"{here}: 'char' must be a non-negative integer offset into completion, got {char!r}")
        if char >= len(obj["completion"]):
            raise UsageError(
                f"{here}: char {char} is past the end of the completion ({len(obj['completion'])} characters); "
                "offsets count characters from the start of 'completion'"
            )
        branches, valid = d["branches"], d["valid"]
        if not isinstance(branches, list) or len(branches) < 2 or not all(isinstance(b, str) and b for b in branches):
            raise UsageError(f"{here}: 'branches' must list at least two non-empty strings")
        if len(set(branches)) != len(branches):
            raise UsageError(f"{here}: 'branches' has duplicates: {branches}")
        if not isinstance(valid, list) or not valid or any(v not in branches for v in valid):
            raise UsageError(f"{here}: 'valid' must be a non-empty subset of 'branches'")
        if d["kind"] not in KINDS:
            raise UsageError(f"{here}: kind {d['kind']!r} is not one of {', '.join(KINDS)}")
        taken = d.get("taken")
        if taken is not None and taken not in branches:
            raise UsageError(f"{here}: 'taken' {taken!r} is not one of the branches")
        dps.append(DecisionPoint(char=char, branches=list(branches), valid=list(valid), kind=d["kind"], taken=taken))
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "completion", "answer", "decision_points")}
    return Problem(obj["prompt"], obj["completion"], obj["answer"], dps, extra)


def check_problem_tasks(problems: Sequence[Problem], task: dict | None, where: str, trained: str) -> None:
    """Each line's optional ``task`` is a task name, and none names a task other than ``task``, the
    one ``trained`` ("the model was", "the checkpoints were") trained on."""
    for i, p in enumerate(problems, 1):
        t = p.extra.get("task")
        if t is not None and not isinstance(t, str):
            raise UsageError(f"{where}: problem {i}: 'task' must be a task name (a string), got {type(t).__name__}")
    if task:
        other = {p.extra.get("task") for p in problems} - {None, task.get("name")}
        if other:
            raise UsageError(f"{where} holds {sorted(other)[0]!r} problems but {trained} trained on {task.get('name')!r}")


def read_jsonl(path: str | os.PathLike) -> list[Problem]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such file: {path} (give a JSONL file of annotated problems)")
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[Problem]:
    for where, obj in iter_json_lines(path):
        yield problem_from_dict(obj, where)


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(``PATH:LINE``, parsed object) per non-blank line; one clear error for bytes or JSON that are not."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                                 "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            yield f"{path}:{lineno}", obj


def write_jsonl(path: str | os.PathLike, problems: Iterable[Problem]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for p in problems:
                f.write(json.dumps(p.to_dict(), separators=(",", ":")) + "\n")

    return atomic_write(path, write)
