"""The training loop: `train_and_evaluate(config)` fine-tunes a classifier epoch by epoch with the engine's
pmapped step on every device of every process, evaluates, logs, plots, checkpoints, stops cleanly when
preempted, and resumes a stopped run exactly where it left off.

The work folder (`config.workdir`; one folder that every process of a run shares) holds:
  config.json          the run's Config
  metrics.jsonl        one JSON object per epoch (epoch, train_loss, train_accuracy, [train_top5,] val_loss,
                       val_accuracy, [val_top5,] seconds, img_per_s); val_* are null in epochs not evaluated
  curves.png           loss and accuracy vs epoch, train and validation
  checkpoints/STEP/    the whole TrainState after train step STEP, with the config and the metrics so far
                       (`checkpoints.py`, orbax): after every epoch, every `checkpoint_every` steps within one
                       and when stopped; the last `checkpoints.KEEP` are kept
  final.msgpack        the classifier as a weights file: `load_converted` gives a model mapping raw uint8
                       images at the dataset's native size to logits; metadata has class_names, image_shape
  events.out.tfevents.*  TensorBoard scalars per step and per epoch (`tensorboard.py`), with the extra installed
Process 0 prints and writes them all but the checkpoints, which every process writes its part of.

Several processes (`config.coordinator`, `jax.distributed`): each feeds its own rows of every global batch
(`distributed.process_rows`) and evaluates its rows of every validation batch; metrics are reduced over all
devices inside the steps, so every process holds the same numbers.

Determinism: the data order depends on (seed, epoch) alone and each step's randomness on fold_in(key, step),
and a checkpoint's step says where in the data it was taken: a run resumed from any checkpoint, also one from
the middle of an epoch, ends with exactly the numbers of an uninterrupted run with the same layout (processes
and devices; reductions follow the layout, so another layout agrees to rounding only).

Feature cache (`config.feature_cache`, `feature_cache`): when the backbone is frozen, in inference mode and fed
unaugmented images, `epoch_inputs` computes every image's pooled backbone features once, and the epochs train
and evaluate the head alone on them; checkpoints and final.msgpack hold the whole state either way.

Stopping: after SIGTERM or Ctrl-C (`preemption.StopSignals`) every process saves a checkpoint after the same
step and `train_and_evaluate` raises `Preempted`. This module is train.py's engine, so its errors name the
options by their train.py flags (`errors.flag`); the library below it speaks of them in its own terms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jax
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from tqdm import tqdm

from flaxresnet import (checkpoints, compile_cache, data, distributed, feature_cache, freeze, optim, preemption,
                        stream, tensorboard, train_lib, weights_file)
from flaxresnet.config import Config
from flaxresnet.errors import UserError, flag
from flaxresnet.models import Classifier, ResNet

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


def default_workdir(dataset: str) -> str:
    """runs/<dataset>-<YYYYmmdd-HHMMSS>, the dataset spec made file-name safe."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("_") or "run"
    return f"runs/{name}-{datetime.now():%Y%m%d-%H%M%S}"


def say(text: str) -> None:
    """Print a log line, from process 0 only."""
    if distributed.is_main():
        print(text, flush=True)


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
    distributed.initialize(config.coordinator, config.num_processes, config.process_id)
    distributed.check_batch_size(config.batch_size)
    if config.workdir is None:
        if jax.process_count() > 1:
            raise UserError("a multi-process run needs --workdir: one folder that every process shares")
        config = dataclasses.replace(config, workdir=default_workdir(config.dataset))
    workdir = Path(config.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"work folder {workdir} is a file, not a folder: choose another --workdir")
    if old := sorted(workdir.glob("checkpoint_*.msgpack")):
        raise UserError(f"{workdir} holds checkpoints of an older flaxresnet ({old[-1].name}), which this one "
                        f"does not resume: use a fresh --workdir")
    backbone = load_backbone(config)
    store = checkpoints.Checkpoints(workdir / "checkpoints")
    try:
        return _run(config, workdir, backbone, store)
    finally:
        store.close()


def _run(config: Config, workdir: Path, backbone: tuple[ResNet, dict[str, Any]] | None,
         store: checkpoints.Checkpoints) -> Row:
    """`train_and_evaluate` once the processes, the work folder and the backbone are there."""
    resume = store.latest()
    if resume is not None:
        check_resumable(resume, config)

    ds = data.open_dataset(config.dataset, config.data_dir, config.seed, config.image_size)
    config = dataclasses.replace(config, num_classes=ds.num_classes)
    image_shape = ds.train.image_shape
    check_image_size(config, image_shape)
    steps_per_epoch = data.num_train_steps(ds.train, config.batch_size)
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    say(f"dataset {config.dataset}: {len(ds.train)} training and {len(ds.validation)} validation images of "
        f"{image_shape[0]}x{image_shape[1]} px (model input {config.image_size or image_shape[0]} px), "
        f"{ds.num_classes} classes; {steps_per_epoch} steps of {config.batch_size} an epoch on "
        f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s){processes}")
    ds = input_pipeline(config, ds)

    init_key, train_key = jax.random.split(jax.random.key(config.seed))

    def new_state() -> train_lib.TrainState:
        return train_lib.create_train_state(config, init_key, image_shape, backbone,
                                            config.epochs * steps_per_epoch)

    if distributed.is_main():
        workdir.mkdir(parents=True, exist_ok=True)
    if resume is None:
        state, history, done, seconds = new_state(), [], [], 0.0
        say(f"work folder {workdir}: new run (rerun the same command to resume it if stopped)")
    else:
        state = store.restore(resume, jax.eval_shape(new_state))
        history, done, seconds = resume.meta.history, resume.meta.epoch_metrics, resume.meta.epoch_seconds
        say(f"work folder {workdir}: resuming {describe_position(resume, steps_per_epoch)} from "
            f"{resume.path.relative_to(workdir)}")
        if resume.meta.layout != checkpoints.current_layout():
            say(f"note: the checkpoint was written by {format_layout(resume.meta.layout)}, this run has "
                f"{format_layout(checkpoints.current_layout())}: the numbers agree with an uninterrupted run "
                f"to rounding only (dropout masks follow the device count)")
    say(freeze.format_counts(freeze.parameter_counts(state.variables(), state.settings.frozen)))
    if distributed.is_main():
        _write_json(workdir / "config.json", config.to_dict())
        write_metrics(workdir, history)

    state, train, validation, whole = epoch_inputs(config, train_lib.replicate(state), ds)

    def save(state: train_lib.TrainState, step: int, fetched: list[StepMetrics], seconds: float) -> None:
        store.save(step, whole(state), checkpoints.Meta(config, history, fetched, seconds))

    events = tensorboard.Events(workdir, (0 if resume is None else resume.step) + 1,
                                optim.learning_rate_schedule(state.settings.optimizer), distributed.is_main())
    with preemption.StopSignals() as stop, contextlib.closing(events):
        for epoch in range(len(history) + 1, config.epochs + 1):
            start = time.perf_counter()
            state, row, train_seconds = train_epoch(state, train, config, epoch, steps_per_epoch, train_key,
                                                    done=done, seconds=seconds, save=save, stop=stop,
                                                    events=events)
            if epoch % config.eval_every == 0 or epoch == config.epochs:
                result = evaluate(state.model, state.variables(), validation, config.batch_size)
                row.update(val_loss=result.loss, val_accuracy=result.accuracy)
                if result.top5 is not None:
                    row["val_top5"] = result.top5
            else:
                row.update(val_loss=None, val_accuracy=None)
            row.update(seconds=seconds + time.perf_counter() - start,
                       img_per_s=steps_per_epoch * config.batch_size / train_seconds)
            history.append(row)
            save(state, epoch * steps_per_epoch, [], 0.0)
            if distributed.is_main():
                write_metrics(workdir, history)
            events.epoch(row)
            say(format_row(row, config.epochs))
            done, seconds = [], 0.0

    if distributed.is_main():
        train_lib.save_classifier(str(workdir / "final.msgpack"), train_lib.unreplicate(whole(state)),
                                  config=config.to_dict(), class_names=ds.class_names,
                                  image_shape=list(image_shape), dataset=config.dataset, metrics=history[-1])
    say(f"final classifier: {workdir / 'final.msgpack'}")
    return history[-1]


def epoch_inputs(config: Config, state: train_lib.TrainState, ds: data.Dataset) -> tuple[
        train_lib.TrainState, data.Examples, data.Examples, Callable[[train_lib.TrainState], train_lib.TrainState]]:
    """What the epochs train and evaluate on, chosen once a run (and said in one line): the replicated `state`
    and the dataset's splits; or, when the feature cache applies (`feature_cache`), the head's part of the state
    and the splits' pooled backbone features, computed here. Also the function that makes a state trained on
    them whole again, for checkpoints and final.msgpack."""
    reason = f"{flag('feature_cache')} off" if config.feature_cache == "off" else feature_cache.why_not(state)
    if reason is not None:
        hint = "" if config.feature_cache == "off" else f"; it needs {flag('freeze')} backbone {flag('augment')} none"
        say(f"feature cache: off ({reason}{hint})")
        return state, ds.train, ds.validation, lambda trained: trained
    head, backbone = train_lib.split_backbone(state)
    start = time.perf_counter()
    train, validation = (feature_cache.compute(state.model, backbone, split, config.batch_size, name)
                         for split, name in ((ds.train, "training"), (ds.validation, "validation")))
    seconds, images = time.perf_counter() - start, len(train) + len(validation)
    size = (train.features.nbytes + validation.features.nbytes) / 1e6
    say(f"feature cache: on (backbone frozen and in inference mode, no augmentation): the pooled backbone "
        f"features of {images:,} images computed once in {seconds:.1f} s ({images / seconds:.0f} img/s), "
        f"{size:,.1f} MB on the host{' of each process' if jax.process_count() > 1 else ''}; the epochs run "
        f"the head alone")
    return head, train, validation, functools.partial(train_lib.join_backbone, backbone=backbone)


def input_pipeline(config: Config, ds: data.Dataset) -> data.Dataset:
    """`ds` decoded into memory or streamed, as `config.input_pipeline` says (`data.choose_pipeline`); says which
    in one line."""
    pipeline, why = data.choose_pipeline(config.input_pipeline, ds)
    workers = stream.default_workers() if config.data_workers is None else config.data_workers
    if pipeline == "memory":
        say(f"input pipeline: memory, every image decoded before the first step ({why})")
        return ds.in_memory(workers)
    decoders = "the training process" if not workers else f"{workers} worker process(es)" + (
        " of each training process" if jax.process_count() > 1 else "")
    say(f"input pipeline: stream, each batch decoded when needed by {decoders} ({why})")
    return ds.streamed(workers)


def describe_position(checkpoint: checkpoints.Checkpoint, steps_per_epoch: int) -> str:
    """'after epoch E (step N)' or 'at step N (epoch E, batch B of S)'; UserError if the checkpoint's step
    does not fall where its metrics say (the dataset changed size, e.g. another --data-dir)."""
    finished, partial = len(checkpoint.meta.history), len(checkpoint.meta.epoch_metrics)
    if checkpoint.step != finished * steps_per_epoch + partial or partial > steps_per_epoch:
        raise UserError(f"checkpoint {checkpoint.path} was taken at step {checkpoint.step} after {finished} "
                        f"epochs and {partial} steps, which does not fit this dataset's {steps_per_epoch} steps "
                        f"an epoch: resume it with the data it was trained on, or use a fresh --workdir")
    if not partial:
        return f"after epoch {finished} (step {checkpoint.step})"
    return f"at step {checkpoint.step} (epoch {finished + 1}, batch {partial} of {steps_per_epoch})"


def format_layout(layout: dict[str, int]) -> str:
    """'2 processes with 4 devices in all'."""
    return f"{layout['processes']} process(es) with {layout['devices']} device(s) in all"


def load_backbone(config: Config) -> tuple[ResNet, dict[str, Any]] | None:
    """`load_converted` of `config.backbone_weights`, or None (saying so) to train from scratch."""
    if config.backbone_weights is None:
        print(f"no backbone weights (--backbone-weights none): training ResNet{config.depth} from scratch, "
              f"randomly initialised")
        return None
    model, variables = weights_file.load_converted(config.backbone_weights)
    if not isinstance(model, ResNet):
        raise UserError(f"{config.backbone_weights} is a fine-tuned classifier, not a backbone: pass a file "
                        f"converted with `python -m convert keras_to_flax`")
    print(f"backbone: ResNet{model.depth} from {config.backbone_weights}")
    return model, variables


def check_image_size(config: Config, image_shape: tuple[int, ...]) -> None:
    """UserError unless nearest upsampling can reach `config.image_size` by a whole factor."""
    height, width = image_shape[:2]
    size = config.image_size
    if config.upsample == "nearest" and size is not None and (size % height or size % width):
        raise UserError(f"--image-size {size} is not a whole multiple of the dataset's {height}x{width} images, "
                        f"which nearest upsampling needs: choose a multiple of {max(height, width)} or "
                        f"--upsample bilinear")


def train_epoch(state: train_lib.TrainState, split: data.Examples, config: Config, epoch: int, steps: int,
                key: jax.Array, *, done: list[StepMetrics] = (), seconds: float = 0.0, save: Save | None = None,
                stop: preemption.StopSignals | None = None,
                events: tensorboard.Events | None = None) -> tuple[train_lib.TrainState, Row, float]:
    """Run (the rest of) one epoch of training steps on a replicated state; returns it, the epoch's mean train
    metrics and its training seconds.

    `done` and `seconds` are the step metrics and training seconds of the epoch's batches already run (a
    resumed epoch starts after them). `save` checkpoints every `config.checkpoint_every` steps within the
    epoch, and when `stop` asks after a step, before raising Preempted. Step metrics stay on device and are
    fetched every FETCH_EVERY steps (all but the newest, so the device keeps working) to update the progress
    bar and `events`, and to stop at a non-finite loss. A `data.FeatureSplit` trains the head alone
    (`epoch_inputs`): the state is then the head's part.
    """
    step_fn = train_lib.p_head_train_step if isinstance(split, data.FeatureSplit) else train_lib.p_train_step
    batches = data.prefetch_to_device(data.train_batches(
        split, config.batch_size, config.seed, epoch, len(done), distributed.process_rows(config.batch_size)))
    first_step = (epoch - 1) * steps + 1
    pending: list[train_lib.Metrics] = []
    fetched: list[StepMetrics] = list(done)
    begin = time.perf_counter()
    with contextlib.closing(batches), tqdm(
            total=steps * config.batch_size, initial=len(done) * config.batch_size, desc=f"epoch {epoch}/"
            f"{config.epochs}", unit="img", leave=False, disable=None if distributed.is_main() else True) as bar:

        def fetch(count: int) -> None:
            for metrics in jax.device_get(pending[:count]):
                values = {k: float(v[0]) for k, v in metrics.items()}  # pmean: every device has the same
                if not math.isfinite(values["loss"]):
                    step = first_step + len(fetched)
                    raise UserError(f"the training loss is {values['loss']} at step {step} (epoch {epoch}, batch "
                                    f"{step - first_step + 1} of {steps}): stopped; lower --learning-rate or "
                                    f"set --clip-norm, in a fresh --workdir (resuming this one repeats it)")
                if events is not None:
                    events.step(first_step + len(fetched), values)
                fetched.append(values)
            del pending[:count]
            bar.update(count * config.batch_size)
            bar.set_postfix(loss=f"{np.mean([m['loss'] for m in fetched]):.4f}",
                            acc=f"{np.mean([m['accuracy'] for m in fetched]):.2%}",
                            grad_norm=f"{fetched[-1]['grad_norm']:.3g}")

        for batch in batches:
            state, metrics = step_fn(state, batch, key)
            pending.append(metrics)
            finished = len(fetched) + len(pending)
            step = first_step - 1 + finished  # the steps done in all
            if stop is not None and stop.requested(step):
                fetch(len(pending))
                if save is not None:
                    save(state, step, fetched, seconds + time.perf_counter() - begin)
                raise Preempted(f"{stop.reason} at step {step} (epoch {epoch}, batch {finished} of {steps}): checkpoint "
                                f"saved; rerun the same command to resume", stop.exit_status)
            if save is not None and config.checkpoint_every and not step % config.checkpoint_every \
                    and finished < steps:
                fetch(len(pending))
                save(state, step, fetched, seconds + time.perf_counter() - begin)
            elif len(pending) > FETCH_EVERY:
                fetch(len(pending) - 1)
        fetch(len(pending))
    means = {f"train_{k}": float(np.mean([m[k] for m in fetched])) for k in ("loss", "accuracy", "top5")
             if k in fetched[0]}
    return state, {"epoch": epoch, **means}, seconds + time.perf_counter() - begin


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Means over a split's examples (`top5` None below 5 classes) and each example's top-1 class, in order."""

    loss: float
    accuracy: float
    top5: float | None
    count: int
    predictions: np.ndarray


def evaluate(model: Classifier, variables: dict[str, Any], split: data.Examples, batch_size: int) -> Evaluation:
    """Evaluate `model` with replicated `variables` (`train_lib.replicate`) on every example of `split` once, in
    global batches of `batch_size` (each process runs its rows of each), with the engine's `p_eval_step`: the
    training loop's validation every epoch and `python -m flaxresnet.evaluate` are this one function. A
    `data.FeatureSplit` is evaluated by the head alone (`p_head_eval_step`, `variables` the head's)."""
    if not len(split):
        raise UserError("the split to evaluate on has no examples")
    step = train_lib.p_head_eval_step if isinstance(split, data.FeatureSplit) else train_lib.p_eval_step
    sums, predictions = [], []
    batches = data.prefetch_to_device(data.eval_batches(split, batch_size, distributed.process_rows(batch_size)))
    with contextlib.closing(batches):
        for batch in batches:
            batch_sums, batch_predictions = step(model, variables, batch)
            sums.append(jax.tree.map(lambda x: x[0], batch_sums))  # psum: every device holds the global sums
            predictions.append(batch_predictions.reshape(-1))
    totals = {k: float(np.sum([np.asarray(s[k], np.float64) for s in sums])) for k in sums[0]}
    count = int(totals["count"])
    ours = distributed.gather_rows(np.stack(jax.device_get(predictions)))  # every process's, in order
    return Evaluation(loss=totals["loss"] / count, accuracy=totals["accuracy"] / count,
                      top5=totals["top5"] / count if "top5" in totals else None, count=count,
                      predictions=ours[:len(split)])


def format_row(row: Row, epochs: int) -> str:
    """The one log line of an epoch."""
    def part(prefix: str) -> str:
        top5 = f" top5 {row[prefix + '_top5']:.2%}" if prefix + "_top5" in row else ""
        return f"{prefix} loss {row[prefix + '_loss']:.4f} acc {row[prefix + '_accuracy']:.2%}{top5}"

    val = part("val") if row["val_loss"] is not None else "no validation"
    return (f"epoch {row['epoch']}/{epochs}: {part('train')} | {val} | {row['seconds']:.1f} s, "
            f"{row['img_per_s']:.0f} img/s")


def check_resumable(checkpoint: checkpoints.Checkpoint, config: Config) -> None:
    """UserError unless `config` continues the checkpoint's run: equal settings (but those the Config marks
    resumable or derived) and enough epochs (the cosine schedule's dependence on epochs is checked here)."""
    saved = checkpoint.meta.config
    changed = [f"{flag(f.name)} {getattr(saved, f.name)} -> {getattr(config, f.name)}"
               for f in dataclasses.fields(Config)
               if not (f.metadata["resumable"] or f.metadata["derived"])
               and getattr(saved, f.name) != getattr(config, f.name)]
    fresh = "or use a fresh --workdir"
    folder = checkpoint.path.parent.parent
    if changed:
        raise UserError(f"{folder} holds a run with other settings ({'; '.join(changed)}): rerun with its "
                        f"settings (see its config.json) to resume it, {fresh}")
    if saved.schedule == "cosine" and saved.epochs != config.epochs:
        raise UserError(f"{folder} holds a run whose cosine schedule decays to zero at epoch {saved.epochs}, not "
                        f"{config.epochs}: resume it with --epochs {saved.epochs}, {fresh}")
    reached = len(checkpoint.meta.history) + bool(checkpoint.meta.epoch_metrics)
    if reached > config.epochs:
        raise UserError(f"{folder} holds a run already in epoch {reached}: pass --epochs {reached} or more to "
                        f"continue it, {fresh}")


def write_metrics(workdir: Path, history: list[Row]) -> None:
    """Rewrite metrics.jsonl and curves.png from the metrics history (atomically; nothing when it is empty)."""
    if not history:
        return
    text = "".join(json.dumps(row) + "\n" for row in history)
    weights_file.atomic_write(workdir / "metrics.jsonl", lambda f: f.write(text), mode="w")
    plot_curves(workdir / "curves.png", history)


def plot_curves(path: Path, history: list[Row]) -> None:
    """Loss and accuracy against epoch, train and validation, side by side, as a PNG written atomically."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    epochs = [row["epoch"] for row in history]
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], "o-", label="train")
        val = [(row["epoch"], row[f"val_{metric}"]) for row in history if row[f"val_{metric}"] is not None]
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metric == "accuracy":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    weights_file.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def _write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=2) + "\n"
    weights_file.atomic_write(path, lambda f: f.write(text), mode="w")
