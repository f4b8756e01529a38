"""Fine-tuning in stages (`train.py --init-from`): stage 1 trains the head on a frozen backbone (feature cache),
stage 2 starts from stage 1's classifier file with other freezing, augmentation and learning rate; it starts
from exactly stage 1's arrays with a fresh optimizer at step 0, records where it started, and resumes after
SIGTERM to the numbers of an uninterrupted stage 2. The mistakes (a head that does not fit, both starts, a
backbone given as a classifier) are one line each.

Kept small: 40 of the 8x8 digits (3 training steps of 8 an epoch), a random ResNet50 backbone, 8 px.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from flaxresnet import load_converted, train_lib, weights_file
from flaxresnet.config import Config
from data_helpers import write_digits_folder
from test_train_cli import numbers, run, stop_at, train

COMMON = ("--image-size", "8", "--batch-size", "8")
STAGE1 = ("--freeze", "backbone", "--augment", "none", "--epochs", "1")
STAGE2 = ("--freeze", "stages:4", "--augment", "flip", "--learning-rate", "1e-4", "--epochs", "2",
          "--checkpoint-every", "2")


def flat(variables) -> dict:
    return traverse_util.flatten_dict(jax.device_get(variables), sep="/")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("digits") / "images", 4)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, backbone_file, images) -> Path:
    """Stage 1's final classifier file: the head trained on the frozen backbone (the feature cache applies)."""
    workdir = tmp_path_factory.mktemp("stage1") / "run"
    assert train.main(["--backbone-weights", str(backbone_file), "--dataset", f"folder:{images}", *COMMON, *STAGE1,
                       "--workdir", str(workdir)]) == 0
    return workdir / "final.msgpack"


def stage2_argv(start: Path, images: Path, workdir: Path, *extra: str) -> list[str]:
    return [str(a) for a in ("--init-from", start, "--dataset", f"folder:{images}", *COMMON, *STAGE2, *extra,
                             "--workdir", workdir)]


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, stage1, images) -> Path:
    """The work folder of an uninterrupted stage 2 from stage 1's file."""
    workdir = tmp_path_factory.mktemp("stage2") / "run"
    assert train.main(stage2_argv(stage1, images, workdir)) == 0
    return workdir


def test_stage_two_starts_from_stage_ones_arrays_with_a_fresh_optimizer(stage1, stage2, images):
    config = Config.from_dict(json.loads((stage2 / "config.json").read_text()))
    assert config.init_from == str(stage1) and config.init_from_md5 == weights_file.md5sum(stage1)
    assert (config.freeze, config.augment, config.learning_rate) == ("stages:4", ("flip",), 1e-4)
    # The state stage 2 starts from, made as the training loop makes it.
    init_key = jax.random.split(jax.random.key(config.seed))[0]
    state = train_lib.create_train_state(config, init_key, (8, 8, 3), train_lib.load_init(str(stage1)))
    _, stage1_variables = load_converted(stage1)
    assert flat(state.variables()).keys() == flat(stage1_variables).keys()
    assert all(np.array_equal(flat(state.variables())[k], v) for k, v in flat(stage1_variables).items())
    assert int(state.step) == 0
    fresh = state.settings.tx.init(train_lib.freeze.split(state.params, state.settings.frozen)[0])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh)))
    # Stage 2 trained what it unfroze (stage 5 and the head) and left stages 1-4 as stage 1 ended them.
    final = flat(load_converted(stage2 / "final.msgpack")[1])
    start = flat(stage1_variables)
    assert not np.array_equal(final["params/backbone/conv5_block3_3_conv/kernel"],
                              start["params/backbone/conv5_block3_3_conv/kernel"])
    assert not np.array_equal(final["params/head/dense_1/kernel"], start["params/head/dense_1/kernel"])
    assert np.array_equal(final["params/backbone/conv4_block6_3_conv/kernel"],
                          start["params/backbone/conv4_block6_3_conv/kernel"])


def test_stage_two_resumed_after_sigterm_equals_the_uninterrupted_one(stage1, stage2, images, tmp_path, capsys,
                                                                      monkeypatch):
    argv = stage2_argv(stage1, images, tmp_path / "run")
    stop_at(monkeypatch, "p_train_step", 5, signal.SIGTERM)  # mid-epoch 2, after a periodic checkpoint at step 4
    status, _, err = run(capsys, *argv)
    assert status == 143 and err == ("preempted at step 5 (epoch 2, batch 2 of 3): checkpoint saved; rerun the "
                                     "same command to resume\n"), err
    monkeypatch.undo()
    status, out, err = run(capsys, *argv)
    assert status == 0 and "resuming at step 5 (epoch 2, batch 2 of 3)" in out, err
    assert numbers(tmp_path / "run") == numbers(stage2) and len(numbers(stage2)) == 2
    final, expected = flat(load_converted(tmp_path / "run" / "final.msgpack")[1]), flat(
        load_converted(stage2 / "final.msgpack")[1])
    assert final.keys() == expected.keys() and all(np.array_equal(final[k], expected[k]) for k in final)


MISTAKES = {
    "hidden width": (("--hidden", "128"), "seed head has 256 hidden units and the run 128: set --hidden 256"),
    "head kind": (("--head", "linear"), "has a seed head and the run a linear head: set --head seed"),
    "both starts": (("--backbone-weights", "none"), "--backbone-weights and --init-from are both given"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_a_start_that_does_not_fit_is_one_line(stage1, images, tmp_path, capsys, case):
    extra, message = MISTAKES[case]
    status, out, err = run(capsys, *stage2_argv(stage1, images, tmp_path / "run", *extra))
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_other_class_count_and_a_backbone_file_are_one_line(stage1, backbone_file, tmp_path, capsys):
    five = write_digits_folder(tmp_path / "five", 4)
    for label in range(5, 10):
        for png in (five / str(label)).iterdir():
            png.unlink()
        (five / str(label)).rmdir()
    status, _, err = run(capsys, *stage2_argv(stage1, five, tmp_path / "run"))
    assert status == 2 and f"{stage1} classifies 10 classes and the dataset has 5" in err and \
        err.count("\n") == 1, err
    status, _, err = run(capsys, *stage2_argv(backbone_file, five, tmp_path / "run"))
    assert status == 2 and f"{backbone_file} holds a ResNet50 backbone, not a classifier: start from it with " \
        f"--backbone-weights" in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit:  # neither start: argparse's usage error
        train.main(["--dataset", f"folder:{five}", *COMMON, "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "error: one of the arguments --backbone-weights --init-from is required" in err
