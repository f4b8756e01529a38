"""When the feature cache applies (`feature_cache.why_not`): exactly when the backbone's output for an image
cannot change; tests/test_train_cli.py runs it against the full step end to end."""

from __future__ import annotations

import jax
import pytest

from engine_helpers import small_config
from flaxresnet import feature_cache, train_lib


@pytest.mark.parametrize("freeze, augment, reason", [
    ("backbone", (), None),
    ("backbone", ("flip",), "augmentation (flip) changes the images every epoch"),
    ("convs", (), "106 of the backbone's 212 parameter tensors train"),  # BN scale and bias of 53 layers
    # Every backbone parameter frozen by a regex: only the 'backbone' preset puts BatchNorm in inference mode.
    ("^backbone/", (), "the backbone's BatchNorm trains on batch statistics"),
])
def test_the_cache_applies_only_to_a_fixed_backbone_function(freeze, augment, reason):
    config = small_config(freeze=freeze, augment=augment)
    state = jax.eval_shape(lambda: train_lib.create_train_state(config, jax.random.key(0)))  # shapes only
    assert feature_cache.why_not(state) == reason
