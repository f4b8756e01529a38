"""JAX's persistent compilation cache, on by default: a rerun, a resumed run or a run differing only in settings
the compiled steps do not depend on loads them from disk instead of compiling them again.

`enable(setting)` is called before anything compiles: by the training loop and by the evaluate and predict
commands (`Config.compile_cache`, a local setting, so resuming may change it). JAX keys each entry by
the compiled program (its HLO, without source locations), the compile options and XLA flags, the devices, the
backend and the jaxlib version, so a changed step is a new entry and never a stale hit. In a multi-process run
every process reads the cache and process 0 alone writes it (JAX does both), so the folder should be one they all
see: a folder of each host's own would serve process 0 only. The folder grows by what each new set of settings
compiles (about 1 MB on CPU for a small run); nothing evicts old entries, so delete it at any time.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

from flaxresnet.errors import UserError

OFF = "off"
DEFAULT = "default"
# Compilations of at least this many seconds are written to the cache: all of them. JAX's default, 1 s, keeps
# the few big programs (train and evaluation steps, initialisation: seconds to minutes each) but none of the
# ~15 small ones a run also compiles (sharding batches, metrics: 10-150 ms each), which would then be compiled
# at every start. The small entries take ~2 kB each.
MIN_COMPILE_TIME_S = 0.0


def default_folder() -> Path:
    """The cache folder in the user's cache folder: $XDG_CACHE_HOME (when set to an absolute path, as the XDG
    base directory specification says), else ~/.cache."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "flaxresnet" / "jax-compilation-cache"


def check(setting: str) -> str | None:
    """What is wrong with a --compile-cache value, None if nothing (the Config field's check)."""
    if setting.strip().lower() in ("", "none"):
        return f"{setting!r} is not a folder: give '{OFF}' to turn the cache off, or a folder"
    return None


def folder_of(setting: str) -> Path | None:
    """The folder a setting names (absolute), None for 'off'."""
    if setting == OFF:
        return None
    return default_folder() if setting == DEFAULT else Path(setting).expanduser().absolute()


def enable(setting: str) -> Path | None:
    """Point JAX's persistent compilation cache at the folder `setting` names (created if need be), or turn it
    off; returns the folder, None when off. Takes effect for everything compiled afterwards in this process,
    also after earlier calls with other settings.

    UserError if the setting is invalid or the folder cannot be created or written: a cache that silently does
    not work would cost every run its whole compilation again (a minute and more on a GPU) unnoticed, and the
    fix (another folder, or off) is one flag.
    """
    if (problem := check(setting)) is not None:
        raise UserError(f"compile_cache {problem}", option="compile_cache")
    folder = folder_of(setting)
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise UserError(f"cannot write the compilation cache folder {folder} ({e.strerror or e}): give "
                            f"another folder, or off", option="compile_cache") from e
    apply({"jax_enable_compilation_cache": folder is not None,
           "jax_compilation_cache_dir": None if folder is None else str(folder),
           "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_TIME_S})
    return folder


def settings() -> dict[str, object]:
    """The jax.config values `enable` sets, as they are now."""
    return {name: getattr(jax.config, name) for name in (
        "jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}


def apply(values: dict[str, object]) -> None:
    """Set these jax.config values (of `settings`); when any changes, JAX's cache is reset so that the next
    compilation opens the new folder (JAX opens it once per process otherwise)."""
    now = settings()
    if any(now[name] != value for name, value in values.items()):
        for name, value in values.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()

