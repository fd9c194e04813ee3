"""The error types netforge raises for bad input, and the did-you-mean helper.

A ``ConfigError`` is bad input from the user (a config file, a flag, a data file): the CLI prints
it on one line and exits with code 2. Anything else that escapes is a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NetforgeError(Exception):
    """Base class of every error netforge raises on purpose."""

    exit_code = 1


class ConfigError(NetforgeError):
    """Bad input, reported with where it is (file:line:col, layer name or key path)."""

    exit_code = 2

    def __init__(self, message: str, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" {self.hint}"
        return text


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """'(did you mean 'x'?)' for the closest choice, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not matches:
        lowered = {c.lower(): c for c in choices}
        if word.lower() in lowered:
            matches = [lowered[word.lower()]]
    return f"(did you mean '{matches[0]}'?)" if matches else None
