"""Test set-up: Keras runs on the JAX backend (TensorFlow is never needed), nothing is written into the real user
cache folder, and JAX's compilation cache settings do not leak from one test into the next."""

import os
import shutil
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The user cache folder of this process and of every process a test starts (they inherit os.environ): train.py,
# evaluate and predict keep their compilation cache there by default, shared by every run of the session, and
# matplotlib its font list. Set before the test modules are imported, since importing matplotlib writes there.
USER_CACHE = tempfile.mkdtemp(prefix="flaxresnet-tests-cache-")
os.environ["XDG_CACHE_HOME"] = USER_CACHE

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from flaxresnet import compile_cache  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def user_cache_folder() -> Iterator[str]:
    """The session's XDG_CACHE_HOME, removed when the session ends."""
    yield USER_CACHE
    shutil.rmtree(USER_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def compilation_cache_settings() -> Iterator[None]:
    """A run in this process sets JAX's compilation cache for the rest of the process, as the commands do; each
    test gets the settings back as they were before it."""
    before = compile_cache.settings()
    yield
    compile_cache.apply(before)
