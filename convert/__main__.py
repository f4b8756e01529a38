"""CLI: `python -m convert keras_to_flax --weights SRC --out converted.msgpack`, and back:
`python -m convert flax_to_keras IN.msgpack --out OUT` (.h5 weights for a backbone, .keras for a classifier).

Parses arguments, calls the library, prints a one-line summary. Foreseeable mistakes print one line on stderr
and exit with status 2; no output file is written (or changed) then.
"""

from __future__ import annotations

import argparse
import sys

from flaxresnet.cli import run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k2f = sub.add_parser("keras_to_flax", help="convert a Keras ResNet50/101/152 or ResNet50V2/101V2/152V2 weights "
                                               "file, or a whole Keras classifier on one, to flaxresnet")
    k2f.add_argument("--weights", default="imagenet",
                     help="'imagenet' (download the official file, cached in ~/.keras/models) or a path to a "
                          "Keras .h5 / .weights.h5 / .keras file (default: imagenet)")
    k2f.add_argument("--out", default="converted.msgpack", help="output file (default: converted.msgpack)")
    k2f.add_argument("--depth", type=int, choices=(50, 101, 152), default=50,
                     help="with --weights imagenet: which official file (default: 50); a file's own depth is "
                          "detected")
    k2f.add_argument("--family", choices=("v1", "v2"), default="v1",
                     help="with --weights imagenet: ResNet v1 (ResNet50/101/152, default) or v2 "
                          "(ResNet50V2/101V2/152V2); a file's own family is detected")
    k2f.add_argument("--include-top", action="store_true",
                     help="with --weights imagenet: the file with the 1000-class classifier")
    k2f.add_argument("--preprocessing", choices=("caffe", "tf", "none"),
                     help="a whole Keras classifier only: the preprocessing its inputs were given outside the model "
                          "(default: the backbone family's preprocess_input, caffe for ResNet and tf for ResNetV2, "
                          "unless the model preprocesses inside)")
    k2f.add_argument("--pool1-pad", type=int, choices=(0, 1), default=1,
                     help="zero padding before the stem max pool: 1 (Keras >= 2.2.4, default) or 0 for models "
                          "built with older keras_applications resnet50.py")
    f2k = sub.add_parser("flax_to_keras", help="export a flaxresnet file to Keras: a backbone to legacy .h5 "
                                               "weights, a fine-tuned classifier to a .keras model")
    f2k.add_argument("weights", metavar="IN", help="a flaxresnet weights file (converted or fine-tuned)")
    f2k.add_argument("--out", help="output file: .h5 for a backbone (keras.applications.ResNet50(weights=OUT)), "
                                   ".keras for a classifier (keras.models.load_model); default: IN with that "
                                   "suffix")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> None:
        if args.command == "keras_to_flax":
            from convert.keras_to_flax import keras_to_flax

            print(keras_to_flax(args.weights, args.out, depth=args.depth, include_top=args.include_top,
                                pool1_pad=args.pool1_pad, family=args.family, preprocessing=args.preprocessing))
        elif args.command == "flax_to_keras":
            from convert.flax_to_keras import flax_to_keras

            print(flax_to_keras(args.weights, args.out))

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
