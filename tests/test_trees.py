"""The one strict tree comparison: every kind of problem named by path, the first few and the count."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from flaxresnet import trees
from flaxresnet.errors import UserError


def test_problems_name_every_kind_by_path():
    expected = {"a": {"kernel": jax.ShapeDtypeStruct((3, 4), np.float32), "bias": np.zeros(4, np.float32)},
                "b": {"mean": np.zeros(2, np.float32)}}
    given = {"a": {"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(4, np.float64)},
             "c": {"mean": np.zeros(2, np.float32)}}
    assert trees.problems(expected, given, dtypes=True) == [
        "missing b/mean", "unexpected c/mean", "a/bias: dtype float64, expected float32",
        "a/kernel: shape (4, 3), expected (3, 4)"]
    assert trees.problems(expected, given) == ["missing b/mean", "unexpected c/mean",
                                               "a/kernel: shape (4, 3), expected (3, 4)"]
    assert trees.problems(expected, given, depth=1, unit="layer ") == ["missing layer b", "unexpected layer c"]


def test_check_shows_the_first_few_and_the_count():
    expected = {f"layer{i}": np.zeros(1) for i in range(8)}
    with pytest.raises(UserError) as e:
        trees.check(expected, {}, "the weights do not fit", "convert them again")
    assert str(e.value) == ("the weights do not fit: missing layer0; missing layer1; missing layer2; missing layer3; "
                            "missing layer4; ... (8 in all); convert them again")
    trees.check(expected, dict(expected), "unused", "unused")
