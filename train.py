"""Fine-tune a ResNet classifier: `python train.py --backbone-weights converted.msgpack` runs the CIFAR-100 recipe.

Parses the command line into the one Config and hands it to `flaxresnet.loop.train_and_evaluate`. Mistakes the
user can fix (missing weights file, unprepared dataset, ...) end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    config = Config(**vars(p.parse_args(argv)))
    return config if config.workdir else dataclasses.replace(config, workdir=loop.default_workdir(config.dataset))


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0, 2 for a UserError, 130 when interrupted)."""
    config = None

    def run() -> None:
        nonlocal config
        config = parse_args(argv)
        loop.train_and_evaluate(config)

    try:
        return run_command(run)
    except KeyboardInterrupt:
        resume = f": rerun with --workdir {config.workdir} to resume from its last checkpoint" if config else ""
        print(f"interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
