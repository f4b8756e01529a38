"""The persistent compilation cache (flaxresnet/compile_cache.py): an identical rerun loads every program from it and
writes nothing, a run whose train step differs adds that step alone; 'off' writes nothing anywhere; the default
folder follows XDG_CACHE_HOME; a folder that cannot be written is one line.

Hits and misses are counted from JAX's compilation events. A process reuses what it compiled without asking the
persistent cache, so the train.py runs compared share one subprocess that clears JAX's in-memory caches before
each run (the pytest process keeps its own). Kept cheap: a random backbone file with `--freeze backbone`, 10
images of 16 px (one step and one evaluation batch an epoch), models no other test compiles.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from jax import monitoring
from PIL import Image

import train
from flaxresnet import compile_cache, evaluate, predict, train_lib, weights_file
from flaxresnet.config import Config
from data_helpers import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
COMPILED, HITS, WRITES = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_hits",
                          "/jax/compilation_cache/cache_misses")
MAINS = {"train": train.main, "evaluate": evaluate.main, "predict": predict.main}
# argv[1]: JSON list of train.py argument lists, argv[2]: the cache folder, argv[3]: the JSON file written. Runs
# train.py's main on each, JAX's in-memory caches cleared before each run, and records its exit status, its
# compilation events and the cache's entries after it.
RUNS = f"""
import collections, json, sys
from pathlib import Path
import jax
from jax import monitoring
events = collections.Counter()
monitoring.register_event_listener(lambda event, **kwargs: events.update([event]))
monitoring.register_event_duration_secs_listener(lambda event, duration, **kwargs: events.update([event]))
from train import main
results = []
for argv in json.loads(sys.argv[1]):
    jax.clear_caches()
    events.clear()
    status = main(argv)
    results.append({{"status": status, "compiled": events[{COMPILED!r}], "hits": events[{HITS!r}],
                    "writes": events[{WRITES!r}], "entries": sorted(p.name for p in Path(sys.argv[2]).iterdir())}})
Path(sys.argv[3]).write_text(json.dumps(results))
"""


@contextlib.contextmanager
def compile_events() -> Iterator[collections.Counter]:
    """Counts of JAX's compilation events in this process within the block."""
    events = collections.Counter()

    def count(event: str, *args, **kwargs) -> None:
        events.update([event])

    monitoring.register_event_listener(count)
    monitoring.register_event_duration_secs_listener(count)
    try:
        yield events
    finally:
        monitoring.unregister_event_listener(count)
        monitoring.unregister_event_duration_listener(count)


def cache_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*-cache"))


def test_identical_rerun_hits_and_a_changed_step_adds_only_itself(tmp_path, backbone_file):
    cache = tmp_path / "cache"
    folder = write_image_folder(tmp_path / "images", {"a": 5, "b": 5})
    command = ["--backbone-weights", str(backbone_file), "--dataset", f"folder:{folder}", "--image-size", "16",
               "--batch-size", "8", "--freeze", "backbone", "--augment", "none", "--epochs", "1",
               "--compile-cache", str(cache)]
    runs = [[*command, "--workdir", str(tmp_path / "first")], [*command, "--workdir", str(tmp_path / "again")],
            [*command, "--label-smoothing", "0.1", "--workdir", str(tmp_path / "smoothed")]]
    results = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-c", RUNS, json.dumps(runs), str(cache), str(results)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first, again, smoothed = json.loads(results.read_text())
    assert first["status"] == again["status"] == smoothed["status"] == 0
    # The first run writes every program it compiles: the steps, the initialisation and ~15 small ones.
    assert first["compiled"] > 10 and first["hits"] == 0
    assert first["writes"] == first["compiled"] == len(first["entries"])
    # The same command again (another work folder) loads every one of them and writes nothing.
    assert (again["hits"], again["writes"], again["entries"]) == (first["compiled"], 0, first["entries"])
    # Label smoothing changes the train step only: one new entry; the evaluation step and the rest are hits.
    assert (smoothed["hits"], smoothed["writes"]) == (first["compiled"] - 1, 1)
    (new,) = set(smoothed["entries"]) - set(first["entries"])
    assert set(first["entries"]) < set(smoothed["entries"]) and new.endswith("-cache")


def classifier_file(path: Path) -> Path:
    """A random digits classifier (8 px, 10 classes) with a seed head of width 24, which no other test compiles,
    saved as train.py saves final.msgpack; drawn with numpy (nothing compiles)."""
    model = train_lib.build_classifier(Config(num_classes=10, image_size=None, hidden=24))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 3), np.uint8))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda leaf: rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype), shapes)
    weights_file.save(path, variables, {"model": model.metadata(), "image_shape": [8, 8, 3], "dataset": "digits",
                                        "class_names": [str(d) for d in range(10)]})
    return path


def test_off_writes_nothing_and_the_default_folder_follows_xdg_cache_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    weights = str(classifier_file(tmp_path / "final.msgpack"))
    was_on = compile_cache.enable(str(tmp_path / "was-on"))
    with compile_events() as events:
        status = evaluate.main(["--weights", weights, "--out", str(tmp_path / "eval"), "--compile-cache", "off"])
    assert status == 0, capsys.readouterr().err
    assert events[COMPILED] > 0 and events[WRITES] == events[HITS] == 0  # it compiled, and cached nothing
    assert not (tmp_path / "user-cache").exists() and cache_entries(was_on) == []

    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    with compile_events() as events:
        status = predict.main(["--weights", weights, str(image)])  # the default: the user cache folder
    assert status == 0, capsys.readouterr().err
    entries = cache_entries(tmp_path / "user-cache" / "flaxresnet" / "jax-compilation-cache")
    assert events[WRITES] == len(entries) > 0 and cache_entries(was_on) == []


def test_default_folder_follows_the_xdg_base_directory_rules(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_folder() == tmp_path / "flaxresnet" / "jax-compilation-cache"
    assert compile_cache.folder_of("default") == compile_cache.default_folder()
    home_cache = Path.home() / ".cache" / "flaxresnet" / "jax-compilation-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the specification: relative paths are invalid
    assert compile_cache.default_folder() == home_cache
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_folder() == home_cache
    assert compile_cache.folder_of("off") is None
    monkeypatch.chdir(tmp_path)
    assert compile_cache.folder_of("xla") == tmp_path / "xla"


@pytest.mark.parametrize("command, argv", [
    ("train", ["--backbone-weights", "none", "--dataset", "digits"]),
    ("evaluate", ["--weights", "missing.msgpack"]),
    ("predict", ["--weights", "missing.msgpack", "image.png"]),
])
def test_a_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, command, argv):
    (tmp_path / "taken").write_text("a file")
    for folder, reason in [(tmp_path / "taken", "File exists"), (tmp_path / "taken" / "sub", "Not a directory")]:
        status = MAINS[command]([*argv, "--compile-cache", str(folder)])
        err = capsys.readouterr().err
        assert status == 2 and err == (f"error: cannot write the compilation cache folder {folder} ({reason}): "
                                       f"give another folder, or off (set --compile-cache)\n")
    status = MAINS[command]([*argv, "--compile-cache", "none"])
    assert status == 2 and capsys.readouterr().err == (
        "error: compile_cache 'none' is not a folder: give 'off' to turn the cache off, or a folder (set "
        "--compile-cache)\n")
    assert os.listdir(tmp_path) == ["taken"]
