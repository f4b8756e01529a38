"""Host input pipeline throughput on CIFAR-sized data, no model: shuffle -> uint8 batches -> devices.

Must exceed what a GPU train step consumes by a wide margin (target >= 50,000 img/s).
"""

from __future__ import annotations

import argparse
import time

import jax

from benchmarks.common import report, synthetic_split
from flaxresnet import data


def measure(split: data.Split, batch_size: int, to_device: bool) -> float:
    """Images per second for one epoch of train batches (optionally prefetched onto all local devices)."""
    batches = data.train_batches(split, batch_size, seed=0, epoch=0)
    if to_device:
        batches = data.prefetch_to_device(batches)
    start, n, last = time.perf_counter(), 0, None
    for batch in batches:
        n += len(batch["label"]) if not to_device else batch["label"].size
        last = batch
    if to_device:
        jax.block_until_ready(last)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50_000, help="synthetic training examples (CIFAR: 50k)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (CIFAR: 32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--out", default="benchmarks/results/input_pipeline.json")
    args = parser.parse_args(argv)
    split = synthetic_split(args.examples, args.size)
    rows = [{"batch": b, "stage": stage, "img_per_s": measure(split, b, stage != "host batches")}
            for b in args.batch_sizes for stage in ("host batches", "batches on devices")]
    report("input pipeline (no model)", rows, args.out, devices=jax.local_device_count(), target_img_per_s=50_000)


if __name__ == "__main__":
    main()
