"""Fine-tune a ResNet classifier: `python train.py --backbone-weights converted.msgpack` runs the CIFAR-100 recipe.

Parses the command line into the one Config and hands it to `flaxresnet.loop.train_and_evaluate`. Mistakes the
user can fix (missing weights file, unprepared dataset, ...) end with one line on stderr and exit status 2; a
run stopped by SIGTERM or Ctrl-C saves a checkpoint, says so in one line and exits with 143 or 130. For a
multi-process run, every process gets the same command plus its --process-id (README: "Multi-host").
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from collections.abc import Callable
from typing import Any

from flaxresnet import loop
from flaxresnet.config import Config
from flaxresnet.errors import flag, run_command


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


def parse_args(argv: list[str] | None = None) -> Config:
    """The Config the command line describes: one flag per Config field (but derived ones), with the field's
    help, default and choices; defaults are Config's (the seed recipe)."""
    p = argparse.ArgumentParser(prog="python train.py", description=__doc__.splitlines()[0])
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        meta = field.metadata
        if meta["derived"]:
            continue
        text = meta["help"] if "(default:" in meta["help"] or meta["required"] else \
            f"{meta['help']} (default: {_value_to_text(field.default)})"
        choices = meta["choices"]
        p.add_argument(flag(field.name), dest=field.name, type=_text_to_value(hints[field.name]),
                       default=field.default, required=meta["required"], help=text.replace("%", "%%"),
                       metavar=meta["metavar"] or ("{" + ",".join(map(str, choices)) + "}" if choices else None))
    return Config(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status: 0, 2 for a UserError, 143 (SIGTERM) or 130 (Ctrl-C) when
    stopped with a checkpoint saved, 130 when interrupted before training started or by a second Ctrl-C."""
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's progress notes; its errors still show
    try:
        return run_command(lambda: loop.train_and_evaluate(parse_args(argv)))
    except loop.Preempted as e:
        print(e, file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("interrupted, no checkpoint saved: rerun the same command to resume from the last one",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
