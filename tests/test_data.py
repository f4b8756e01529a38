"""flaxresnet.data: every source, the host batching and the device prefetch; offline, no TensorFlow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.datasets import prepare_tfds_images
from data_helpers import mock_tfds, write_image_folder, write_tfds_metadata
from flaxresnet import data, feature_cache
from flaxresnet.errors import UserError


@pytest.fixture(autouse=True)
def deadline():
    """Fail a test that runs past 60 s instead of hanging (e.g. on a download attempt with no network)."""
    def fail(signum, frame):
        raise TimeoutError("test ran past 60 s: did something try to download?")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def assert_split(split: data.Split, n: int, size: tuple[int, int], num_classes: int) -> None:
    assert split.images.shape == (n, *size, 3) and split.images.dtype == np.uint8
    assert split.labels.shape == (n,) and split.labels.dtype == np.int32
    assert split.labels.min() >= 0 and split.labels.max() < num_classes


def synthetic_split(n: int, size: int = 4) -> data.Split:
    """Example i has label i and every pixel i % 256, so batches show which examples they hold."""
    images = np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, size, size, 3))
    return data.Split(np.ascontiguousarray(images), np.arange(n, dtype=np.int32))


# --- tfds ---------------------------------------------------------------------------------------------------

def test_mock_cifar100(tmp_path):
    with mock_tfds(tmp_path, num_examples=24):
        ds = data.load_dataset("cifar100")
        same = data.load_dataset("tfds:cifar100:label", data_dir="/ignored/by/the/mock")
    assert_split(ds.train, 24, (32, 32), 100)
    assert_split(ds.validation, 24, (32, 32), 100)
    assert ds.num_classes == len(ds.class_names) == 100
    np.testing.assert_array_equal(ds.train.images, same.train.images)
    np.testing.assert_array_equal(ds.validation.labels, same.validation.labels)


def test_unprepared_tfds_dataset_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(UserError, match="not prepared") as e:
        data.load_dataset("cifar100", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    message = str(e.value)
    assert "\n" not in message
    command = message.split(": ")[-1]
    assert command == ("pip install tensorflow-cpu && python -c \"import tensorflow_datasets as tfds; "
                       f"tfds.builder('cifar100', data_dir='{tmp_path}', file_format='array_record')"
                       ".download_and_prepare()\"")


def test_tfds_dataset_without_random_access(tmp_path):
    write_tfds_metadata(tmp_path, "cifar100", {"train": 10, "test": 10}, file_format="tfrecord")
    with pytest.raises(UserError, match="stored as tfrecord.*tfds convert_format --dataset_version_dir="):
        data.load_dataset("cifar100", data_dir=str(tmp_path))


def test_unknown_tfds_name(tmp_path):
    with pytest.raises(UserError, match="no tfds dataset named 'no_such_dataset'"):
        data.load_dataset("tfds:no_such_dataset", data_dir=str(tmp_path))


@pytest.fixture(scope="module")
def fixed_size_tfds(tmp_path_factory) -> Path:
    """A prepared dataset: 'train' 40, 'test' 12 examples of 12x12 RGB, 3 classes."""
    data_dir = tmp_path_factory.mktemp("tfds_fixed")
    prepare_tfds_images(data_dir, {"train": 40, "test": 12})
    return data_dir


def test_prepared_tfds_dataset(fixed_size_tfds):
    ds = data.load_dataset("tfds:test_images", data_dir=str(fixed_size_tfds), image_size=256)
    assert_split(ds.train, 40, (12, 12), 3)  # a fixed native size is kept: the model upsamples on device
    assert_split(ds.validation, 12, (12, 12), 3)
    assert ds.class_names == ["0", "1", "2"]
    for split, n in ((ds.train, 40), (ds.validation, 12)):
        index = split.images[:, 0, 0, 0].astype(int)  # the builder writes example i's index in a pixel
        assert sorted(index) == list(range(n))  # every example once, in the files' (shuffled) order
        np.testing.assert_array_equal(split.labels, index % 3)
    again = data.load_dataset("tfds:test_images:1.0.0", data_dir=str(fixed_size_tfds))  # NAME:VERSION
    np.testing.assert_array_equal(again.train.images, ds.train.images)


def test_tfds_varying_sizes_and_validation_split(tmp_path):
    prepare_tfds_images(tmp_path, {"train": 10, "validation": 4}, sizes=((10, 14), (20, 8)), channels=1)
    with pytest.raises(UserError, match="varying size"):
        data.load_dataset("tfds:test_images", data_dir=str(tmp_path))
    ds = data.load_dataset("tfds:test_images", data_dir=str(tmp_path), image_size=16)
    assert_split(ds.train, 10, (16, 16), 3)
    assert_split(ds.validation, 4, (16, 16), 3)
    np.testing.assert_array_equal(ds.train.images[..., 0], ds.train.images[..., 2])  # gray -> RGB


def test_tfds_without_validation_split_and_other_label_key(tmp_path):
    prepare_tfds_images(tmp_path, {"train": 30}, label_key="y", class_label=False)
    with pytest.raises(UserError, match=r"no label feature 'label'.*tfds:test_images:KEY.*'y'"):
        data.load_dataset("tfds:test_images", data_dir=str(tmp_path))
    ds = data.load_dataset("tfds:test_images:y", data_dir=str(tmp_path), seed=1)
    assert (len(ds.train), len(ds.validation)) == (24, 6)  # 2 of each class's 10
    assert ds.class_names == ["0", "1", "2"]
    index = np.concatenate([ds.train.images, ds.validation.images])[:, 0, 0, 0]
    assert sorted(index) == list(range(30))
    again = data.load_dataset("tfds:test_images:y", data_dir=str(tmp_path), seed=1)
    np.testing.assert_array_equal(again.validation.images, ds.validation.images)


# --- image folder -------------------------------------------------------------------------------------------

def test_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "images", {"cat": 5, "dog": 4, "ant": 11})
    ds = data.load_dataset(f"folder:{root}", seed=3)
    assert ds.class_names == ["ant", "cat", "dog"]
    assert_split(ds.train, 16, (64, 64), 3)
    assert_split(ds.validation, 4, (64, 64), 3)
    assert np.bincount(ds.validation.labels).tolist() == [2, 1, 1]  # round(20%) of 11, 5, 4
    assert np.bincount(ds.train.labels).tolist() == [9, 4, 3]
    same = data.load_dataset(f"folder:{root}", seed=3)
    np.testing.assert_array_equal(same.validation.images, ds.validation.images)
    small = data.load_dataset(f"folder:{root}", seed=3, image_size=20)
    assert small.train.images.shape == (16, 20, 20, 3)
    other_seed = data.load_dataset(f"folder:{root}", seed=4, image_size=20)
    assert not np.array_equal(other_seed.validation.images, small.validation.images)


def test_image_folder_errors(tmp_path):
    def fails(root: Path, match: str) -> None:
        with pytest.raises(UserError, match=match):
            data.load_dataset(f"folder:{root}")

    fails(tmp_path / "missing", "image folder .*missing not found")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    fails(tmp_path / "flat", "has no class sub-folders")
    root = write_image_folder(tmp_path / "empty_class", {"a": 3})
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("not an image")
    fails(root, r"class folder .*empty_class/b has no images")
    root = write_image_folder(tmp_path / "corrupt", {"a": 3, "b": 3})
    (root / "b" / "bad.jpg").write_bytes(b"this is no jpeg")
    fails(root, r"cannot read image .*corrupt/b/bad\.jpg")
    good = (root / "a" / "1.png").read_bytes()
    (root / "b" / "bad.jpg").unlink()
    (root / "a" / "1.png").write_bytes(good[:len(good) // 2])
    fails(root, r"cannot read image .*corrupt/a/1\.png")
    fails(write_image_folder(tmp_path / "tiny", {"a": 1, "b": 2}), "too few examples")


# --- digits -------------------------------------------------------------------------------------------------

def test_digits():
    ds = data.load_dataset("digits")
    assert ds.class_names == [str(d) for d in range(10)]
    assert len(ds.train) + len(ds.validation) == 1797
    assert abs(len(ds.validation) - 0.2 * 1797) <= 5
    assert_split(ds.validation, len(ds.validation), (8, 8), 10)
    images = ds.train.images
    assert images.min() == 0 and images.max() == 255
    np.testing.assert_array_equal(images[..., 0], images[..., 1])
    np.testing.assert_array_equal(data.load_dataset("digits").validation.images, ds.validation.images)


def test_digits_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(UserError, match=r"pip install 'flaxresnet\[digits\]'"):
        data.load_dataset("digits")


@pytest.mark.parametrize("spec", ["mnist", "", "tfds:", "folder:", "digits:x"])
def test_unknown_spec(spec):
    with pytest.raises(UserError, match="use one of cifar100, tfds:NAME"):
        data.load_dataset(spec)


# --- host batches -------------------------------------------------------------------------------------------

def test_train_batches():
    split = synthetic_split(50)
    assert data.num_train_steps(split, 16) == 3
    epoch = list(data.train_batches(split, 16, seed=0, epoch=0))
    assert len(epoch) == 3  # the last 2 examples are dropped
    for batch in epoch:
        assert batch.keys() == {"image", "label"}
        assert batch["image"].shape == (16, 4, 4, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["label"])
    labels = np.concatenate([b["label"] for b in epoch])
    assert len(set(labels)) == 48

    def order(seed, epoch):
        return np.concatenate([b["label"] for b in data.train_batches(split, 16, seed=seed, epoch=epoch)])

    np.testing.assert_array_equal(order(0, 0), labels)  # a resumed run replays the same batches
    assert not np.array_equal(order(0, 1), labels)
    assert not np.array_equal(order(1, 0), labels)
    with pytest.raises(UserError, match="batch size 64 does not fit the 50 training examples"):
        next(data.train_batches(split, 64, seed=0, epoch=0))


def test_train_batches_from_a_step_and_per_process_rows():
    """A resumed epoch starts at its batch; processes' rows of every global batch put together are the batch."""
    split = synthetic_split(50)
    epoch = list(data.train_batches(split, 16, seed=0, epoch=3))
    later = list(data.train_batches(split, 16, seed=0, epoch=3, start=2))
    assert len(later) == 1 and all(np.array_equal(later[0][k], epoch[2][k]) for k in ("image", "label"))
    halves = [list(data.train_batches(split, 16, seed=0, epoch=3, rows=slice(i * 8, (i + 1) * 8))) for i in (0, 1)]
    for whole, first, second in zip(epoch, *halves):
        assert len(first["label"]) == 8
        np.testing.assert_array_equal(np.concatenate([first["label"], second["label"]]), whole["label"])
        np.testing.assert_array_equal(np.concatenate([first["image"], second["image"]]), whole["image"])


def test_eval_batches_per_process_rows():
    split = synthetic_split(50)
    whole = list(data.eval_batches(split, 16))
    halves = [list(data.eval_batches(split, 16, rows=slice(i * 8, (i + 1) * 8))) for i in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(whole) == 4
    for batch, first, second in zip(whole, *halves):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key])
    assert not halves[1][-1]["mask"].any()  # the last batch holds 2 examples: all in process 0's rows


def test_eval_batches():
    split = synthetic_split(50)
    batches = list(data.eval_batches(split, 16))
    assert len(batches) == 4
    assert all(b["image"].shape == (16, 4, 4, 3) and b["mask"].dtype == bool for b in batches)
    assert batches[-1]["mask"].tolist() == [True] * 2 + [False] * 14
    assert not batches[-1]["image"][2:].any() and not batches[-1]["label"][2:].any()
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(50))  # every example exactly once


def test_feature_split_batches_like_its_images():
    split = synthetic_split(40)
    features = feature_cache.FeatureSplit(np.repeat(np.arange(40, dtype=np.float32)[:, None], 3, axis=1),
                                          split.labels)
    pairs = list(zip(data.train_batches(split, 16, seed=0, epoch=3, start=1, rows=slice(8, 16)),
                     data.train_batches(features, 16, seed=0, epoch=3, start=1, rows=slice(8, 16))))
    assert len(pairs) == 1  # 40 // 16 = 2 steps, from the second on
    for images, cached in pairs:
        assert cached.keys() == {"features", "label"} and cached["features"].shape == (8, 3)
        indices = cached["features"][:, 0].astype(int)  # each row holds its example's index
        np.testing.assert_array_equal(images["image"], split.images[indices])
        np.testing.assert_array_equal(cached["label"], images["label"])
    last = list(data.eval_batches(features, 16))[-1]  # 8 real rows, 8 zeroed padding rows
    assert last.keys() == {"features", "label", "mask"} and last["mask"].sum() == 8
    np.testing.assert_array_equal(last["features"][:8], features.features[32:])
    assert not last["features"][8:].any() and not last["label"][8:].any()
    with pytest.raises(ValueError, match="features must be float"):
        feature_cache.FeatureSplit(np.zeros((40, 3), np.uint8), split.labels)


def test_shard():
    batch = next(data.eval_batches(synthetic_split(8), 8))
    sharded = data.shard(batch, 2)
    assert sharded["image"].shape == (2, 4, 4, 4, 3) and sharded["mask"].shape == (2, 4)
    np.testing.assert_array_equal(sharded["label"][1], [4, 5, 6, 7])
    with pytest.raises(UserError, match="batch size 8 does not divide over 3 devices"):
        data.shard(batch, 3)


def test_prefetch_to_device_feeds_pmap():
    """On 2 host devices, prefetched batches enter a pmap-ed step with no transfer at all."""
    script = textwrap.dedent("""
        import jax, numpy as np
        from flaxresnet import data
        assert jax.local_device_count() == 2
        split = data.Split(np.zeros((40, 4, 4, 3), np.uint8), np.arange(40, dtype=np.int32))
        step = jax.pmap(lambda b: jax.lax.psum(b["label"].sum(), "d"), axis_name="d")
        batches = list(data.prefetch_to_device(data.train_batches(split, 8, seed=0, epoch=0), size=2))
        assert len(batches) == 5 and batches[0]["image"].shape == (2, 4, 4, 4, 3)
        with jax.transfer_guard("disallow"):  # a copy or reshard inside pmap would raise here
            sums = [step(b) for b in batches]
        assert sum(int(s[0]) for s in sums) == sum(range(40)), sums
        print("ok")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=50)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
