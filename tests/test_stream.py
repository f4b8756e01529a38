"""The `stream` input pipeline (flaxresnet.stream) against the in-memory one: bit-identical batches from mock and
real tfds datasets, image folders and digits, in worker processes or in this one; a resumed epoch's start and a
process's rows; an unreadable image's one line; workers that leave signals to the training process and end with
it; the `auto` choice. Worker processes take a few seconds to start on 2 cores, so few tests start them."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from benchmarks.datasets import prepare_tfds_images
from data_helpers import mock_tfds, write_image_folder
from flaxresnet import data, stream
from flaxresnet.errors import UserError


def assert_same_batches(left, right) -> int:
    """Both iterables give the same batches, key by key, bit for bit (dtype and shape included); their count."""
    left, right = list(left), list(right)
    assert len(left) == len(right) > 0
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    return len(left)


def assert_stream_equals_memory(ds: data.Dataset, workers: int, batch_size: int) -> None:
    """Train batches of one epoch and evaluation batches (the last padded) of both splits, both pipelines."""
    memory, streamed = ds.in_memory(), ds.streamed(workers)
    assert isinstance(streamed.train, data.StreamSplit) and isinstance(memory.train, data.Split)
    assert_same_batches(data.train_batches(memory.train, batch_size, seed=3, epoch=2),
                        data.train_batches(streamed.train, batch_size, seed=3, epoch=2))
    assert len(memory.validation) % batch_size  # so the last batch is padded
    assert_same_batches(data.eval_batches(memory.validation, batch_size),
                        data.eval_batches(streamed.validation, batch_size))


def test_mock_tfds_stream_equals_memory_in_worker_processes(tmp_path):
    with mock_tfds(tmp_path, num_examples=21):
        assert_stream_equals_memory(data.open_dataset("cifar100"), workers=2, batch_size=4)


def test_real_tfds_of_varying_sizes_stream_equals_memory(tmp_path):
    """A prepared ArrayRecord dataset with images of three sizes, resized when read; no validation split, so
    one is split off by the labels, read without decoding the images."""
    name = prepare_tfds_images(tmp_path, {"train": 30}, sizes=((9, 7), (12, 12), (5, 16)), channels=1)
    ds = data.open_dataset(f"tfds:{name}", str(tmp_path), seed=1, image_size=10)
    assert ds.train.image_shape == (10, 10, 3) and len(ds.train) + len(ds.validation) == 30
    assert_stream_equals_memory(ds, workers=0, batch_size=4)
    assert_same_batches(data.eval_batches(ds.in_memory().train, 7), data.eval_batches(ds.streamed(2).train, 7))


def test_image_folder_stream_equals_memory_in_worker_processes(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "images", {"cat": 9, "dog": 8, "eel": 7})
    ds = data.open_dataset(f"folder:{root}", seed=5, image_size=24)
    assert_stream_equals_memory(ds, workers=2, batch_size=4)
    # A large dataset is decoded into memory by the workers, in chunks (the last one partial): the same arrays.
    monkeypatch.setattr(data, "PARALLEL_DECODE_FROM", 10)
    monkeypatch.setattr(data, "DECODE_CHUNK", 3)
    by_workers, by_threads = ds.in_memory(workers=2).train, ds.in_memory().train
    assert len(by_workers) % 3
    np.testing.assert_array_equal(by_workers.images, by_threads.images)
    np.testing.assert_array_equal(by_workers.labels, by_threads.labels)


def test_digits_stream_equals_memory():
    assert_stream_equals_memory(data.open_dataset("digits"), workers=0, batch_size=64)


@dataclasses.dataclass(frozen=True)
class CountingSource(data.Split):
    """A Split that records which examples are read (workers 0: in this process)."""

    reads: list = dataclasses.field(default_factory=list)

    def read(self, index: int):
        self.reads.append(index)
        return super().read(index)


def test_a_resumed_epoch_and_each_process_read_only_their_batches_and_rows():
    """Example i of the source has every pixel i, so a batch shows which examples it holds."""
    images = np.broadcast_to(np.arange(40, dtype=np.uint8)[:, None, None, None], (40, 3, 3, 3))
    source = CountingSource(np.ascontiguousarray(images), np.arange(40, dtype=np.int32) % 5)
    split = data.StreamSplit(source, np.arange(3, 39))  # a part of its source, as a split-off train part is

    def read_by(batches) -> tuple[list, list[int]]:
        source.reads.clear()
        batches = list(batches)
        held = sorted(np.concatenate([b["image"][:, 0, 0, 0] for b in batches]).tolist())
        return batches, held

    full, held = read_by(data.train_batches(split, 8, seed=0, epoch=1))
    assert len(full) == 4 and sorted(source.reads) == held and len(held) == 32 and min(held) >= 3
    tail, held = read_by(data.train_batches(split, 8, seed=0, epoch=1, start=2))
    assert_same_batches(tail, full[2:])
    assert sorted(source.reads) == held and len(held) == 16  # no replay of the batches before the resumed one
    for rows in (slice(0, 4), slice(4, 8)):  # process 0 and process 1 of 2
        mine, held = read_by(data.train_batches(split, 8, seed=0, epoch=1, rows=rows))
        assert_same_batches(mine, [{k: v[rows] for k, v in batch.items()} for batch in full])
        assert sorted(source.reads) == held and len(held) == 16  # its 4 rows of each of the 4 batches alone
    memory = data.Split(source.images[3:39], source.labels[3:39])
    assert_same_batches(data.eval_batches(split, 7, rows=slice(4, 7)), data.eval_batches(memory, 7, slice(4, 7)))


def test_bad_image_in_a_streamed_folder_is_one_line_naming_the_file(tmp_path):
    root = write_image_folder(tmp_path / "images", {"a": 6, "b": 6})
    (root / "b" / "bad.jpg").write_bytes(b"this is no jpeg")
    ds = data.open_dataset(f"folder:{root}", seed=0).streamed(2)
    with pytest.raises(UserError) as caught:
        for split in (ds.train, ds.validation):
            list(data.eval_batches(split, 2))
    # The command line prints str(error): grain's note on its traceback filtering is not part of it.
    assert re.fullmatch(r"cannot read image .*images/b/bad\.jpg \(.*\): fix or remove the file", str(caught.value))
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()  # the workers ended with the failed batches


def test_user_error_pickles_with_its_option():
    error = pickle.loads(pickle.dumps(UserError("batch size 7 does not divide", option="batch_size")))
    assert type(error) is UserError and str(error) == "batch size 7 does not divide"
    assert error.option == "batch_size"


_ORPHAN = textwrap.dedent("""
    import multiprocessing, threading, time
    import numpy as np
    from flaxresnet import data

    def tell_workers():  # as soon as both exist, while they are still starting
        while len(workers := multiprocessing.active_children()) < 2:
            time.sleep(0.005)
        print(" ".join(str(p.pid) for p in workers), flush=True)

    if __name__ == "__main__":
        threading.Thread(target=tell_workers, daemon=True).start()
        split = data.StreamSplit(data.Split(np.zeros((64, 2, 2, 3), np.uint8), np.zeros(64, np.int32)),
                                 np.arange(64), workers=2)
        batches = data.train_batches(split, 1, seed=0, epoch=0)
        for _ in range(3):  # batches of both workers
            next(batches)
        print("running", flush=True)
        time.sleep(600)
""")


def test_workers_ignore_signals_from_their_start_and_end_with_their_training_process(tmp_path):
    """SIGINT and SIGTERM sent to the workers as soon as they exist, while Python is still starting in them (a
    terminal's Ctrl-C and a scheduler's SIGTERM reach every process of the job), leave them working; a kill -9
    of the training process ends them."""
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in process.stdout.readline().split()]
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
        assert process.stdout.readline() == "running\n"
        time.sleep(0.5)
        assert all(alive(pid) for pid in workers) and process.poll() is None
        process.kill()  # no chance to end its workers
        process.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers)
    finally:
        process.kill()
        process.wait(10)
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie awaiting its parent's wait counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_auto_streams_what_does_not_fit_the_memory_budget(monkeypatch):
    ds = data.open_dataset("digits")
    assert ds.nbytes == 1797 * 8 * 8 * 3
    monkeypatch.setattr(data, "physical_memory", lambda: 8 * ds.nbytes)
    assert data.choose_pipeline("auto", ds) == ("memory", "auto: the dataset is 0.3 MB decoded, within the memory "
                                                "budget of 0.7 MB, 25% of this machine's memory")
    monkeypatch.setattr(data, "physical_memory", lambda: 4 * ds.nbytes - 4)
    assert data.choose_pipeline("auto", ds)[0] == "stream"
    assert data.choose_pipeline("memory", ds)[0] == "memory" and data.choose_pipeline("stream", ds)[0] == "stream"


def test_default_workers_leave_a_core_to_training():
    assert stream.default_workers() == max(1, len(os.sched_getaffinity(0)) - 1)
