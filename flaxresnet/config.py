"""The one typed configuration of a fine-tuning run, shared by train.py, the training library and the tests.

Every option is declared once, as a Config field made by `option`: its type (the annotation), default, help
and check live there, and everything else reads them: the command lines build their flags from the fields
(`cli.py`), the run saves `to_dict()` beside its checkpoints and compares the fields on resume (all but those
marked `resumable`, `rundir.check_resumable`), and `train_lib.build_classifier` takes every Classifier attribute of the same name, so the saved
classifier's metadata and its Keras export carry it too. Invalid values raise UserError when the Config is
built, before any device work starts. The choices of options that other modules implement (input pipelines,
dataset forms) are declared here too, and those modules read them from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from flaxresnet import augment as augment_lib
from flaxresnet import compile_cache as compile_cache_lib
from flaxresnet import distributed
from flaxresnet import freeze
from flaxresnet.errors import UserError, option_name
from flaxresnet.models import BACKBONES, HEADS, STAGE_BLOCKS

SCHEDULES = ("constant", "cosine")
UPSAMPLE_METHODS = ("nearest", "bilinear")
DTYPES = ("float32", "bfloat16", "float64")
FEATURE_CACHE = ("auto", "off")
INPUT_PIPELINES = ("auto", "memory", "stream")
# `auto` decodes a dataset into memory when its decoded uint8 images (train + validation) take at most this
# fraction of the machine's physical memory, and streams it otherwise (`data.choose_pipeline`).
MEMORY_BUDGET_FRACTION = 0.25
DATASET_FORMS = "cifar100, tfds:NAME[:LABEL_KEY], folder:PATH or digits"
# Steps between checkpoints within an epoch: see the README's "Checkpoints" for the measured cost behind it.
CHECKPOINT_EVERY = 500

Check = Callable[[Any], str | None]


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None, check: Check | None = None,
           metavar: str | None = None, resumable: bool = False, required: bool = False, instead: str | None = None,
           derived: bool = False, local: bool = False) -> Any:
    """A Config field: `help` (ending in its own '(default: ...)' where the plain default would mislead),
    `choices` or a `check` returning what is wrong with a value (None if nothing), the command line's
    `metavar`; `resumable`: may change when a stopped run is resumed (it does not change the numbers);
    `required`: the command line must give it, or else the option `instead` names (never both);
    `derived`: set by the run itself (no flag, not compared); `local`: how this process runs (joins other
    processes, caches), not a setting of the run: never saved, may change on resume."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "check": check, "metavar": metavar, "resumable": resumable or local,
        "required": required, "instead": instead, "derived": derived, "local": local})


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be positive, got {value}"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must not be negative, got {value}"


def _positive_or_none(value: float | None) -> str | None:
    return None if value is None else _positive(value)


def _non_negative_or_none(value: int | None) -> str | None:
    return None if value is None else _non_negative(value)


def _fraction(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else f"must lie in [0, 1), got {value}"


def _augmentations(names: tuple[str, ...]) -> str | None:
    unknown = [a for a in names if a not in augment_lib.AUGMENTATIONS]
    return (f"has unknown augmentation(s) {', '.join(unknown)}: choose from {', '.join(augment_lib.AUGMENTATIONS)}"
            if unknown else None)


def _dtype(name: str) -> str | None:
    if name == "float16":
        return ("float16 is not offered: training in it needs loss scaling, which flaxresnet does not do; use "
                "bfloat16, the mixed-precision dtype of GPUs and TPUs")
    if name == "float64" and not jax.config.jax_enable_x64:
        return "float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 in the environment"
    return None


def both_starts() -> UserError:
    """The error of a run given both a backbone and a classifier to start from."""
    return UserError(f"{option_name('backbone_weights')} and {option_name('init_from')} are both given: a run "
                     f"starts from a backbone or from a whole classifier, not both; drop one")


@dataclasses.dataclass(frozen=True)
class Config:
    """Fine-tuning settings; the defaults are the seed recipe (CIFAR-100, frozen convs, Adam 1e-3). Each field's
    help says what it means."""

    num_classes: int = option(100, "classifier width (set from the dataset)", check=_positive, derived=True)
    image_size: int | None = option(
        256, "side the images are upsampled to on device, or 'none' to keep their size; folder datasets are also "
             "resized to it when read (the seed: 256, three UpSampling2D(2) on 32 px)",
        check=_positive_or_none, metavar="PX")
    upsample: str = option("nearest", "'nearest' (Keras UpSampling2D, a whole factor) or 'bilinear'",
                           choices=UPSAMPLE_METHODS)
    head: str = option("seed", "seed: GAP -> Dense(hidden, relu) -> Dropout -> BN -> Dense; linear: GAP -> Dense",
                       choices=HEADS)
    hidden: int = option(256, "hidden width of the seed head", check=_positive, metavar="N")
    dropout: float = option(0.25, "dropout rate of the seed head", check=_fraction, metavar="RATE")
    freeze: str = option("convs", f"{', '.join(freeze.PRESETS)}, stages:N or a regex over '/'-joined parameter "
                                  f"paths (freeze.py)", metavar="SPEC")
    augment: tuple[str, ...] = option(
        ("random-erasing",), f"comma-separated, applied in this order on the preprocessed native-size image, "
                             f"from {', '.join(augment_lib.AUGMENTATIONS)}; or 'none'",
        check=_augmentations, metavar="NAMES")
    cutout_size: int = option(8, "side in pixels of the cutout square", check=_positive, metavar="PX")
    learning_rate: float = option(1e-3, "(peak) learning rate of Adam (Keras defaults otherwise: betas "
                                        "0.9/0.999, epsilon 1e-7)", check=_positive, metavar="LR")
    schedule: str = option("constant", "learning rate after warmup: constant, or cosine decay to zero at the "
                                       "last step", choices=SCHEDULES)
    warmup: int = option(0, "linear warmup steps", check=_non_negative, metavar="STEPS")
    weight_decay: float = option(0.0, "decoupled (AdamW-style, scaled by the learning rate) weight decay on "
                                      "kernels only, not BN or biases", check=_non_negative, metavar="W")
    label_smoothing: float = option(0.0, "mass spread uniformly over the classes in the cross-entropy targets",
                                    check=_fraction, metavar="E")
    clip_norm: float | None = option(None, "clip gradients to this global norm over the trainable parameters "
                                           "(default: no clipping)", check=_positive_or_none, metavar="NORM")
    dtype: str = option("float32", "compute dtype; parameters, BN statistics and the loss stay float32 "
                                   "('float64', which needs 64-bit JAX, keeps everything in float64: a mode to "
                                   "verify against a float64 reference, not to train fast)",
                        check=_dtype, choices=DTYPES)
    batch_size: int = option(64, "global batch size, split evenly over all devices", check=_positive, metavar="N")
    depth: int = option(50, "ResNet depth when training from scratch; a weights file brings its own",
                        choices=tuple(STAGE_BLOCKS))
    family: str = option("v1", "ResNet family when training from scratch: v1 (ResNet50/101/152) or v2 "
                               "(ResNet50V2/101V2/152V2); a weights file brings its own", choices=tuple(BACKBONES))
    seed: int = option(0, "the one root of all randomness: initialisation, data order, any split-off "
                          "validation part, augmentation and dropout", metavar="N")
    backbone_weights: str | None = option(
        None, "a backbone converted with `python -m convert keras_to_flax`, or 'none' to train from scratch",
        metavar="FILE|none", required=True, instead="init_from")
    init_from: str | None = option(
        None, "start from a classifier file instead of a backbone: train.py's final.msgpack (e.g. the first stage "
              "of a fine-tune in stages) or a Keras classifier converted with `python -m convert keras_to_flax`; "
              "its backbone, head and BN statistics, with a fresh optimizer from step 0; its head must fit the "
              "run (classes, head kind, hidden width)", metavar="FILE")
    init_from_md5: str | None = option(None, "md5 of the init_from file, recorded by the run", derived=True)
    dataset: str = option("cifar100", DATASET_FORMS, metavar="SPEC")
    data_dir: str | None = option(None, "tfds data folder (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)",
                                  resumable=True)
    epochs: int = option(15, "training epochs in all (a resumed run continues up to it)", check=_positive,
                         metavar="N", resumable=True)
    feature_cache: str = option(
        "auto", "auto: when the backbone is frozen, in inference mode and gets unaugmented images (--freeze "
                "backbone --augment none), compute its pooled features of every image once and train and evaluate "
                "the head alone on them (the log says whether it applies, and why not); off: run the backbone "
                "every step", choices=FEATURE_CACHE, resumable=True)
    input_pipeline: str = option(
        "auto", "memory: decode the whole dataset into RAM before the first step; stream: decode each batch's "
                "images when it is needed, in --data-workers processes reading a few batches ahead (memory does not "
                "grow with the dataset; each process decodes only its rows); auto: memory when the decoded images "
                f"fit {MEMORY_BUDGET_FRACTION:.0%} of this machine's memory, else stream (the log says which). "
                "Same batches, same numbers either way", choices=INPUT_PIPELINES, resumable=True)
    data_workers: int | None = option(
        None, "processes decoding the images: each batch with --input-pipeline stream, and a dataset of 10,000 "
              "images or more before the first step with memory; 0 decodes in the training process (default: one "
              "per CPU core but one; with several training processes on one machine, give each its share)",
        check=_non_negative_or_none, metavar="N", local=True)
    eval_every: int = option(1, "evaluate on the validation split every N epochs and after the last",
                             check=_positive, metavar="N", resumable=True)
    workdir: str | None = option(
        None, "folder of metrics, plots, checkpoints and final.msgpack; rerunning with the same one resumes a "
              "stopped run (default: a new runs/<dataset>-<date>-<time> each time, printed at the start; a "
              "multi-process run needs one folder that all processes share)",
        resumable=True)
    checkpoint_every: int | None = option(
        CHECKPOINT_EVERY, "checkpoint also every N steps within an epoch, besides after every epoch and on "
                          "SIGTERM or Ctrl-C; 'none' for epoch ends only", check=_positive_or_none,
        metavar="STEPS", resumable=True)
    coordinator: str | None = option(
        None, "multi-process run: HOST:PORT of process 0 (every process gives the same), or 'auto' to detect "
              "the cluster (SLURM, Open MPI, TPU pod slice, ...) (default: one process)",
        check=distributed.check_coordinator, metavar="HOST:PORT|auto", local=True)
    coordinator_timeout: int = option(
        distributed.TIMEOUT, "multi-process run: seconds to wait for process 0 to answer and for every process "
                             "to join", check=_positive, metavar="SECONDS", local=True)
    num_processes: int | None = option(None, "multi-process run: the number of processes (with --coordinator)",
                                       check=_positive_or_none, metavar="N", local=True)
    process_id: int | None = option(None, "multi-process run: this process's id, 0 to N-1 (with --coordinator)",
                                    check=_non_negative_or_none, metavar="I", local=True)
    compile_cache: str = option(
        compile_cache_lib.DEFAULT, "folder of the persistent XLA compilation cache, or 'off' (default: 'default', "
                                   "which is $XDG_CACHE_HOME/flaxresnet/jax-compilation-cache, else "
                                   "~/.cache/flaxresnet/jax-compilation-cache)",
        check=compile_cache_lib.check, metavar=f"DIR|{compile_cache_lib.OFF}", local=True)

    def __post_init__(self) -> None:
        # A list from JSON or a command line becomes a tuple, keeping the config hashable.
        object.__setattr__(self, "augment", tuple(self.augment))
        for field in dataclasses.fields(self):
            value, check, choices = getattr(self, field.name), field.metadata["check"], field.metadata["choices"]
            problem = check(value) if check is not None else None
            if problem is None and choices is not None and value not in choices:
                problem = f"{value!r} is not one of {', '.join(map(str, choices))}"
            if problem is not None:
                raise UserError(f"{field.name} {problem}", option=field.name)
        if self.init_from is not None and self.backbone_weights is not None:
            raise both_starts()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field but the local ones (tuples become lists): what the run saves."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self) if not f.metadata["local"]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """The Config of `to_dict` output (or a hand-written subset); unknown keys are a UserError."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"unknown config field(s) {', '.join(unknown)}: check spelling against "
                            f"flaxresnet.config.Config")
        return cls(**values)
