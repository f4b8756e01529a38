"""orbax checkpoints of a (small) replicated state: save/restore round trip of every array and the meta, the
newest kept, one checkpoint per step, and each unusable checkpoint as one UserError naming its folder."""

from __future__ import annotations

import errno
import logging
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxresnet import checkpoints, train_lib
from flaxresnet.config import Config
from flaxresnet.errors import UserError

STATE = {"step": jnp.array(7, jnp.int32), "params": {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4),
                                                               "bias": jnp.ones(4, jnp.bfloat16)}},
         "opt_state": {"0": {"count": jnp.array(3, jnp.int32)}, "1": {}}}
META = checkpoints.Meta(Config(backbone_weights=None, epochs=4), [{"epoch": 1, "train_loss": 0.5, "val_loss": None}],
                        [{"loss": 0.25, "accuracy": 0.5}], 1.5)


def saved(directory, steps=(7,), **options) -> checkpoints.Checkpoints:
    store = checkpoints.Checkpoints(directory, **options)
    for step in steps:
        store.save(step, train_lib.replicate(jax.tree.map(lambda x: x + step - 7, STATE)), META)
    store.wait()
    return store


def test_round_trip(tmp_path):
    store = saved(tmp_path / "ckpt")
    checkpoint = store.latest()
    assert checkpoint.step == 7 and checkpoint.path == tmp_path / "ckpt" / "7"
    assert checkpoint.meta == META and checkpoint.meta.layout == {"processes": 1, "devices": jax.device_count()}
    restored = store.restore(checkpoint, jax.eval_shape(lambda: STATE))
    assert jax.tree.structure(restored) == jax.tree.structure(STATE)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(STATE)):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and np.array_equal(got, want)
    store.close()


def test_keeps_the_newest_and_replaces_a_step(tmp_path):
    store = saved(tmp_path / "ckpt", steps=(1, 2, 3, 4), keep=2)
    assert store.steps() == [3, 4]
    store.save(4, train_lib.replicate(STATE), checkpoints.Meta(META.config, []))  # e.g. an epoch's end after a stop
    store.wait()
    assert store.steps() == [3, 4] and store.latest().meta.epoch_metrics == []
    assert int(store.restore(store.latest(), jax.eval_shape(lambda: STATE))["step"]) == 7
    store.close()


def test_synchronous_saves_are_written_on_return(tmp_path):
    store = checkpoints.Checkpoints(tmp_path / "ckpt", asynchronous=False)
    store.save(3, train_lib.replicate(STATE), META)
    assert (tmp_path / "ckpt" / "3" / "commit_success.txt").exists() and store.steps() == [3]
    store.close()


def test_nothing_saved(tmp_path):
    store = checkpoints.Checkpoints(tmp_path / "none")
    assert store.latest() is None and store.steps() == [] and not (tmp_path / "none").exists()
    store.close()


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "8" / "meta" / "metadata").write_text("{not json"),
     "checkpoint {c}/8 is corrupt or not a flaxresnet checkpoint (JSONDecodeError: "),
    (lambda c: (c / "8" / "meta" / "metadata").write_text('{"some": "json"}'),
     "checkpoint {c}/8 is corrupt or not a flaxresnet checkpoint (ValueError: no flaxresnet meta)"),
    (lambda c: (c / "8" / "meta" / "metadata").unlink(),
     "checkpoint {c}/8 is corrupt or not a flaxresnet checkpoint (FileNotFoundError: "),
])
def test_unreadable_meta(tmp_path, damage, message):
    store = saved(tmp_path / "ckpt", steps=(7, 8))
    damage(tmp_path / "ckpt")
    with pytest.raises(UserError) as e:
        store.latest()
    assert str(e.value).startswith(message.format(c=tmp_path / "ckpt"))
    assert str(e.value).endswith("delete it to resume from the one before (step 7), or use a fresh work folder")
    assert e.value.option == "workdir" and "\n" not in str(e.value)
    store.close()


def test_other_version(tmp_path):
    store = saved(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "7" / "meta" / "metadata"
    path.write_text(path.read_text().replace(f'"version": {checkpoints.VERSION}', '"version": 99'))
    with pytest.raises(UserError, match="has version 99, this flaxresnet resumes version 3: delete it to start"):
        store.latest()
    store.close()


@pytest.mark.parametrize("damage, message", [
    (lambda s: shutil.rmtree(s / "d"), "is damaged (ValueError: NOT_FOUND: "),
    (lambda s: shutil.rmtree(s), "is damaged (KeyError: "),
])
def test_damaged_arrays(tmp_path, damage, message):
    store = saved(tmp_path / "ckpt")
    damage(tmp_path / "ckpt" / "7" / "state")
    with pytest.raises(UserError) as e:
        store.restore(store.latest(), jax.eval_shape(lambda: STATE))
    assert message in str(e.value) and "tensorstore_spec" not in str(e.value) and "\n" not in str(e.value)
    store.close()


def test_state_of_another_run(tmp_path):
    store = saved(tmp_path / "ckpt")
    other = {**STATE, "params": {"dense": {"kernel": jnp.zeros((3, 5)), "bias": jnp.ones(4, jnp.float32)}}}
    with pytest.raises(UserError) as e:
        store.restore(store.latest(), jax.eval_shape(lambda: other))
    assert str(e.value) == (f"checkpoint {tmp_path / 'ckpt' / '7'} does not fit this run: params/dense/bias: dtype "
                            f"bfloat16, expected float32; params/dense/kernel: shape (3, 4), expected (3, 5); "
                            f"delete it to start the run over, or use a fresh work folder")
    store.close()


def test_refusal_is_found_through_the_cause_chain():
    assert checkpoints.refusal(OSError(errno.ENOSPC, "full")) == "No space left on device"
    try:
        try:
            raise ValueError("RESOURCE_EXHAUSTED: Failed to write 907955 bytes to file 4: Disk quota exceeded "
                             "[os_error_code='122']")
        except ValueError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as e:
        assert checkpoints.refusal(e) == "Disk quota exceeded"
    assert checkpoints.refusal(ValueError("not found [os_error_code='2']")) is None
    assert checkpoints.refusal(OSError(errno.EIO, "i/o")) is None


def test_room_warning(tmp_path):
    free = checkpoints.free_bytes(tmp_path / "not" / "yet")  # of the folder that would hold it
    assert checkpoints.room_warning(tmp_path, free // (checkpoints.KEEP + 1)) is None
    assert checkpoints.room_warning(tmp_path, free // checkpoints.KEEP + 1) == (
        f"warning: {tmp_path} has {free / 1e6:.1f} MB free, less than the {checkpoints.KEEP + 1} checkpoints of "
        f"{(free // checkpoints.KEEP + 1) / 1e6:.1f} MB a run holds at once: a checkpoint that does not fit stops "
        f"the run")


BIG = {"w": np.random.default_rng(0).normal(size=(256, 1024)).astype(np.float32)}  # 1 MB that does not compress


def save_until_refused(store: checkpoints.Checkpoints, steps) -> str:
    with pytest.raises(UserError) as refused:
        for step in steps:
            store.save(step, train_lib.replicate(BIG), META)
        store.wait()
    store.close()  # reported once: closing does not raise it again
    return str(refused.value)


def test_a_full_disk_is_one_error_and_the_last_checkpoint_stays(small_disk, caplog):
    store = checkpoints.Checkpoints(small_disk(3) / "ckpt")
    message = save_until_refused(store, range(1, 6))
    assert re.fullmatch(
        rf"the checkpoint of step 4 could not be written to {store.directory} \(No space left on device\): it needs "
        r"1\.0 MB, 0\.\d MB are free; the last complete checkpoint \(step 3\) is intact and a rerun of the same "
        r"command resumes from it once the folder has room and can be written", message), message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # orbax's tracebacks of it are dropped
    reopened = checkpoints.Checkpoints(store.directory)
    assert reopened.steps() == [1, 2, 3] and reopened.latest().step == 3
    assert np.array_equal(reopened.restore(reopened.latest(), jax.eval_shape(lambda: BIG))["w"], BIG["w"])


def test_a_read_only_folder_is_one_error(small_disk):
    disk = small_disk(8)
    store = saved(disk / "ckpt")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    message = save_until_refused(store, [8])
    assert message.startswith(f"the checkpoint of step 8 could not be written to {store.directory} (Read-only file "
                              f"system): it needs 1.0 MB")
    assert "the last complete checkpoint (step 7) is intact" in message
