"""train.py end to end on tiny settings: mock CIFAR-100 and an image folder, resume equality, the work folder's
files, final.msgpack, the feature cache against the full step, and each foreseeable mistake as one line on stderr
with exit status 2.

Kept fast on 2 CPU cores: a random backbone file with `--freeze backbone` (the step then differentiates the head
only), 32 px images not upsampled, batches of 8, a few steps an epoch, and train.py's own persistent compilation
cache in the session's user cache folder (tests/conftest.py; in-process runs of equal step settings share their
compiled steps anyway, as a test here shows).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest
from flax import traverse_util
from tensorboardX.proto import event_pb2

from flaxresnet import (checkpoints, cli, data, evaluation, load_converted, rundir, tensorboard, train_lib,
                        weights_file)
from flaxresnet.config import Config
from flaxresnet.errors import UserError, spelled_as
from flaxresnet.models import Classifier
from data_helpers import mock_tfds, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

# Mock CIFAR-100: 20 examples per split, so 2 training steps of 8 an epoch and 3 evaluation batches (one padded).
EXAMPLES = 20
TINY = ("--image-size", "32", "--batch-size", "8", "--freeze", "backbone", "--augment", "cutout,flip")
ROW_KEYS = {"epoch", "train_loss", "train_accuracy", "train_top5", "val_loss", "val_accuracy", "val_top5",
            "seconds", "img_per_s"}
TIMING_KEYS = {"seconds", "img_per_s"}

def run(capsys, *argv) -> tuple[int, str, str]:
    status = train.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def numbers(workdir: Path) -> list[dict]:
    """metrics.jsonl without the timings: what must be equal between runs."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows(workdir)]


def test_cifar100_extended_run_equals_uninterrupted_and_final_file_predicts(tmp_path, backbone_file, capsys):
    tfds_dir = tmp_path / "tfds"
    cifar = ("--backbone-weights", backbone_file, "--data-dir", tfds_dir, *TINY)
    with mock_tfds(tfds_dir, num_examples=EXAMPLES):
        status, out, err = run(capsys, *cifar, "--epochs", 3, "--workdir", tmp_path / "full")
        assert status == 0, err
        status, out, err = run(capsys, *cifar, "--epochs", 1, "--workdir", tmp_path / "split")
        assert status == 0, err
        assert "new run" in out and "epoch 1/1: train loss" in out
        assert ("input pipeline: memory, every image decoded before the first step (auto: the dataset is 0.1 MB "
                "decoded, within the memory budget of ") in out
        assert ("feature cache: off (augmentation (cutout,flip) changes the images every epoch; it needs --freeze "
                "backbone --augment none)\n") in out
        one = rows(tmp_path / "split")
        assert len(one) == 1 and set(one[0]) == ROW_KEYS and one[0]["epoch"] == 1
        assert all(isinstance(one[0][k], float) for k in ROW_KEYS - {"epoch"})

        status, out, err = run(capsys, *cifar, "--epochs", 3, "--workdir", tmp_path / "split")
        assert status == 0, err
        assert "resuming after epoch 1 (step 2) from checkpoints/2" in out
        assert "epoch 1/3" not in out and "epoch 3/3" in out
        ds = data.load_dataset("cifar100", str(tfds_dir))

    full, split = tmp_path / "full", tmp_path / "split"
    assert numbers(split) == numbers(full) and [r["epoch"] for r in rows(full)] == [1, 2, 3]
    assert rows(split)[0] == one[0]  # the first run's row is kept, timings included
    assert sorted(int(p.name) for p in (split / "checkpoints").iterdir()) == [2, 4, 6]  # after each epoch
    assert json.loads((split / "config.json").read_text())["num_classes"] == 100
    # TensorBoard: every step once (the resumed run continues the stopped one's events), every epoch's metrics.
    events = read_events(split)
    assert [step for step, _ in events["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in events["epoch/val_accuracy"]] == [1, 2, 3]
    for row in rows(split):
        losses = [v for step, v in events["train/loss"] if (step - 1) // 2 + 1 == row["epoch"]]
        assert np.mean(losses) == pytest.approx(row["train_loss"], rel=1e-6)  # float32 in the event file
        assert dict(events["epoch/val_loss"])[row["epoch"]] == pytest.approx(row["val_loss"], rel=1e-6)
    assert all(v == pytest.approx(1e-3) for _, v in events["train/learning_rate"])
    assert len(events["train/grad_norm"]) == 6 and all(v > 0 for _, v in events["train/grad_norm"])
    assert (split / "curves.png").read_bytes()[:4] == b"\x89PNG"

    model, variables = load_converted(split / "final.msgpack")
    _, full_variables = load_converted(full / "final.msgpack")
    flat, full_flat = (traverse_util.flatten_dict(v) for v in (variables, full_variables))
    assert flat.keys() == full_flat.keys() and all(np.array_equal(flat[k], full_flat[k]) for k in flat)
    _, metadata = weights_file.load(split / "final.msgpack")
    assert isinstance(model, Classifier) and metadata["image_shape"] == [32, 32, 3]
    assert metadata["class_names"] == ds.class_names and len(ds.class_names) == 100
    logits = jax.jit(lambda x: model.apply(variables, x))(ds.validation.images)
    assert logits.shape == (EXAMPLES, 100)
    # The evaluation command's numbers on the final file are the loop's final validation numbers.
    result = evaluation.evaluate(model, train_lib.replicate(variables), ds.validation, 8)
    last = rows(split)[-1]
    assert (result.loss, result.accuracy, result.top5) == (last["val_loss"], last["val_accuracy"],
                                                          last["val_top5"])
    assert result.accuracy == np.mean(np.argmax(logits, -1) == ds.validation.labels)


def stop_at(monkeypatch, name: str, count: int, signum: int = signal.SIGINT) -> None:
    """Ctrl-C (or `signum`) after the `count`-th call of `train_lib.<name>` (the step runs first)."""
    step, calls = getattr(train_lib, name), []

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) == count:
            os.kill(os.getpid(), signum)
        return step(*args)

    monkeypatch.setattr(train_lib, name, interrupted_step)


def test_ctrl_c_mid_epoch_saves_and_resumes_to_the_same_numbers(tmp_path, backbone_file, capsys, monkeypatch):
    """Ctrl-C after the last batch of epoch 2 (before its evaluation): a checkpoint of that step, exit status 130;
    the resumed run evaluates, replaces that checkpoint with the epoch's own and ends as an uninterrupted run."""
    tfds_dir = tmp_path / "tfds"
    cosine = ("--backbone-weights", backbone_file, "--data-dir", tfds_dir, *TINY, "--epochs", 3,
              "--schedule", "cosine", "--eval-every", 2)
    with mock_tfds(tfds_dir, num_examples=EXAMPLES):
        status, _, err = run(capsys, *cosine, "--workdir", tmp_path / "full")
        assert status == 0, err
        stop_at(monkeypatch, "p_train_step", 4)  # the second step of epoch 2: epoch 1 checkpointed, epoch 2 trained
        status, _, err = run(capsys, *cosine, "--workdir", tmp_path / "stopped")
        assert status == 130
        assert err == ("interrupted at step 4 (epoch 2, batch 2 of 2): checkpoint saved; rerun the same command "
                       "to resume\n")
        assert not (tmp_path / "stopped" / "final.msgpack").exists()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are put back
        monkeypatch.undo()
        status, out, err = run(capsys, *cosine, "--workdir", tmp_path / "stopped")
        assert status == 0, err
        assert "resuming at step 4 (epoch 2, batch 2 of 2) from checkpoints/4" in out
        assert "epoch 2/3: train loss" in out
        # A cosine schedule ends at --epochs: the run cannot be extended, and says so.
        status, _, err = run(capsys, *cosine[:-4], "--epochs", 4, "--schedule", "cosine",
                             "--workdir", tmp_path / "stopped")
    assert numbers(tmp_path / "stopped") == numbers(tmp_path / "full")
    assert rows(tmp_path / "full")[0]["val_loss"] is None  # --eval-every 2
    assert status == 2 and "cosine schedule decays to zero at epoch 3" in err and err.count("\n") == 1


def test_streamed_run_stopped_mid_epoch_resumes_to_the_in_memory_numbers(tmp_path, backbone_file, capsys,
                                                                          monkeypatch):
    """--input-pipeline stream, batches decoded by 2 worker processes: Ctrl-C in epoch 2, resumed from its step
    (no replay of the epoch's first batch), ends with the in-memory run's metrics and final.msgpack, bit for bit."""
    tfds_dir = tmp_path / "tfds"
    cifar = ("--backbone-weights", backbone_file, "--data-dir", tfds_dir, *TINY, "--epochs", 2)
    streamed = ("--input-pipeline", "stream", "--data-workers", 2, "--workdir", tmp_path / "stream")
    with mock_tfds(tfds_dir, num_examples=EXAMPLES):
        status, out, err = run(capsys, *cifar, "--input-pipeline", "memory", "--workdir", tmp_path / "memory")
        assert status == 0, err
        assert ("input pipeline: memory, every image decoded before the first step (as chosen; the dataset is 0.1 MB "
                "decoded)\n") in out
        stop_at(monkeypatch, "p_train_step", 3)  # batch 1 of 2 in epoch 2
        status, out, err = run(capsys, *cifar, *streamed)
        assert status == 130 and err.startswith("interrupted at step 3 (epoch 2, batch 1 of 2): checkpoint saved")
        assert ("input pipeline: stream, each batch decoded when needed by 2 worker process(es) (as chosen; the "
                "dataset is 0.1 MB decoded)\n") in out
        monkeypatch.undo()
        status, out, err = run(capsys, *cifar, *streamed)
        assert status == 0, err
        assert "resuming at step 3 (epoch 2, batch 1 of 2)" in out
    assert numbers(tmp_path / "stream") == numbers(tmp_path / "memory")
    final, expected = (traverse_util.flatten_dict(load_converted(tmp_path / name / "final.msgpack")[1])
                       for name in ("stream", "memory"))
    assert final.keys() == expected.keys() and all(np.array_equal(final[k], expected[k]) for k in final)


def test_feature_cache_equals_the_full_step_and_resumes_either_way(tmp_path, backbone_file, capsys, monkeypatch):
    """--freeze backbone --augment none, seed head with dropout: the cached run's metrics equal the full step's
    (validation accuracy exactly, losses to 1e-4) and so does final.msgpack; a cached run stopped mid-epoch
    resumes to exactly the uninterrupted cached run, and its checkpoint also continues without the cache."""
    tfds_dir = tmp_path / "tfds"
    probe = ("--backbone-weights", backbone_file, "--data-dir", tfds_dir, "--image-size", 32, "--batch-size", 8,
             "--freeze", "backbone", "--augment", "none", "--epochs", 2)
    with mock_tfds(tfds_dir, num_examples=EXAMPLES):
        with monkeypatch.context() as patch:  # the full step alone: the cached path would call None
            for name in ("p_pooled_features", "p_head_train_step", "p_head_eval_step"):
                patch.setattr(train_lib, name, None)
            status, out, err = run(capsys, *probe, "--feature-cache", "off", "--workdir", tmp_path / "full")
        assert status == 0, err
        assert "feature cache: off (--feature-cache off)\n" in out
        status, out, err = run(capsys, *probe, "--workdir", tmp_path / "cached")
        assert status == 0, err
        on = [line for line in out.splitlines() if line.startswith("feature cache:")]
        assert len(on) == 1 and on[0].startswith(
            "feature cache: on (backbone frozen and in inference mode, no augmentation): the pooled backbone "
            "features of 40 images computed once in ") and "0.3 MB on the host" in on[0]

        stop_at(monkeypatch, "p_head_train_step", 3)  # step 3: batch 1 of 2 in epoch 2
        status, _, err = run(capsys, *probe, "--workdir", tmp_path / "stopped")
        assert status == 130 and err.startswith("interrupted at step 3 (epoch 2, batch 1 of 2): checkpoint saved")
        monkeypatch.undo()
        shutil.copytree(tmp_path / "stopped", tmp_path / "switched")
        status, out, err = run(capsys, *probe, "--workdir", tmp_path / "stopped")
        assert status == 0, err
        assert "resuming at step 3 (epoch 2, batch 1 of 2)" in out and "feature cache: on" in out
        status, out, err = run(capsys, *probe, "--feature-cache", "off", "--workdir", tmp_path / "switched")
        assert status == 0, err
        assert "resuming at step 3 (epoch 2, batch 1 of 2)" in out and "feature cache: off" in out

    full, cached = numbers(tmp_path / "full"), numbers(tmp_path / "cached")
    print("cached / full loss - 1:", [(r["train_loss"] / f["train_loss"] - 1, r["val_loss"] / f["val_loss"] - 1)
                                      for r, f in zip(cached, full)])
    assert numbers(tmp_path / "stopped") == cached  # bit for bit: the cache is recomputed identically
    for other in (cached, numbers(tmp_path / "switched")):
        assert [r["epoch"] for r in other] == [1, 2]
        for row, reference in zip(other, full):
            for key in ("train_accuracy", "train_top5", "val_accuracy", "val_top5"):
                assert row[key] == reference[key], key
            for key in ("train_loss", "val_loss"):
                assert abs(row[key] / reference[key] - 1) < 1e-4, key
    assert full[1]["train_loss"] != full[0]["train_loss"]  # the head learns: the losses move
    finals = {name: traverse_util.flatten_dict(load_converted(tmp_path / name / "final.msgpack")[1], sep="/")
              for name in ("full", "cached", "stopped")}
    assert finals["full"].keys() == finals["cached"].keys()
    for path, value in finals["full"].items():
        if "/backbone/" in path:
            assert np.array_equal(value, finals["cached"][path]), path  # never touched
        else:
            np.testing.assert_allclose(finals["cached"][path], value, rtol=1e-4, atol=1e-6, err_msg=path)
        assert np.array_equal(finals["stopped"][path], finals["cached"][path]), path


def test_runs_differing_in_run_settings_share_the_compiled_steps(tmp_path, backbone_file, capsys, monkeypatch):
    """Work folder, data folder, epochs (constant schedule) and evaluation interval are not part of the compiled
    steps: a second run in this process traces neither the train step nor the eval step again."""
    traces = []
    cross_entropy = train_lib.cross_entropy

    def counted(*args, **kwargs):  # called once each time a step is traced, never when a compiled one runs
        traces.append(1)
        return cross_entropy(*args, **kwargs)

    monkeypatch.setattr(train_lib, "cross_entropy", counted)
    unique = ("--backbone-weights", backbone_file, *TINY, "--hidden", 32)  # a model no other test compiles
    with mock_tfds(tmp_path / "tfds", num_examples=EXAMPLES):
        status, _, err = run(capsys, *unique, "--data-dir", tmp_path / "tfds", "--epochs", 1,
                             "--workdir", tmp_path / "first")
        assert status == 0, err
        first = len(traces)
        status, _, err = run(capsys, *unique, "--data-dir", tmp_path / "elsewhere", "--epochs", 2,
                             "--eval-every", 2, "--workdir", tmp_path / "second")
        assert status == 0, err
    assert first == 2  # the train step and the eval step, each traced once
    assert len(traces) == first
    assert [r["epoch"] for r in rows(tmp_path / "second")] == [1, 2]


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in `folder`, oldest file first: {tag: [(step, value), ...]}
    (TFRecord framing: length u64, its crc u32, an Event proto, its crc u32)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        raw, offset = path.read_bytes(), 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset:offset + 8])
            event = event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_without_the_tensorboard_extra_nothing_changes(tmp_path, backbone_file, capsys, monkeypatch):
    monkeypatch.setattr(tensorboard, "SummaryWriter", None)  # as if tensorboardX were not installed
    with mock_tfds(tmp_path / "tfds", num_examples=EXAMPLES):
        status, _, err = run(capsys, "--backbone-weights", backbone_file, "--data-dir", tmp_path / "tfds", *TINY,
                             "--epochs", 1, "--workdir", tmp_path / "run")
    assert status == 0, err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.json", "curves.png",
                                                                    "final.msgpack", "metrics.jsonl"]


def test_workdir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    status, out, err = run(capsys, "--backbone-weights", "none", "--dataset", "digits", "--workdir",
                           tmp_path / "taken")
    assert status == 2 and err == f"error: work folder {tmp_path / 'taken'} is a file, not a folder: choose " \
                                  f"another --workdir\n"


def test_image_folder_run_in_a_subprocess(tmp_path, backbone_file):
    """Also: the compilation cache is on by default, in $XDG_CACHE_HOME/flaxresnet/jax-compilation-cache."""
    folder = write_image_folder(tmp_path / "images", {"cat": 12, "dog": 12, "fish": 12})
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "user-cache")}
    done = subprocess.run([sys.executable, "train.py", "--backbone-weights", backbone_file, "--dataset",
                           f"folder:{folder}", *TINY, "--epochs", "1", "--workdir", tmp_path / "run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "30 training and 6 validation images of 32x32 px" in done.stdout
    assert "epoch 1/1: train loss" in done.stdout
    (row,) = rows(tmp_path / "run")
    assert set(row) == ROW_KEYS - {"train_top5", "val_top5"}  # 3 classes: no top-5
    model, variables = load_converted(tmp_path / "run" / "final.msgpack")
    _, metadata = weights_file.load(tmp_path / "run" / "final.msgpack")
    assert metadata["class_names"] == ["cat", "dog", "fish"] and model.num_classes == 3
    # Every program the run compiled: the train and evaluation steps, the initialisation and ~15 small ones.
    assert len(list((tmp_path / "user-cache" / "flaxresnet" / "jax-compilation-cache").glob("jit_*-cache"))) > 10


def test_non_finite_loss_stops_naming_the_step(tmp_path, backbone_file, capsys, monkeypatch):
    def nan_step(state, batch, rng):
        loss = np.nan if int(state.step[0]) == 2 else 1.0
        return state.replace(step=state.step + 1), {"loss": np.full(1, loss), "accuracy": np.zeros(1),
                                                    "grad_norm": np.ones(1)}

    monkeypatch.setattr(train_lib, "p_train_step", nan_step)
    with mock_tfds(tmp_path / "tfds", num_examples=EXAMPLES):
        status, _, err = run(capsys, "--backbone-weights", backbone_file, "--data-dir", tmp_path / "tfds", *TINY,
                             "--epochs", 3, "--workdir", tmp_path / "run")
    assert status == 2 and err.count("\n") == 1
    assert "the training loss is nan at step 3 (epoch 2, batch 1 of 2): stopped" in err
    assert [r["epoch"] for r in rows(tmp_path / "run")] == [1]


def bad_image_folder(tmp_path: Path) -> Path:
    folder = write_image_folder(tmp_path / "images", {"a": 3, "b": 3})
    (folder / "b" / "broken.png").write_bytes(b"not a png")
    return folder


def corrupt_checkpoint(tmp_path: Path) -> Path:
    (tmp_path / "run" / "checkpoints" / "7" / "meta").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "7" / "meta" / "metadata").write_text("{truncated")
    return tmp_path / "run"


def old_checkpoint(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint_0001.msgpack").write_bytes(b"\x93")
    return tmp_path / "run"


def garbage_file(tmp_path: Path) -> Path:
    (tmp_path / "garbage.msgpack").write_bytes(b"\x00" * 100)
    return tmp_path / "garbage.msgpack"


def keras_h5_file(tmp_path: Path) -> Path:
    h5py.File(tmp_path / "resnet50_notop.h5", "w").close()
    return tmp_path / "resnet50_notop.h5"


@pytest.mark.parametrize("argv, message", [
    (lambda t: ["--backbone-weights", t / "missing.msgpack"], "weights file {t}/missing.msgpack not found"),
    (lambda t: ["--backbone-weights", garbage_file(t)], "{t}/garbage.msgpack is not a readable flaxresnet"),
    (lambda t: ["--backbone-weights", keras_h5_file(t)],
     "convert it first with `python -m convert keras_to_flax --weights {t}/resnet50_notop.h5`"),
    (lambda t: ["--backbone-weights", "none", "--data-dir", t], "tfds dataset 'cifar100' is not prepared in"),
    (lambda t: ["--backbone-weights", "none", "--dataset", f"folder:{t}"], "image folder {t} has no class"),
    (lambda t: ["--backbone-weights", "none", "--dataset", f"folder:{bad_image_folder(t)}", "--batch-size", "2"],
     "cannot read image {t}/images/b/broken.png"),
    (lambda t: ["--backbone-weights", "none", "--workdir", corrupt_checkpoint(t)],
     "checkpoint {t}/run/checkpoints/7 is corrupt or not a flaxresnet checkpoint (JSONDecodeError: "),
    (lambda t: ["--backbone-weights", "none", "--workdir", old_checkpoint(t)],
     "{t}/run holds checkpoints of an older flaxresnet (checkpoint_0001.msgpack), which this one does not "
     "resume: use a fresh --workdir"),
    (lambda t: ["--backbone-weights", "none", "--coordinator", "127.0.0.1:1234"],
     "a multi-process run needs all of coordinator (HOST:PORT of process 0), num_processes and process_id, or "
     "coordinator 'auto' (set --coordinator)"),
    (lambda t: ["--backbone-weights", "none", "--dataset", "digits", "--image-size", "20"],
     "--image-size 20 is not a whole multiple of the dataset's 8x8 images"),
    (lambda t: ["--backbone-weights", "none", "--augment", "rotate"], "unknown augmentation(s) rotate"),
], ids=["missing-weights", "corrupt-weights", "keras-weights", "unprepared-dataset", "empty-folder", "unreadable-image",
        "corrupt-checkpoint", "old-checkpoint", "half-multi-process", "image-size", "augment"])
def test_mistakes_fail_fast_with_one_line(tmp_path, capsys, argv, message):
    status, out, err = run(capsys, *argv(tmp_path), "--workdir", tmp_path / "run")
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(t=tmp_path) in err


def test_every_option_is_a_flag_of_its_field():
    config = train.parse_args(["--backbone-weights", "none", "--image-size", "none", "--augment", "none",
                               "--clip-norm", "2", "--label-smoothing", "0.1", "--depth", "101", "--workdir", "w"])
    assert config == Config(backbone_weights=None, image_size=None, augment=(), clip_norm=2.0, label_smoothing=0.1,
                            depth=101, workdir="w")
    assert train.parse_args(["--backbone-weights", "b.msgpack", "--augment", "flip, cutout",
                             "--workdir", "w"]).augment == ("flip", "cutout")
    launch = train.parse_args(["--backbone-weights", "none", "--coordinator", "10.0.0.1:1234", "--num-processes", "2",
                               "--process-id", "1", "--checkpoint-every", "none", "--compile-cache", "off"])
    assert (launch.coordinator, launch.num_processes, launch.process_id) == ("10.0.0.1:1234", 2, 1)
    assert launch.checkpoint_every is None and launch.workdir is None  # the loop names a fresh folder
    assert launch.compile_cache == "off" and Config(backbone_weights=None).compile_cache == "default"
    # How a process joins the run and caches is not a setting of the run: never saved, so resuming may change it.
    assert launch.to_dict() == Config(backbone_weights=None, checkpoint_every=None).to_dict()
    assert not {"coordinator", "num_processes", "process_id", "compile_cache"} & set(launch.to_dict())


def test_batch_size_not_divisible_by_devices(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "train.py", "--backbone-weights", "none", "--dataset", "digits",
                           "--batch-size", "7", "--workdir", tmp_path / "run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("error: batch size 7 does not divide evenly over 2 devices: use a multiple of 2 (set "
                           "--batch-size)\n")


@pytest.mark.parametrize("changes, message", [
    ({"epochs": 5, "eval_every": 2, "workdir": "elsewhere", "data_dir": "moved", "checkpoint_every": 7,
      "coordinator": "h:1", "num_processes": 2, "process_id": 1, "compile_cache": "off"}, None),
    ({"learning_rate": 0.01}, "other settings (--learning-rate 0.001 -> 0.01)"),
    ({"epochs": 2}, "holds a run already in epoch 3: pass --epochs 3 or more"),
    ({"schedule": "cosine", "epochs": 5}, "other settings (--schedule constant -> cosine)"),
])
@pytest.mark.parametrize("mid_epoch", [False, True])
def test_resume_checks_the_settings(tmp_path, changes, message, mid_epoch):
    saved = Config(num_classes=10, epochs=3, workdir=str(tmp_path))
    history = [{"epoch": e} for e in range(1, 3 if mid_epoch else 4)]
    meta = checkpoints.Meta(saved, history, [{"loss": 1.0}] if mid_epoch else [])
    checkpoint = checkpoints.Checkpoint(tmp_path / "checkpoints" / "30", 30, meta)
    config = Config(**{**saved.to_dict(), "num_classes": 100, **changes})
    if message is None:
        rundir.check_resumable(checkpoint, config)
    else:
        with pytest.raises(UserError) as e, spelled_as(cli.flag):  # as train.py names the options
            rundir.check_resumable(checkpoint, config)
        assert str(e.value).startswith(f"{tmp_path} holds a run") and message in str(e.value)


def test_a_full_disk_stops_the_run_in_one_line(tmp_path, backbone_file, small_disk):
    """150 MB: the first checkpoint (~100 MB, step 15) fits, the second does not; the first stays resumable."""
    workdir = small_disk(150) / "run"
    done = subprocess.run([sys.executable, "train.py", "--backbone-weights", backbone_file, "--dataset", "digits",
                           "--image-size", "none", "--batch-size", "32", "--epochs", "2", "--freeze", "backbone",
                           "--augment", "cutout,flip", "--cutout-size", "3", "--checkpoint-every", "15",
                           "--workdir", workdir], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(rf"^warning: {workdir / 'checkpoints'} has 15\d\.\d MB free, less than the 4 checkpoints of "
                     r"10\d\.\d MB a run holds at once: a checkpoint that does not fit stops the run$", done.stdout,
                     re.MULTILINE), done.stdout
    assert re.fullmatch(
        rf"error: the checkpoint of step 30 could not be written to {workdir / 'checkpoints'} \(No space left on "
        r"device\): it needs 10\d\.\d MB, \d+\.\d MB are free; the last complete checkpoint \(step 15\) is intact "
        r"and a rerun of the same command resumes from it once the folder has room and can be written\n",
        done.stderr), done.stderr[-3000:]
    store = checkpoints.Checkpoints(workdir / "checkpoints")  # the refused save's leftovers are no checkpoint
    assert store.steps() == [15] and store.latest().step == 15
