"""Fine-tune a ResNet classifier: `python train.py --backbone-weights converted.msgpack` runs the CIFAR-100 recipe.

Parses the command line into the one Config and hands it to `flaxresnet.loop.train_and_evaluate`. Mistakes the
user can fix (missing weights file, unprepared dataset, ...) end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from flaxresnet import augment, data, freeze, loop
from flaxresnet.config import DTYPES, SCHEDULES, UPSAMPLE_METHODS, Config
from flaxresnet.errors import run_command
from flaxresnet.models import HEADS, STAGE_BLOCKS


def parse_args(argv: list[str] | None = None) -> Config:
    """The Config the command line describes; defaults are Config's (the seed recipe)."""
    d = Config()
    p = argparse.ArgumentParser(prog="python train.py", description=__doc__.splitlines()[0])
    p.add_argument("--backbone-weights", required=True, metavar="FILE|none",
                   help="a backbone converted with `python -m convert keras_to_flax`, or 'none' to train from "
                        "scratch")
    p.add_argument("--dataset", default=d.dataset, metavar="SPEC", help=f"{data.SPEC_FORMS} (default: %(default)s)")
    p.add_argument("--data-dir", help="tfds data folder (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--workdir",
                   help="folder for metrics, plots, checkpoints and final.msgpack; rerunning with the same "
                        "--workdir resumes a stopped run (default: a new runs/<dataset>-<date>-<time> each time, "
                        "printed at the start)")
    p.add_argument("--epochs", type=int, default=d.epochs, metavar="N", help="epochs in all (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, metavar="N",
                   help="evaluate on the validation split every N epochs and after the last (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                   help="global batch size, split evenly over all devices (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size, metavar="PX",
                   help="side the images are upsampled to on device; folder datasets are also resized to it when "
                        "read (default: %(default)s)")
    p.add_argument("--upsample", choices=UPSAMPLE_METHODS, default=d.upsample, help="(default: %(default)s)")
    p.add_argument("--depth", type=int, choices=sorted(STAGE_BLOCKS), default=d.depth,
                   help="ResNet depth when training from scratch; a weights file brings its own (default: "
                        "%(default)s)")
    p.add_argument("--freeze", default=d.freeze, metavar="SPEC",
                   help=f"{', '.join(freeze.PRESETS)}, stages:N or a regex over parameter paths "
                        f"(default: %(default)s)")
    p.add_argument("--augment", default=",".join(d.augment) or "none", metavar="NAMES",
                   help=f"comma-separated, from {', '.join(augment.AUGMENTATIONS)}; or 'none' (default: "
                        f"%(default)s)")
    p.add_argument("--cutout-size", type=int, default=d.cutout_size, metavar="PX",
                   help="side of the cutout square (default: %(default)s)")
    p.add_argument("--head", choices=HEADS, default=d.head,
                   help="seed: GAP -> Dense(hidden, relu) -> Dropout -> BN -> Dense; linear: GAP -> Dense "
                        "(default: %(default)s)")
    p.add_argument("--hidden", type=int, default=d.hidden, metavar="N",
                   help="hidden width of the seed head (default: %(default)s)")
    p.add_argument("--dropout", type=float, default=d.dropout, metavar="RATE",
                   help="dropout rate of the seed head (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, metavar="LR",
                   help="(peak) Adam learning rate (default: %(default)s)")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="learning rate after warmup: constant, or cosine decay to zero at the last step "
                        "(default: %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, metavar="STEPS",
                   help="linear warmup steps (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, metavar="W",
                   help="decoupled weight decay on kernels (default: %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, metavar="E",
                   help="(default: %(default)s)")
    p.add_argument("--clip-norm", type=float, default=d.clip_norm, metavar="NORM",
                   help="clip gradients to this global norm (default: no clipping)")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                   help="compute dtype; parameters stay float32 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, metavar="N",
                   help="seed of initialisation, data order, augmentation and dropout (default: %(default)s)")
    args = p.parse_args(argv)
    return Config(
        backbone_weights=None if args.backbone_weights.lower() == "none" else args.backbone_weights,
        dataset=args.dataset, data_dir=args.data_dir,
        workdir=args.workdir or loop.default_workdir(args.dataset), epochs=args.epochs,
        eval_every=args.eval_every, batch_size=args.batch_size, image_size=args.image_size,
        upsample=args.upsample, depth=args.depth, freeze=args.freeze,
        augment=() if args.augment == "none" else tuple(a.strip() for a in args.augment.split(",")),
        cutout_size=args.cutout_size, head=args.head, hidden=args.hidden, dropout=args.dropout,
        learning_rate=args.learning_rate, schedule=args.schedule, warmup=args.warmup,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, clip_norm=args.clip_norm,
        dtype=args.dtype, seed=args.seed)


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
