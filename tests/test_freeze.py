"""Freezing: presets and regexes -> frozen paths, the parameter-count table, and what a few real steps do to frozen
and trainable leaves, optimizer state and BN statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from engine_helpers import random_backbone, random_batch, small_config, train_steps
from flaxresnet import freeze, train_lib
from flaxresnet.errors import UserError
from flaxresnet.models import Classifier, ResNetV2


@pytest.fixture(scope="module")
def seed_variables():
    """Shapes of ResNet50 + the seed head on 100 classes (no compute)."""
    return jax.eval_shape(Classifier(num_classes=100).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))


def frozen_paths(params, spec: str) -> set[str]:
    return set(freeze.frozen_paths(params, spec))


def test_presets_and_regexes_pick_the_documented_leaves(seed_variables):
    params = seed_variables["params"]
    paths = set(traverse_util.flatten_dict(params, sep="/"))
    backbone = {p for p in paths if p.startswith("backbone/")}
    convs = {p for p in backbone if p.split("/")[1].endswith("_conv")}
    assert len(convs) == 2 * 53  # kernel and bias of the 53 convolutions
    assert frozen_paths(params, "convs") == convs
    assert frozen_paths(params, "none") == set()
    assert frozen_paths(params, "backbone") == backbone
    assert frozen_paths(params, "stages:1") == {f"backbone/conv1_{k}" for k in
                                                ("conv/kernel", "conv/bias", "bn/scale", "bn/bias")}
    stage2 = frozen_paths(params, "stages:2")
    assert stage2 == {p for p in backbone if p.split("/")[1].startswith(("conv1_", "conv2_"))}
    assert frozen_paths(params, "stages:5") == backbone
    assert frozen_paths(params, r"^head/dense_1/") == {"head/dense_1/kernel", "head/dense_1/bias"}
    assert freeze.backbone_bn_train("convs") and not freeze.backbone_bn_train("backbone")


def test_stage_presets_on_resnet_v2_count_post_bn_in_stage_5():
    shapes = jax.eval_shape(ResNetV2(depth=50).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    params = {"backbone": shapes["params"]}
    backbone = set(traverse_util.flatten_dict(params, sep="/"))
    post_bn = {"backbone/post_bn/scale", "backbone/post_bn/bias"}
    assert post_bn <= backbone
    assert frozen_paths(params, "stages:5") == frozen_paths(params, "backbone") == backbone
    stage4 = frozen_paths(params, "stages:4")
    assert stage4 == {p for p in backbone if p.split("/")[1].startswith(("conv1_", "conv2_", "conv3_", "conv4_"))}
    assert not stage4 & post_bn
    assert frozen_paths(params, "convs") == {p for p in backbone if p.split("/")[1].endswith("_conv")}


@pytest.mark.parametrize("spec, message", [
    ("stages:0", "N must be 1"),
    ("stages:6", "N must be 1"),
    ("conv(", "neither a preset"),
    ("^backbone/conv9_", "matches no parameter"),
])
def test_bad_specs_are_user_errors(seed_variables, spec, message):
    with pytest.raises(UserError, match=message):
        freeze.frozen_paths(seed_variables["params"], spec)


def test_parameter_count_table_matches_keras(seed_variables):
    counts = freeze.parameter_counts(seed_variables, freeze.frozen_paths(seed_variables["params"], "convs"))
    # Keras' summary of the original run: 603,876 trainable of 24,138,980 (BN moving statistics included).
    assert counts == {"trainable": 603_876, "frozen": 23_481_472, "bn_statistics": 53_632, "total": 24_138_980}
    table = freeze.format_counts(counts).splitlines()
    assert table[0].split() == ["trainable", "603,876"] and table[-1].split() == ["total", "24,138,980"]
    none = freeze.parameter_counts(seed_variables, freeze.frozen_paths(seed_variables["params"], "none"))
    assert none["frozen"] == 0 and none["total"] == counts["total"]


def leaves(tree) -> dict[str, np.ndarray]:
    return traverse_util.flatten_dict(tree, sep="/")


def test_convs_preset_trains_bn_and_head_only():
    states, _ = train_steps()
    before, after = states[0], states[-1]
    frozen = frozen_paths(before.params, "convs")
    p0, p1 = leaves(before.params), leaves(after.params)
    for path in p0:
        if path in frozen:
            assert np.array_equal(p0[path], p1[path]), path  # bit-identical
        else:
            assert not np.array_equal(p0[path], p1[path]), path  # every trainable leaf moved
    # Adam moments exist for the trainable leaves only; the rest of the state is step counters.
    trainable = sum(v.size for k, v in p0.items() if k not in frozen)
    state_sizes = [np.size(x) for x in jax.tree.leaves(after.opt_state)]
    assert sum(s for s in state_sizes if s > 1) == 2 * trainable
    # Backbone BN runs in training mode: every moving statistic was updated.
    s0, s1 = leaves(before.batch_stats), leaves(after.batch_stats)
    assert all(not np.array_equal(s0[k], s1[k]) for k in s0)
    assert int(after.step) == len(states) - 1


def test_backbone_preset_is_feature_extraction():
    state = train_lib.create_train_state(small_config(freeze="backbone"), jax.random.key(0),
                                         backbone=random_backbone())
    assert frozen_paths(state.params, "backbone") == {p for p in leaves(state.params) if p.startswith("backbone/")}
    # The training-mode forward of the step: the backbone's BN uses and keeps its moving statistics, the
    # head's BN trains on batch statistics.
    _, updated = jax.jit(lambda v, x: state.model.clone(axis_name=None).apply(
        v, x, train=True, mutable=["batch_stats"]))(state.variables(), random_batch()["image"])
    s0, s1 = leaves(state.batch_stats), leaves(updated["batch_stats"])
    for path in s0:
        assert np.array_equal(s0[path], s1[path]) == path.startswith("backbone/"), path
