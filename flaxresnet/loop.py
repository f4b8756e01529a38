"""The training loop: `train_and_evaluate(config)` fine-tunes a classifier epoch by epoch with the engine's
pmapped step, evaluates, logs, plots, checkpoints, and resumes a stopped run where it left off.

The work folder (`config.workdir`) holds:
  config.json               the run's Config
  metrics.jsonl             one JSON object per epoch (epoch, train_loss, train_accuracy, [train_top5,] val_loss,
                            val_accuracy, [val_top5,] seconds, img_per_s); val_* are null in epochs not evaluated
  curves.png                loss and accuracy vs epoch, train and validation
  checkpoint_NNNN.msgpack   after epoch NNNN: the whole TrainState (parameters, BN statistics, optimizer state,
                            step), the config and the metrics so far; the last KEEP_CHECKPOINTS are kept
  final.msgpack             the classifier as a weights file: `load_converted` gives a model mapping raw uint8
                            images at the dataset's native size to logits; metadata has class_names, image_shape

Determinism: the data order depends on (seed, epoch) alone and each step's randomness on fold_in(key, step),
so a run resumed from its last checkpoint ends with exactly the numbers of an uninterrupted run.

One process feeds every local device and writes every file (no multi-host support). This module is train.py's
engine, so its errors name the options by their train.py flags (`errors.flag`); the library below it (data,
train_lib, weights_file, ...) speaks of them in its own terms.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from tqdm import tqdm

from flaxresnet import data, freeze, train_lib, trees, weights_file
from flaxresnet.config import Config
from flaxresnet.errors import UserError, flag
from flaxresnet.models import Classifier, ResNet

CHECKPOINT_FORMAT = "flaxresnet-checkpoint"
CHECKPOINT_VERSION = 2  # 2: Adam state for the trainable parameters only
KEEP_CHECKPOINTS = 2
# Host fetches of step metrics (for the progress bar and the non-finite check) happen every this many steps.
FETCH_EVERY = 20
_CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)\.msgpack")

Row = dict[str, Any]


def default_workdir(dataset: str) -> str:
    """runs/<dataset>-<YYYYmmdd-HHMMSS>, the dataset spec made file-name safe."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("_") or "run"
    return f"runs/{name}-{datetime.now():%Y%m%d-%H%M%S}"


def train_and_evaluate(config: Config) -> Row:
    """Train and evaluate as `config` says, resuming from the work folder's last checkpoint if there is one.

    Returns the last epoch's metrics (a metrics.jsonl row). Foreseeable problems (weights file, dataset,
    batch size, corrupt checkpoint, non-finite loss, ...) raise UserError, checked before slow work starts.
    """
    train_lib.check_batch_size(config.batch_size)
    if config.workdir is None:
        config = dataclasses.replace(config, workdir=default_workdir(config.dataset))
    workdir = Path(config.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"work folder {workdir} is a file, not a folder: choose another --workdir")
    backbone = load_backbone(config)
    resume = latest_checkpoint(workdir)
    if resume is not None:
        check_resumable(resume, config)

    ds = data.load_dataset(config.dataset, config.data_dir, config.seed, config.image_size)
    config = dataclasses.replace(config, num_classes=ds.num_classes)
    image_shape = ds.train.images.shape[1:]
    check_image_size(config, image_shape)
    steps_per_epoch = data.num_train_steps(ds.train, config.batch_size)
    print(f"dataset {config.dataset}: {len(ds.train)} training and {len(ds.validation)} validation images of "
          f"{image_shape[0]}x{image_shape[1]} px (model input {config.image_size or image_shape[0]} px), "
          f"{ds.num_classes} classes; {steps_per_epoch} steps of {config.batch_size} an epoch on "
          f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s)")

    init_key, train_key = jax.random.split(jax.random.key(config.seed))

    def new_state() -> train_lib.TrainState:
        return train_lib.create_train_state(config, init_key, image_shape, backbone,
                                            config.epochs * steps_per_epoch)

    workdir.mkdir(parents=True, exist_ok=True)
    if resume is None:
        state, history = new_state(), []
        print(f"work folder {workdir}: new run (rerun with --workdir {workdir} to resume it if stopped)")
    else:
        state, history = restore_checkpoint(resume, jax.eval_shape(new_state)), resume.history
        print(f"work folder {workdir}: resuming after epoch {resume.epoch} from {resume.path.name}")
    print(freeze.format_counts(freeze.parameter_counts(state.variables(), state.settings.frozen)))
    _write_json(workdir / "config.json", config.to_dict())
    write_metrics(workdir, history)

    state = train_lib.replicate(state)
    for epoch in range(len(history) + 1, config.epochs + 1):
        start = time.perf_counter()
        state, row = train_epoch(state, ds.train, config, epoch, steps_per_epoch, train_key)
        img_per_s = steps_per_epoch * config.batch_size / (time.perf_counter() - start)
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            result = evaluate(state.model, state.variables(), ds.validation, config.batch_size)
            row.update(val_loss=result.loss, val_accuracy=result.accuracy)
            if result.top5 is not None:
                row["val_top5"] = result.top5
        else:
            row.update(val_loss=None, val_accuracy=None)
        row.update(seconds=time.perf_counter() - start, img_per_s=img_per_s)
        history.append(row)
        save_checkpoint(workdir, state, config, history)
        write_metrics(workdir, history)
        print(format_row(row, config.epochs))

    train_lib.save_classifier(str(workdir / "final.msgpack"), train_lib.unreplicate(state),
                              config=config.to_dict(), class_names=ds.class_names,
                              image_shape=list(image_shape), dataset=config.dataset, metrics=history[-1])
    print(f"final classifier: {workdir / 'final.msgpack'}")
    return history[-1]


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


def train_epoch(state: train_lib.TrainState, split: data.Split, config: Config, epoch: int, steps: int,
                key: jax.Array) -> tuple[train_lib.TrainState, Row]:
    """Run one epoch of training steps on a replicated state; returns it and the epoch's mean train metrics.

    Step metrics stay on device and are fetched every FETCH_EVERY steps (all but the newest, so the device
    keeps working) to update the progress bar and stop at a non-finite loss.
    """
    batches = data.prefetch_to_device(data.train_batches(split, config.batch_size, config.seed, epoch))
    first_step = (epoch - 1) * steps + 1
    pending: list[train_lib.Metrics] = []
    fetched: list[dict[str, float]] = []
    with tqdm(total=steps * config.batch_size, desc=f"epoch {epoch}/{config.epochs}", unit="img", leave=False,
              disable=None) as bar:

        def fetch(count: int) -> None:
            for metrics in jax.device_get(pending[:count]):
                values = {k: float(v[0]) for k, v in metrics.items()}  # pmean: every device has the same
                if not math.isfinite(values["loss"]):
                    step = first_step + len(fetched)
                    kept = f" (the checkpoint of epoch {epoch - 1} is kept)" if epoch > 1 else ""
                    raise UserError(f"the training loss is {values['loss']} at step {step} (epoch {epoch}, batch "
                                    f"{step - first_step + 1} of {steps}): stopped; lower --learning-rate or "
                                    f"set --clip-norm{kept}")
                fetched.append(values)
            del pending[:count]
            bar.update(count * config.batch_size)
            bar.set_postfix(loss=f"{np.mean([m['loss'] for m in fetched]):.4f}",
                            acc=f"{np.mean([m['accuracy'] for m in fetched]):.2%}",
                            grad_norm=f"{fetched[-1]['grad_norm']:.3g}")

        for batch in batches:
            state, metrics = train_lib.p_train_step(state, batch, key)
            pending.append(metrics)
            if len(pending) > FETCH_EVERY:
                fetch(len(pending) - 1)
        fetch(len(pending))
    means = {f"train_{k}": float(np.mean([m[k] for m in fetched])) for k in ("loss", "accuracy", "top5")
             if k in fetched[0]}
    return state, {"epoch": epoch, **means}


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Means over a split's examples (`top5` None below 5 classes) and each example's top-1 class, in order."""

    loss: float
    accuracy: float
    top5: float | None
    count: int
    predictions: np.ndarray


def evaluate(model: Classifier, variables: dict[str, Any], split: data.Split, batch_size: int) -> Evaluation:
    """Evaluate `model` with replicated `variables` (`train_lib.replicate`) on every example of `split` once, in
    global batches of `batch_size`, with the engine's `p_eval_step`: the training loop's validation every
    epoch and `python -m flaxresnet.evaluate` are this one function."""
    if not len(split):
        raise UserError("the split to evaluate on has no examples")
    sums, predictions = [], []
    for batch in data.prefetch_to_device(data.eval_batches(split, batch_size)):
        batch_sums, batch_predictions = train_lib.p_eval_step(model, variables, batch)
        sums.append(jax.tree.map(lambda x: x[0], batch_sums))  # psum: every device holds the global sums
        predictions.append(batch_predictions.reshape(-1))
    totals = {k: float(np.sum([np.asarray(s[k], np.float64) for s in sums])) for k in sums[0]}
    count = int(totals["count"])
    return Evaluation(loss=totals["loss"] / count, accuracy=totals["accuracy"] / count,
                      top5=totals["top5"] / count if "top5" in totals else None, count=count,
                      predictions=np.concatenate(jax.device_get(predictions))[:len(split)])


def format_row(row: Row, epochs: int) -> str:
    """The one log line of an epoch."""
    def part(prefix: str) -> str:
        top5 = f" top5 {row[prefix + '_top5']:.2%}" if prefix + "_top5" in row else ""
        return f"{prefix} loss {row[prefix + '_loss']:.4f} acc {row[prefix + '_accuracy']:.2%}{top5}"

    val = part("val") if row["val_loss"] is not None else "no validation"
    return (f"epoch {row['epoch']}/{epochs}: {part('train')} | {val} | {row['seconds']:.1f} s, "
            f"{row['img_per_s']:.0f} img/s")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file read from the work folder: its epoch, config, metrics history and the raw state."""

    path: Path
    epoch: int
    config: Config
    history: list[Row]
    state: dict[str, Any]


def checkpoint_paths(workdir: Path) -> list[Path]:
    """The work folder's checkpoint files, oldest epoch first."""
    found = [(int(m.group(1)), p) for p in workdir.glob("checkpoint_*.msgpack")
             if (m := _CHECKPOINT_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(workdir: Path) -> Checkpoint | None:
    """The newest checkpoint in `workdir`, or None; UserError naming the file if it cannot be read."""
    paths = checkpoint_paths(workdir)
    if not paths:
        return None
    path = paths[-1]
    advice = (f"delete it to resume from the one before ({paths[-2].name})" if len(paths) > 1
              else "delete it to start the run over")

    def damaged(why: str) -> str:
        return (f"checkpoint {path} is corrupt or not a flaxresnet checkpoint ({why}): {advice}, or use a fresh "
                f"--workdir")

    contents = weights_file.read_msgpack(
        path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, damaged,
        lambda version: f"checkpoint {path} has version {version}, this flaxresnet resumes version "
                        f"{CHECKPOINT_VERSION}: {advice}, or use a fresh --workdir")
    try:
        if not isinstance(contents["state"], dict):
            raise TypeError(f"state is a {type(contents['state']).__name__}")
        return Checkpoint(path, int(contents["epoch"]), Config.from_dict(json.loads(contents["config"])),
                          json.loads(contents["history"]), contents["state"])
    except (KeyError, TypeError, ValueError, UserError) as e:  # a missing entry, bad JSON, an unknown setting
        raise UserError(damaged(f"{type(e).__name__}: {e}")) from e


def check_resumable(checkpoint: Checkpoint, config: Config) -> None:
    """UserError unless `config` continues the checkpoint's run: equal settings (but those the Config marks
    resumable or derived) and enough epochs (the cosine schedule's dependence on epochs is checked here)."""
    saved = checkpoint.config
    changed = [f"{flag(f.name)} {getattr(saved, f.name)} -> {getattr(config, f.name)}"
               for f in dataclasses.fields(Config)
               if not (f.metadata["resumable"] or f.metadata["derived"])
               and getattr(saved, f.name) != getattr(config, f.name)]
    fresh = "or use a fresh --workdir"
    if changed:
        raise UserError(f"{checkpoint.path.parent} holds a run with other settings ({'; '.join(changed)}): "
                        f"rerun with its settings (see its config.json) to resume it, {fresh}")
    if saved.schedule == "cosine" and saved.epochs != config.epochs:
        raise UserError(f"{checkpoint.path.parent} holds a run whose cosine schedule decays to zero at epoch "
                        f"{saved.epochs}, not {config.epochs}: resume it with --epochs {saved.epochs}, {fresh}")
    if checkpoint.epoch > config.epochs:
        raise UserError(f"{checkpoint.path} is already past epoch {config.epochs}: pass --epochs "
                        f"{checkpoint.epoch} or more to continue it, {fresh}")


def save_checkpoint(workdir: Path, state: train_lib.TrainState, config: Config, history: list[Row]) -> None:
    """Write checkpoint_<epoch>.msgpack atomically from a replicated state; keep the last KEEP_CHECKPOINTS."""
    epoch = len(history)
    blob = serialization.msgpack_serialize({
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "config": json.dumps(config.to_dict()),
        "history": json.dumps(history),
        "state": serialization.to_state_dict(jax.device_get(train_lib.unreplicate(state))),
    })
    weights_file.atomic_write(workdir / f"checkpoint_{epoch:04d}.msgpack", lambda f: f.write(blob))
    for old in checkpoint_paths(workdir)[:-KEEP_CHECKPOINTS]:
        old.unlink()


def restore_checkpoint(checkpoint: Checkpoint, target: train_lib.TrainState) -> train_lib.TrainState:
    """The (unreplicated) state saved in `checkpoint`; `target` gives the state's structure, shapes and dtypes
    (e.g. `jax.eval_shape` of creating it). UserError naming what does not match."""
    trees.check(serialization.to_state_dict(target), checkpoint.state,
                f"checkpoint {checkpoint.path} does not fit this run", "delete it or use a fresh --workdir",
                dtypes=True)
    return serialization.from_state_dict(target, checkpoint.state)


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
