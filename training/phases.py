"""A checkpoint's place in its series: the phase order, its (phase, step), and which one is the base.

The rule lives here and only here; loading, the results table, the figures and the report all
call it. Phases run ``pretrain`` < ``base`` < ``sft``; any other phase name sorts after them,
alphabetically. The *base* of a series (the reference model every before/after comparison uses)
is the SFT checkpoint at step 0 (the pretrained model before fine-tuning); without one, the last
checkpoint whose phase is ``base``; without one, the last ``pretrain`` checkpoint; without any of
those, the first checkpoint in series order, which is then only the earliest measured, not a
model before SFT (:func:`base_position` says which case applies).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from training.errors import UsageError

PHASE_ORDER = ("pretrain", "base", "sft")
NATIVE_NAME = re.compile(r"^(?P<phase>[a-z]+)-step(?P<step>\d{6,})$")
_TRAILING_DIGITS = re.compile(r"(\d+)$")


def phase_rank(phase: str) -> int:
    """0, 1, 2 for pretrain, base, sft; 3 for any other phase."""
    return PHASE_ORDER.index(phase) if phase in PHASE_ORDER else len(PHASE_ORDER)


def series_key(phase: str, step: int, name: str = "") -> tuple[int, str, int, str]:
    """Sort key of a checkpoint in its series: phase order, then step, then name (a stable tie-break)."""
    return (phase_rank(phase), str(phase), int(step), str(name))


def base_position(entries: Sequence[tuple[str, int]]) -> tuple[int, str]:
    """(index of the base among ``(phase, step)`` pairs, why it is the base).

    The reason is ``"sft step 0"``, ``"base phase"``, ``"last pretrain"`` or ``"earliest"`` (no
    model before SFT is among them: the earliest in series order stands in).
    """
    if not entries:
        raise UsageError("no checkpoints: a series needs at least one")
    for i, (phase, step) in enumerate(entries):
        if phase == "sft" and int(step) == 0:
            return i, "sft step 0"
    for reason, wanted in (("base phase", "base"), ("last pretrain", "pretrain")):
        hits = [i for i, (phase, _) in enumerate(entries) if phase == wanted]
        if hits:
            return max(hits, key=lambda i: int(entries[i][1])), reason
    order = sorted(range(len(entries)), key=lambda i: series_key(entries[i][0], entries[i][1]))
    return order[0], "earliest"


def final_position(entries: Sequence[tuple[str, int]]) -> int:
    """Index of the last checkpoint in series order (the base itself when it is the only one)."""
    if not entries:
        raise UsageError("no checkpoints: a series needs at least one")
    return max(range(len(entries)), key=lambda i: series_key(entries[i][0], entries[i][1]))


def phase_step(name: str, meta: Mapping[str, Any], native: bool, where: str = "") -> tuple[str, int]:
    """A checkpoint directory's (phase, step): ``meta.json`` first, then its directory name.

    Native directories are named ``<phase>-step<NNNNNN>``. Other directories (Hugging Face) without
    a phase in meta.json are ``base`` when the name contains "base" and ``sft`` otherwise; without a
    step, the name's trailing digits (``checkpoint-400`` -> 400), else 0. A phase that is not a
    non-empty string, or a step that is not a whole number >= 0, is a user error naming ``where``.
    """
    at = f"{where}: " if where else ""
    phase, step = meta.get("phase"), meta.get("step")
    if phase is not None and (not isinstance(phase, str) or not phase.strip()):
        raise UsageError(f"{at}meta.json 'phase' must be a non-empty string (pretrain, base, sft), got {phase!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise UsageError(f"{at}meta.json 'step' must be a whole number >= 0, got {step!r}")
    match = NATIVE_NAME.match(name) if native else None
    if phase is None:
        if match:
            phase = match["phase"]
        else:
            phase = "base" if "base" in name.lower() else "sft"
    if step is None:
        if match:
            step = int(match["step"])
        else:
            digits = _TRAILING_DIGITS.search(name)
            step = int(digits.group(1)) if digits else 0
    return str(phase), int(step)
