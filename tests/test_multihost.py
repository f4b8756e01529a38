"""train.py as several processes (`jax.distributed` on 127.0.0.1, gloo collectives) and its stops: 2 processes x
1 device equal 1 process x 2 devices bit for bit; SIGTERM (to the one process, or to one of two) saves a
checkpoint at the same step everywhere and the resumed run equals the uninterrupted one; so does a resume from a
periodic mid-epoch checkpoint after `kill -9`, and a streamed run (`--input-pipeline stream`) stopped by a SIGTERM
to a whole process group, data workers included.

Kept small on 2 CPU cores: an image folder of 400 of the 8x8 digits (320 for training: 20 steps of 16 an epoch),
a random backbone with `--freeze backbone` (the head and its BatchNorm train, gradients and statistics averaged
over all devices), 2 epochs, a checkpoint every 6 steps, and train.py's persistent compilation cache, in the session's user cache folder
(tests/conftest.py), for every process started here. Every process is ended (killed if need be) when its test
ends.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

from flaxresnet import load_converted
from data_helpers import write_digits_folder
from process_helpers import running

STEPS, EPOCHS, EVERY = 20, 2, 6
TIMEOUT = 300  # seconds a run may take at most (a cold compilation cache on 2 busy cores)
TIMING_KEYS = {"seconds", "img_per_s"}
FILES = ["checkpoints", "config.json", "curves.png", "final.msgpack", "metrics.jsonl"]
STOPPED = re.compile(r"preempted at step (\d+) \(epoch (\d), batch (\d+) of 20\): checkpoint saved; rerun the "
                     r"same command to resume")


@pytest.fixture(scope="module")
def argv(tmp_path_factory, backbone_file) -> list[str]:
    images = write_digits_folder(tmp_path_factory.mktemp("digits") / "images", 40)
    return ["--backbone-weights", str(backbone_file), "--dataset", f"folder:{images}", "--image-size", "8", "--batch-size", "16",
            "--epochs", str(EPOCHS), "--freeze", "backbone", "--augment", "cutout,flip", "--cutout-size", "3",
            "--checkpoint-every", str(EVERY)]


def numbers(workdir: Path) -> list[dict]:
    """metrics.jsonl without the timings: what must be equal between runs."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def final_arrays(workdir: Path) -> dict:
    return traverse_util.flatten_dict(load_converted(workdir / "final.msgpack")[1])


def assert_same_run(workdir: Path, reference: Path) -> None:
    assert numbers(workdir) == numbers(reference) and len(numbers(reference)) == EPOCHS
    final, expected = final_arrays(workdir), final_arrays(reference)
    assert final.keys() == expected.keys()
    assert all(np.array_equal(final[k], expected[k]) for k in final)


def complete_run(tmp_path_factory, argv, processes: int) -> Path:
    workdir = tmp_path_factory.mktemp(f"reference-{processes}") / "run"
    start = time.perf_counter()
    with running(argv, workdir, processes, 2, record_writes=processes > 1) as run:
        statuses = run.wait(TIMEOUT)
        assert statuses == [0] * processes, run.err(0)[-3000:]
    print(f"{processes} process(es) x {2 // processes} device(s): {time.perf_counter() - start:.1f} s")
    return workdir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, argv) -> Path:
    """An uninterrupted run: 1 process x 2 devices."""
    return complete_run(tmp_path_factory, argv, 1)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, argv) -> Path:
    """An uninterrupted run: 2 processes x 1 device, process 1 recording what it writes."""
    return complete_run(tmp_path_factory, argv, 2)


def test_two_processes_equal_one_with_as_many_devices(one_process, two_processes):
    assert_same_run(two_processes, one_process)
    names = sorted(p.name for p in two_processes.iterdir())
    assert [n for n in names if not n.startswith("events.out.tfevents.")] == FILES
    assert len(names) == len(FILES) + 1  # one TensorBoard event file, process 0's
    logs = two_processes.parent / "run-logs"
    out0, out1 = (logs / "0.out").read_text(), (logs / "1.out").read_text()
    assert "on 2 CPU device(s) in 2 processes" in out0 and "epoch 2/2: train loss" in out0
    assert "epoch" not in out1 and "final classifier" not in out1  # only process 0 prints
    assert not (logs / "1.writes").exists()  # ... and writes the run's files (orbax writes checkpoints jointly)
    steps = sorted(int(p.name) for p in (two_processes / "checkpoints").iterdir())
    assert steps == [30, 36, 40]  # every 6 steps and after each epoch of 20, the last 3 kept


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_mid_epoch_saves_and_resumes_to_the_same_numbers(tmp_path, argv, one_process,
                                                                  two_processes, processes):
    """SIGTERM to process 0 alone (1 process) or to process 1 of 2: every process stops after the same step."""
    workdir = tmp_path / "run"
    with running(argv, workdir, processes, 2) as run:
        run.wait_for_checkpoint(EVERY, TIMEOUT)
        run.signal(signal.SIGTERM, processes - 1)
        sent = time.perf_counter()
        statuses = run.wait(60)
        print(f"stopped {time.perf_counter() - sent:.1f} s after SIGTERM")
        lines = [run.err(i).strip().splitlines()[-1] for i in range(processes)]
    assert statuses == [143] * processes, run.err(0)[-3000:]
    stopped = [STOPPED.fullmatch(line) for line in lines]
    assert all(stopped), lines
    assert len(set(lines)) == 1  # the same step everywhere
    step, epoch, batch = map(int, stopped[0].groups())
    assert step == batch and epoch == 1 and EVERY <= step < STEPS
    assert "Traceback" not in "".join(run.err(i) for i in range(processes))
    assert (workdir / "checkpoints" / str(step) / "commit_success.txt").exists()
    assert not (workdir / "final.msgpack").exists()

    with running(argv, workdir, processes, 2) as run:
        assert run.wait(TIMEOUT) == [0] * processes, run.err(0)[-3000:]
    assert f"resuming at step {step} (epoch 1, batch {step} of {STEPS}) from checkpoints/{step}" in run.out(0)
    assert_same_run(workdir, two_processes if processes == 2 else one_process)


def test_streamed_processes_stop_on_sigterm_to_a_process_group_and_resume_to_the_same_numbers(tmp_path, argv,
                                                                                                 two_processes):
    """--input-pipeline stream, 1 data worker per process, each decoding its rows: SIGTERM to the whole process
    group of process 1 (its worker too, as a scheduler does) stops both processes after the same step; resumed,
    the run ends with the in-memory run's numbers of the same layout, bit for bit."""
    workdir, streamed = tmp_path / "run", [*argv, "--input-pipeline", "stream", "--data-workers", "1"]
    with running(streamed, workdir, 2, 2) as run:
        run.wait_for_checkpoint(EVERY, TIMEOUT)
        run.signal_group(signal.SIGTERM, 1)
        statuses = run.wait(60)
        lines = [run.err(i).strip().splitlines()[-1] for i in range(2)]
    assert statuses == [143, 143], run.err(0)[-3000:]
    stopped = [STOPPED.fullmatch(line) for line in lines]
    assert all(stopped) and len(set(lines)) == 1, lines
    assert "input pipeline: stream, each batch decoded when needed by 1 worker process(es) of each training " \
           "process (as chosen" in run.out(0)
    assert "Traceback" not in run.err(0) + run.err(1)
    step = int(stopped[0].group(1))
    with running(streamed, workdir, 2, 2) as run:
        assert run.wait(TIMEOUT) == [0, 0], run.err(0)[-3000:]
    assert f"resuming at step {step} (epoch 1, batch {step} of {STEPS})" in run.out(0)
    assert_same_run(workdir, two_processes)


def test_kill_9_resumes_from_a_periodic_checkpoint_to_the_same_numbers(tmp_path, argv, one_process):
    """No chance to save: the run resumes from the newest complete periodic checkpoint, in epoch 2."""
    workdir = tmp_path / "run"
    with running(argv, workdir, 1, 2) as run:
        run.wait_for_checkpoint(4 * EVERY, TIMEOUT)
        run.signal(signal.SIGKILL)
        assert run.wait(30) == [-signal.SIGKILL]
    with running(argv, workdir, 1, 2) as run:
        assert run.wait(TIMEOUT) == [0], run.err(0)[-3000:]
    resumed = re.search(r"resuming at step (\d+) \(epoch 2, batch (\d+) of 20\)", run.out(0))
    assert resumed, run.out(0)
    assert int(resumed.group(1)) >= 4 * EVERY and int(resumed.group(2)) == int(resumed.group(1)) - STEPS
    assert_same_run(workdir, one_process)
