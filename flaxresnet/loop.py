"""The training loop: `train_and_evaluate(config)` fine-tunes a classifier epoch by epoch with the engine's
pmapped step on every device of every process, evaluates, checkpoints, stops cleanly when preempted, and resumes
a stopped run exactly where it left off.

It calls the rooms that own each part: `distributed` (the processes), `rundir` (the work folder's files and the
resume contract), `data` (the dataset and its input pipeline), `train_lib` (the state and its steps),
`feature_cache` (the plan of what the epochs step on), `evaluation`, `checkpoints`, `preemption` and
`tensorboard`; this module keeps the epochs and the steps within one (`Epochs`).

Several processes (`config.coordinator`, `jax.distributed`): each feeds its own rows of every global batch
(`distributed.process_rows`) and evaluates its rows of every validation batch; metrics are reduced over all
devices inside the steps, so every process holds the same numbers. Process 0 alone prints (`log.say`).

Determinism: the data order depends on (seed, epoch) alone and each step's randomness on fold_in(key, step),
and a checkpoint's step says where in the data it was taken: a run resumed from any checkpoint, also one from
the middle of an epoch, ends with exactly the numbers of an uninterrupted run with the same layout (processes
and devices; reductions follow the layout, so another layout agrees to rounding only).

Stopping: after SIGTERM or Ctrl-C (`preemption.StopSignals`) every process saves a checkpoint after the same
step and `train_and_evaluate` raises `Preempted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from flaxresnet import (checkpoints, compile_cache, data, distributed, evaluation, feature_cache, freeze, log, optim,
                        preemption, rundir, tensorboard, train_lib, weights_file)
from flaxresnet.config import Config
from flaxresnet.errors import UserError, option_name

# Host fetches of step metrics (for the progress bar and the non-finite check) happen every this many steps.
FETCH_EVERY = 20

Row = dict[str, Any]
StepMetrics = dict[str, float]
# save(replicated state, step, step metrics of the epoch so far, training seconds of the epoch so far)
Save = Callable[[train_lib.TrainState, int, list[StepMetrics], float], None]


class Preempted(Exception):
    """The run stopped on SIGTERM or Ctrl-C after saving a checkpoint; `status` is the exit status to end with
    (`preemption.EXIT_STATUS`)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def train_and_evaluate(config: Config) -> Row:
    """Train and evaluate as `config` says, resuming from the work folder's newest checkpoint if there is one;
    as one process of a multi-process run when `config.coordinator` is set (this starts `jax.distributed`,
    so call it before anything else touches a device). JAX's persistent compilation cache is set first, as
    `config.compile_cache` says (`compile_cache.enable`), for everything this process compiles from then on.

    Returns the last epoch's metrics (a metrics.jsonl row). Foreseeable problems (weights file, dataset,
    batch size, corrupt checkpoint, non-finite loss, ...) raise UserError, checked before slow work starts;
    SIGTERM or Ctrl-C while training raises Preempted once a checkpoint is saved.
    """
    compile_cache.enable(config.compile_cache)
    distributed.initialize(config.coordinator, config.num_processes, config.process_id, config.coordinator_timeout)
    distributed.check_batch_size(config.batch_size)
    config, workdir = rundir.open_workdir(config)
    if config.init_from is not None:
        backbone = train_lib.load_init(config.init_from)
        config = dataclasses.replace(config, init_from_md5=weights_file.md5sum(config.init_from))
    else:
        backbone = train_lib.load_backbone(config.backbone_weights, config.depth, config.family)
    store = checkpoints.Checkpoints(workdir / "checkpoints")
    try:
        return _run(config, workdir, backbone, store)
    finally:
        store.close()


def _run(config: Config, workdir: Path, backbone: tuple[Any, train_lib.Variables] | None,
         store: checkpoints.Checkpoints) -> Row:
    """`train_and_evaluate` once the processes, the work folder and the backbone are there."""
    resume = store.latest()
    if resume is not None:
        rundir.check_resumable(resume, config)
    config, ds = open_data(config)
    steps = data.num_train_steps(ds.train, config.batch_size)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    new_state = functools.partial(train_lib.create_train_state, config, init_key, ds.train.image_shape, backbone,
                                  config.epochs * steps)
    if distributed.is_main():
        workdir.mkdir(parents=True, exist_ok=True)
    state, history, done, seconds = rundir.start(workdir, store, resume, new_state, steps)
    if warning := checkpoints.room_warning(store.directory, checkpoints.state_bytes(state)):
        log.say(warning)
    log.say(freeze.format_counts(freeze.parameter_counts(state.variables(), state.settings.frozen)))
    if distributed.is_main():
        rundir.write_config(workdir, config)
        rundir.write_metrics(workdir, history)

    plan = feature_cache.plan(config.feature_cache, train_lib.replicate(state), ds, config.batch_size)

    def save(state: train_lib.TrainState, step: int, fetched: list[StepMetrics], seconds: float) -> None:
        store.save(step, plan.whole(state), checkpoints.Meta(config, history, fetched, seconds))

    events = tensorboard.Events(workdir, (0 if resume is None else resume.step) + 1,
                                optim.learning_rate_schedule(state.settings.optimizer), distributed.is_main())
    state = plan.state
    with preemption.StopSignals() as stop, contextlib.closing(events):
        epochs = Epochs.of(config, steps, train_key, plan.train_step, save=save, stop=stop, events=events)
        for epoch in range(len(history) + 1, config.epochs + 1):
            start = time.perf_counter()
            state, row, train_seconds = epochs.train(state, plan.train, epoch, done, seconds)
            if epoch % config.eval_every == 0 or epoch == config.epochs:
                row.update(validation_metrics(evaluation.evaluate(
                    state.model, state.variables(), plan.validation, config.batch_size, plan.eval_step)))
            else:
                row.update(val_loss=None, val_accuracy=None)
            row.update(seconds=seconds + time.perf_counter() - start,
                       img_per_s=steps * config.batch_size / train_seconds)
            history.append(row)
            save(state, epoch * steps, [], 0.0)
            if distributed.is_main():
                rundir.write_metrics(workdir, history)
            events.epoch(row)
            log.say(format_row(row, config.epochs))
            done, seconds = [], 0.0

    if distributed.is_main():
        train_lib.save_classifier(str(workdir / "final.msgpack"), train_lib.unreplicate(plan.whole(state)),
                                  config=config.to_dict(), class_names=ds.class_names,
                                  image_shape=list(ds.train.image_shape), dataset=config.dataset,
                                  metrics=history[-1])
    log.say(f"final classifier: {workdir / 'final.msgpack'}")
    return history[-1]


def open_data(config: Config) -> tuple[Config, data.Dataset]:
    """The run's dataset through its input pipeline (`data.use_pipeline`), and the config with its class count;
    says what the dataset is in one line. UserError if the image size does not fit it."""
    ds = data.open_dataset(config.dataset, config.data_dir, config.seed, config.image_size)
    config = dataclasses.replace(config, num_classes=ds.num_classes)
    image_shape = ds.train.image_shape
    check_image_size(config, image_shape)
    steps = data.num_train_steps(ds.train, config.batch_size)
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    log.say(f"dataset {config.dataset}: {len(ds.train)} training and {len(ds.validation)} validation images of "
            f"{image_shape[0]}x{image_shape[1]} px (model input {config.image_size or image_shape[0]} px), "
            f"{ds.num_classes} classes; {steps} steps of {config.batch_size} an epoch on "
            f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s){processes}")
    return config, data.use_pipeline(ds, config.input_pipeline, config.data_workers)


def check_image_size(config: Config, image_shape: tuple[int, ...]) -> None:
    """UserError unless nearest upsampling can reach `config.image_size` by a whole factor."""
    height, width = image_shape[:2]
    size = config.image_size
    if config.upsample == "nearest" and size is not None and (size % height or size % width):
        raise UserError(f"{option_name('image_size')} {size} is not a whole multiple of the dataset's "
                        f"{height}x{width} images, which nearest upsampling needs: choose a multiple of "
                        f"{max(height, width)} or {option_name('upsample')} bilinear")


def validation_metrics(result: evaluation.Evaluation) -> Row:
    """An evaluation as the val_* entries of a metrics row."""
    row = {"val_loss": result.loss, "val_accuracy": result.accuracy}
    if result.top5 is not None:
        row["val_top5"] = result.top5
    return row


@dataclasses.dataclass(frozen=True)
class Epochs:
    """How every training epoch of a run goes: its shape (`batch_size`, `seed`, `steps` an epoch of `epochs`),
    the step (`train_step`, e.g. the feature cache's head-only one) and its root `key`; and optionally, within an
    epoch, a checkpoint every `checkpoint_every` steps through `save`, a stop when `stop` asks after a step
    (saving first, then raising Preempted), and TensorBoard `events` per step."""

    batch_size: int
    seed: int
    epochs: int
    steps: int
    key: jax.Array
    train_step: Callable[..., Any] = train_lib.p_train_step
    checkpoint_every: int | None = None
    save: Save | None = None
    stop: preemption.StopSignals | None = None
    events: tensorboard.Events | None = None

    @classmethod
    def of(cls, config: Config, steps: int, key: jax.Array, train_step: Callable[..., Any] = train_lib.p_train_step,
           **within: Any) -> Epochs:
        """The epochs of `config`'s run of `steps` an epoch (`within`: save, stop, events)."""
        return cls(config.batch_size, config.seed, config.epochs, steps, key, train_step, config.checkpoint_every,
                   **within)

    def train(self, state: train_lib.TrainState, split: data.Examples, epoch: int,
              done: list[StepMetrics] = (), seconds: float = 0.0) -> tuple[train_lib.TrainState, Row, float]:
        """Run (the rest of) epoch `epoch` on a replicated state; returns it, the epoch's mean train metrics and
        its training seconds. `done` and `seconds` are the step metrics and training seconds of the epoch's
        batches already run (a resumed epoch starts after them)."""
        batches = data.prefetch_to_device(data.train_batches(
            split, self.batch_size, self.seed, epoch, len(done), distributed.process_rows(self.batch_size)))
        begin = time.perf_counter()
        with contextlib.closing(batches), _StepLog(self, epoch, done) as steps:
            for batch in batches:
                state, metrics = self.train_step(state, batch, self.key)
                steps.add(metrics)
                self._after_step(state, steps, seconds + time.perf_counter() - begin)
        return state, {"epoch": epoch, **steps.means()}, seconds + time.perf_counter() - begin

    def _after_step(self, state: train_lib.TrainState, steps: _StepLog, seconds: float) -> None:
        """Save and stop if asked (Preempted), or checkpoint if one is due within the epoch."""
        step, finished = steps.global_step, steps.count
        if self.stop is not None and self.stop.requested(step):
            steps.fetch()
            if self.save is not None:
                self.save(state, step, steps.fetched, seconds)
            raise Preempted(f"{self.stop.reason} at step {step} (epoch {steps.epoch}, batch {finished} of "
                            f"{self.steps}): checkpoint saved; rerun the same command to resume",
                            self.stop.exit_status)
        if self.save is not None and self.checkpoint_every and not step % self.checkpoint_every \
                and finished < self.steps:
            steps.fetch()
            self.save(state, step, steps.fetched, seconds)


class _StepLog:
    """An epoch's step metrics: kept on device as they come and fetched every FETCH_EVERY steps (all but the
    newest, so the device keeps working) to update the progress bar and the events, and to stop at a non-finite
    loss; `fetched` holds those on the host, in order, the epoch's earlier ones (`done`) first."""

    def __init__(self, epochs: Epochs, epoch: int, done: list[StepMetrics]) -> None:
        self.epochs, self.epoch = epochs, epoch
        self.first_step = (epoch - 1) * epochs.steps + 1
        self.pending: list[train_lib.Metrics] = []
        self.fetched: list[StepMetrics] = list(done)
        self.bar = tqdm(total=epochs.steps * epochs.batch_size, initial=len(done) * epochs.batch_size,
                        desc=f"epoch {epoch}/{epochs.epochs}", unit="img", leave=False,
                        disable=None if distributed.is_main() else True)

    def __enter__(self) -> _StepLog:
        return self

    def __exit__(self, kind: type | None, *_: Any) -> None:
        try:
            if kind is None:
                self.fetch()
        finally:
            self.bar.close()

    @property
    def count(self) -> int:
        """The epoch's steps done so far."""
        return len(self.fetched) + len(self.pending)

    @property
    def global_step(self) -> int:
        """The run's steps done so far."""
        return self.first_step - 1 + self.count

    def add(self, metrics: train_lib.Metrics) -> None:
        """A step's metrics, still on device; fetches the older ones every FETCH_EVERY steps."""
        self.pending.append(metrics)
        if len(self.pending) > FETCH_EVERY:
            self.fetch(len(self.pending) - 1)

    def fetch(self, count: int | None = None) -> None:
        """Bring the oldest `count` (default: all) pending step metrics to the host."""
        count = len(self.pending) if count is None else count
        for metrics in jax.device_get(self.pending[:count]):
            values = {k: float(v[0]) for k, v in metrics.items()}  # pmean: every device has the same
            step = self.first_step + len(self.fetched)
            if not math.isfinite(values["loss"]):
                raise UserError(f"the training loss is {values['loss']} at step {step} (epoch {self.epoch}, batch "
                                f"{step - self.first_step + 1} of {self.epochs.steps}): stopped; lower "
                                f"{option_name('learning_rate')} or set {option_name('clip_norm')}, in a fresh "
                                f"{option_name('workdir')} (resuming this one repeats it)")
            if self.epochs.events is not None:
                self.epochs.events.step(step, values)
            self.fetched.append(values)
        del self.pending[:count]
        if count:
            self.bar.update(count * self.epochs.batch_size)
            self.bar.set_postfix(loss=f"{np.mean([m['loss'] for m in self.fetched]):.4f}",
                                 acc=f"{np.mean([m['accuracy'] for m in self.fetched]):.2%}",
                                 grad_norm=f"{self.fetched[-1]['grad_norm']:.3g}")

    def means(self) -> Row:
        """The epoch's mean train metrics (train_loss, train_accuracy[, train_top5])."""
        return {f"train_{k}": float(np.mean([m[k] for m in self.fetched])) for k in ("loss", "accuracy", "top5")
                if k in self.fetched[0]}


def format_row(row: Row, epochs: int) -> str:
    """The one log line of an epoch."""
    def part(prefix: str) -> str:
        top5 = f" top5 {row[prefix + '_top5']:.2%}" if prefix + "_top5" in row else ""
        return f"{prefix} loss {row[prefix + '_loss']:.4f} acc {row[prefix + '_accuracy']:.2%}{top5}"

    val = part("val") if row["val_loss"] is not None else "no validation"
    return (f"epoch {row['epoch']}/{epochs}: {part('train')} | {val} | {row['seconds']:.1f} s, "
            f"{row['img_per_s']:.0f} img/s")
