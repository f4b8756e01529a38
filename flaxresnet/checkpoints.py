"""Train-state checkpoints with orbax: asynchronous, multi-process, at any step, the last few kept.

A checkpoint is a folder `<directory>/<step>/` that orbax writes atomically (a half-written one is never seen
as a checkpoint) with two items:
  state  the TrainState's arrays (step, parameters, BN statistics, optimizer state), written once however many
         devices and processes hold copies
  meta   JSON: format and version, the run's config, the metrics of the finished epochs, the step metrics and
         seconds of the unfinished epoch so far, and the process/device layout that wrote it
The step says where in the data the run stands (epoch and batch follow from it), so resuming needs no replay.

Saving returns once the arrays are copied off the devices; the files are written in a background thread while
training goes on. Every process of a run calls every method, in the same order (orbax synchronises them).
A checkpoint the file system refuses (no space, quota, no permission, read-only) is a UserError saying what it
needed and that the last complete one is intact, raised by the next call that waits for it (`save`, `wait`,
`close`); orbax's logged tracebacks of that refusal are dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from flaxresnet import train_lib, trees
from flaxresnet.config import Config
from flaxresnet.errors import UserError

FORMAT = "flaxresnet-checkpoint"
VERSION = 3  # 3: orbax folders at any step (2: one msgpack file after each epoch)
KEEP = 3

Row = dict[str, Any]


def current_layout() -> dict[str, int]:
    """This run's {'processes': P, 'devices': D}: what the exact numbers of a run depend on."""
    return {"processes": jax.process_count(), "devices": jax.device_count()}


@dataclasses.dataclass(frozen=True)
class Meta:
    """What a checkpoint says besides the arrays.

    Attributes:
      config: the run's settings.
      history: the metrics rows of the finished epochs.
      epoch_metrics: per-step train metrics of the unfinished epoch so far (empty at an epoch's end).
      epoch_seconds: training seconds spent in the unfinished epoch so far.
      layout: {'processes': P, 'devices': D} of the run that wrote it.
    """

    config: Config
    history: list[Row]
    epoch_metrics: list[dict[str, float]] = dataclasses.field(default_factory=list)
    epoch_seconds: float = 0.0
    layout: dict[str, int] = dataclasses.field(default_factory=current_layout)

    def to_json(self) -> dict[str, Any]:
        """The meta item as written: format and version first, then the fields."""
        return {"format": FORMAT, "version": VERSION, "config": self.config.to_dict(), "history": self.history,
                "epoch_metrics": self.epoch_metrics, "epoch_seconds": self.epoch_seconds, "layout": self.layout}

    @classmethod
    def from_json(cls, raw: Any) -> Meta:
        """The Meta of a `to_json` value of this VERSION; ValueError, KeyError or TypeError if it is not one
        (`OtherVersion` if it is one of another version)."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError("no flaxresnet meta")
        if raw["version"] != VERSION:
            raise OtherVersion(raw["version"])
        return cls(Config.from_dict(raw["config"]), list(raw["history"]), list(raw["epoch_metrics"]),
                   float(raw["epoch_seconds"]), dict(raw["layout"]))


class OtherVersion(Exception):
    """A checkpoint of another format version than this flaxresnet resumes (the version is `args[0]`)."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint found on disk: its folder, step and meta (the arrays stay on disk until `restore`)."""

    path: Path
    step: int
    meta: Meta


class Checkpoints:
    """The checkpoints of one run in `directory` (created on the first save), the newest `keep` kept;
    `asynchronous=False` writes before `save` returns. A save's leftovers (a refused or killed one,
    `<step>.orbax-checkpoint-tmp`) are never taken for a checkpoint."""

    def __init__(self, directory: str | Path, keep: int = KEEP, asynchronous: bool = True) -> None:
        self.directory = Path(directory).absolute()
        logging.getLogger("absl").addFilter(_drop_refusals)
        if sys.unraisablehook is not _drop_late_callbacks:
            global _unraisablehook
            _unraisablehook, sys.unraisablehook = sys.unraisablehook, _drop_late_callbacks
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=asynchronous, create=False),  # saving creates it
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        self._pending: tuple[int, int] | None = None  # (step, bytes) of the save being written
        self._reported = False  # a refusal became a UserError: met again (closing), it is not raised twice

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint, or None; UserError naming its folder if its meta cannot be read."""
        steps = self.steps()
        if not steps:
            return None
        step = steps[-1]
        path = self.directory / str(step)
        try:
            meta = Meta.from_json(self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"])
        except OtherVersion as e:
            raise UserError(f"checkpoint {path} has version {e.args[0]}, this flaxresnet resumes version {VERSION}: "
                            f"{self._advice(step)}", option="workdir") from e
        except (OSError, KeyError, TypeError, ValueError) as e:  # missing, not JSON, not ours, a field missing
            raise UserError(f"checkpoint {path} is corrupt or not a flaxresnet checkpoint ({_reason(e)}): "
                            f"{self._advice(step)}", option="workdir") from e
        return Checkpoint(path, step, meta)

    def _advice(self, step: int) -> str:
        """What to do about an unusable checkpoint of `step`."""
        before = [s for s in self.steps() if s < step]
        return (f"delete it to resume from the one before (step {before[-1]})" if before
                else "delete it to start the run over") + ", or use a fresh work folder"

    def save(self, step: int, state: Any, meta: Meta) -> None:
        """Checkpoint a replicated TrainState (`train_lib.replicate`, or `p_train_step`'s output) as `step`,
        replacing one of the same step (a stop's, taken before its epoch's evaluation)."""
        self.wait()  # the previous save's refusal is its own
        with self._refusals():
            arrays = serialization.to_state_dict(train_lib.unreplicate(state))  # process 0 writes host arrays
            self._pending = step, state_bytes(arrays)
            if step in self._manager.all_steps():
                self._manager.delete(step)
            # A folder orbax cannot create leaves its writer threads waiting for it (for 10 minutes): refused
            # here, before they start.
            self.directory.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.directory).close()
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                             meta=ocp.args.JsonSave(meta.to_json())), force=True)

    def restore(self, checkpoint: Checkpoint, target: Any) -> Any:
        """The (unreplicated, host) TrainState of `checkpoint`; `target` gives its structure, shapes and dtypes
        (e.g. `jax.eval_shape` of creating it). UserError naming what does not fit or is damaged."""
        expected = serialization.to_state_dict(target)

        def damaged(error: Exception) -> UserError:
            return UserError(f"checkpoint {checkpoint.path} is damaged ({_reason(error)}): "
                             f"{self._advice(checkpoint.step)}", option="workdir")

        try:
            saved = self._manager.item_metadata(checkpoint.step)["state"].tree
        except (KeyError, OSError, ValueError) as e:  # no state item; tensorstore cannot open an array
            raise damaged(e) from e
        trees.check(expected, saved, f"checkpoint {checkpoint.path} does not fit this run",
                    self._advice(checkpoint.step), dtypes=True)
        arrays = jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), expected)
        try:
            restored = self._manager.restore(checkpoint.step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(arrays)))["state"]
        except (OSError, ValueError) as e:  # tensorstore: a data file is missing or damaged
            raise damaged(e) from e
        return serialization.from_state_dict(target, restored)

    def wait(self) -> None:
        """Block until every save has been written."""
        with self._refusals():
            self._manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """Finish writing and release the manager's threads."""
        with self._refusals():
            self._manager.close()
        self._pending = None

    @contextlib.contextmanager
    def _refusals(self) -> Iterator[None]:
        """The file system refusing the pending save as one UserError (reported once; what else fails raises)."""
        try:
            yield
        except Exception as e:
            reason = refusal(e)
            if reason is None:
                raise
            if self._reported:  # the refusal already raised, met again while finishing
                return
            if self._pending is None:  # not a save's refusal
                raise
            self._reported = True
            (step, needed), self._pending = self._pending, None
            self._manager.reload()
            complete = [s for s in self._manager.all_steps() if s != step]
            intact = (f"the last complete checkpoint (step {max(complete)}) is intact and a rerun of the same "
                      f"command resumes from it" if complete else "no checkpoint is complete yet: a rerun starts over")
            raise UserError(f"the checkpoint of step {step} could not be written to {self.directory} ({reason}): it "
                            f"needs {_megabytes(needed)}, {_megabytes(free_bytes(self.directory))} are free; {intact}"
                            f" once the folder has room and can be written") from e


# errno values by which a file system refuses a write the user can make room or permission for.
_REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def refusal(error: BaseException) -> str | None:
    """Why the file system refused a write (e.g. 'No space left on device'), if `error` or what it was raised
    from is such a refusal: an OSError, or tensorstore's error naming the errno ("[os_error_code='28']")."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = error.errno if isinstance(error, OSError) else None
        if code is None and (found := re.search(r"\[os_error_code='(\d+)'\]", str(error))):
            code = int(found[1])
        if code in _REFUSED:
            return os.strerror(code)
        error = error.__cause__ or error.__context__
    return None


def _drop_refusals(record: logging.LogRecord) -> bool:
    """A logging filter: orbax logs a refused save with its traceback from each of its threads (the refusal
    reaches the run as `Checkpoints`' UserError)."""
    return not (record.exc_info and record.exc_info[1] is not None and refusal(record.exc_info[1]) is not None
                or "os_error_code=" in record.getMessage())


_unraisablehook = sys.unraisablehook  # the hook `_drop_late_callbacks` hands everything else to


def _drop_late_callbacks(unraisable: Any) -> None:
    """sys.unraisablehook: after a refused save, tensorstore completes the writes still in flight on orbax's
    closed event loop, one unraisable 'Event loop is closed' each (hundreds); those are dropped."""
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        _unraisablehook(unraisable)


def state_bytes(state: Any) -> int:
    """Bytes of the arrays of an unreplicated `state` (or of one as `save` writes it): about what a checkpoint
    takes on disk."""
    return sum(leaf.nbytes if hasattr(leaf, "nbytes") else np.asarray(leaf).nbytes
               for leaf in jax.tree.leaves(state))


def free_bytes(directory: Path) -> int:
    """Bytes free to this user on the file system that holds `directory` (or would hold it)."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def room_warning(directory: Path, checkpoint_bytes: int, keep: int = KEEP) -> str | None:
    """A warning when the file system of `directory` has less room than the `keep` + 1 checkpoints of
    `checkpoint_bytes` a run holds at once (a new one is written before the oldest goes), else None."""
    free = free_bytes(directory)
    if free >= (keep + 1) * checkpoint_bytes:
        return None
    return (f"warning: {directory} has {_megabytes(free)} free, less than the {keep + 1} checkpoints of "
            f"{_megabytes(checkpoint_bytes)} a run holds at once: a checkpoint that does not fit stops the run")


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def _reason(error: Exception) -> str:
    """'Type: first line of the message', without tensorstore's spec dump."""
    return f"{type(error).__name__}: {str(error).splitlines()[0].split(' [tensorstore_spec=')[0]}"
