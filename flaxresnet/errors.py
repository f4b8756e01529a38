"""The one exception type for foreseeable user mistakes, and how messages name the options a user would change.

Command-line entry points catch it and print its message as a single line on stderr with a non-zero exit
status (`cli.run_command`); anything else escaping is a bug and keeps its traceback. A library raising it speaks
in its own terms: it names options through `option_name` (a Config field or keyword argument, e.g.
'batch_size') and may say which one to change (`option`); a command line spells them as its flags
(`spelled_as`), so the same message reads 'batch_size' from Python and '--batch-size' from train.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

# How option names are spelled in messages and log lines now: the library's own names unless a command line
# said otherwise (`spelled_as`).
_spelling: Callable[[str], str] = str


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


def option_name(name: str) -> str:
    """Option `name` (a Config field or keyword argument) as the user gave it: the name itself in the library,
    the flag on a command line (`spelled_as`)."""
    return _spelling(name)


@contextlib.contextmanager
def spelled_as(spelling: Callable[[str], str]) -> Iterator[None]:
    """Within the block, messages and log lines name options with `spelling` (e.g. `cli.flag`)."""
    global _spelling
    previous, _spelling = _spelling, spelling
    try:
        yield
    finally:
        _spelling = previous
