"""The work folder of a training run and the resume contract: what the folder holds, and when and how a run
continues the one it holds.

The work folder (one folder that every process of a run shares) holds:
  config.json          the run's Config (`write_config`)
  metrics.jsonl        one JSON object per epoch (epoch, train_loss, train_accuracy, [train_top5,] val_loss,
                       val_accuracy, [val_top5,] seconds, img_per_s); val_* are null in epochs not evaluated
  curves.png           loss and accuracy vs epoch, train and validation (`write_metrics`)
  checkpoints/STEP/    the whole TrainState after train step STEP with its `checkpoints.Meta` (config, metrics so
                       far, layout): after every epoch, every `checkpoint_every` steps within one and when stopped
  final.msgpack        the classifier as a weights file (`train_lib.save_classifier`)
  events.out.tfevents.*  TensorBoard scalars (`tensorboard.py`), with the extra installed
Process 0 writes them all but the checkpoints, which every process writes its part of.

Resuming: the newest checkpoint continues when the run's settings equal its own but for those the Config marks
resumable (`check_resumable`), and its step falls where its metrics say (`describe_position`); a checkpoint of
another process/device layout resumes with a note that the numbers then agree to rounding only.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jax
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from flaxresnet import checkpoints, log, weights_file
from flaxresnet.config import Config
from flaxresnet.errors import UserError, option_name

Row = dict[str, Any]


def default_workdir(dataset: str) -> str:
    """runs/<dataset>-<YYYYmmdd-HHMMSS>, the dataset spec made file-name safe."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("_") or "run"
    return f"runs/{name}-{datetime.now():%Y%m%d-%H%M%S}"


def open_workdir(config: Config) -> tuple[Config, Path]:
    """The run's config with its work folder set (a new default one if none was given) and that folder; UserError
    if it cannot hold this run (a file, an older flaxresnet's checkpoints, several processes without one)."""
    if config.workdir is None:
        if jax.process_count() > 1:
            raise UserError("a multi-process run needs a work folder that every process shares", option="workdir")
        config = dataclasses.replace(config, workdir=default_workdir(config.dataset))
    workdir = Path(config.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"work folder {workdir} is a file, not a folder: choose another {option_name('workdir')}")
    if old := sorted(workdir.glob("checkpoint_*.msgpack")):
        raise UserError(f"{workdir} holds checkpoints of an older flaxresnet ({old[-1].name}), which this one "
                        f"does not resume: use a fresh {option_name('workdir')}")
    return config, workdir


def check_resumable(checkpoint: checkpoints.Checkpoint, config: Config) -> None:
    """UserError unless `config` continues the checkpoint's run: equal settings (but those the Config marks
    resumable or derived) and enough epochs (the cosine schedule's dependence on epochs is checked here)."""
    saved = checkpoint.meta.config
    changed = [f"{option_name(f.name)} {getattr(saved, f.name)} -> {getattr(config, f.name)}"
               for f in dataclasses.fields(Config)
               if not (f.metadata["resumable"] or f.metadata["derived"])
               and getattr(saved, f.name) != getattr(config, f.name)]
    fresh = f"or use a fresh {option_name('workdir')}"
    folder = checkpoint.path.parent.parent
    if changed:
        raise UserError(f"{folder} holds a run with other settings ({'; '.join(changed)}): rerun with its "
                        f"settings (see its config.json) to resume it, {fresh}")
    epochs = option_name("epochs")
    if saved.schedule == "cosine" and saved.epochs != config.epochs:
        raise UserError(f"{folder} holds a run whose cosine schedule decays to zero at epoch {saved.epochs}, not "
                        f"{config.epochs}: resume it with {epochs} {saved.epochs}, {fresh}")
    reached = len(checkpoint.meta.history) + bool(checkpoint.meta.epoch_metrics)
    if reached > config.epochs:
        raise UserError(f"{folder} holds a run already in epoch {reached}: pass {epochs} {reached} or more to "
                        f"continue it, {fresh}")


def describe_position(checkpoint: checkpoints.Checkpoint, steps_per_epoch: int) -> str:
    """'after epoch E (step N)' or 'at step N (epoch E, batch B of S)'; UserError if the checkpoint's step
    does not fall where its metrics say (the dataset changed size, e.g. another data folder)."""
    finished, partial = len(checkpoint.meta.history), len(checkpoint.meta.epoch_metrics)
    if checkpoint.step != finished * steps_per_epoch + partial or partial > steps_per_epoch:
        raise UserError(f"checkpoint {checkpoint.path} was taken at step {checkpoint.step} after {finished} "
                        f"epochs and {partial} steps, which does not fit this dataset's {steps_per_epoch} steps "
                        f"an epoch: resume it with the data it was trained on, or use a fresh "
                        f"{option_name('workdir')}")
    if not partial:
        return f"after epoch {finished} (step {checkpoint.step})"
    return f"at step {checkpoint.step} (epoch {finished + 1}, batch {partial} of {steps_per_epoch})"


def format_layout(layout: dict[str, int]) -> str:
    """'2 processes with 4 devices in all'."""
    return f"{layout['processes']} process(es) with {layout['devices']} device(s) in all"


def start(workdir: Path, store: checkpoints.Checkpoints, resume: checkpoints.Checkpoint | None,
          new_state: Callable[[], Any], steps_per_epoch: int) -> tuple[Any, list[Row], list[Row], float]:
    """The run's (host) TrainState and where it stands: the finished epochs' rows, the unfinished epoch's step
    metrics and training seconds so far. `resume`'s, restored from `store`, or a fresh state's (`new_state`);
    says which in a line or two."""
    if resume is None:
        log.say(f"work folder {workdir}: new run (rerun the same command to resume it if stopped)")
        return new_state(), [], [], 0.0
    state = store.restore(resume, jax.eval_shape(new_state))
    log.say(f"work folder {workdir}: resuming {describe_position(resume, steps_per_epoch)} from "
            f"{resume.path.relative_to(workdir)}")
    if resume.meta.layout != checkpoints.current_layout():
        log.say(f"note: the checkpoint was written by {format_layout(resume.meta.layout)}, this run has "
                f"{format_layout(checkpoints.current_layout())}: the numbers agree with an uninterrupted run "
                f"to rounding only (dropout masks follow the device count)")
    return state, resume.meta.history, resume.meta.epoch_metrics, resume.meta.epoch_seconds


def write_config(workdir: Path, config: Config) -> None:
    """config.json: the run's settings (`Config.to_dict`), written atomically."""
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    weights_file.atomic_write(workdir / "config.json", lambda f: f.write(text), mode="w")


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
