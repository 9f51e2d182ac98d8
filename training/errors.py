"""The one exception type for user mistakes.

Raised anywhere a caller handed us something wrong (a bad config key, a missing file, a
prevalence outside [0, 1]); the CLI catches it at the edge, prints the message as one line and
exits with code 2. Everything else is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """A user mistake: the message says what was wrong and how to fix it."""


def short_reason(error: BaseException, limit: int = 100) -> str:
    """A library error's first sentence, cut at a word within ``limit`` characters: enough to say why
    inside one line, never a clipped half-word."""
    text = " ".join(str(error).split()) or type(error).__name__
    for end in (". ", "; "):
        if end in text:
            text = text[: text.index(end) + 1].rstrip(";")
            break
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return text
