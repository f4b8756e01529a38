"""The one typed configuration of a fine-tuning run, shared by train.py, the training library and the tests.

Flat and JSON round-trippable (`to_dict` / `from_dict`), so a run's config is saved beside its checkpoints.
Invalid values raise UserError when the Config is built, before any device work starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from flaxresnet import augment as augment_lib
from flaxresnet.errors import UserError
from flaxresnet.models import HEADS, STAGE_BLOCKS

SCHEDULES = ("constant", "cosine")
UPSAMPLE_METHODS = ("nearest", "bilinear")
DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class Config:
    """Fine-tuning settings; the defaults are the seed recipe (CIFAR-100, frozen convs, Adam 1e-3).

    Attributes:
      num_classes: classifier width.
      image_size: side the (e.g. 32 px) images are upsampled to on device; the seed used 256 (three
        UpSampling2D(2) layers on 32 px).
      upsample: 'nearest' (Keras UpSampling2D) or 'bilinear'.
      head, hidden, dropout: 'seed' (GAP -> Dense(hidden, relu) -> Dropout -> BN -> Dense) or 'linear' (GAP ->
        Dense); hidden width and dropout rate of the seed head.
      freeze: 'convs', 'none', 'backbone', 'stages:N' or a regex over '/'-joined parameter paths (freeze.py).
      augment: names from augment.AUGMENTATIONS, applied in this order on the preprocessed native-size image.
      cutout_size: side in pixels of the cutout square.
      learning_rate: peak learning rate of Adam (Keras defaults otherwise: betas 0.9/0.999, epsilon 1e-7).
      schedule: 'constant' or 'cosine' (to zero at the last step), after `warmup` linear warmup steps.
      weight_decay: decoupled (AdamW-style, scaled by the learning rate) on kernels only, not BN or biases.
      label_smoothing: mass spread uniformly over the classes in the cross-entropy targets.
      clip_norm: clip gradients to this global norm (over trainable parameters); None disables clipping.
      dtype: compute dtype; parameters, BN statistics and the loss stay float32 ('float64', which needs 64-bit
        JAX, keeps everything in float64: a mode to verify against a float64 reference, not to train fast).
      batch_size: global batch size, split evenly over all devices.
      depth: ResNet depth of a backbone initialised from scratch (a converted backbone brings its own).
      seed: the one root of all randomness (initialisation, augmentation, dropout).
      backbone_weights: a converted backbone file (`python -m convert keras_to_flax`); None trains from scratch.
      dataset, data_dir: a data.load_dataset spec and the tfds data folder (None: tfds' default); `seed` also
        fixes the data order and any split-off validation part.
      epochs: training epochs in all (a resumed run continues up to it).
      eval_every: evaluate on the validation split every this many epochs, and after the last.
      workdir: folder of metrics, plots, checkpoints and final.msgpack (loop.py); None: a new timestamped one.
    """

    num_classes: int = 100
    image_size: int | None = 256
    upsample: str = "nearest"
    head: str = "seed"
    hidden: int = 256
    dropout: float = 0.25
    freeze: str = "convs"
    augment: tuple[str, ...] = ("random-erasing",)
    cutout_size: int = 8
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    clip_norm: float | None = None
    dtype: str = "float32"
    batch_size: int = 64
    depth: int = 50
    seed: int = 0
    backbone_weights: str | None = None
    dataset: str = "cifar100"
    data_dir: str | None = None
    epochs: int = 15
    eval_every: int = 1
    workdir: str | None = None

    def __post_init__(self) -> None:
        # A list from JSON or a command line becomes a tuple, keeping the config hashable.
        object.__setattr__(self, "augment", tuple(self.augment))
        choices = {"upsample": UPSAMPLE_METHODS, "head": HEADS, "schedule": SCHEDULES, "dtype": DTYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise UserError("dtype float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 in the environment")
        unknown = [a for a in self.augment if a not in augment_lib.AUGMENTATIONS]
        if unknown:
            raise UserError(f"unknown augmentation(s) {', '.join(unknown)}: choose from "
                            f"{', '.join(augment_lib.AUGMENTATIONS)}")
        if self.num_classes < 1 or self.batch_size < 1 or self.hidden < 1 or self.cutout_size < 1:
            raise UserError("num_classes, batch_size, hidden and cutout_size must be positive integers")
        if self.image_size is not None and self.image_size < 1:
            raise UserError(f"image_size must be a positive number of pixels (or None), got {self.image_size}")
        if self.depth not in STAGE_BLOCKS:
            raise UserError(f"depth {self.depth} is not one of {', '.join(map(str, STAGE_BLOCKS))}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.label_smoothing < 1.0:
            raise UserError("dropout and label_smoothing must lie in [0, 1)")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.warmup < 0:
            raise UserError("learning_rate must be positive; weight_decay and warmup non-negative")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise UserError("clip_norm must be positive (or None to disable clipping)")
        if self.epochs < 1 or self.eval_every < 1:
            raise UserError(f"epochs and eval_every must be positive, got {self.epochs} and {self.eval_every}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """The Config of `to_dict` output (or a hand-written subset); unknown keys are a UserError."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"unknown config field(s) {', '.join(unknown)}: check spelling against "
                            f"flaxresnet.config.Config")
        return cls(**values)
