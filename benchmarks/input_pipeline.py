"""Input pipeline speed and memory: in-memory batches; streamed decoding in grain workers of CIFAR-sized PNG records
and of a JPEG folder read at 224 px, per worker and with all cores, next to the train step's need; the time to
the first train step in both modes; peak memory for folders of 2,000 and 8,000 images at 256 px, both modes.

Sections (--sections):
- memory: host batches of an in-memory synthetic split, and the same prefetched onto the devices (no decoding).
- stream: img/s of streamed train batches (after the first, whose wait, worker start included, is given apart)
  with 0 workers (decoding in this process), 1, and every core's (`stream.default_workers`, and more if asked),
  for a tfds ArrayRecord dataset of 32 x 32 PNG records (what a prepared CIFAR-100 is) and a folder of 256 px
  JPEGs resized to 224 px when read; beside each, the img/s of the seed recipe's train step at that size
  (`benchmarks.train_step`'s flax:convs:float32; 32 px upsampled to 256), the rate the pipeline must keep up with.
- first-step: seconds from `loop.train_and_evaluate` to the end of the first train step, for the CIFAR-sized
  records (50,000 + 10,000) in `memory` mode decoding in the training process (threads) and in the default
  worker processes, and in `stream` mode, each in a fresh process, after one untimed run that fills the
  compilation cache (a random backbone, --freeze backbone, 32 px, batch 64: the data's part is what differs).
- rss: the peak resident memory of a fresh process that opens a folder of 2,000 or 8,000 256 px JPEGs and runs
  one epoch of train batches onto the device, `memory` and `stream` mode: the training process's peak, the
  largest worker's peak, and the peak of their sum (sampled every 20 ms from /proc).

The datasets are generated once in --data (default: a folder under the system's temporary folder) and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import jax

from benchmarks import train_step
from benchmarks.common import (add_step_args, parse_step_args, random_resnet50, report, synthetic_split,
                               time_steps)
from benchmarks.datasets import prepare_tfds_images, write_jpeg_folder
from flaxresnet import data, stream, weights_file

SECTIONS = ("memory", "stream", "first-step", "rss")
STEP_BATCH = 8  # the train step's batch on CPU; its img/s barely depends on it there


def memory_rate(split: data.Split, batch_size: int, to_device: bool) -> float:
    """Images per second for one epoch of in-memory train batches (optionally prefetched onto the devices)."""
    batches = data.train_batches(split, batch_size, seed=0, epoch=0)
    if to_device:
        batches = data.prefetch_to_device(batches)
    start, n, last = time.perf_counter(), 0, None
    for batch in batches:
        n += batch["label"].size
        last = batch
    jax.block_until_ready(last)
    return n / (time.perf_counter() - start)


def stream_rate(split: data.StreamSplit, batch_size: int, workers: int, batches: int) -> dict[str, float]:
    """Seconds to the first streamed train batch (workers starting included), then img/s over `batches` more."""
    start = time.perf_counter()
    iterator = data.train_batches(dataclasses.replace(split, workers=workers), batch_size, seed=0, epoch=0)
    next(iterator)
    first = time.perf_counter() - start
    start, n = time.perf_counter(), 0
    for batch in itertools.islice(iterator, batches):
        n += len(batch["label"])
    seconds = time.perf_counter() - start
    iterator.close()
    return {"first_batch_s": first, "img_per_s": n / seconds, "img_per_s_per_worker": n / seconds / max(workers, 1)}


def step_rate(native_size: int, image_size: int) -> float:
    """img/s of the seed recipe's train step (frozen convs, float32) on `native_size` px images upsampled to
    `image_size`, batch STEP_BATCH, on this machine's devices: median of 5 steps after compiling and 1 warmup."""
    parser = argparse.ArgumentParser()
    add_step_args(parser)
    args = parse_step_args(parser, ["--native-size", str(native_size), "--image-size", str(image_size),
                                    "--batch-size", str(STEP_BATCH)])
    variant = train_step.Variant.parse("flax:convs:float32")
    split = synthetic_split(train_step.POOL * STEP_BATCH, native_size, args.classes)
    backbone = random_resnet50()
    _, times = time_steps({variant: lambda: train_step.flax_step(variant, args, split, backbone)}, args.warmup,
                          args.steps, jax.block_until_ready)
    return STEP_BATCH / statistics.median(times[variant])


def cifar_like(folder: Path, records: int) -> tuple[str, str]:
    """The tfds spec and data folder of `records` 32 x 32 PNG records in 100 classes, 5/6 of them 'train' and 1/6
    'test' (CIFAR-100: 60,000); made once in `folder`."""
    data_dir = folder / f"records{records}"
    if not (data_dir / "test_images").is_dir():
        print(f"preparing {records:,} PNG records in {data_dir} (once)", flush=True)
        prepare_tfds_images(data_dir, {"train": records - records // 6, "test": records // 6}, num_classes=100,
                            sizes=((32, 32),))
    return "tfds:test_images", str(data_dir)


def jpeg_folders(folder: Path, count: int) -> dict[int, Path]:
    """Folders of `count` // 4 and `count` 256 px JPEGs in 10 classes (made once in `folder`; the small one links
    the big one's first files)."""
    big, small = folder / f"jpeg{count}", folder / f"jpeg{count}-{count // 4}"
    if not big.is_dir():
        print(f"writing {count:,} 256 px JPEGs in {big} (once)", flush=True)
        write_jpeg_folder(big, classes=10, per_class=count // 10, size=256)
        for class_dir in sorted(big.iterdir()):
            (small / class_dir.name).mkdir(parents=True)
            for i in range(count // 40):
                (small / class_dir.name / f"{i}.jpg").symlink_to(class_dir / f"{i}.jpg")
    return {count // 4: small, count: big}


def stream_rows(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    workers = sorted({0, 1, stream.default_workers(), *args.workers})
    sources = [("32 px PNG records (tfds)", data.open_dataset(*cifar_like(folder, args.records)), 32, 256,
                args.batches),
               ("256 px JPEGs read at 224 px", data.open_dataset(
                   f"folder:{jpeg_folders(folder, args.jpegs)[args.jpegs]}", image_size=224), 224, 224,
                args.jpeg_batches)]
    rows = []
    for name, ds, native, upsampled, batches in sources:
        need = step_rate(native, upsampled) if args.step else None
        for w in workers:
            row = {"source": name, "workers": w, **stream_rate(ds.train, args.batch_size, w, batches)}
            if need is not None:
                row[f"train_step_img_per_s ({native}->{upsampled} px)"] = need
            print(row, flush=True)
            rows.append(row)
    return rows


def child(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run this module with `argv` in a fresh process; the JSON object its last output line holds."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.input_pipeline", *argv], capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, check=False)
    if result.returncode:
        raise RuntimeError(f"benchmark child {argv} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def first_step_rows(folder: Path, records: int) -> list[dict[str, Any]]:
    spec, data_dir = cifar_like(folder, records)
    backbone = folder / "random_backbone.msgpack"
    if not backbone.exists():
        weights_file.save(backbone, random_resnet50()[1], {"model": {"kind": "resnet", "config": {"depth": 50}}})
    cache = {"XDG_CACHE_HOME": str(folder / "cache")}  # the compilation cache of these runs alone
    default = str(stream.default_workers())
    child(["--first-step-child", "memory", "0", spec, data_dir, str(backbone)], cache)  # fills the cache
    return [{"data": f"{records:,} 32 px PNG records", "input_pipeline": mode, "data_workers": int(workers),
             **child(["--first-step-child", mode, workers, spec, data_dir, str(backbone)], cache)}
            for mode, workers in (("memory", "0"), ("memory", default), ("stream", default))]


def first_step_child(mode: str, workers: str, spec: str, data_dir: str, backbone: str) -> dict[str, Any]:
    """In a fresh process: seconds from `train_and_evaluate` to the end of the first train step (then a Ctrl-C
    stops the run)."""
    from flaxresnet import loop, train_lib
    from flaxresnet.config import Config

    step, done = train_lib.p_train_step, []

    def first(*args):
        result = jax.block_until_ready(step(*args))
        if not done:
            done.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)
        return result

    train_lib.p_train_step = first
    with tempfile.TemporaryDirectory() as workdir:
        config = Config(backbone_weights=backbone, dataset=spec, data_dir=data_dir, image_size=None,
                        freeze="backbone", batch_size=64, epochs=1, input_pipeline=mode, data_workers=int(workers),
                        workdir=workdir)
        start = time.perf_counter()
        try:
            loop.train_and_evaluate(config)
        except loop.Preempted:
            pass
    return {"first_step_s": done[0] - start}


def rss_rows(folder: Path, count: int, batch_size: int) -> list[dict[str, Any]]:
    return [{"images": n, "input_pipeline": mode, **child(["--rss-child", mode, str(path), str(batch_size)])}
            for n, path in jpeg_folders(folder, count).items() for mode in ("memory", "stream")]


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (FileNotFoundError, StopIteration, ProcessLookupError):
        return 0


def _children(pid: int) -> list[int]:
    """The processes that any thread of process `pid` started."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += map(int, (task / "children").read_text().split())
        except FileNotFoundError:
            pass
    return children


def rss_child(mode: str, folder: str, batch_size: int) -> dict[str, Any]:
    """In a fresh process: one epoch of 256 px train batches of `folder` onto the device in `mode`; the peak
    resident memory of this process, of its largest worker and of their sum, sampled every 20 ms from /proc
    (getrusage's ru_maxrss would not do: Linux keeps it across the exec from the parent process)."""
    me, running = os.getpid(), True
    peaks = {"training_process_peak_mb": 0, "largest_worker_peak_mb": 0, "peak_of_the_sum_mb": 0}

    def sample() -> None:
        while running:
            own, workers = _rss_kb(me), [_rss_kb(p) for p in _children(me)]
            for key, kb in (("training_process_peak_mb", own), ("largest_worker_peak_mb", max(workers, default=0)),
                            ("peak_of_the_sum_mb", own + sum(workers))):
                peaks[key] = max(peaks[key], kb / 1024)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ds = data.open_dataset(f"folder:{folder}", image_size=256)
    ds = ds.in_memory() if mode == "memory" else ds.streamed(stream.default_workers())
    start, last = time.perf_counter(), None
    for last in data.prefetch_to_device(data.train_batches(ds.train, batch_size, seed=0, epoch=0)):
        pass
    jax.block_until_ready(last)
    seconds = time.perf_counter() - start
    running = False
    sampler.join()
    return {**peaks, "decoded_dataset_mb": ds.nbytes / 2**20, "epoch_s": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--examples", type=int, default=50_000, help="synthetic in-memory examples (memory)")
    parser.add_argument("--size", type=int, default=32, help="their image side in pixels (memory)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256], help="(memory)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch of the streamed sections")
    parser.add_argument("--workers", type=int, nargs="*", default=[],
                        help="worker counts to stream with besides 0, 1 and one per core but one (stream)")
    parser.add_argument("--records", type=int, default=60_000,
                        help="PNG records of the CIFAR-sized dataset (stream, first-step)")
    parser.add_argument("--jpegs", type=int, default=8_000,
                        help="JPEGs of the big folder, the small one has a quarter (stream, rss)")
    parser.add_argument("--batches", type=int, default=100, help="timed batches of the PNG records (stream)")
    parser.add_argument("--jpeg-batches", type=int, default=20, help="timed batches of the JPEGs (stream)")
    parser.add_argument("--no-step", dest="step", action="store_false",
                        help="leave out the train step's img/s (stream)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "flaxresnet-input-pipeline",
                        help="folder of the generated datasets, made once and reused")
    parser.add_argument("--out", default="benchmarks/results/input_pipeline.json")
    parser.add_argument("--first-step-child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.first_step_child:
        print(json.dumps(first_step_child(*args.first_step_child)))
        return
    if args.rss_child:
        mode, folder, batch_size = args.rss_child
        print(json.dumps(rss_child(mode, folder, int(batch_size))))
        return

    args.data.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    if "memory" in args.sections:
        split = synthetic_split(args.examples, args.size)
        results["memory"] = [{"batch": b, "stage": stage, "img_per_s": memory_rate(split, b, stage != "host batches")}
                             for b in args.batch_sizes for stage in ("host batches", "batches on devices")]
    if "stream" in args.sections:
        results["stream"] = stream_rows(args, args.data)
    if "first-step" in args.sections:
        results["first_step"] = first_step_rows(args.data, args.records)
    if "rss" in args.sections:
        results["rss"] = rss_rows(args.data, args.jpegs, args.batch_size)
    for name, rows in results.items():
        report(f"input pipeline: {name}", rows, None)
    report("input pipeline", [row | {"section": name} for name, rows in results.items() for row in rows], args.out,
           devices=jax.local_device_count(), cores=len(os.sched_getaffinity(0)),
           default_workers=stream.default_workers())


if __name__ == "__main__":
    main()
