"""End-to-end training throughput of whole epochs: train.py's loop (`loop.Epochs.train`: host batches, prefetch to
device, pmapped steps, metrics fetched every few steps) vs the original pipeline (Keras `fit` on a host-side
Python generator that copies and randomly erases every preprocessed image in numpy), on the same synthetic
CIFAR-sized data, model, batch and image size.

Both are compiled first (an untimed one-step epoch each), then their epochs alternate (flax, keras, flax, ...);
the ratio is the median of the per-round ratios of epoch times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402

from benchmarks import original  # noqa: E402
from benchmarks.common import random_resnet50, report, synthetic_split  # noqa: E402
from flaxresnet import data, loop, train_lib  # noqa: E402
from flaxresnet.config import Config  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--examples", type=int, default=64, help="training images an epoch (CIFAR-100: 50,000)")
    parser.add_argument("--native-size", type=int, default=32, help="side of the images (CIFAR: 32)")
    parser.add_argument("--image-size", type=int, default=128,
                        help="side the model upsamples them to (seed: 256; see train_step.py on 64 px)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (seed: 64)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="timed epochs of each pipeline")
    parser.add_argument("--out", default="benchmarks/results/epoch.json")
    args = parser.parse_args(argv)
    if args.image_size % args.native_size:
        parser.error("--image-size must be a multiple of --native-size (nearest upsampling)")
    split = synthetic_split(args.examples, args.native_size, args.classes)
    steps = data.num_train_steps(split, args.batch_size)

    # flaxresnet: the seed recipe's config, a random ResNet50 backbone, train.py's epoch function.
    config = Config(num_classes=args.classes, image_size=args.image_size, batch_size=args.batch_size,
                    epochs=args.rounds + 1)
    state = train_lib.replicate(train_lib.create_train_state(config, jax.random.key(0), split.images.shape[1:],
                                                             random_resnet50()))
    key = jax.random.key(1)
    first_batch = data.Split(split.images[:args.batch_size], split.labels[:args.batch_size])

    # The original: the seed's Sequential, images preprocessed once on the host, erased per image by `fit`'s
    # generator.
    model = original.seed_resnet50(args.native_size, args.image_size, args.classes)
    batches = original.erased_batches(original.preprocess(split.images), split.labels, args.batch_size)

    def flax_epoch(epoch: int, examples: data.Split, n: int) -> None:
        nonlocal state
        state, _, _ = loop.Epochs.of(config, n, key).train(state, examples, epoch)

    def keras_epoch(n: int) -> None:
        model.fit(batches, steps_per_epoch=n, epochs=1, verbose=0, shuffle=False)  # the generator shuffles

    def timed(run: Callable[..., None], *run_args: Any) -> float:
        start = time.perf_counter()
        run(*run_args)
        return time.perf_counter() - start

    warmup = {"flax": timed(flax_epoch, 1, first_batch, 1), "keras": timed(keras_epoch, 1)}
    print(f"compile + one step: flaxresnet {warmup['flax']:.1f} s, Keras {warmup['keras']:.1f} s", flush=True)
    times = {"flax": [], "keras": []}
    for epoch in range(2, args.rounds + 2):
        times["flax"].append(timed(flax_epoch, epoch, split, steps))
        times["keras"].append(timed(keras_epoch, steps))

    names = {"flax": "flaxresnet loop.Epochs.train", "keras": "Keras fit + host random erasing"}
    rows = [{"pipeline": names[k], "first_step_s": warmup[k], "epoch_s": statistics.median(t),
             "img_per_s": steps * args.batch_size / statistics.median(t)} for k, t in times.items()]
    ratio = statistics.median(a / b for a, b in zip(times["flax"], times["keras"]))
    report(f"one epoch end to end ({steps} steps of {args.batch_size}, {args.native_size} px -> "
           f"{args.image_size} px)", rows, args.out, ratio_flax_over_keras=ratio,
           raw={"settings": {k: v for k, v in vars(args).items() if k != "out"}, "epoch_times_s": times})


if __name__ == "__main__":
    main()
