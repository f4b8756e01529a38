"""Compilation cache: the first training step and the whole run of a second identical train.py run (cache warm)
against the first (cold: it compiles and writes the cache) and against a run with --compile-cache off.

Each run is a fresh `python train.py` process with its own work folder (so nothing resumes) and the benchmark's
own cache folder. The first step is timed by a small hook: train.py runs under `runpy` with
`train_lib.p_train_step` and `p_eval_step` wrapped so that their first two calls are timed until their results
are ready; the first call is compilation (or loading it from the cache) plus one step, the second one step.
Within the first train step, JAX's own compilation events give the time spent tracing the step in Python,
lowering it to HLO and compiling it or loading it from the cache: what a warm cache can and cannot save.
The wall time is the whole process, from its start (imports included) to its exit. Settings:
  small  digits (8x8 px, 1,437 training images), a random ResNet50 backbone file, --freeze backbone,
         --image-size none, batch 64, 1 epoch
  seed   the seed recipe's real train step: a random ResNet50 with frozen convs, seed head, random erasing, 64 px
         input, batch 8; an image folder of 20 random images (2 steps and 1 evaluation batch an epoch), 1 epoch
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import random_resnet50, report
from flaxresnet import weights_file

ROOT = Path(__file__).resolve().parents[1]
# train.py with its first two train and eval step calls timed, and JAX's compilation phases (tracing, lowering to
# HLO, compiling or loading from the cache) during the first train step summed (argv[1]: the JSON file written).
HOOK = """
import collections, json, runpy, sys, time
import jax
from jax import monitoring
from flaxresnet import train_lib
log = sys.argv.pop(1)
times = {"train": [], "eval": []}
phases, measuring = collections.Counter(), [False]
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kwargs: measuring[0] and phases.update({event.rsplit("/", 1)[-1]: duration}))
def timed(name, step):
    def run(*args):
        if len(times[name]) == 2:
            return step(*args)
        measuring[0] = name == "train" and not times["train"]
        start = time.perf_counter()
        out = jax.block_until_ready(step(*args))
        times[name].append(time.perf_counter() - start)
        measuring[0] = False
        return out
    return run
train_lib.p_train_step = timed("train", train_lib.p_train_step)
train_lib.p_eval_step = timed("eval", train_lib.p_eval_step)
sys.argv[0] = "train.py"
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    with open(log, "w") as f:
        json.dump({**times, "phases": phases}, f)
"""
SETTINGS = {
    "small": ["--dataset", "digits", "--freeze", "backbone", "--image-size", "none", "--batch-size", "64"],
    "seed": ["--image-size", "64", "--batch-size", "8"],
}


def image_folder(root: Path, classes: int = 2, per_class: int = 10, size: int = 32) -> Path:
    """`root/CLASS/i.png`: random RGB images, a `folder:` dataset."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"class{c}/{i}.png")
    return root


def cache_entries(folder: Path | None) -> tuple[int, int]:
    """(entries, bytes) of a JAX compilation cache folder (none for None, the cache off)."""
    files = list(folder.glob("*-cache")) if folder is not None and folder.is_dir() else []
    return len(files), sum(f.stat().st_size for f in files)


def run(argv: list[str], cache: str, root: Path, name: str) -> dict[str, Any]:
    """One train.py process: its first train/eval step times, wall time and what it added to the cache."""
    times = root / f"{name}.json"
    folder = None if cache == "off" else Path(cache)
    before = cache_entries(folder)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", HOOK, str(times), *argv, "--workdir", str(root / name),
                           "--compile-cache", cache], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"train.py failed ({name}):\n{done.stderr[-3000:]}")
    steps = json.loads(times.read_text())
    after = cache_entries(folder)
    phases = steps["phases"]
    return {"first_step_s": steps["train"][0], "trace_s": phases["jaxpr_trace_duration"],
            "lower_s": phases["jaxpr_to_mlir_module_duration"], "compile_or_load_s": phases["backend_compile_duration"],
            "step_s": steps["train"][1], "first_eval_s": steps["eval"][0], "wall_s": wall,
            "entries_added": after[0] - before[0], "kb_added": (after[1] - before[1]) / 1e3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--out", default="benchmarks/results/compile_cache.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flaxresnet-compile-cache-") as folder:
        root = Path(folder)
        backbone = root / "backbone.msgpack"
        weights_file.save(backbone, random_resnet50()[1], {"model": {"kind": "resnet", "config": {"depth": 50}}})
        datasets = {"small": [], "seed": ["--dataset", f"folder:{image_folder(root / 'images')}"]}
        rows, ratios = [], {}
        for setting in args.settings:
            command = ["--backbone-weights", str(backbone), *SETTINGS[setting], *datasets[setting], "--epochs", "1"]
            cache = str(root / f"cache-{setting}")
            runs = {"cold": run(command, cache, root, f"{setting}-cold"), "warm": run(command, cache, root,
                    f"{setting}-warm"), "off": run(command, "off", root, f"{setting}-off")}
            rows += [{"setting": setting, "cache": name, **values} for name, values in runs.items()]
            ratios[setting] = {"first_step": runs["warm"]["first_step_s"] / runs["cold"]["first_step_s"],
                               "wall": runs["warm"]["wall_s"] / runs["cold"]["wall_s"]}
    report("compilation cache: a second identical train.py run (warm) vs the first (cold)", rows, args.out,
           warm_over_cold=ratios, first_step_target="<= 0.25")


if __name__ == "__main__":
    main()
