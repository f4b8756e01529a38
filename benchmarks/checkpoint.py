"""Checkpoint cost: seconds the training loop is blocked per save of a ResNet50 train state, async vs sync.

The state is the seed recipe's (frozen convs: parameters, BN statistics, Adam moments of the BN and head
parameters) or a full fine-tune's (`--freeze none`: Adam moments of every parameter), replicated over the local
devices as the training loop holds it. "blocked" is what `Checkpoints.save` costs the loop; "written" is until
the files are complete (for async, measured with `wait`, which the loop never calls between saves).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax

from benchmarks.common import random_resnet50, report
from flaxresnet import checkpoints, train_lib
from flaxresnet.config import Config


def state_bytes(state: train_lib.TrainState) -> int:
    """Bytes of one copy of the state's arrays."""
    return sum(x.nbytes for x in jax.tree.leaves(jax.device_get(state)))


def measure(state: train_lib.TrainState, folder: Path, asynchronous: bool, saves: int) -> dict[str, float]:
    """Median blocked and written seconds over `saves` saves of a replicated `state`."""
    store = checkpoints.Checkpoints(folder, asynchronous=asynchronous)
    meta = checkpoints.Meta(Config(backbone_weights=None), [])
    blocked, written = [], []
    for step in range(1, saves + 1):
        start = time.perf_counter()
        store.save(step, state, meta)
        blocked.append(time.perf_counter() - start)
        store.wait()
        written.append(time.perf_counter() - start)
    store.close()
    return {"blocked_s": statistics.median(blocked), "written_s": statistics.median(written)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--freeze", nargs="+", default=["convs", "none"], help="freeze presets of the states")
    parser.add_argument("--saves", type=int, default=5, help="saves per setting (the median is reported)")
    parser.add_argument("--dir", default=None, help="folder to write into (default: a temporary one); put it "
                                                    "on the file system the runs use")
    parser.add_argument("--out", default="benchmarks/results/checkpoint.json")
    args = parser.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="flaxresnet-checkpoint-"))
    rows = []
    for preset in args.freeze:
        config = Config(backbone_weights=None, freeze=preset, image_size=None)
        state = train_lib.create_train_state(config, jax.random.key(0), backbone=random_resnet50())
        size = state_bytes(state)
        replicated = train_lib.replicate(state)
        for asynchronous in (True, False):
            folder = root / f"{preset}-{'async' if asynchronous else 'sync'}"
            result = measure(replicated, folder, asynchronous, args.saves)
            shutil.rmtree(folder)
            rows.append({"freeze": preset, "mode": "async" if asynchronous else "sync", "state_MB": size / 1e6,
                         **result, "MB_per_s_written": size / 1e6 / result["written_s"]})
    if args.dir is None:
        shutil.rmtree(root)
    report("checkpoint save (ResNet50 train state)", rows, args.out, devices=jax.local_device_count(),
           folder=str(root))


if __name__ == "__main__":
    main()
