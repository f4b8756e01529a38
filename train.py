"""Fine-tune a ResNet classifier: `python train.py --backbone-weights converted.msgpack` runs the CIFAR-100 recipe.

Parses the command line into the one Config and hands it to `flaxresnet.loop.train_and_evaluate`. Mistakes the
user can fix (missing weights file, unprepared dataset, ...) end with one line on stderr and exit status 2; a
run stopped by SIGTERM or Ctrl-C saves a checkpoint, says so in one line and exits with 143 or 130. For a
multi-process run, every process gets the same command plus its --process-id (README: "Multi-host").
"""

from __future__ import annotations

import logging
import sys

from flaxresnet import cli, loop
from flaxresnet.config import Config


def parse_args(argv: list[str] | None = None) -> Config:
    """The Config the command line describes (`cli.parse_config`): one flag per Config field."""
    return cli.parse_config(argv, "python train.py", __doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status: 0, 2 for a UserError, 143 (SIGTERM) or 130 (Ctrl-C) when
    stopped with a checkpoint saved, 130 when interrupted before training started or by a second Ctrl-C."""
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's progress notes; its errors still show
    try:
        return cli.run_command(lambda: loop.train_and_evaluate(parse_args(argv)))
    except loop.Preempted as e:
        print(e, file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("interrupted, no checkpoint saved: rerun the same command to resume from the last one",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
