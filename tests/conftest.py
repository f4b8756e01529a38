"""Test set-up: Keras runs on the JAX backend (TensorFlow is never needed), nothing is written into the real user
cache folder, and JAX's compilation cache settings do not leak from one test into the next."""

import os
import shutil
import subprocess
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The user cache folder of this process and of every process a test starts (they inherit os.environ): train.py,
# evaluate and predict keep their compilation cache there by default, shared by every run of the session, and
# matplotlib its font list. Set before the test modules are imported, since importing matplotlib writes there.
# Under `pytest -n N` (pytest-xdist) the workers inherit the folder of the main process, which removes it at the end.
WORKER = "PYTEST_XDIST_WORKER" in os.environ
if WORKER:
    USER_CACHE = os.environ["XDG_CACHE_HOME"]
else:
    USER_CACHE = tempfile.mkdtemp(prefix="flaxresnet-tests-cache-")
    os.environ["XDG_CACHE_HOME"] = USER_CACHE

from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from flaxresnet import compile_cache  # noqa: E402

# This process compiles into the same session cache as the commands it starts: a program that two tests build
# from different Python objects (a new model, a new step partial) is compiled by XLA once.
compile_cache.enable(compile_cache.DEFAULT)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's XDG_CACHE_HOME is removed when the session ends (by the main process under pytest-xdist)."""
    if not WORKER:
        shutil.rmtree(USER_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def compilation_cache_settings() -> Iterator[None]:
    """A run in this process sets JAX's compilation cache for the rest of the process, as the commands do; each
    test gets the settings back as they were before it."""
    before = compile_cache.settings()
    yield
    compile_cache.apply(before)


@pytest.fixture(scope="session")
def backbone_file(tmp_path_factory) -> Path:
    """A random ResNet50 backbone saved as a converted weights file."""
    from flaxresnet import weights_file
    from engine_helpers import random_backbone

    path = tmp_path_factory.mktemp("backbone") / "backbone.msgpack"
    weights_file.save(path, random_backbone()[1], {"model": {"kind": "resnet", "config": {"depth": 50}}})
    return path


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Callable[[int], Path]]:
    """A factory of tmpfs mounts of N MB under tmp_path (to fill a disk); the test is skipped where it cannot
    mount one (not root, or no mount permission in the container). Every mount is removed after the test."""
    mounts: list[Path] = []

    def mount(megabytes: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs to fill needs root")
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(path)
        return path

    yield mount
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", str(path)], check=True)
