"""The one exception type for foreseeable user mistakes.

Command-line entry points catch it and print its message as a single line on stderr with a non-zero exit
status (`run_command`); anything else escaping is a bug and keeps its traceback. A library raising it speaks
in its own terms and may name the `option` the user would change; the command line then names its flag.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix: the message says what, where, and what to do.

    `option`: the setting to change (a Config field or keyword argument name, e.g. 'batch_size'), if any.
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        """Pickles with its option (an exception pickles its args alone), so that one raised in a worker process
        (`stream`) arrives whole."""
        return type(self), (str(self), self.option)


def flag(name: str) -> str:
    """The command-line flag of an option: 'batch_size' -> '--batch-size'."""
    return "--" + name.replace("_", "-")


def run_command(action: Callable[[], object]) -> int:
    """Run a command-line entry point's work; its exit status: 0, or 2 after printing a UserError's message as
    one line on stderr, with the flag of the option it names."""
    try:
        action()
    except UserError as e:
        advice = f" (set {flag(e.option)})" if e.option else ""
        print(f"error: {e}{advice}", file=sys.stderr)
        return 2
    return 0
