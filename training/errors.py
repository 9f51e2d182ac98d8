"""The one exception type for user mistakes.

Raised anywhere a caller handed us something wrong (a bad config key, a missing file, a
prevalence outside [0, 1]); the CLI catches it at the edge, prints the message as one line and
exits with code 2. Everything else is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """A user mistake: the message says what was wrong and how to fix it."""
