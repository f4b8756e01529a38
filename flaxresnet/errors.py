"""The one exception type for foreseeable user mistakes.

Command-line entry points catch it and print its message as a single line on stderr with a non-zero exit
status; anything else escaping is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: the message says what, where, and what to do."""
