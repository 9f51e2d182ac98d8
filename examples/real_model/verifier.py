"""The verifier of examples/real_model/problems.jsonl: the last number in the answer, against the
problem's accepted answers (its ``answers`` field, or its ``answer``).

    probes run ... --verifier examples/real_model/verifier.py:last_number
"""

import re

from training.schema import Problem

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(problem: Problem, completion: str) -> bool:
    found = _NUMBER.findall(completion)
    if not found:
        return False  # no number: a wrong answer, not an error
    accepted = problem.extra.get("answers") or [problem.answer]
    return found[-1] in {str(a).strip() for a in accepted}
