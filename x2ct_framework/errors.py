"""Errors that the command line reports as a message (exit status 2) instead of a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class X2CTError(Exception):
    """Base class for every error caused by the user's input (recipe, data, plugins, files)."""

    exit_code = 2


class RecipeError(X2CTError):
    """One or more problems in a recipe; `problems` holds every one, each a full sentence."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = [_clip(p) for p in self.problems[:MAX_PROBLEMS]]
        more = len(self.problems) - len(shown)
        if len(self.problems) == 1:
            msg = shown[0]
        else:
            msg = f"{len(self.problems)} problems in the recipe:\n" + "\n".join(f"  - {p}" for p in shown)
            if more:
                msg += f"\n  ... and {more} more (fix these and run again to see the rest)"
        super().__init__(msg)


MAX_PROBLEMS = 25  # problems listed in one message; the rest are counted
MAX_PROBLEM_CHARS = 2000  # a problem that echoes a huge value is cut


def _clip(text: str) -> str:
    text = str(text)
    if len(text) <= MAX_PROBLEM_CHARS:
        return text
    return f"{text[:MAX_PROBLEM_CHARS]}... ({len(text) - MAX_PROBLEM_CHARS} more characters)"


class PluginError(X2CTError):
    """A plugin could not be loaded, registered or built."""


class DataError(X2CTError):
    """A data file or folder is missing, unreadable or not what was expected."""


class CheckpointError(X2CTError):
    """A checkpoint is missing, damaged or does not fit the model."""


class FinalEvaluationError(X2CTError):
    """Training finished and its checkpoints are saved, but the end-of-run evaluation could not run."""

    exit_code = 4


def check_int(name: str, value: Any, minimum: int = 0, maximum: int | None = None, hint: str = "") -> int:
    """An option that must be an integer (not a bool) in ``[minimum, maximum]``: the value, else a ``ValueError``
    ``"<name> must be an integer >= <minimum>[ and <= <maximum>]<hint>, got <value>"``, which the registry reports
    as a recipe error naming the file and key. The one check of integer options for plugins and the core."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None
                                                                                   and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{upper}{hint}, got {value!r}")
    return value


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""
