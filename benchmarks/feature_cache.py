"""Linear-probe epochs with and without the feature cache: train.py's epoch (`loop.Epochs.train`) and validation
(`evaluation.evaluate`) on images through the frozen, inference-mode backbone, against the same on the pooled features
computed once (`feature_cache.compute`), plus that one-off feature pass.

The run is `--freeze backbone --augment none` with the seed head, on synthetic CIFAR-sized images upsampled on
the device, a random ResNet50 backbone. Everything is compiled first (untimed one-batch calls); then each round
runs a full epoch, the feature pass and a cached epoch (and both validations), and the ratio is the median of the
per-round ratios. Medians over rounds, so a busy machine's slow moment counts less.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

from benchmarks.common import random_resnet50, report, synthetic_split
from flaxresnet import data, evaluation, feature_cache, loop, train_lib
from flaxresnet.config import Config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--examples", type=int, default=256, help="training images (CIFAR-100: 50,000)")
    parser.add_argument("--validation", type=int, default=64, help="validation images (CIFAR-100: 10,000)")
    parser.add_argument("--native-size", type=int, default=32, help="side of the images (CIFAR: 32)")
    parser.add_argument("--image-size", type=int, default=64, help="side the model upsamples them to (seed: 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (seed: 64)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs of each path")
    parser.add_argument("--recipe-epochs", type=int, default=15, help="epochs of a run, to weigh the one-off pass")
    parser.add_argument("--out", default="benchmarks/results/feature_cache.json")
    args = parser.parse_args(argv)
    if args.image_size % args.native_size:
        parser.error("--image-size must be a multiple of --native-size (nearest upsampling)")
    train = synthetic_split(args.examples, args.native_size, args.classes)
    validation = synthetic_split(args.validation, args.native_size, args.classes, seed=1)
    steps = data.num_train_steps(train, args.batch_size)
    config = Config(num_classes=args.classes, image_size=args.image_size, batch_size=args.batch_size,
                    freeze="backbone", augment=(), epochs=args.rounds + 1)
    host = train_lib.create_train_state(config, jax.random.key(0), train.images.shape[1:], random_resnet50())
    assert feature_cache.why_not(host) is None
    full = train_lib.replicate(host)
    head, backbone = train_lib.split_backbone(train_lib.replicate(host))
    model, key = host.model, jax.random.key(1)

    def first(split: data.Split) -> data.Split:
        return data.Split(split.images[:args.batch_size], split.labels[:args.batch_size])

    def features(split: data.Split) -> feature_cache.FeatureSplit:
        return feature_cache.compute(model, backbone, split, args.batch_size, "benchmark")

    def head_epochs(steps: int) -> loop.Epochs:
        return loop.Epochs.of(config, steps, key, train_lib.p_head_train_step)

    def timed(run: Callable[..., Any], *run_args: Any) -> tuple[float, Any]:
        start = time.perf_counter()
        result = run(*run_args)
        return time.perf_counter() - start, result

    # Compilation: one batch each (the feature pass and the full steps compile the backbone separately).
    compile_s = {"features": timed(features, first(train))[0]}
    cached_train, cached_validation = features(first(train)), features(first(validation))
    compile_s["full_epoch"], (full, _, _) = timed(loop.Epochs.of(config, 1, key).train, full, first(train), 1)
    compile_s["cached_epoch"], (head, _, _) = timed(head_epochs(1).train, head, cached_train, 1)
    compile_s["full_eval"] = timed(evaluation.evaluate, model, full.variables(), first(validation),
                                 args.batch_size)[0]
    compile_s["cached_eval"] = timed(evaluation.evaluate, model, head.variables(), cached_validation, args.batch_size,
                                   train_lib.p_head_eval_step)[0]
    print(f"compile + one batch (s): {compile_s}", flush=True)

    times: dict[str, list[float]] = {"full_epoch": [], "cached_epoch": [], "full_eval": [], "cached_eval": [],
                                     "pass_training": [], "pass_validation": []}
    for epoch in range(2, args.rounds + 2):
        seconds, (full, _, _) = timed(loop.Epochs.of(config, steps, key).train, full, train, epoch)
        times["full_epoch"].append(seconds)
        seconds, cached_train = timed(features, train)
        times["pass_training"].append(seconds)
        seconds, cached_validation = timed(features, validation)
        times["pass_validation"].append(seconds)
        seconds, (head, _, _) = timed(head_epochs(steps).train, head, cached_train, epoch)
        times["cached_epoch"].append(seconds)
        times["full_eval"].append(timed(evaluation.evaluate, model, full.variables(), validation,
                                        args.batch_size)[0])
        times["cached_eval"].append(timed(evaluation.evaluate, model, head.variables(), cached_validation,
                                          args.batch_size, train_lib.p_head_eval_step)[0])

    median = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"what": f"training epoch ({steps} steps of {args.batch_size})", "full_s": median["full_epoch"],
             "cached_s": median["cached_epoch"], "full_img_per_s": args.examples / median["full_epoch"],
             "cached_img_per_s": args.examples / median["cached_epoch"],
             "cached_over_full": statistics.median(c / f for c, f in zip(times["cached_epoch"], times["full_epoch"]))},
            {"what": f"validation ({args.validation} images)", "full_s": median["full_eval"],
             "cached_s": median["cached_eval"], "full_img_per_s": args.validation / median["full_eval"],
             "cached_img_per_s": args.validation / median["cached_eval"],
             "cached_over_full": statistics.median(c / f for c, f in zip(times["cached_eval"], times["full_eval"]))}]
    pass_s = {"training": median["pass_training"], "validation": median["pass_validation"]}
    one_off = sum(pass_s.values())
    epochs = args.recipe_epochs
    with_pass = (one_off + epochs * (median["cached_epoch"] + median["cached_eval"])) / (
        epochs * (median["full_epoch"] + median["full_eval"]))
    report(f"feature cache: {args.native_size} px -> {args.image_size} px, ResNet50, batch {args.batch_size}",
           rows, args.out, feature_pass_s=pass_s,
           feature_pass_img_per_s=(args.examples + args.validation) / one_off,
           **{f"run_of_{epochs}_epochs_cached_over_full": with_pass},
           raw={"settings": {k: v for k, v in vars(args).items() if k != "out"}, "compile_s": compile_s,
                "times_s": times})


if __name__ == "__main__":
    main()
