"""What every command line shares: flags built from the Config's fields, and one-line errors.

train.py takes one flag per Config field (`parse_config`); evaluate and predict take the few they share with it
(`add_option`), so an option's help, default and check are declared once, in `config.py`. `run_command` runs a
command's work with option names spelled as flags and turns a UserError into one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from typing import Any

from flaxresnet.config import Config, both_starts
from flaxresnet.errors import UserError, spelled_as


def flag(name: str) -> str:
    """The command-line flag of an option: 'batch_size' -> '--batch-size'."""
    return "--" + name.replace("_", "-")


def run_command(action: Callable[[], object]) -> int:
    """Run a command-line entry point's work, its messages naming options by their flags; its exit status: 0, or
    2 after printing a UserError's message as one line on stderr, with the flag of the option it names."""
    try:
        with spelled_as(flag):
            action()
    except UserError as e:
        advice = f" (set {flag(e.option)})" if e.option else ""
        print(f"error: {e}{advice}", file=sys.stderr)
        return 2
    return 0


def _text_to_value(hint: Any) -> Callable[[str], Any]:
    """How a flag's text becomes a value of a Config field's type: int, float, str, `X | None` ('none' is
    None) or tuple[str, ...] (comma-separated, 'none' is empty)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return lambda text: () if text == "none" else tuple(a.strip() for a in text.split(","))
    if type(None) in args:
        inner = _text_to_value(next(a for a in args if a is not type(None)))
        return lambda text: None if text.lower() == "none" else inner(text)
    return hint


def _value_to_text(value: Any) -> str:
    """A default as the command line spells it."""
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return "none" if value is None else str(value)


# The parsed value of a required option that may be replaced by another (`option(instead=...)`) and is not given.
_NOT_GIVEN = object()


def add_option(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    """The flag of one Config field, with its help, default, choices and metavar."""
    meta = field.metadata
    required = meta["required"] and meta["instead"] is None
    text = meta["help"] if "(default:" in meta["help"] or meta["required"] else \
        f"{meta['help']} (default: {_value_to_text(field.default)})"
    if meta["instead"] is not None:
        text += f" (required, unless {flag(meta['instead'])} is given)"
    choices = meta["choices"]
    parser.add_argument(flag(field.name), dest=field.name,
                        type=_text_to_value(typing.get_type_hints(Config)[field.name]),
                        default=_NOT_GIVEN if meta["instead"] is not None else field.default,
                        required=required, help=text.replace("%", "%%"),
                        metavar=meta["metavar"] or ("{" + ",".join(map(str, choices)) + "}" if choices else None))


def config_field(name: str) -> dataclasses.Field:
    """The Config field `name`, for `add_option`."""
    return next(f for f in dataclasses.fields(Config) if f.name == name)


def parse_config(argv: list[str] | None, prog: str, description: str) -> Config:
    """The Config a command line describes: one flag per Config field (but derived ones); defaults are
    Config's (the seed recipe)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    fields = [f for f in dataclasses.fields(Config) if not f.metadata["derived"]]
    for field in fields:
        add_option(parser, field)
    values = vars(parser.parse_args(argv))
    for field in fields:
        if (instead := field.metadata["instead"]) is None:
            continue
        given, other = values[field.name] is not _NOT_GIVEN, values[instead] is not None
        if given and other:
            raise both_starts()
        if not (given or other):
            parser.error(f"one of the arguments {flag(field.name)} {flag(instead)} is required")
        if not given:
            values[field.name] = field.default
    return Config(**values)
