"""The one exception type for foreseeable user mistakes.

Command-line entry points catch it and print its message as a single line on stderr with a non-zero exit
status (`run_command`); anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix: the message says what, where, and what to do."""


def run_command(action: Callable[[], object]) -> int:
    """Run a command-line entry point's work; its exit status: 0, or 2 after printing a UserError's message as
    one line on stderr."""
    try:
        action()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
